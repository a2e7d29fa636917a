use super::*;

#[test]
fn greeting_round_trip_and_bytes() {
    let g = encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(&g[16..], &[0, 3]);
    assert_eq!(decode_greeting(&g).unwrap(), 3);
}

#[test]
fn greeting_malformed() {
    let g = encode_greeting(1);
    assert!(matches!(
        decode_greeting(&g[..10]),
        Err(WireError::Truncated { need: 16, .. })
    ));
    assert!(matches!(
        decode_greeting(&g[..17]),
        Err(WireError::Truncated { need: 18, .. })
    ));
    let mut bad = g;
    bad[0] = b'X';
    assert!(matches!(
        decode_greeting(&bad),
        Err(WireError::BadMagic {
            what: "greeting",
            ..
        })
    ));
    let mut old = g;
    old[8..16].copy_from_slice(&CLISERV_MAGIC.to_be_bytes());
    assert_eq!(decode_greeting(&old), Err(WireError::Oldstyle));
    let mut other = g;
    other[15] ^= 1;
    assert!(matches!(
        decode_greeting(&other),
        Err(WireError::BadMagic { .. })
    ));
}

#[test]
fn option_header_round_trip() {
    let h = OptionHeader {
        option: Opt::GO,
        len: 0x0102_0304,
    };
    let b = h.encode();
    assert_eq!(&b[..8], b"IHAVEOPT");
    assert_eq!(&b[8..12], &[0, 0, 0, 7]);
    assert_eq!(OptionHeader::decode(&b).unwrap(), h);
    let mut v = Vec::new();
    encode_option(&mut v, Opt::LIST, b"xy");
    assert_eq!(v.len(), OPTION_HEADER_LEN + 2);
    assert_eq!(
        OptionHeader::decode(&v).unwrap(),
        OptionHeader {
            option: Opt::LIST,
            len: 2
        }
    );
}

#[test]
fn option_header_malformed() {
    assert!(matches!(
        OptionHeader::decode(&[0u8; 15]),
        Err(WireError::Truncated { .. })
    ));
    let mut b = OptionHeader {
        option: Opt::GO,
        len: 0,
    }
    .encode();
    b[3] = 0;
    assert!(matches!(
        OptionHeader::decode(&b),
        Err(WireError::BadMagic { what: "option", .. })
    ));
    // An HTTP request is not an option.
    assert!(matches!(
        OptionHeader::decode(b"GET / HTTP/1.1\r\nHost"),
        Err(WireError::BadMagic { .. })
    ));
}

#[test]
fn option_reply_round_trip() {
    let mut v = Vec::new();
    encode_option_reply(&mut v, Opt::GO, Rep::ERR_UNKNOWN, b"no such export");
    let h = OptionReplyHeader::decode(&v).unwrap();
    assert_eq!(h.option, Opt::GO);
    assert_eq!(h.reply, Rep::ERR_UNKNOWN);
    assert!(h.reply.is_error());
    assert!(!Rep::ACK.is_error());
    assert_eq!(h.len as usize, v.len() - OPTION_REPLY_HEADER_LEN);
    assert_eq!(h.reply.0, 0x8000_0006);
    let mut bad = v.clone();
    bad[0] = 1;
    assert!(matches!(
        OptionReplyHeader::decode(&bad),
        Err(WireError::BadMagic { .. })
    ));
    assert!(matches!(
        OptionReplyHeader::decode(&v[..19]),
        Err(WireError::Truncated { .. })
    ));
}

#[test]
fn info_request_round_trip() {
    let r = InfoRequest {
        name: "disk0",
        requests: vec![info_type::BLOCK_SIZE, info_type::NAME],
    };
    let mut v = Vec::new();
    r.encode(&mut v);
    assert_eq!(v.len(), 4 + 5 + 2 + 4);
    assert_eq!(InfoRequest::decode(&v).unwrap(), r);
    let empty = InfoRequest {
        name: "",
        requests: vec![],
    };
    let mut v = Vec::new();
    empty.encode(&mut v);
    assert_eq!(InfoRequest::decode(&v).unwrap(), empty);
}

