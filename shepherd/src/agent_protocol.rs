//! The host side's state machine of one agent session: which frames the guest agent may send in
//! each state, and what an accepted frame means. The guest is whatever the job's owner put in
//! the VM, so anything outside these rules is a [`ProtocolViolation`], which the shepherd
//! charges to the job, never to the host or the queue.
//!
//! ```text
//! AwaitingHello --Hello--> Spawning --Started--> Running --Exit--> Exited
//!                              |                    |  ^
//!                              +--SpawnFailed,      |  +--Reconnect-- AwaitingReconnect
//!                                 Error--> Failed   +--Error--> Failed
//! ```
//! A session resumed after a restore from a snapshot starts in `AwaitingReconnect`: the job
//! already runs, and the agent's first frame on its new connection must be `Reconnect`.
//! After `Started` only output, the end of stdout/stderr (once each), `Exit` or `Error` are
//! accepted; a `SpawnFailed` then is a violation. The states are plain data (no handles), so a
//! session's position can be recorded with a VM snapshot.

use guest_agent::protocol::{
    BootTimes, Frame, GuestMemoryReport, ReconnectPoint, Rusage, SpawnStage, Stream,
    PROTOCOL_VERSION,
};

/// Where an agent session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SessionState {
    /// Connected; the agent's first frame must be `Hello` with our protocol version.
    AwaitingHello,
    /// Connected to the agent of a restored VM, whose job already runs: its first frame must
    /// be `Reconnect` with our protocol version.
    AwaitingReconnect,
    /// `Hello` received (and `Spawn` sent): `Started`, `SpawnFailed` or `Error` may come.
    Spawning,
    /// The job runs: output, the end of stdout and of stderr, `Exit`, or `Error`.
    Running {
        /// Whether the agent has not yet ended stdout.
        stdout_open: bool,
        /// Whether the agent has not yet ended stderr.
        stderr_open: bool,
    },
    /// `Exit` received: the agent may only close the connection.
    Exited,
    /// The session ended without an exit: the spawn was refused, the agent reported an error,
    /// or it broke the protocol. Nothing more is accepted.
    Failed,
}

impl SessionState {
    /// Whether the job was started in the guest (the agent said `Started`).
    pub fn job_started(self) -> bool {
        matches!(
            self,
            SessionState::AwaitingReconnect | SessionState::Running { .. } | SessionState::Exited
        )
    }

    /// Whether the session is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, SessionState::Exited | SessionState::Failed)
    }

    fn describe(self) -> &'static str {
        match self {
            SessionState::AwaitingHello => "before Hello",
            SessionState::AwaitingReconnect => "before Reconnect",
            SessionState::Spawning => "while the job was being started",
            SessionState::Running { .. } => "while the job ran",
            SessionState::Exited => "after the job's exit",
            SessionState::Failed => "after the session had failed",
        }
    }
}

/// What an accepted frame from the agent means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// The agent is up (timestamps of the guest's boot).
    Hello(BootTimes),
    /// The job runs as this guest pid.
    Started { pid: i32 },
    /// The agent of a restored VM took the session up again, from this point.
    Reconnected(ReconnectPoint),
    /// The guest could not start the job; the session is over.
    SpawnRefused {
        stage: SpawnStage,
        errno: i32,
        message: String,
    },
    /// Job output.
    Output { stream: Stream, data: Vec<u8> },
    /// The job's stdout or stderr ended.
    OutputEnded(Stream),
    /// The job ended (raw wait status and rusage as the guest reports them).
    Exited {
        wait_status: i32,
        rusage: Rusage,
        memory: GuestMemoryReport,
    },
    /// The agent reported a fatal problem; the session is over.
    AgentFailed { message: String },
}

/// A frame the agent was not allowed to send in its state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("the guest agent broke the protocol: {what} {}", .state.describe())]
pub struct ProtocolViolation {
    /// The state the session was in when the frame came.
    pub state: SessionState,
    /// What came, in the host's words (never the guest's text).
    pub what: String,
}

