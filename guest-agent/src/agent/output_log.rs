//! What the agent keeps of one output stream until the host has written it: the bytes from the
//! host's last acknowledgement on, so that a new connection can carry them again.
//!
//! Offsets count the stream's bytes from its start. The host acknowledges offsets it has
//! written; an acknowledgement of bytes never sent, or a resume point outside what is kept, is
//! the host's error and ends the session (the agent never guesses).

use std::collections::VecDeque;

/// A host offset outside what the agent can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("offset {offset} is outside the bytes kept ({kept_from}..={sent})")]
pub struct OffsetOutOfRange {
    pub offset: u64,
    pub kept_from: u64,
    pub sent: u64,
}

/// One stream's unacknowledged bytes and whether the stream has ended.
#[derive(Debug, Default)]
pub struct OutputLog {
    kept: VecDeque<u8>,
    /// Offset of the first kept byte: everything before it the host has written.
    acked: u64,
    /// The job's pipe reached its end (or the host refused the stream): Eof was sent.
    pub ended: bool,
}

impl OutputLog {
    /// Bytes the stream has produced in all.
    pub fn sent(&self) -> u64 {
        self.acked + self.kept.len() as u64
    }

    /// Bytes kept (not acknowledged yet).
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// Records `data` as sent (before it is written to the connection, so a snapshot taken in
    /// between still finds it here).
    pub fn append(&mut self, data: &[u8]) {
        self.kept.extend(data);
    }

    /// Forgets the bytes before `offset`, which the host has written. An older offset than a
    /// previous one changes nothing.
    pub fn ack(&mut self, offset: u64) -> Result<(), OffsetOutOfRange> {
        self.check(offset.max(self.acked))?;
        if offset > self.acked {
            let n = (offset - self.acked) as usize;
            self.kept.drain(..n);
            self.acked = offset;
        }
        Ok(())
    }

    /// The bytes from `offset` on, for a new connection; the host has everything before it.
    pub fn bytes_after(&self, offset: u64) -> Result<Vec<u8>, OffsetOutOfRange> {
        self.check(offset)?;
        let skip = (offset - self.acked) as usize;
        Ok(self.kept.iter().skip(skip).copied().collect())
    }

    fn check(&self, offset: u64) -> Result<(), OffsetOutOfRange> {
        if offset < self.acked || offset > self.sent() {
            return Err(OffsetOutOfRange {
                offset,
                kept_from: self.acked,
                sent: self.sent(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn acknowledged_bytes_are_forgotten_and_the_rest_served_again() {
        let mut log = OutputLog::default();
        log.append(b"hello ");
        log.append(b"world");
        assert_eq!(log.sent(), 11);
        log.ack(6).unwrap();
        assert_eq!(log.kept(), 5);
        assert_eq!(log.bytes_after(6).unwrap(), b"world");
        assert_eq!(log.bytes_after(8).unwrap(), b"rld");
        assert_eq!(log.bytes_after(11).unwrap(), b"");
        // An older acknowledgement (one overtaken on the wire) changes nothing.
        log.ack(3).unwrap();
        assert_eq!(log.kept(), 5);
    }

    #[test]
    fn offsets_outside_what_is_kept_are_refused() {
        let mut log = OutputLog::default();
        log.append(b"abcdef");
        log.ack(2).unwrap();
        assert!(log.bytes_after(1).is_err(), "already forgotten");
        assert!(log.bytes_after(7).is_err(), "never sent");
        assert!(log.ack(7).is_err(), "never sent");
        assert_eq!(log.kept(), 4, "a refused ack forgets nothing");
    }

    proptest! {
        /// Whatever the acknowledgements, what is served from a valid offset is exactly the
        /// stream's bytes from there.
        #[test]
        fn served_bytes_are_the_stream_from_the_offset(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..20),
            acks in proptest::collection::vec(any::<u16>(), 0..20),
            resume in any::<u16>(),
        ) {
            let mut log = OutputLog::default();
            let mut stream = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                log.append(c);
                stream.extend_from_slice(c);
                if let Some(a) = acks.get(i) {
                    let _ = log.ack(u64::from(*a) % (stream.len() as u64 + 1));
                }
            }
            let offset = u64::from(resume) % (stream.len() as u64 + 1);
            match log.bytes_after(offset) {
                Ok(bytes) => prop_assert_eq!(bytes, stream[offset as usize..].to_vec()),
                Err(e) => prop_assert!(offset < e.kept_from),
            }
        }
    }
}
