//! The relay between two socketpairs: the test holds the device's end of one and passt's end of
//! the other.

use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use crate::virtio::net::egress_filter::tests::{check_refusal, policy, tcp_frame, udp_frame};

const ALLOWED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const ELSEWHERE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

fn prefixed(frame: &[u8]) -> Vec<u8> {
    [&(frame.len() as u32).to_be_bytes()[..], frame].concat()
}

/// The test's two ends: the device's (`guest`) and passt's (`passt`), and the relay's thread.
struct Rig {
    guest: UnixStream,
    passt: UnixStream,
    relay: JoinHandle<Result<RelayReport, NetError>>,
}

impl Rig {
    fn new(policy: EgressPolicy) -> Self {
        Self::with_sndbuf(policy, None)
    }

    /// With `sndbuf` on every end (the test's and the relay's), to make the sockets fill up.
    fn with_sndbuf(policy: EgressPolicy, sndbuf: Option<usize>) -> Self {
        let (guest, relay_guest) = UnixStream::pair().unwrap();
        let (passt, relay_passt) = UnixStream::pair().unwrap();
        if let Some(size) = sndbuf {
            for s in [&guest, &relay_guest, &passt, &relay_passt] {
                nix::sys::socket::setsockopt(s, sockopt::SndBuf, &size).unwrap();
            }
        }
        for s in [&guest, &passt] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        let relay = std::thread::spawn(move || {
            run(
                OwnedFd::from(relay_guest),
                OwnedFd::from(relay_passt),
                &policy,
            )
        });
        Self {
            guest,
            passt,
            relay,
        }
    }

    fn report(self) -> RelayReport {
        let Rig {
            guest,
            passt,
            relay,
        } = self;
        let report = relay.join().unwrap().unwrap();
        drop((guest, passt));
        report
    }
}

fn send(s: &mut UnixStream, frame: &[u8]) {
    s.write_all(&prefixed(frame)).unwrap();
}

/// The next frame on `s`, its prefix checked.
fn receive(s: &mut UnixStream) -> Vec<u8> {
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix).unwrap();
    let mut frame = vec![0u8; u32::from_be_bytes(prefix) as usize];
    s.read_exact(&mut frame).unwrap();
    frame
}

/// Whether `s` has nothing to read now.
fn nothing_waiting(s: &UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let r = (&*s).read(&mut b);
    s.set_nonblocking(false).unwrap();
    matches!(r, Err(e) if e.kind() == ErrorKind::WouldBlock)
}

fn assert_eof(s: &mut UnixStream) {
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0, "end of stream");
}

#[test]
fn allowed_frames_pass_byte_identical_with_their_prefix_both_ways() {
    let mut rig = Rig::new(policy());
    let syn = tcp_frame(ALLOWED, 27000, 77, 0x02, &[]);
    let data = tcp_frame(ALLOWED, 27000, 78, 0x18, &[0xab; 1400]);
    send(&mut rig.guest, &syn);
    send(&mut rig.guest, &data);
    let mut wire = vec![0u8; 8 + syn.len() + data.len()];
    rig.passt.read_exact(&mut wire).unwrap();
    assert_eq!(wire, [prefixed(&syn), prefixed(&data)].concat());
    // passt's frames go to the guest unjudged, even ones the filter would drop.
    let from_passt = [vec![0x5a; 14], vec![0x33; 9000], vec![1, 2, 3]];
    for f in &from_passt {
        send(&mut rig.passt, f);
    }
    let mut wire = vec![0u8; from_passt.iter().map(|f| 4 + f.len()).sum()];
    rig.guest.read_exact(&mut wire).unwrap();
    assert_eq!(
        wire,
        from_passt
            .iter()
            .flat_map(|f| prefixed(f))
            .collect::<Vec<_>>()
    );
    rig.guest.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eof(&mut rig.passt);
    assert_eq!(
        rig.report(),
        RelayReport {
            passed: 2,
            dropped: 0,
            refused: 0,
            refusals_lost: 0,
            to_guest: 3,
            ended_by: RelayEnd::Eof(Side::Guest),
        }
    );
}