/// The frame's kind, for messages: never its contents, which the guest chose.
fn kind(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello { .. } => "Hello",
        Frame::Spawn(_) => "Spawn",
        Frame::Filesystems(_) => "Filesystems",
        Frame::Network(_) => "Network",
        Frame::Started { .. } => "Started",
        Frame::SpawnFailed { .. } => "SpawnFailed",
        Frame::Stdin(_) => "Stdin",
        Frame::Stdout(_) => "Stdout",
        Frame::Stderr(_) => "Stderr",
        Frame::Eof(Stream::Stdin) => "Eof(stdin)",
        Frame::Eof(Stream::Stdout) => "Eof(stdout)",
        Frame::Eof(Stream::Stderr) => "Eof(stderr)",
        Frame::Signal { .. } => "Signal",
        Frame::Exit { .. } => "Exit",
        Frame::Ack => "Ack",
        Frame::Error { .. } => "Error",
        Frame::OutputAck { .. } => "OutputAck",
        Frame::Reconnect(_) => "Reconnect",
        Frame::Resume { .. } => "Resume",
    }
}

impl SessionState {
    /// Takes the agent's next frame: the new state and what the frame means, or the violation
    /// (the session is then [`SessionState::Failed`]).
    pub fn accept(&mut self, frame: Frame) -> Result<AgentEvent, ProtocolViolation> {
        let before = *self;
        let refuse = |what: String| ProtocolViolation {
            state: before,
            what,
        };
        // Failed until a rule below accepts the frame.
        *self = SessionState::Failed;
        let (next, event) = match (before, frame) {
            (SessionState::AwaitingHello, Frame::Hello { version, boot }) => {
                if version != PROTOCOL_VERSION {
                    return Err(refuse(format!(
                        "Hello for protocol version {version} (this shepherd speaks \
                         {PROTOCOL_VERSION})"
                    )));
                }
                (SessionState::Spawning, AgentEvent::Hello(boot))
            }
            (SessionState::AwaitingReconnect, Frame::Reconnect(point)) => {
                if point.version != PROTOCOL_VERSION {
                    return Err(refuse(format!(
                        "Reconnect for protocol version {} (this shepherd speaks \
                         {PROTOCOL_VERSION})",
                        point.version
                    )));
                }
                (
                    SessionState::Running {
                        stdout_open: true,
                        stderr_open: true,
                    },
                    AgentEvent::Reconnected(point),
                )
            }
            (SessionState::Spawning, Frame::Started { pid }) if pid > 0 => (
                SessionState::Running {
                    stdout_open: true,
                    stderr_open: true,
                },
                AgentEvent::Started { pid },
            ),
            (SessionState::Spawning, Frame::Started { pid }) => {
                return Err(refuse(format!("Started with pid {pid}")))
            }
            (
                SessionState::Spawning,
                Frame::SpawnFailed {
                    stage,
                    errno,
                    message,
                },
            ) => (
                SessionState::Failed,
                AgentEvent::SpawnRefused {
                    stage,
                    errno,
                    message,
                },
            ),
            (
                SessionState::Running {
                    stdout_open: true,
                    stderr_open,
                },
                Frame::Stdout(data),
            ) => (
                SessionState::Running {
                    stdout_open: true,
                    stderr_open,
                },
                AgentEvent::Output {
                    stream: Stream::Stdout,
                    data,
                },
            ),
            (
                SessionState::Running {
                    stdout_open,
                    stderr_open: true,
                },
                Frame::Stderr(data),
            ) => (
                SessionState::Running {
                    stdout_open,
                    stderr_open: true,
                },
                AgentEvent::Output {
                    stream: Stream::Stderr,
                    data,
                },
            ),
            (
                SessionState::Running {
                    stdout_open: true,
                    stderr_open,
                },
                Frame::Eof(Stream::Stdout),
            ) => (
                SessionState::Running {
                    stdout_open: false,
                    stderr_open,
                },
                AgentEvent::OutputEnded(Stream::Stdout),
            ),
            (
                SessionState::Running {
                    stdout_open,
                    stderr_open: true,
                },
                Frame::Eof(Stream::Stderr),
            ) => (
                SessionState::Running {
                    stdout_open,
                    stderr_open: false,
                },
                AgentEvent::OutputEnded(Stream::Stderr),
            ),
            // The agent reports the exit even when some output pipe stayed open past its
            // drain deadline (something of the job outlived it): the output just ends there.
            (
                SessionState::Running { .. },
                Frame::Exit {
                    wait_status,
                    rusage,
                    memory,
                },
            ) => (
                SessionState::Exited,
                AgentEvent::Exited {
                    wait_status,
                    rusage,
                    memory,
                },
            ),
            (SessionState::Spawning | SessionState::Running { .. }, Frame::Error { message }) => {
                (SessionState::Failed, AgentEvent::AgentFailed { message })
            }
            (_, frame) => return Err(refuse(kind(&frame).to_string())),
        };
        *self = next;
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> Frame {
        Frame::Hello {
            version: PROTOCOL_VERSION,
            boot: BootTimes::default(),
        }
    }

    fn spawn_failed() -> Frame {
        Frame::SpawnFailed {
            stage: SpawnStage::Credentials,
            errno: libc::EPERM,
            message: "forged".into(),
        }
    }

    fn exit() -> Frame {
        Frame::Exit {
            wait_status: 0,
            rusage: Rusage::default(),
            memory: Default::default(),
        }
    }

    fn run(frames: Vec<Frame>) -> (SessionState, Vec<Result<AgentEvent, ProtocolViolation>>) {
        let mut state = SessionState::AwaitingHello;
        let results = frames.into_iter().map(|f| state.accept(f)).collect();
        (state, results)
    }

    #[test]
    fn a_well_behaved_session_is_accepted() {
        let (state, results) = run(vec![
            hello(),
            Frame::Started { pid: 7 },
            Frame::Stdout(b"out".to_vec()),
            Frame::Stderr(b"err".to_vec()),
            Frame::Eof(Stream::Stdout),
            Frame::Stderr(b"more".to_vec()),
            Frame::Eof(Stream::Stderr),
            exit(),
        ]);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(state, SessionState::Exited);
        assert_eq!(results[1], Ok(AgentEvent::Started { pid: 7 }));
    }

    #[test]
    fn a_spawn_failure_before_started_ends_the_session() {
        let (state, results) = run(vec![hello(), spawn_failed()]);
        assert!(matches!(results[1], Ok(AgentEvent::SpawnRefused { .. })));
        assert_eq!(state, SessionState::Failed);
        assert!(!state.job_started());
    }

    /// Issue 12 item 4: after Started, a SpawnFailed is refused (it used to end the job with a
    /// state execd charges to the queue).
    #[test]
    fn spawn_failed_after_started_is_a_violation() {
        let (state, results) = run(vec![hello(), Frame::Started { pid: 7 }, spawn_failed()]);
        let violation = results[2].clone().unwrap_err();
        assert!(violation.state.job_started());
        assert_eq!(violation.what, "SpawnFailed");
        assert_eq!(state, SessionState::Failed);
    }

    #[test]
    fn out_of_order_frames_are_violations() {
        for frames in [
            vec![Frame::Started { pid: 1 }],
            vec![exit()],
            vec![hello(), hello()],
            vec![hello(), exit()],
            vec![hello(), Frame::Stdout(vec![1])],
            vec![hello(), Frame::Started { pid: 0 }],
            vec![
                hello(),
                Frame::Started { pid: 3 },
                Frame::Started { pid: 3 },
            ],
            vec![hello(), Frame::Started { pid: 3 }, Frame::Ack],
            vec![hello(), Frame::Started { pid: 3 }, Frame::Stdin(vec![])],
            vec![
                hello(),
                Frame::Started { pid: 3 },
                Frame::Eof(Stream::Stdout),
                Frame::Stdout(vec![1]),
            ],
            vec![hello(), Frame::Started { pid: 3 }, exit(), exit()],
            vec![Frame::Hello {
                version: PROTOCOL_VERSION + 1,
                boot: BootTimes::default(),
            }],
        ] {
            let (state, results) = run(frames.clone());
            assert!(results.last().unwrap().is_err(), "{frames:?}: {results:?}");
            assert_eq!(state, SessionState::Failed, "{frames:?}");
        }
    }

    /// Issue 14: a restored VM's agent takes the session up with Reconnect, and only with it;
    /// then the job's frames flow as before. Reconnect is refused anywhere else.
    #[test]
    fn a_restored_session_starts_with_reconnect_only() {
        let reconnect = Frame::Reconnect(ReconnectPoint {
            version: PROTOCOL_VERSION,
            stdout_sent: 10,
            ..ReconnectPoint::default()
        });
        let mut state = SessionState::AwaitingReconnect;
        assert!(matches!(
            state.accept(reconnect.clone()),
            Ok(AgentEvent::Reconnected(p)) if p.stdout_sent == 10
        ));
        assert!(state.job_started());
        for frame in [
            Frame::Stdout(b"x".to_vec()),
            Frame::Eof(Stream::Stdout),
            exit(),
        ] {
            assert!(state.accept(frame).is_ok());
        }
        assert_eq!(state, SessionState::Exited);

        for frames in [
            vec![hello()],
            vec![Frame::Stdout(vec![1])],
            vec![Frame::Reconnect(ReconnectPoint {
                version: PROTOCOL_VERSION - 1,
                ..ReconnectPoint::default()
            })],
        ] {
            let mut state = SessionState::AwaitingReconnect;
            let results: Vec<_> = frames.into_iter().map(|f| state.accept(f)).collect();
            assert!(results.last().unwrap().is_err(), "{results:?}");
        }
        let (state, results) = run(vec![hello(), Frame::Started { pid: 3 }, reconnect]);
        assert!(results[2].is_err(), "Reconnect on a live session");
        assert_eq!(state, SessionState::Failed);
    }

    #[test]
    fn violation_messages_carry_no_guest_text() {
        let mut state = SessionState::Running {
            stdout_open: true,
            stderr_open: true,
        };
        let v = state
            .accept(Frame::SpawnFailed {
                stage: SpawnStage::Other,
                errno: 1,
                message: "\nforged trace line".into(),
            })
            .unwrap_err();
        assert_eq!(
            v.to_string(),
            "the guest agent broke the protocol: SpawnFailed while the job ran"
        );
    }

    fn any_stream() -> impl Strategy<Value = Stream> {
        prop_oneof![
            Just(Stream::Stdin),
            Just(Stream::Stdout),
            Just(Stream::Stderr)
        ]
    }

    fn any_stage() -> impl Strategy<Value = SpawnStage> {
        proptest::sample::select(SpawnStage::ALL.to_vec())
    }

    /// Every frame a guest could send (host-only frames included: a hostile agent may).
    fn any_frame() -> impl Strategy<Value = Frame> {
        let bytes = proptest::collection::vec(any::<u8>(), 0..8);
        prop_oneof![
            (PROTOCOL_VERSION - 1..=PROTOCOL_VERSION + 1).prop_map(|version| Frame::Hello {
                version,
                boot: BootTimes::default()
            }),
            any::<i32>().prop_map(|pid| Frame::Started { pid }),
            (any_stage(), any::<i32>()).prop_map(|(stage, errno)| Frame::SpawnFailed {
                stage,
                errno,
                message: "x".into()
            }),
            bytes.clone().prop_map(Frame::Stdout),
            bytes.clone().prop_map(Frame::Stderr),
            bytes.prop_map(Frame::Stdin),
            any_stream().prop_map(Frame::Eof),
            any::<i32>().prop_map(|wait_status| Frame::Exit {
                wait_status,
                rusage: Rusage::default(),
                memory: GuestMemoryReport::default()
            }),
            any::<i32>().prop_map(|signo| Frame::Signal { signo }),
            Just(Frame::Ack),
            Just(Frame::Error {
                message: "e".into()
            }),
            (any_stream(), any::<u64>())
                .prop_map(|(stream, offset)| Frame::OutputAck { stream, offset }),
            (PROTOCOL_VERSION - 1..=PROTOCOL_VERSION + 1, any::<u64>()).prop_map(
                |(version, sent)| Frame::Reconnect(ReconnectPoint {
                    version,
                    stdout_sent: sent,
                    ..ReconnectPoint::default()
                })
            ),
            (any::<u64>(), any::<u64>())
                .prop_map(|(stdout, stderr)| Frame::Resume { stdout, stderr }),
        ]
    }

    proptest! {
        /// Random frame sequences never panic; once the job started, no frame yields a spawn
        /// refusal; nothing is accepted after the session ended; and every violation leaves the
        /// session failed.
        #[test]
        fn random_sequences_follow_the_rules(frames in proptest::collection::vec(any_frame(), 0..24)) {
            let mut state = SessionState::AwaitingHello;
            for frame in frames {
                let before = state;
                let result = state.accept(frame);
                if before.is_terminal() {
                    prop_assert!(result.is_err());
                }
                match result {
                    Ok(AgentEvent::SpawnRefused { .. }) => {
                        prop_assert_eq!(before, SessionState::Spawning);
                        prop_assert_eq!(state, SessionState::Failed);
                    }
                    Ok(AgentEvent::Started { .. }) => prop_assert!(state.job_started()),
                    Ok(_) => {}
                    Err(v) => {
                        prop_assert_eq!(v.state, before);
                        prop_assert_eq!(state, SessionState::Failed);
                    }
                }
                if before.job_started() {
                    prop_assert!(state.job_started() || state == SessionState::Failed);
                }
            }
        }
    }
}
