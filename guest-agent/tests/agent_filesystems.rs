//! The agent's handling of the Filesystems frame and of frames it cannot read, run as an
//! ordinary host process over a Unix socket (it is not PID 1 there, so it must refuse to mount).

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command};
use std::time::Duration;

use guest_agent::protocol::*;

struct Agent {
    child: Child,
    stream: UnixStream,
    reader: FrameReader<UnixStream>,
    dir: std::path::PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the agent and reads its Hello.
fn agent(test: &str) -> Agent {
    let dir = std::env::temp_dir().join(format!("agent-fs-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sge-vm-agent"))
        .arg("--unix")
        .arg(&sock)
        .spawn()
        .unwrap();
    let (stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = FrameReader::new(stream.try_clone().unwrap());
    assert!(matches!(
        reader.read_frame().unwrap(),
        Some(Frame::Hello { version, .. }) if version == PROTOCOL_VERSION
    ));
    Agent {
        child,
        stream,
        reader,
        dir,
    }
}

#[test]
fn outside_a_guest_the_agent_refuses_filesystems_with_a_spawn_failure() {
    let mut a = agent("refuse");
    let fs = Filesystems {
        root: Some(RootImage {
            device: b"/dev/vda".to_vec(),
            fstype: b"ext4".to_vec(),
        }),
        mounts: vec![],
        account: None,
    };
    let mut bytes = encode(&Frame::Filesystems(fs)).unwrap();
    bytes.extend(
        encode(&Frame::Spawn(Spawn {
            argv: vec![b"/bin/true".to_vec()],
            ..Spawn::default()
        }))
        .unwrap(),
    );
    a.stream.write_all(&bytes).unwrap();
    match a.reader.read_frame().unwrap() {
        Some(Frame::SpawnFailed { stage, message, .. }) => {
            assert_eq!(stage, SpawnStage::Filesystems);
            assert!(message.contains("PID 1"), "{message}");
        }
        other => panic!("expected SpawnFailed, got {other:?}"),
    }
    // The agent ends only once the host has closed the connection (having read the failure),
    // so the frame cannot be lost with the VM.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(a.child.try_wait().unwrap().is_none(), "agent ended first");
    a.stream.shutdown(std::net::Shutdown::Both).unwrap();
    // Nothing ran: the agent ends without starting the job.
    assert!(a.child.wait().unwrap().success());
}

#[test]
fn a_frame_the_agent_cannot_read_is_reported_to_the_host() {
    let mut a = agent("garbage");
    // A Filesystems frame cut short: its kind byte and nothing else.
    a.stream.write_all(&[1, 0, 0, 0, 13]).unwrap();
    match a.reader.read_frame().unwrap() {
        Some(Frame::Error { message }) => {
            assert!(
                message.contains("guest agent: frame truncated"),
                "{message}"
            );
        }
        other => panic!("expected Error, got {other:?}"),
    }
}
