//! Property tests: arbitrary bytes never panic the decoder, and encode→decode is identity.

use plugin_proto::frame::{decode_body, encode_frame, read_frame, FrameDecoder};
use plugin_proto::*;
use proptest::prelude::*;

fn payload() -> impl Strategy<Value = Payload> {
    (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(json, data)| {
        Payload::raw(if json { PayloadCodec::Json } else { PayloadCodec::Bincode }, data)
    })
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::Unavailable),
        Just(ErrorCode::UnknownMethod),
        Just(ErrorCode::BadPayload),
        Just(ErrorCode::DeadlineExceeded),
        Just(ErrorCode::Cancelled),
        Just(ErrorCode::Panicked),
        Just(ErrorCode::Failed),
        Just(ErrorCode::PluginExited),
        Just(ErrorCode::Internal),
    ]
}

fn level() -> impl Strategy<Value = LogLevel> {
    prop_oneof![
        Just(LogLevel::Error),
        Just(LogLevel::Warn),
        Just(LogLevel::Info),
        Just(LogLevel::Debug),
        Just(LogLevel::Trace),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    let s = ".{0,16}";
    prop_oneof![
        (any::<u32>(), any::<u16>(), any::<u16>(), s, s, proptest::collection::vec(s, 0..4), s)
            .prop_map(|(magic, proto_min, proto_max, name, version, methods, sdk)| {
                Message::Hello(Hello { magic, proto_min, proto_max, name, version, methods, sdk })
            }),
        (
            any::<u16>(),
            s,
            any::<u64>(),
            any::<u32>(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32))
        )
            .prop_map(|(proto, config_json, heartbeat_ms, max_frame, state)| {
                Message::Welcome(Welcome { proto, config_json, heartbeat_ms, max_frame, state })
            }),
        s.prop_map(|reason| Message::Reject { reason }),
        Just(Message::Ready),
        (any::<u64>(), s, any::<u64>(), payload()).prop_map(
            |(id, method, deadline_us, payload)| {
                Message::Call(Call { id, method, deadline_us, payload })
            }
        ),
        (any::<u64>(), payload()).prop_map(|(id, p)| Message::Reply(Reply { id, result: Ok(p) })),
        (any::<u64>(), error_code(), s).prop_map(|(id, code, m)| Message::Reply(Reply {
            id,
            result: Err(CallError::new(code, m))
        })),
        (any::<u64>(), payload()).prop_map(|(id, payload)| Message::Chunk { id, payload }),
        any::<u64>().prop_map(|id| Message::Cancel { id }),
        (s, payload()).prop_map(|(method, payload)| Message::Notify { method, payload }),
        any::<u64>().prop_map(|seq| Message::Ping { seq }),
        any::<u64>().prop_map(|seq| Message::Pong { seq }),
        any::<u64>().prop_map(|grace_ms| Message::Shutdown { grace_ms }),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|blob| Message::State { blob }),
        Just(Message::Goodbye),
        (level(), s).prop_map(|(level, message)| Message::Log { level, message }),
    ]
}

