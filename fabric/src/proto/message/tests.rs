//! Round trips for every message and one test per kind of malformed input.

use super::*;
use crate::proto::{MAGIC, MAX_FRAME};

fn roundtrip(msg: Message<'_>) {
    let mut buf = Vec::new();
    msg.encode(0xdead_beef_0000_0001, &mut buf);
    let (hdr, decoded, used) = decode_frame(&buf).unwrap().expect("complete frame");
    assert_eq!(used, buf.len());
    assert_eq!(hdr.request_id, 0xdead_beef_0000_0001);
    assert_eq!(hdr.opcode, msg.opcode());
    assert_eq!(decoded, msg);
    // Every strict prefix is incomplete, never an error and never a panic.
    for cut in 0..buf.len() {
        assert!(decode_frame(&buf[..cut]).unwrap().is_none(), "cut at {cut}");
    }
}

fn gpn_bytes(gpns: &[u64]) -> Vec<u8> {
    gpns.iter().flat_map(|g| g.to_le_bytes()).collect()
}

#[test]
fn every_message_roundtrips() {
    let gpns = gpn_bytes(&[0, 1, u64::MAX, 42]);
    let pages: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i * 7) as u8).collect();
    roundtrip(Message::hello(Role::Vmm, 7, b""));
    roundtrip(Message::hello(Role::Admin, u64::MAX, b"proof"));
    roundtrip(Message::HelloOk {
        role: Role::MemNode,
        version: PROTOCOL_VERSION,
        page_size: PAGE_SIZE as u32,
        max_batch: MAX_BATCH as u32,
        capacity_pages: 1 << 21,
        instance: 0x1234_5678_9abc_def0,
    });
    roundtrip(Message::Challenge {
        nonce: &[1; 32],
        proof: &[2; 32],
    });
    roundtrip(Message::Proof {
        proof: Some(&[3; 32]),
        vm: None,
    });
    roundtrip(Message::Proof {
        proof: None,
        vm: Some((&[4; 32], &[5; 64])),
    });
    roundtrip(Message::Proof {
        proof: Some(&[3; 32]),
        vm: Some((&[4; 32], &[5; 64])),
    });
    roundtrip(Message::ReadPages {
        gpns: Message::gpn_list(&gpns),
    });
    let endpoint = RdmaEndpoint {
        qpn: 0x11,
        psn: 0xff_ffff,
        lid: 3,
        gid: [7; 16],
    };
    roundtrip(Message::RdmaConnect { endpoint });
    roundtrip(Message::RdmaConnectOk {
        endpoint,
        chunk_pages: 512,
    });
    roundtrip(Message::MapRegion { chunk: u64::MAX });
    roundtrip(Message::MapRegionOk {
        chunk: 9,
        addr: 0x7f00_0000_0000,
        len: 2 << 20,
        rkey: 0xabcd,
    });
    roundtrip(Message::ReadPagesOk {
        present: &[1, 0, 1, 0],
        data: &pages[..2 * PAGE_SIZE],
    });
    roundtrip(Message::WritePages {
        gpns: Message::gpn_list(&gpns),
        data: &pages,
    });
    roundtrip(Message::WritePagesOk { count: 4 });
    roundtrip(Message::FreePages {
        gpns: Message::gpn_list(&gpns),
    });
    roundtrip(Message::FreePagesOk { count: 3 });
    roundtrip(Message::Stats);
    roundtrip(Message::StatsOk(StatsReply {
        vm_pages: 1,
        vm_reads: 2,
        vm_zero_reads: 3,
        vm_writes: 4,
        vm_frees: 5,
        node_pages: 6,
        node_capacity_pages: 7,
        node_vms: 8,
        node_connections: 9,
        node_errors: 10,
        node_overhead_bytes: 11,
        vm_quota_pages: 12,
    }));
    roundtrip(Message::Ping { nonce: 99 });
    roundtrip(Message::Pong { nonce: 99 });
    roundtrip(Message::Error {
        code: ErrorCode::OutOfCapacity,
        message: "out of capacity: 10 of 10 pages used",
    });
    roundtrip(Message::Error {
        code: ErrorCode::Other(999),
        message: "",
    });
}

