//! Property tests of the wire protocol: every frame survives encode → decode, and no byte
//! sequence makes the decoder panic.

use guest_agent::protocol::*;
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn rusage() -> impl Strategy<Value = Rusage> {
    (
        any::<u64>(),
        any::<u64>(),
        proptest::array::uniform14(any::<i64>()),
    )
        .prop_map(|(u, s, c)| Rusage {
            utime_us: u,
            stime_us: s,
            maxrss: c[0],
            ixrss: c[1],
            idrss: c[2],
            isrss: c[3],
            minflt: c[4],
            majflt: c[5],
            nswap: c[6],
            inblock: c[7],
            oublock: c[8],
            msgsnd: c[9],
            msgrcv: c[10],
            nsignals: c[11],
            nvcsw: c[12],
            nivcsw: c[13],
        })
}

fn spawn() -> impl Strategy<Value = Spawn> {
    (
        proptest::collection::vec(bytes(40), 0..6),
        proptest::collection::vec(bytes(40), 0..6),
        bytes(60),
        any::<u32>(),
        any::<u32>(),
        proptest::collection::vec(any::<u32>(), 0..8),
        proptest::collection::vec((any::<u32>(), any::<u64>(), any::<u64>()), 0..5),
        any::<i32>(),
        any::<bool>(),
    )
        .prop_map(
            |(argv, env, cwd, uid, gid, groups, rl, nice, frames)| Spawn {
                argv,
                env,
                cwd,
                uid,
                gid,
                groups,
                rlimits: rl
                    .into_iter()
                    .map(|(resource, soft, hard)| Rlimit {
                        resource,
                        soft,
                        hard,
                    })
                    .collect(),
                nice,
                stdin: if frames {
                    StdinMode::Frames
                } else {
                    StdinMode::Null
                },
            },
        )
}

fn filesystems() -> impl Strategy<Value = Filesystems> {
    (
        proptest::option::of((bytes(20), bytes(10))),
        proptest::collection::vec((any::<bool>(), bytes(20), bytes(60), any::<bool>()), 0..4),
        proptest::option::of((bytes(60), proptest::collection::vec(bytes(30), 0..4))),
    )
        .prop_map(|(root, mounts, account)| Filesystems {
            root: root.map(|(device, fstype)| RootImage { device, fstype }),
            mounts: mounts
                .into_iter()
                .map(|(virtio_fs, tag, target, read_only)| SharedMount {
                    transport: if virtio_fs {
                        ShareTransport::VirtioFs
                    } else {
                        ShareTransport::NineP
                    },
                    tag,
                    target,
                    read_only,
                })
                .collect(),
            account: account.map(|(passwd, groups)| Account { passwd, groups }),
        })
}

fn network() -> impl Strategy<Value = GuestNetwork> {
    (
        bytes(64),
        proptest::option::of((any::<[u8; 4]>(), 1u8..=32, any::<[u8; 4]>(), any::<u32>())),
        proptest::collection::vec(any::<[u8; 4]>(), 0..4),
        proptest::collection::vec(bytes(30), 0..4),
    )
        .prop_map(|(hostname, ipv4, nameservers, search)| GuestNetwork {
            hostname,
            ipv4: ipv4.map(|(address, prefix_len, gateway, mtu)| Ipv4Interface {
                address,
                prefix_len,
                gateway,
                mtu,
            }),
            nameservers,
            search,
        })
}