#[test]
fn a_refused_connection_gets_its_reply_and_nothing_reaches_passt() {
    let mut rig = Rig::new(policy());
    let syn = tcp_frame(ELSEWHERE, 443, 1000, 0x02, &[]);
    let dgram = udp_frame(ELSEWHERE, 53, b"query");
    let ack = tcp_frame(ELSEWHERE, 443, 1000, 0x10, &[]);
    let mut ipv6 = tcp_frame(ALLOWED, 27000, 1, 0x02, &[]);
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    let allowed = udp_frame(ALLOWED, 27000, b"ok");
    for f in [&syn, &dgram, &ack, &ipv6, &allowed] {
        send(&mut rig.guest, f);
    }
    let rst = receive(&mut rig.guest);
    check_refusal(&syn, &rst).unwrap();
    let unreachable = receive(&mut rig.guest);
    check_refusal(&dgram, &unreachable).unwrap();
    // The first (and only) thing passt gets is the allowed datagram.
    assert_eq!(receive(&mut rig.passt), allowed);
    assert!(nothing_waiting(&rig.passt));
    assert!(nothing_waiting(&rig.guest));
    rig.passt.shutdown(std::net::Shutdown::Both).unwrap();
    let report = rig.report();
    assert_eq!(
        (
            report.passed,
            report.dropped,
            report.refused,
            report.refusals_lost,
            report.to_guest
        ),
        (1, 2, 2, 0, 0)
    );
    assert_eq!(report.ended_by, RelayEnd::Eof(Side::Passt));
}

#[test]
fn passt_closing_ends_the_relay_once_its_frames_are_delivered() {
    let mut rig = Rig::new(policy());
    let frames: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
    for f in &frames {
        send(&mut rig.passt, f);
    }
    rig.passt.shutdown(std::net::Shutdown::Write).unwrap();
    for f in &frames {
        assert_eq!(&receive(&mut rig.guest), f);
    }
    assert_eof(&mut rig.guest);
    let report = rig.report();
    assert_eq!(report.to_guest, 3);
    assert_eq!(report.ended_by, RelayEnd::Eof(Side::Passt));
}

#[test]
fn a_frame_length_passt_never_uses_ends_the_relay() {
    for (from_guest, len) in [
        (true, 0u32),
        (true, MAX_FRAME_LEN as u32 + 1),
        (true, u32::MAX),
        (false, 0),
        (false, u32::MAX),
    ] {
        let mut rig = Rig::new(policy());
        let side = if from_guest { Side::Guest } else { Side::Passt };
        let (writer, other) = if from_guest {
            (&mut rig.guest, &mut rig.passt)
        } else {
            (&mut rig.passt, &mut rig.guest)
        };
        writer.write_all(&len.to_be_bytes()).unwrap();
        writer.write_all(&[0x55; 64]).unwrap();
        assert_eof(other);
        assert_eq!(
            rig.report().ended_by,
            RelayEnd::FrameLength { side, len },
            "{side:?} {len}"
        );
    }
}

#[test]
fn a_side_that_goes_away_mid_frame_ends_the_relay() {
    let mut rig = Rig::new(policy());
    let f = udp_frame(ALLOWED, 27000, &[9; 500]);
    let wire = prefixed(&f);
    rig.guest.write_all(&wire[..200]).unwrap();
    drop(std::mem::replace(
        &mut rig.guest,
        UnixStream::pair().unwrap().0,
    ));
    assert_eof(&mut rig.passt);
    let report = rig.report();
    assert_eq!(report.ended_by, RelayEnd::Eof(Side::Guest));
    assert_eq!(report.passed, 0);
}

#[test]
fn sockets_that_are_not_streams_are_refused() {
    let (d, _e) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let (s, _t) = UnixStream::pair().unwrap();
    let r = run(OwnedFd::from(s), OwnedFd::from(d), &policy());
    assert!(
        matches!(&r, Err(NetError::Config(m)) if m.contains("passt's side")),
        "{r:?}"
    );
    let file = tempfile::tempfile().unwrap();
    let (s, _t) = UnixStream::pair().unwrap();
    let r = run(OwnedFd::from(file), OwnedFd::from(s), &policy());
    assert!(
        matches!(&r, Err(NetError::Config(m)) if m.contains("guest's side")),
        "{r:?}"
    );
}