#[test]
fn info_request_malformed() {
    // Too short for the fixed fields.
    assert!(matches!(
        InfoRequest::decode(&[0, 0, 0, 0, 0]),
        Err(WireError::Truncated { .. })
    ));
    // Name length beyond the data.
    let mut v = vec![0, 0, 0, 9];
    v.extend_from_slice(b"abc");
    v.extend_from_slice(&[0, 0]);
    assert!(matches!(
        InfoRequest::decode(&v),
        Err(WireError::BadLength { .. })
    ));
    // A huge name length must not overflow.
    let v = [0xff, 0xff, 0xff, 0xff, 0, 0];
    assert!(matches!(
        InfoRequest::decode(&v),
        Err(WireError::BadLength { .. })
    ));
    // Request count disagrees with the bytes left.
    let mut v = Vec::new();
    InfoRequest {
        name: "a",
        requests: vec![1, 2],
    }
    .encode(&mut v);
    v.push(0);
    assert!(matches!(
        InfoRequest::decode(&v),
        Err(WireError::BadLength { .. })
    ));
    v.truncate(v.len() - 3);
    assert!(matches!(
        InfoRequest::decode(&v),
        Err(WireError::BadLength { .. })
    ));
    // Names must be UTF-8 without NUL.
    let mut v = vec![0, 0, 0, 2, 0xc3, 0x28, 0, 0];
    assert_eq!(
        InfoRequest::decode(&v),
        Err(WireError::BadString {
            what: "export name"
        })
    );
    v[4] = b'a';
    v[5] = 0;
    assert!(matches!(
        InfoRequest::decode(&v),
        Err(WireError::BadString { .. })
    ));
    // A name over 4096 bytes.
    let mut v = (5000u32).to_be_bytes().to_vec();
    v.extend(std::iter::repeat_n(b'a', 5000));
    v.extend_from_slice(&[0, 0]);
    assert!(matches!(
        InfoRequest::decode(&v),
        Err(WireError::StringTooLong { len: 5000, .. })
    ));
}

#[test]
fn info_round_trip() {
    for info in [
        Info::Export {
            size: 1 << 40,
            flags: TransmissionFlags(0x14d),
        },
        Info::BlockSize {
            min: 1,
            preferred: 4096,
            max: MAX_PAYLOAD,
        },
        Info::Name("disk".into()),
        Info::Description("a disk".into()),
        Info::Unknown(77),
    ] {
        let mut v = Vec::new();
        info.encode(&mut v);
        assert_eq!(Info::decode(&v).unwrap(), info);
    }
    let mut v = Vec::new();
    Info::Export {
        size: 5,
        flags: TransmissionFlags(1),
    }
    .encode(&mut v);
    assert_eq!(v.len(), 12);
}

#[test]
fn info_malformed() {
    assert!(matches!(
        Info::decode(&[0]),
        Err(WireError::Truncated { .. })
    ));
    let mut v = Vec::new();
    Info::Export {
        size: 5,
        flags: TransmissionFlags(1),
    }
    .encode(&mut v);
    v.push(0);
    assert!(matches!(Info::decode(&v), Err(WireError::BadLength { .. })));
    assert!(matches!(
        Info::decode(&[0, 3, 0, 0, 0, 1]),
        Err(WireError::BadLength { .. })
    ));
    assert!(matches!(
        Info::decode(&[0, 1, 0xff]),
        Err(WireError::BadString { .. })
    ));
}

#[test]
fn rep_server_round_trip_and_malformed() {
    let mut v = Vec::new();
    encode_rep_server(&mut v, "vol-1");
    assert_eq!(decode_rep_server(&v).unwrap(), "vol-1");
    v.extend_from_slice(b" description");
    assert_eq!(decode_rep_server(&v).unwrap(), "vol-1");
    assert!(matches!(
        decode_rep_server(&[0, 0, 0, 4, b'a']),
        Err(WireError::BadLength { .. })
    ));
    assert!(matches!(
        decode_rep_server(&[0, 0]),
        Err(WireError::Truncated { .. })
    ));
}