fn frame() -> impl Strategy<Value = Frame> {
    let stage = proptest::sample::select(SpawnStage::ALL.to_vec());
    let stream = prop_oneof![
        Just(Stream::Stdin),
        Just(Stream::Stdout),
        Just(Stream::Stderr)
    ];
    prop_oneof![
        (any::<u16>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(v, a, b, c)| {
            Frame::Hello {
                version: v,
                boot: BootTimes {
                    agent_start_ns: a,
                    connected_ns: b,
                    agent_start_realtime_ns: c,
                },
            }
        }),
        spawn().prop_map(Frame::Spawn),
        filesystems().prop_map(Frame::Filesystems),
        network().prop_map(Frame::Network),
        any::<i32>().prop_map(|pid| Frame::Started { pid }),
        (stage, any::<i32>(), ".{0,40}").prop_map(|(stage, errno, message)| Frame::SpawnFailed {
            stage,
            errno,
            message
        }),
        bytes(300).prop_map(Frame::Stdin),
        bytes(300).prop_map(Frame::Stdout),
        bytes(300).prop_map(Frame::Stderr),
        stream.clone().prop_map(Frame::Eof),
        any::<i32>().prop_map(|signo| Frame::Signal { signo }),
        (any::<i32>(), rusage(), any::<u64>(), any::<u64>()).prop_map(
            |(wait_status, rusage, total_kib, oom_kills)| Frame::Exit {
                wait_status,
                rusage,
                memory: GuestMemoryReport {
                    total_kib,
                    oom_kills
                },
            }
        ),
        Just(Frame::Ack),
        ".{0,40}".prop_map(|message| Frame::Error { message }),
        (stream.clone(), any::<u64>())
            .prop_map(|(stream, offset)| Frame::OutputAck { stream, offset }),
        (
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(|(version, out, err, stdin, ended)| Frame::Reconnect(
                ReconnectPoint {
                    version,
                    stdout_sent: out,
                    stderr_sent: err,
                    stdin_received: stdin,
                    stdin_ended: ended,
                }
            )),
        (any::<u64>(), any::<u64>()).prop_map(|(stdout, stderr)| Frame::Resume { stdout, stderr }),
    ]
}

proptest! {
    #[test]
    fn encode_decode_round_trip(f in frame()) {
        let bytes = encode(&f).unwrap();
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        prop_assert_eq!(len, bytes.len() - 4);
        prop_assert_eq!(decode_body(&bytes[4..]).unwrap(), f.clone());
        // And through the stream reader, several frames back to back.
        let mut stream = bytes.clone();
        stream.extend_from_slice(&bytes);
        let mut reader = FrameReader::new(&stream[..]);
        prop_assert_eq!(reader.read_frame().unwrap(), Some(f.clone()));
        prop_assert_eq!(reader.read_frame().unwrap(), Some(f));
        prop_assert!(reader.read_frame().unwrap().is_none());
    }

    #[test]
    fn random_bodies_never_panic(body in bytes(2000)) {
        let _ = decode_body(&body);
    }

    #[test]
    fn random_streams_never_panic(data in bytes(2000)) {
        let mut reader = FrameReader::new(&data[..]);
        for _ in 0..50 {
            match reader.read_frame() {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }

    #[test]
    fn truncated_frames_are_errors(f in frame(), cut in any::<prop::sample::Index>()) {
        let bytes = encode(&f).unwrap();
        let body = &bytes[4..];
        let cut = cut.index(body.len());
        prop_assert!(decode_body(&body[..cut]).is_err());
    }
}

#[test]
fn oversized_length_is_refused_before_reading() {
    let mut data = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes().to_vec();
    data.push(KIND_ACK_FOR_TEST);
    let mut reader = FrameReader::new(&data[..]);
    assert!(matches!(
        reader.read_frame(),
        Err(ProtocolError::FrameTooLarge(_))
    ));
}

const KIND_ACK_FOR_TEST: u8 = 11;

#[test]
fn unknown_kind_is_an_error() {
    assert!(matches!(
        decode_body(&[200]),
        Err(ProtocolError::UnknownKind(200))
    ));
}

#[test]
fn forged_list_count_does_not_allocate() {
    // Spawn with argv count 0xffff_ffff and nothing behind it.
    let body = [2u8, 0xff, 0xff, 0xff, 0xff];
    assert!(matches!(
        decode_body(&body),
        Err(ProtocolError::Truncated(_))
    ));
}

#[test]
fn unknown_share_transport_is_an_error() {
    let fs = Filesystems {
        root: None,
        mounts: vec![SharedMount {
            transport: ShareTransport::NineP,
            tag: b"share0".to_vec(),
            target: b"/home/u".to_vec(),
            read_only: false,
        }],
        account: None,
    };
    let mut body = encode(&Frame::Filesystems(fs)).unwrap()[4..].to_vec();
    // The mount's transport byte: before its tag (4+6), target (4+7), read-only flag (1) and
    // the account flag (1) that ends the frame.
    let at = body.len() - (1 + 4 + 6 + 4 + 7 + 1 + 1);
    assert_eq!(body[at], 0);
    body[at] = 9;
    assert!(matches!(
        decode_body(&body),
        Err(ProtocolError::InvalidValue {
            field: "mount transport",
            value: 9
        })
    ));
}

#[test]
fn a_prefix_outside_1_to_32_is_an_error() {
    let net = GuestNetwork {
        hostname: b"h".to_vec(),
        ipv4: Some(Ipv4Interface {
            address: [10, 0, 0, 2],
            prefix_len: 24,
            gateway: [10, 0, 0, 1],
            mtu: 65520,
        }),
        nameservers: vec![],
        search: vec![],
    };
    let mut body = encode(&Frame::Network(net)).unwrap()[4..].to_vec();
    // kind, hostname (4+1), the ipv4 flag, the address, then the prefix.
    let at = 1 + 4 + 1 + 1 + 4;
    assert_eq!(body[at], 24);
    for bad in [0u8, 33, 255] {
        body[at] = bad;
        assert!(matches!(
            decode_body(&body),
            Err(ProtocolError::InvalidValue {
                field: "ipv4 prefix",
                ..
            })
        ));
    }
}

#[test]
fn oversized_data_frame_is_refused_by_encoder() {
    let f = Frame::Stdout(vec![0; MAX_FRAME_LEN]);
    assert!(matches!(encode(&f), Err(ProtocolError::FrameTooLarge(_))));
}