/// Polls `count` until it has not changed for 300 ms; returns it.
fn settled(count: &AtomicUsize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = count.load(Ordering::SeqCst);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = count.load(Ordering::SeqCst);
        if now == last {
            return now;
        }
        assert!(Instant::now() < deadline, "never settled");
        last = now;
    }
}

/// A thread writing `frames` to `s` (blocking), counting the bytes written.
fn writer(
    mut s: UnixStream,
    frames: Vec<Vec<u8>>,
    count: Arc<AtomicUsize>,
) -> JoinHandle<std::io::Result<()>> {
    std::thread::spawn(move || {
        for f in frames {
            s.write_all(&prefixed(&f))?;
            count.fetch_add(4 + f.len(), Ordering::SeqCst);
        }
        Ok(())
    })
}

#[test]
fn bulk_both_ways_to_slow_readers_is_held_back_not_buffered() {
    const FRAMES: usize = 1500;
    let mut rig = Rig::with_sndbuf(policy(), Some(16 * 1024));
    let out: Vec<Vec<u8>> = (0..FRAMES)
        .map(|i| udp_frame(ALLOWED, 27000, &[(i % 251) as u8; 1400]))
        .collect();
    let back: Vec<Vec<u8>> = (0..FRAMES)
        .map(|i| vec![(i % 253) as u8; 1000 + i % 600])
        .collect();
    let total_out: usize = out.iter().map(|f| 4 + f.len()).sum();
    let total_back: usize = back.iter().map(|f| 4 + f.len()).sum();
    let (out_count, back_count) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let w_out = writer(
        rig.guest.try_clone().unwrap(),
        out.clone(),
        out_count.clone(),
    );
    let w_back = writer(
        rig.passt.try_clone().unwrap(),
        back.clone(),
        back_count.clone(),
    );
    // Nobody reads: both writers stop, each a bounded distance ahead (two socket buffers and
    // one reassembly buffer), far short of what they have to write.
    let ahead_out = settled(&out_count);
    let ahead_back = settled(&back_count);
    let bound = 512 * 1024;
    assert!(
        ahead_out < bound && ahead_out < total_out / 4,
        "{ahead_out} of {total_out}"
    );
    assert!(
        ahead_back < bound && ahead_back < total_back / 4,
        "{ahead_back} of {total_back}"
    );
    assert!(!w_out.is_finished() && !w_back.is_finished());
    // Slow readers, both at once: everything arrives, whole and in order.
    let mut passt = rig.passt.try_clone().unwrap();
    let r_out = std::thread::spawn(move || {
        (0..FRAMES)
            .map(|i| {
                if i % 100 == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
                receive(&mut passt)
            })
            .collect::<Vec<_>>()
    });
    let got_back: Vec<Vec<u8>> = (0..FRAMES)
        .map(|i| {
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            receive(&mut rig.guest)
        })
        .collect();
    assert!(got_back == back, "passt's frames changed on the way");
    assert!(
        r_out.join().unwrap() == out,
        "the guest's frames changed on the way"
    );
    w_out.join().unwrap().unwrap();
    w_back.join().unwrap().unwrap();
    rig.guest.shutdown(std::net::Shutdown::Both).unwrap();
    let report = rig.report();
    assert_eq!(
        (report.passed, report.to_guest, report.ended_by),
        (FRAMES as u64, FRAMES as u64, RelayEnd::Eof(Side::Guest))
    );
}

