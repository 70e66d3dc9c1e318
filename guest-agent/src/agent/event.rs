//! What the agent's worker threads report to its main loop.

use crate::protocol::Rusage;

#[derive(Debug)]
pub enum Event {
    /// The job's top process ended (raw wait status and its rusage).
    JobExited { wait_status: i32, rusage: Rusage },
    /// An output pipe reached EOF and its Eof frame was sent.
    OutputClosed,
    /// The host acknowledged our Exit.
    Acked,
    /// Connection `generation` ended (closed or broken) without the host saying why: the
    /// agent tries a new one.
    ConnectionLost { generation: u64, why: String },
    /// The host sent garbage or an Error frame, or could not be reached again.
    HostGone(String),
}
