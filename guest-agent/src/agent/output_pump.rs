//! Copies one of the job's output pipes into Stdout/Stderr frames, then sends Eof.
//!
//! Backpressure is end to end: when the host stops reading, the frame write blocks (or, when it
//! stops acknowledging, the kept output reaches its bound), this pump stops reading the pipe,
//! the pipe fills and the job blocks in `write`. Nothing is buffered without bound.
//!
//! When the host says the stream's destination failed (its `Eof` for this stream: a full
//! quota, the job's file-size limit, a reader that went away), the pump closes the pipe, so
//! the job's next write fails as its write to that file would have failed on the host.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use super::event::Event;
use super::host_link::HostLink;
use crate::protocol::{Stream, MAX_DATA_CHUNK};

/// Pumps `pipe` until EOF, or until the host `refused` the stream, then reports
/// [`Event::OutputClosed`].
pub fn pump(
    mut pipe: File,
    stream: Stream,
    link: HostLink,
    refused: Arc<AtomicBool>,
    events: Sender<Event>,
) {
    let mut buf = vec![0u8; MAX_DATA_CHUNK];
    loop {
        let read = pipe.read(&mut buf);
        if refused.load(Ordering::SeqCst) {
            // Closing the pipe's only read end: the job's next write gets EPIPE (SIGPIPE).
            drop(pipe);
            break;
        }
        match read {
            Ok(0) => break,
            // Kept until the host acknowledges it: a lost connection (the reader side reports
            // it) loses nothing.
            Ok(n) => link.send_output(stream, &buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    link.end_output(stream);
    let _ = events.send(Event::OutputClosed);
}
