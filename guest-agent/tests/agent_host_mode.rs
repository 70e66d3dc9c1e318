//! The agent's job logic, run as an ordinary host process over a Unix socket (the same code
//! paths as PID 1 in the guest, minus mounting and ending the VM), driven frame by frame.

use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command};
use std::time::Duration;

use guest_agent::protocol::*;

struct Session {
    agent: Child,
    reader: FrameReader<UnixStream>,
    writer: FrameWriter<UnixStream>,
    /// Still listening: an agent that loses its connection connects again here.
    listener: UnixListener,
    _dir: TempDir,
}

/// A minimal temporary directory (no extra dev-dependency for one use).
struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(argv: &[&str], stdin: StdinMode) -> Session {
    let dir = std::env::temp_dir().join(format!(
        "agent-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let agent = Command::new(env!("CARGO_BIN_EXE_sge-vm-agent"))
        .arg("--unix")
        .arg(&sock)
        .spawn()
        .unwrap();
    let (stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut reader = FrameReader::new(stream.try_clone().unwrap());
    let mut writer = FrameWriter::new(stream);
    match reader.read_frame().unwrap() {
        Some(Frame::Hello { version, .. }) => assert_eq!(version, PROTOCOL_VERSION),
        other => panic!("expected Hello, got {other:?}"),
    }
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    writer
        .write_frame(&Frame::Spawn(Spawn {
            argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
            env: vec![b"PATH=/usr/bin:/bin".to_vec()],
            cwd: std::env::temp_dir().as_os_str().as_encoded_bytes().to_vec(),
            uid,
            gid,
            groups: vec![],
            rlimits: vec![],
            nice: 0,
            stdin,
        }))
        .unwrap();
    Session {
        agent,
        reader,
        writer,
        listener,
        _dir: TempDir(dir),
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

#[derive(Default, Debug)]
struct Collected {
    started: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    eofs: usize,
    exit: Option<(i32, Rusage)>,
    spawn_failed: Option<(SpawnStage, i32, String)>,
}

fn ack(writer: &mut FrameWriter<UnixStream>, stream: Stream, offset: usize) {
    // The agent may be gone already (a test of its end); the test's own checks say so.
    let _ = writer.write_frame(&Frame::OutputAck {
        stream,
        offset: offset as u64,
    });
}

/// Reads frames until Exit (then acks) or SpawnFailed.
fn collect(s: &mut Session, mut on_started: impl FnMut(&mut FrameWriter<UnixStream>)) -> Collected {
    let mut c = Collected::default();
    loop {
        match s.reader.read_frame().unwrap() {
            Some(Frame::Started { pid }) => {
                assert!(pid > 0);
                c.started = true;
                on_started(&mut s.writer);
            }
            // Acknowledged as the shepherd does once written, so the agent forgets it.
            Some(Frame::Stdout(d)) => {
                c.stdout.extend_from_slice(&d);
                ack(&mut s.writer, Stream::Stdout, c.stdout.len());
            }
            Some(Frame::Stderr(d)) => {
                c.stderr.extend_from_slice(&d);
                ack(&mut s.writer, Stream::Stderr, c.stderr.len());
            }
            Some(Frame::Eof(_)) => c.eofs += 1,
            Some(Frame::Exit {
                wait_status,
                rusage,
                memory,
            }) => {
                assert_eq!(c.eofs, 2, "both output streams end before Exit");
                // host mode: the host's own memory, read as the guest's would be
                assert!(memory.total_kib > 0, "{memory:?}");
                c.exit = Some((wait_status, rusage));
                s.writer.write_frame(&Frame::Ack).unwrap();
                break;
            }
            Some(Frame::SpawnFailed {
                stage,
                errno,
                message,
            }) => {
                c.spawn_failed = Some((stage, errno, message));
                // As the shepherd does: no Exit follows, so the host hangs up.
                let _ = s.writer.get_ref().shutdown(std::net::Shutdown::Both);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let status = s.agent.wait().unwrap();
    assert!(status.success(), "agent exit {status}");
    c
}

#[test]
fn exit_code_and_both_streams() {
    let mut s = start(
        &["/bin/sh", "-c", "echo out; echo err >&2; exit 7"],
        StdinMode::Null,
    );
    let c = collect(&mut s, |_| {});
    assert_eq!(c.stdout, b"out\n");
    assert_eq!(c.stderr, b"err\n");
    let (status, _) = c.exit.unwrap();
    assert!(libc::WIFEXITED(status));
    assert_eq!(libc::WEXITSTATUS(status), 7);
}

#[test]
fn killed_by_signal_reports_raw_status() {
    let mut s = start(&["/bin/sh", "-c", "kill -TERM $$"], StdinMode::Null);
    let (status, _) = collect(&mut s, |_| {}).exit.unwrap();
    assert!(libc::WIFSIGNALED(status));
    assert_eq!(libc::WTERMSIG(status), libc::SIGTERM);
}

#[test]
fn stdin_frames_reach_the_job() {
    let mut s = start(&["cat"], StdinMode::Frames);
    let c = collect(&mut s, |w| {
        w.write_frame(&Frame::Stdin(b"abc".to_vec())).unwrap();
        w.write_frame(&Frame::Eof(Stream::Stdin)).unwrap();
    });
    assert_eq!(c.stdout, b"abc");
    assert_eq!(libc::WEXITSTATUS(c.exit.unwrap().0), 0);
}

#[test]
fn large_output_arrives_intact_including_last_bytes() {
    // 8 MiB of a known pattern, then a marker written right before exit.
    let script = "head -c 8388608 /dev/zero | tr '\\0' 'x'; printf END";
    let mut s = start(&["/bin/sh", "-c", script], StdinMode::Null);
    let c = collect(&mut s, |_| {});
    assert_eq!(c.stdout.len(), 8 * 1024 * 1024 + 3);
    assert!(c.stdout[..8 * 1024 * 1024].iter().all(|&b| b == b'x'));
    assert!(c.stdout.ends_with(b"END"));
}

#[test]
fn signals_reach_the_whole_process_group() {
    // The job and a grandchild both trap USR1 and report it; then TERM ends them.
    let dir = std::env::temp_dir().join(format!("agent-sig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("log");
    let script = format!(
        "trap 'echo parent-usr1 >> {log}' USR1; \
         (trap 'echo child-usr1 >> {log}; exit 0' USR1; echo ready-child >> {log}; while :; do sleep 0.05; done) & \
         echo ready >&2; while :; do sleep 0.05; done",
        log = log.display()
    );
    let mut s = start(&["/bin/sh", "-c", &script], StdinMode::Null);
    let mut c = Collected::default();
    loop {
        match s.reader.read_frame().unwrap() {
            Some(Frame::Started { .. }) => c.started = true,
            Some(Frame::Stderr(d)) => {
                c.stderr.extend_from_slice(&d);
                if c.stderr.ends_with(b"ready\n") {
                    // Wait for the grandchild's trap to be installed too.
                    for _ in 0..200 {
                        if std::fs::read_to_string(&log)
                            .unwrap_or_default()
                            .contains("ready-child")
                        {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    s.writer
                        .write_frame(&Frame::Signal {
                            signo: libc::SIGUSR1,
                        })
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(300));
                    s.writer
                        .write_frame(&Frame::Signal {
                            signo: libc::SIGTERM,
                        })
                        .unwrap();
                }
            }
            Some(Frame::Eof(_)) => {}
            Some(Frame::Exit { wait_status, .. }) => {
                s.writer.write_frame(&Frame::Ack).unwrap();
                assert!(libc::WIFSIGNALED(wait_status));
                assert_eq!(libc::WTERMSIG(wait_status), libc::SIGTERM);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    s.agent.wait().unwrap();
    let got = std::fs::read_to_string(&log).unwrap();
    assert!(got.contains("parent-usr1"), "{got}");
    assert!(got.contains("child-usr1"), "{got}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn orphans_are_killed_and_reaped_when_the_job_ends() {
    let mut s = start(
        &[
            "/bin/sh",
            "-c",
            "for i in $(seq 100); do sleep 600 & done; echo $$",
        ],
        StdinMode::Null,
    );
    let c = collect(&mut s, |_| {});
    let pgid: i32 = String::from_utf8_lossy(&c.stdout).trim().parse().unwrap();
    // SAFETY: kill with signal 0 only checks for existence.
    let alive = unsafe { libc::kill(-pgid, 0) };
    assert_eq!(alive, -1, "no process of the job's group survives");
}

#[test]
fn spawn_failures_name_the_step() {
    let mut s = start(&["/nonexistent/program"], StdinMode::Null);
    let (stage, errno, message) = collect(&mut s, |_| {}).spawn_failed.unwrap();
    assert_eq!(stage, SpawnStage::Exec);
    assert_eq!(errno, libc::ENOENT);
    assert!(message.contains("/nonexistent/program"), "{message}");
}

/// Breaks the session's connection (as a restored VM's vsock reset does) and takes the
/// agent's new one.
fn break_and_accept_again(s: &mut Session) {
    s.writer
        .get_ref()
        .shutdown(std::net::Shutdown::Both)
        .unwrap();
    let (stream, _) = s.listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    s.reader = FrameReader::new(stream.try_clone().unwrap());
    s.writer = FrameWriter::new(stream);
}

/// The lines `1\n` to `{n}\n`, as `seq` prints them.
fn counter(n: usize) -> Vec<u8> {
    (1..=n)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect()
}

/// Protocol 7 (issue 14): a connection lost while the job runs (as a restored VM's vsock
/// reset does) is replaced: the agent connects again, the host resumes at the bytes it has,
/// and the stream continues with no gap and no duplicate; the job's exit status comes through.
/// Here the host has written (and acknowledged) part of what it received and lost the rest.
#[test]
fn a_lost_connection_resumes_at_the_hosts_offset() {
    let script = "i=1; while [ $i -le 400 ]; do echo $i; i=$((i+1)); sleep 0.002; done; \
                  echo done >&2; exit 7";
    let mut s = start(&["/bin/sh", "-c", script], StdinMode::Null);
    let mut out = Vec::new();
    while out.len() < 200 {
        match s.reader.read_frame().unwrap() {
            Some(Frame::Started { .. }) => {}
            Some(Frame::Stdout(d)) => {
                out.extend_from_slice(&d);
                if out.len() < 100 {
                    ack(&mut s.writer, Stream::Stdout, out.len());
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Acknowledged: at most what was written while under 100 bytes. Kept: more than that.
    let written = out.len() - 30;
    out.truncate(written);
    break_and_accept_again(&mut s);
    match s.reader.read_frame().unwrap() {
        Some(Frame::Reconnect(point)) => {
            assert_eq!(point.version, PROTOCOL_VERSION);
            assert!(point.stdout_sent >= 200, "{point:?}");
            assert!(!point.stdin_ended, "stdin is /dev/null, never the host's");
        }
        other => panic!("expected Reconnect, got {other:?}"),
    }
    s.writer
        .write_frame(&Frame::Resume {
            stdout: written as u64,
            stderr: 0,
        })
        .unwrap();
    let mut c = collect(&mut s, |_| {});
    out.append(&mut c.stdout);
    assert_eq!(out, counter(400), "no gap, no duplicate");
    assert_eq!(c.stderr, b"done\n");
    assert_eq!(libc::WEXITSTATUS(c.exit.unwrap().0), 7);
}

/// A host that resumes at an offset the agent no longer has (it acknowledged more) cannot get
/// the stream back whole: the agent says so and ends the job rather than leave a gap.
#[test]
fn a_resume_before_the_acknowledged_offset_is_refused() {
    let mut s = start(
        &["/bin/sh", "-c", "echo $$; exec sleep 600"],
        StdinMode::Null,
    );
    let mut pid = None;
    let mut got = 0;
    while pid.is_none() {
        if let Some(Frame::Stdout(d)) = s.reader.read_frame().unwrap() {
            got += d.len();
            pid = String::from_utf8_lossy(&d).trim().parse::<i32>().ok();
        }
    }
    ack(&mut s.writer, Stream::Stdout, got);
    std::thread::sleep(Duration::from_millis(100));
    break_and_accept_again(&mut s);
    assert!(matches!(
        s.reader.read_frame(),
        Ok(Some(Frame::Reconnect(_)))
    ));
    s.writer
        .write_frame(&Frame::Resume {
            stdout: 0,
            stderr: 0,
        })
        .unwrap();
    match s.reader.read_frame() {
        Ok(Some(Frame::Error { message })) => {
            assert!(message.contains("cannot serve"), "{message}")
        }
        other => panic!("expected Error, got {other:?}"),
    }
    assert!(!s.agent.wait().unwrap().success());
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: kill with signal 0 only checks for existence.
        unsafe { libc::kill(pid.unwrap(), 0) == -1 }
    });
    assert!(gone, "job process {} still exists", pid.unwrap());
}

#[test]
fn host_vanishing_kills_the_job() {
    let mut s = start(&["/bin/sh", "-c", "echo $$; sleep 600"], StdinMode::Null);
    let mut pid = None;
    while pid.is_none() {
        if let Some(Frame::Stdout(d)) = s.reader.read_frame().unwrap() {
            pid = String::from_utf8_lossy(&d).trim().parse::<i32>().ok();
        }
    }
    // The host ends the session: its listener goes too, so the agent cannot connect again.
    drop(s.listener);
    drop(s.writer);
    drop(s.reader);
    let status = s.agent.wait().unwrap();
    assert!(!status.success(), "the agent reports the lost host");
    // The job is killed and reaped (a zombie would still answer kill 0).
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: kill with signal 0 only checks for existence.
        unsafe { libc::kill(pid.unwrap(), 0) == -1 }
    });
    assert!(gone, "job process {} still exists", pid.unwrap());
}

/// Protocol 4: the host's Eof for stdout says it can no longer write the job's stdout file (a
/// full quota, the file-size limit): the agent closes the pipe, so the job's next write fails
/// as its write to that file would have failed on the host; the job goes on and ends normally.
#[test]
fn a_stream_the_host_refuses_fails_the_jobs_later_writes() {
    let script = "trap '' PIPE; i=0; while [ $i -lt 500 ]; do \
                  echo line || { echo write-failed >&2; exit 3; }; i=$((i+1)); sleep 0.01; done; \
                  exit 0";
    let mut s = start(&["/bin/sh", "-c", script], StdinMode::Null);
    let mut c = Collected::default();
    let mut refused = false;
    loop {
        match s.reader.read_frame().unwrap() {
            Some(Frame::Started { .. }) => c.started = true,
            Some(Frame::Stdout(d)) => {
                c.stdout.extend_from_slice(&d);
                if !refused {
                    s.writer.write_frame(&Frame::Eof(Stream::Stdout)).unwrap();
                    refused = true;
                }
            }
            Some(Frame::Stderr(d)) => c.stderr.extend_from_slice(&d),
            Some(Frame::Eof(_)) => c.eofs += 1,
            Some(Frame::Exit { wait_status, .. }) => {
                assert_eq!(c.eofs, 2);
                c.exit = Some((wait_status, Rusage::default()));
                s.writer.write_frame(&Frame::Ack).unwrap();
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(s.agent.wait().unwrap().success());
    let (status, _) = c.exit.unwrap();
    assert_eq!(libc::WEXITSTATUS(status), 3, "stderr: {:?}", c.stderr);
    assert!(c.stderr.ends_with(b"write-failed\n"), "{:?}", c.stderr);
    // far fewer than the 500 lines the job would have written
    assert!(c.stdout.len() < 100 * 5, "{} bytes", c.stdout.len());
}