#[test]
fn full_batches_fit_the_limits() {
    let gpns: Vec<u64> = (0..MAX_BATCH as u64).collect();
    let data = vec![0xabu8; MAX_BATCH * PAGE_SIZE];
    let mut buf = Vec::new();
    encode_write_pages_head(5, &gpns, &mut buf);
    buf.extend_from_slice(&data);
    assert!(buf.len() <= MAX_FRAME);
    let (_, msg, _) = decode_frame(&buf).unwrap().unwrap();
    match msg {
        Message::WritePages { gpns: g, data: d } => {
            assert_eq!(g.iter().collect::<Vec<_>>(), gpns);
            assert_eq!(d, &data[..]);
        }
        other => panic!("decoded {other:?}"),
    }
    let mut out = Vec::new();
    let mut b = ReadReplyBuilder::begin(&mut out, 9, MAX_BATCH);
    for i in 0..MAX_BATCH {
        if i % 2 == 0 {
            b.present(&mut out, &[i as u8; PAGE_SIZE]);
        } else {
            b.zero();
        }
    }
    b.finish(&mut out);
    let (h, msg, _) = decode_frame(&out).unwrap().unwrap();
    assert_eq!(h.request_id, 9);
    let Message::ReadPagesOk { present, data } = msg else {
        panic!("decoded {msg:?}")
    };
    assert_eq!(present.len(), MAX_BATCH);
    assert_eq!(data.len(), MAX_BATCH / 2 * PAGE_SIZE);
    assert!(data[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 2));
}

#[test]
fn encode_read_pages_matches_message_encoding() {
    let gpns = [3u64, 4, 5];
    let mut a = Vec::new();
    encode_read_pages(1, &gpns, &mut a);
    let mut b = Vec::new();
    Message::ReadPages {
        gpns: Message::gpn_list(&gpn_bytes(&gpns)),
    }
    .encode(1, &mut b);
    assert_eq!(a, b);
}

fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    b.push(opcode);
    b.push(0);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(payload);
    b
}

#[test]
fn bad_magic() {
    let mut b = frame(11, &[0; 8]);
    b[0] = b'X';
    assert!(matches!(
        decode_frame(&b),
        Err(DecodeError::BadMagic { .. })
    ));
    let garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    assert!(matches!(
        decode_frame(garbage),
        Err(DecodeError::BadMagic { .. })
    ));
}

#[test]
fn unknown_version() {
    let mut b = frame(11, &[0; 8]);
    b[4] = 9;
    assert_eq!(
        decode_frame(&b),
        Err(DecodeError::UnsupportedVersion {
            found: 9,
            supported: PROTOCOL_VERSION
        })
    );
}

#[test]
fn unknown_opcode() {
    assert_eq!(
        decode_frame(&frame(0, &[])),
        Err(DecodeError::UnknownOpcode(0))
    );
    assert_eq!(
        decode_frame(&frame(200, &[])),
        Err(DecodeError::UnknownOpcode(200))
    );
}

#[test]
fn oversized_length_is_rejected_from_the_header_alone() {
    // Only the header is present: the decoder must refuse before waiting for 4 GiB.
    let mut b = frame(11, &[]);
    b[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(
        matches!(decode_frame(&b), Err(DecodeError::Oversized { len, .. }) if len == u32::MAX as usize)
    );
    let mut b = frame(9, &[]);
    b[16..20].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        decode_frame(&b),
        Err(DecodeError::Oversized { .. })
    ));
}

#[test]
fn reserved_bits_are_rejected() {
    let mut b = frame(11, &[0; 8]);
    b[7] = 1;
    assert!(matches!(
        decode_frame(&b),
        Err(DecodeError::Invalid { field: "flags", .. })
    ));
    let mut b = frame(11, &[0; 8]);
    b[22] = 1;
    assert!(matches!(
        decode_frame(&b),
        Err(DecodeError::Invalid {
            field: "header",
            ..
        })
    ));
}

#[test]
fn truncated_payloads() {
    // A ping whose payload is too short for its fields.
    assert!(matches!(
        decode_frame(&frame(11, &[0; 4])),
        Err(DecodeError::Truncated { what: "ping", .. })
    ));
    // A read request declaring 4 pages but carrying 2.
    let mut p = vec![4, 0, 0, 0, 0, 0, 0, 0];
    p.extend_from_slice(&gpn_bytes(&[1, 2]));
    assert!(matches!(
        decode_frame(&frame(3, &p)),
        Err(DecodeError::Truncated { .. })
    ));
    // A write request missing its last page.
    let mut p = vec![1, 0, 0, 0, 0, 0, 0, 0];
    p.extend_from_slice(&gpn_bytes(&[1]));
    p.extend_from_slice(&[0; PAGE_SIZE - 1]);
    assert!(matches!(
        decode_frame(&frame(5, &p)),
        Err(DecodeError::Truncated { .. })
    ));
    // A hello whose auth length exceeds the payload.
    let mut p = vec![1, 0, 1, 0, 100, 0, 0, 0];
    p.extend_from_slice(&[0; 8]);
    assert!(matches!(
        decode_frame(&frame(1, &p)),
        Err(DecodeError::Truncated { .. })
    ));
}