#[test]
fn refusals_past_the_queue_are_dropped_and_counted() {
    let mut rig = Rig::with_sndbuf(policy(), Some(16 * 1024));
    // The guest reads nothing: passt's frames back up, and the relay stops writing to it.
    let count = Arc::new(AtomicUsize::new(0));
    let flood = writer(
        rig.passt.try_clone().unwrap(),
        vec![vec![0x42; 60_000]; 200],
        count.clone(),
    );
    settled(&count);
    let syns = 100;
    for i in 0..syns {
        send(&mut rig.guest, &tcp_frame(ELSEWHERE, 443, i, 0x02, &[]));
    }
    // Through the same relay, after the refusals: so they were all judged.
    let marker = udp_frame(ALLOWED, 27000, b"after");
    send(&mut rig.guest, &marker);
    assert_eq!(receive(&mut rig.passt), marker);
    rig.guest.shutdown(std::net::Shutdown::Both).unwrap();
    let report = rig.report();
    assert_eq!(
        (report.refused, report.refusals_lost, report.passed),
        (u64::from(syns), u64::from(syns) - REFUSAL_QUEUE as u64, 1)
    );
    assert!(matches!(
        report.ended_by,
        RelayEnd::Eof(Side::Guest)
            | RelayEnd::Io {
                side: Side::Guest,
                ..
            }
    ));
    // The relay closed passt's end: the flood ends in an error.
    assert!(flood.join().unwrap().is_err());
}

const SECCOMP_CHILD: &str = "VMM_RELAY_SECCOMP_CHILD";

/// `run` under a filter of [`RELAY_SYSCALLS`] and what a thread's end needs, anything else
/// killing the process: in a child (this test binary re-executed), which must exit cleanly.
#[test]
fn the_relay_makes_no_system_call_outside_relay_syscalls() {
    if std::env::var_os(SECCOMP_CHILD).is_some() {
        seccomp_child();
        return;
    }
    let name = "virtio::net::filtering_relay::tests::the_relay_makes_no_system_call_outside_relay_syscalls";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(SECCOMP_CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("RELAY-UNDER-SECCOMP-OK"),
        "{:?}\n{stdout}\n{stderr}",
        out.status
    );
}

fn seccomp_child() {
    use std::collections::BTreeMap;
    // What the thread's own end needs (glibc and std: the signal stack, the stack, the
    // joiner's wake-up); the relay's own calls are only RELAY_SYSCALLS.
    let thread_end = [
        libc::SYS_exit,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        libc::SYS_futex,
    ];
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = RELAY_SYSCALLS
        .iter()
        .chain(&thread_end)
        .map(|s| (*s, vec![]))
        .collect();
    let filter: seccompiler::BpfProgram = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::KillProcess,
        seccompiler::SeccompAction::Allow,
        seccompiler::TargetArch::x86_64,
    )
    .unwrap()
    .try_into()
    .unwrap();
    let (mut guest, relay_guest) = UnixStream::pair().unwrap();
    let (mut passt, relay_passt) = UnixStream::pair().unwrap();
    let relay = std::thread::spawn(move || {
        seccompiler::apply_filter(&filter).unwrap();
        // Everything from here on, setup and teardown included, is the relay's.
        run(
            OwnedFd::from(relay_guest),
            OwnedFd::from(relay_passt),
            &policy(),
        )
    });
    let syn = tcp_frame(ELSEWHERE, 443, 1, 0x02, &[]);
    let allowed = tcp_frame(ALLOWED, 27000, 1, 0x02, &[]);
    send(&mut guest, &syn);
    send(&mut guest, &allowed);
    check_refusal(&syn, &receive(&mut guest)).unwrap();
    assert_eq!(receive(&mut passt), allowed);
    send(&mut passt, &[7; 3000]);
    assert_eq!(receive(&mut guest), vec![7; 3000]);
    // A frame in two parts, the second after the relay waited.
    let f = udp_frame(ALLOWED, 27000, &[1; 200]);
    let wire = prefixed(&f);
    guest.write_all(&wire[..50]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    guest.write_all(&wire[50..]).unwrap();
    assert_eq!(receive(&mut passt), f);
    drop(guest);
    let report = relay.join().unwrap().unwrap();
    assert_eq!(
        (
            report.passed,
            report.refused,
            report.to_guest,
            report.ended_by
        ),
        (2, 1, 1, RelayEnd::Eof(Side::Guest))
    );
    println!("RELAY-UNDER-SECCOMP-OK");
}