#[test]
fn export_name_reply() {
    let flags = TransmissionFlags(TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY);
    let mut v = Vec::new();
    encode_export_name_reply(&mut v, 1 << 30, flags, false);
    assert_eq!(v.len(), EXPORT_NAME_REPLY_LEN + EXPORT_NAME_PADDING);
    assert!(v[10..].iter().all(|&b| b == 0));
    assert_eq!(decode_export_name_reply(&v).unwrap(), (1 << 30, flags));
    let mut v = Vec::new();
    encode_export_name_reply(&mut v, 7, flags, true);
    assert_eq!(v.len(), EXPORT_NAME_REPLY_LEN);
    assert!(decode_export_name_reply(&v[..9]).is_err());
}

#[test]
fn request_round_trip_and_layout() {
    let r = Request {
        flags: cmd_flags::FUA,
        cmd: Cmd::WRITE,
        handle: 0x0102_0304_0506_0708,
        offset: 0x1000,
        len: 4096,
    };
    let b = r.encode();
    assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(&b[4..8], &[0, 1, 0, 1]);
    assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(&b[24..], &[0, 0, 0x10, 0]);
    assert_eq!(Request::decode(&b).unwrap(), r);
}

#[test]
fn request_malformed() {
    let b = Request {
        flags: 0,
        cmd: Cmd::READ,
        handle: 1,
        offset: 0,
        len: 1,
    }
    .encode();
    assert!(matches!(
        Request::decode(&b[..27]),
        Err(WireError::Truncated { need: 28, .. })
    ));
    let mut bad = b;
    bad[1] = 0;
    assert!(matches!(
        Request::decode(&bad),
        Err(WireError::BadMagic {
            what: "request",
            ..
        })
    ));
}

#[test]
fn simple_reply_round_trip_and_malformed() {
    let r = SimpleReply {
        error: Errno::EINVAL.0,
        handle: u64::MAX,
    };
    let b = r.encode();
    assert_eq!(&b[..4], &[0x67, 0x44, 0x66, 0x98]);
    assert_eq!(SimpleReply::decode(&b).unwrap(), r);
    assert!(matches!(
        SimpleReply::decode(&b[..15]),
        Err(WireError::Truncated { .. })
    ));
    let mut s = b;
    s[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    assert_eq!(
        SimpleReply::decode(&s),
        Err(WireError::UnexpectedStructuredReply)
    );
    s[0] = 0;
    assert!(matches!(
        SimpleReply::decode(&s),
        Err(WireError::BadMagic { .. })
    ));
}

#[test]
fn names_and_errno_mapping() {
    assert_eq!(Opt::GO.to_string(), "NBD_OPT_GO");
    assert_eq!(Opt(99).to_string(), "Opt(99)");
    assert_eq!(Cmd::WRITE_ZEROES.to_string(), "NBD_CMD_WRITE_ZEROES");
    assert_eq!(Rep::ERR_UNSUP.to_string(), "NBD_REP_ERR_UNSUP");
    assert_eq!(Errno(75).to_string(), "EOVERFLOW");
    let f =
        TransmissionFlags(TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY | (1 << 15));
    assert_eq!(format!("{f:?}"), "HAS_FLAGS|READ_ONLY|BIT15");
    assert_eq!(format!("{:?}", TransmissionFlags(0)), "0");
    let io = |n| std::io::Error::from_raw_os_error(n);
    assert_eq!(Errno::from_io(&io(libc::EDQUOT)), Errno::ENOSPC);
    assert_eq!(Errno::from_io(&io(libc::EFBIG)), Errno::ENOSPC);
    assert_eq!(Errno::from_io(&io(libc::EROFS)), Errno::EPERM);
    assert_eq!(Errno::from_io(&io(libc::EBADF)), Errno::EIO);
    assert_eq!(Errno::from_io(&std::io::Error::other("x")), Errno::EIO);
}

#[test]
fn strings() {
    assert_eq!(check_string("s", b"ok").unwrap(), "ok");
    assert!(check_string("s", &[b'a'; 4096]).is_ok());
    assert!(check_string("s", &[b'a'; 4097]).is_err());
    assert!(check_string("s", b"a\0b").is_err());
}