proptest! {
    #[test]
    fn encode_then_decode_is_identity(msg in message()) {
        let mut buf = Vec::new();
        encode_frame(&msg, &mut buf).unwrap();
        let back = read_frame(&mut &buf[..], DEFAULT_MAX_FRAME).unwrap();
        prop_assert_eq!(&back, &msg);
        let mut stream = buf.clone();
        stream.extend_from_slice(&buf);
        let dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        prop_assert_eq!(dec.next(&mut stream).unwrap(), Some(msg.clone()));
        prop_assert_eq!(dec.next(&mut stream).unwrap(), Some(msg));
        prop_assert!(stream.is_empty());
    }

    #[test]
    fn a_call_read_in_place_or_written_borrowed_is_the_owned_call(msg in message()) {
        let mut buf = Vec::new();
        encode_frame(&msg, &mut buf).unwrap();
        let seen = CallRef::read(&buf[HEADER_LEN..]).unwrap();
        match &msg {
            Message::Call(call) => {
                let view = CallRef {
                    id: call.id,
                    method: &call.method,
                    deadline_us: call.deadline_us,
                    payload: call.payload.as_ref(),
                };
                prop_assert_eq!(seen, Some(view));
                let mut borrowed = Vec::new();
                plugin_proto::frame::encode_call_frame(&view, &mut borrowed).unwrap();
                prop_assert_eq!(&borrowed, &buf);
                let mut copy = Payload::empty();
                view.payload.copy_into(&mut copy);
                prop_assert_eq!(&copy, &call.payload);
            }
            _ => prop_assert_eq!(seen, None),
        }
    }

    #[test]
    fn the_hand_written_call_and_reply_are_the_serde_bytes(msg in message()) {
        let mut hot = Vec::new();
        encode_frame(&msg, &mut hot).unwrap();
        let serde = codec::encode(&msg).unwrap();
        prop_assert_eq!(&hot[HEADER_LEN..], &serde[..]);
        prop_assert_eq!(decode_body(&serde).unwrap(), msg);
    }

    /// Valid Calls and Replies with bytes changed, cut or added: the hand-written reader
    /// takes exactly what the serde one takes, and reads the same message from it.
    #[test]
    fn the_hand_written_readers_agree_with_serde_on_damaged_bodies(
        msg in message(),
        edits in proptest::collection::vec((any::<u8>(), any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut body = codec::encode(&msg).unwrap();
        for (kind, at, byte) in edits {
            let i = at.index(body.len() + 1);
            match kind % 4 {
                0 if i < body.len() => body[i] = byte,
                1 => body.truncate(i),
                2 => body.insert(i, byte),
                _ if i < body.len() => body[i] = [4, 5, 250, 251, 252, 253, 254, 0][byte as usize % 8],
                _ => {}
            }
        }
        let hot = decode_body(&body).ok();
        let serde = codec::decode::<Message>(&body).ok();
        prop_assert_eq!(&hot, &serde);
        let view = CallRef::read(&body).ok().flatten().map(|c| c.to_call());
        let want = match serde {
            Some(Message::Call(c)) => Some(c),
            _ => None,
        };
        prop_assert_eq!(view, want);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_frame(&mut &bytes[..], DEFAULT_MAX_FRAME);
        let mut buf = bytes.clone();
        let dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        while let Ok(Some(_)) = dec.next(&mut buf) {}
        let _ = plugin_proto::codec::decode::<Message>(&bytes);
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_header_never_panic(body in proptest::collection::vec(any::<u8>(), 1..512)) {
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&body);
        let _ = read_frame(&mut &frame[..], DEFAULT_MAX_FRAME);
    }
}

#[test]
fn a_four_gib_length_is_refused_before_reading_the_body() {
    let header = u32::MAX.to_le_bytes();
    let err = read_frame(&mut &header[..], DEFAULT_MAX_FRAME).unwrap_err();
    assert!(matches!(err, FrameError::TooLarge { len: u32::MAX, .. }), "{err}");
    assert!(err.is_protocol_violation());
}

#[test]
fn a_lowered_limit_is_enforced() {
    let mut buf = Vec::new();
    encode_frame(&Message::State { blob: vec![0; 100] }, &mut buf).unwrap();
    let err = read_frame(&mut &buf[..], 50).unwrap_err();
    assert!(matches!(err, FrameError::TooLarge { max: 50, .. }), "{err}");
}

#[test]
fn a_body_claiming_a_huge_string_is_malformed_not_fatal() {
    // Reject { reason: <string claiming 2^32-1 bytes> } inside a 7-byte body.
    let body = [2u8, 252, 0xff, 0xff, 0xff, 0xff, b'x'];
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    let err = read_frame(&mut &frame[..], DEFAULT_MAX_FRAME).unwrap_err();
    assert!(matches!(err, FrameError::Malformed(_)), "{err}");
}

#[test]
fn end_of_stream_is_closed_or_truncated() {
    assert!(matches!(read_frame(&mut &[][..], 100), Err(FrameError::Closed)));
    assert!(matches!(read_frame(&mut &[5, 0][..], 100), Err(FrameError::Truncated { .. })));
    assert!(matches!(
        read_frame(&mut &[5, 0, 0, 0, 3][..], 100),
        Err(FrameError::Truncated { .. })
    ));
}

/// Every frame the encoder accepts up to the limit decodes (the codec's own limit must
/// not count more than the body's bytes).
#[test]
fn frames_right_up_to_the_limit_decode() {
    use plugin_proto::frame::{decode_body, encode_frame, HEADER_LEN};
    let max = plugin_proto::DEFAULT_MAX_FRAME as usize;
    let reply = |n: usize| {
        Message::Reply(Reply {
            id: u64::MAX,
            result: Ok(Payload::raw(PayloadCodec::Bincode, vec![7; n])),
        })
    };
    // Find the largest payload whose frame body is within the limit, then try it and the
    // few below.
    let mut buf = Vec::new();
    encode_frame(&reply(0), &mut buf).unwrap();
    let overhead = buf.len() - HEADER_LEN;
    let biggest = max - overhead - 4; // the length prefix of a 16 MiB blob takes 5 bytes, not 1
    for n in biggest.saturating_sub(40)..=biggest + 4 {
        let mut buf = Vec::new();
        encode_frame(&reply(n), &mut buf).unwrap();
        let body = buf.len() - HEADER_LEN;
        if body > max {
            continue;
        }
        let decoded = decode_body(&buf[HEADER_LEN..]);
        assert!(decoded.is_ok(), "a body of {body} bytes (limit {max}): {:?}", decoded.err());
    }
}

/// A reader that hands out `data`, then EOF, and remembers the largest buffer it was given.
struct Spy {
    data: Vec<u8>,
    at: usize,
    largest: usize,
}

impl std::io::Read for Spy {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.largest = self.largest.max(buf.len());
        let n = buf.len().min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A header that announces 16 MiB and then nothing costs a small buffer, not 16 MiB.
#[test]
fn read_frame_grows_the_body_as_bytes_arrive() {
    let mut spy = Spy { data: DEFAULT_MAX_FRAME.to_le_bytes().to_vec(), at: 0, largest: 0 };
    let err = read_frame(&mut spy, DEFAULT_MAX_FRAME).unwrap_err();
    assert!(matches!(err, plugin_proto::frame::FrameError::Truncated { .. }), "{err}");
    assert!(spy.largest <= 64 * 1024, "a {} byte buffer up front", spy.largest);
    // And a real frame, larger than one step, still reads whole.
    let msg = Message::Reply(Reply {
        id: 1,
        result: Ok(Payload::raw(PayloadCodec::Bincode, vec![3; 300_000])),
    });
    let mut data = Vec::new();
    encode_frame(&msg, &mut data).unwrap();
    let mut spy = Spy { data, at: 0, largest: 0 };
    assert_eq!(read_frame(&mut spy, DEFAULT_MAX_FRAME).unwrap(), msg);
}

#[test]
fn calls_go_both_ways_from_protocol_2_and_one_way_before() {
    use plugin_proto::{Call, Message, Payload, Reply, Side};
    let call = Message::Call(Call {
        id: 1,
        method: "m".into(),
        deadline_us: 0,
        payload: Payload::empty(),
    });
    let reply = Message::Reply(Reply { id: 1, result: Ok(Payload::empty()) });
    let cancel = Message::Cancel { id: 1 };
    for m in [&call, &cancel] {
        assert!(m.may_be_sent_by(Side::Supervisor, 1));
        assert!(!m.may_be_sent_by(Side::Plugin, 1), "{} from a plugin needs version 2", m.kind());
        assert!(m.may_be_sent_by(Side::Plugin, 2));
    }
    assert!(!reply.may_be_sent_by(Side::Supervisor, 1));
    assert!(reply.may_be_sent_by(Side::Supervisor, 2));
    // Everything else keeps its one direction.
    assert!(!Message::Ping { seq: 1 }.may_be_sent_by(Side::Plugin, 2));
    assert!(!Message::Ready.may_be_sent_by(Side::Supervisor, 2));
    assert!(Message::Notify { method: "x".into(), payload: Payload::empty() }
        .may_be_sent_by(Side::Plugin, 1));
    // From version 2 a plugin whose on_load failed says why with Reject (PROTOCOL.md 5.2).
    let reject = Message::Reject { reason: "no API key in [config]".into() };
    assert!(reject.may_be_sent_by(Side::Supervisor, 1));
    assert!(!reject.may_be_sent_by(Side::Plugin, 1));
    assert!(reject.may_be_sent_by(Side::Plugin, 2));
}

/// What PROTOCOL.md §3 says about edge cases of the body encoding, checked.
#[test]
fn body_edge_cases_are_as_the_spec_says() {
    use plugin_proto::frame::decode_body;
    use plugin_proto::Message;
    // Ping (tag 9) with seq 5 written minimally, then with a needless u16 marker: both read.
    assert_eq!(decode_body(&[0x09, 0x05]).unwrap(), Message::Ping { seq: 5 });
    let lenient = decode_body(&[0x09, 0xfb, 0x05, 0x00]);
    assert_eq!(lenient.unwrap(), Message::Ping { seq: 5 }, "non-minimal varints are accepted");
    // Marker 254 (a u128) and 255 (none) are not a u64.
    for marker in [0xfeu8, 0xff] {
        let mut body = vec![0x09, marker];
        body.extend_from_slice(&[0; 16]);
        assert!(decode_body(&body).is_err(), "marker {marker} in a u64");
    }
    // Invalid UTF-8 in a string (Log's message) is refused.
    assert!(decode_body(&[0x0e, 0x01, 0x02, 0xff, 0xfe]).is_err());
    // Bytes after the message are refused.
    assert!(decode_body(&[0x09, 0x05, 0x00]).is_err());
    // The magic is a u32 varint: fc + 4 bytes; four raw bytes instead misread the fields.
    let raw_magic = [0x00, 0x50, 0x4c, 0x47, 0x44, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00];
    // (or it does not decode at all; the supervisor answers Reject either way)
    if let Ok(Message::Hello(h)) = decode_body(&raw_magic) {
        assert_ne!(h.magic, plugin_proto::MAGIC);
    }
}
