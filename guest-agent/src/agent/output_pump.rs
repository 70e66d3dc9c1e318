//! Copies one of the job's output pipes into Stdout/Stderr frames, then sends Eof.
//!
//! Backpressure is end to end: when the host stops reading, the frame write blocks, this pump
//! stops reading the pipe, the pipe fills and the job blocks in `write`. Nothing is buffered
//! without bound.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::sync::mpsc::Sender;

use super::event::Event;
use super::shared_writer::SharedWriter;
use crate::protocol::{Frame, Stream, MAX_DATA_CHUNK};

/// Pumps `pipe` until EOF, then reports [`Event::OutputClosed`].
pub fn pump(mut pipe: File, stream: Stream, writer: SharedWriter, events: Sender<Event>) {
    let mut buf = vec![0u8; MAX_DATA_CHUNK];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let data = buf[..n].to_vec();
                let frame = match stream {
                    Stream::Stderr => Frame::Stderr(data),
                    _ => Frame::Stdout(data),
                };
                if writer.send(&frame).is_err() {
                    // The host is gone; the reader side reports it. Keep draining so the job
                    // is not blocked on a full pipe while it is being killed.
                    continue;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = writer.send(&Frame::Eof(stream));
    let _ = events.send(Event::OutputClosed);
}