#[test]
fn invalid_fields() {
    // Zero and oversized batch counts.
    for count in [0u32, MAX_BATCH as u32 + 1, u32::MAX] {
        let mut p = count.to_le_bytes().to_vec();
        p.extend_from_slice(&[0; 4]);
        p.extend_from_slice(&[0; 8]);
        assert!(
            matches!(
                decode_frame(&frame(3, &p)),
                Err(DecodeError::Invalid {
                    field: "page count",
                    ..
                })
            ),
            "count {count}"
        );
    }
    // A proof with undefined flag bits, or a short one.
    for (flags, len) in [(4u8, 136usize), (1, 136), (0, 32)] {
        let mut p = vec![0u8; len];
        p[0] = flags;
        p[3] = u8::from(flags == 1); // a nonzero reserved byte
        assert!(
            matches!(
                decode_frame(&frame(15, &p)),
                Err(DecodeError::Invalid { .. } | DecodeError::Truncated { .. })
            ),
            "proof flags {flags}, {len} bytes"
        );
    }
    // Trailing bytes after a read request.
    let mut p = vec![1, 0, 0, 0, 0, 0, 0, 0];
    p.extend_from_slice(&[0; 9]);
    assert!(matches!(
        decode_frame(&frame(3, &p)),
        Err(DecodeError::Invalid { .. })
    ));
    // Unknown role.
    let mut p = vec![9, 0, 1, 0, 0, 0, 0, 0];
    p.extend_from_slice(&[0; 8]);
    assert!(matches!(
        decode_frame(&frame(1, &p)),
        Err(DecodeError::Invalid { field: "role", .. })
    ));
    // Presence byte other than 0/1.
    let p = vec![1, 0, 0, 0, 0, 0, 0, 0, 7];
    assert!(matches!(
        decode_frame(&frame(4, &p)),
        Err(DecodeError::Invalid {
            field: "presence byte",
            ..
        })
    ));
    // Error message that is not UTF-8.
    let p = vec![1, 0, 0, 0, 2, 0, 0, 0, 0xff, 0xfe];
    assert!(matches!(
        decode_frame(&frame(13, &p)),
        Err(DecodeError::Invalid {
            field: "error message",
            ..
        })
    ));
    // RDMA endpoints: a packet sequence number over 24 bits, nonzero reserved
    // bytes; a chunk size that is not a power of two.
    let mut p = vec![0u8; 32];
    p[7] = 1;
    assert!(matches!(
        decode_frame(&frame(16, &p)),
        Err(DecodeError::Invalid { .. })
    ));
    let mut p = vec![0u8; 32];
    p[12] = 1;
    assert!(matches!(
        decode_frame(&frame(16, &p)),
        Err(DecodeError::Invalid { .. })
    ));
    let mut p = vec![0u8; 40];
    p[32] = 3;
    assert!(matches!(
        decode_frame(&frame(17, &p)),
        Err(DecodeError::Invalid { .. })
    ));
    // Oversized auth length.
    let mut p = vec![1, 0, 1, 0, 0xff, 0xff, 0, 0];
    p.extend_from_slice(&[0; 8]);
    assert!(matches!(
        decode_frame(&frame(1, &p)),
        Err(DecodeError::Invalid {
            field: "auth length",
            ..
        })
    ));
}

#[test]
fn long_error_messages_are_truncated_on_a_char_boundary() {
    let long = "é".repeat(MAX_ERROR_MESSAGE);
    let mut buf = Vec::new();
    Message::Error {
        code: ErrorCode::Internal,
        message: &long,
    }
    .encode(1, &mut buf);
    let (_, msg, _) = decode_frame(&buf).unwrap().unwrap();
    let Message::Error { message, .. } = msg else {
        panic!()
    };
    assert!(message.len() <= MAX_ERROR_MESSAGE && message.chars().all(|c| c == 'é'));
}

#[test]
fn stats_reply_ignores_fields_it_does_not_know() {
    let mut p = 13u32.to_le_bytes().to_vec();
    p.extend_from_slice(&[0; 4]);
    for i in 0..13u64 {
        p.extend_from_slice(&(i + 1).to_le_bytes());
    }
    let f = frame(10, &p);
    let (_, msg, _) = decode_frame(&f).unwrap().unwrap();
    let Message::StatsOk(s) = msg else { panic!() };
    assert_eq!(s.vm_pages, 1);
    assert_eq!(s.node_overhead_bytes, 11);
}

#[test]
fn pseudo_random_garbage_never_panics() {
    // A cheap deterministic fuzz: random bytes behind a valid header prefix.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let len = (next() % 200) as usize;
        let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if next() % 2 == 0 && b.len() >= 24 {
            b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            b[6] = (next() % 14) as u8;
            b[7] = 0;
            let plen = (len - 24) as u32;
            b[16..20].copy_from_slice(&plen.to_le_bytes());
            b[20..24].fill(0);
        }
        let _ = decode_frame(&b);
    }
}
