//! A cursor that reads a case's choices (integers, byte strings) from the fuzzer's bytes, and
//! yields zeros once they run out, so every input, however short, is a complete case.

/// Reads little-endian integers and byte strings from the front of a case's input.
pub struct ByteCursor<'a>(&'a [u8]);

impl<'a> ByteCursor<'a> {
    /// A cursor over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self(data)
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The next byte (0 when exhausted).
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    /// The next little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// The next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// The next little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// Up to `n` next bytes (fewer when the input runs out).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::ByteCursor;

    #[test]
    fn reads_little_endian_and_pads_with_zeros() {
        let mut c = ByteCursor::new(&[1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(c.u16(), 0x0201);
        assert_eq!(c.bytes(2), &[3, 4]);
        assert_eq!(c.u32(), 0x0007_0605);
        assert!(c.is_empty());
        assert_eq!(c.u64(), 0);
    }
}
