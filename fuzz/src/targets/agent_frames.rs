//! Target `agent_frames`: the agent protocol as the shepherd reads it from the guest — a byte
//! stream cut into reads of input-chosen sizes, through [`FrameReader`] (length prefix, bound,
//! body) and the codec's [`decode_body`]. Properties: no panic, no allocation beyond the frame
//! bound, and every frame that decodes re-encodes to bytes that decode to the same frame.

use std::io::Read;

use guest_agent::protocol::{
    decode_body, encode, BootTimes, Frame, FrameReader, Rusage, SpawnStage, Stream, MAX_FRAME_LEN,
    PROTOCOL_VERSION,
};

use crate::input::ByteCursor;

/// A reader that hands out its bytes in reads of at most `chunk` bytes, as a socket may.
struct ChoppedReader<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for ChoppedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Checks that `frame` survives encoding and decoding unchanged.
fn assert_round_trip(frame: &Frame) {
    let bytes = match encode(frame) {
        Ok(bytes) => bytes,
        // Only a body over the bound is refused, and a decoded frame was within it.
        Err(e) => panic!("a decoded frame does not encode: {e}: {frame:?}"),
    };
    assert!(bytes.len() - 4 <= MAX_FRAME_LEN);
    let again = decode_body(&bytes[4..]).expect("an encoded frame decodes");
    assert_eq!(&again, frame, "frame changed in a round trip");
}

/// One case: the first byte picks the read size, the rest is the stream from the guest.
pub fn run(data: &[u8]) {
    let mut input = ByteCursor::new(data);
    let chunk = usize::from(input.u8() % 16) + 1;
    let stream = input.rest();
    // The body alone, as the codec sees it.
    if let Ok(frame) = decode_body(stream) {
        assert_round_trip(&frame);
    }
    let mut reader = FrameReader::new(ChoppedReader {
        data: stream,
        chunk,
    });
    while let Ok(Some(frame)) = reader.read_frame() {
        assert_round_trip(&frame);
    }
}

/// Streams the guest sends in a normal job: Hello, Started, output, Eof, Exit; and failures.
pub fn seeds() -> Vec<Vec<u8>> {
    let conversation = [
        Frame::Hello {
            version: PROTOCOL_VERSION,
            boot: BootTimes {
                agent_start_ns: 1_000,
                connected_ns: 2_000,
                agent_start_realtime_ns: 3_000,
            },
        },
        Frame::Started { pid: 42 },
        Frame::Stdout(b"hello\n".to_vec()),
        Frame::Stderr(b"warning\n".to_vec()),
        Frame::Eof(Stream::Stdout),
        Frame::Eof(Stream::Stderr),
        Frame::Exit {
            wait_status: 0x100,
            rusage: Rusage {
                utime_us: 1234,
                maxrss: 5678,
                ..Rusage::default()
            },
            memory: Default::default(),
        },
    ];
    let failure = [
        Frame::SpawnFailed {
            stage: SpawnStage::Exec,
            errno: 2,
            message: "no such file".into(),
        },
        Frame::Error {
            message: "bad frame".into(),
        },
    ];
    let stream = |frames: &[Frame]| -> Vec<u8> {
        let mut out = vec![3u8];
        for f in frames {
            out.extend(encode(f).expect("a small frame encodes"));
        }
        out
    };
    let mut seeds = vec![stream(&conversation), stream(&failure)];
    seeds.extend(conversation.iter().map(|f| stream(std::slice::from_ref(f))));
    seeds
}
