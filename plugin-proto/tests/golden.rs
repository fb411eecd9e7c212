//! Golden vectors: the exact bytes of one frame of every message kind.
//!
//! `golden/vectors.txt` (name, then the whole frame in hex) is the shared
//! truth: this test checks that the Rust encoder produces each vector, that
//! each vector decodes back to the same message, and that PROTOCOL.md quotes
//! every vector verbatim. SDKs in other languages check the same file.

use plugin_proto::frame::{encode_frame, read_frame};
use plugin_proto::*;

/// The messages behind each vector name. Keep in step with PROTOCOL.md.
fn vectors() -> Vec<(&'static str, Message)> {
    vec![
        (
            "hello",
            Message::Hello(Hello {
                magic: MAGIC,
                proto_min: 1,
                proto_max: 1,
                name: "echo".into(),
                version: "1.0.0".into(),
                methods: vec!["echo".into()],
                sdk: "py/0.1".into(),
            }),
        ),
        (
            "welcome",
            Message::Welcome(Welcome {
                proto: 1,
                config_json: "{}".into(),
                heartbeat_ms: 1000,
                max_frame: 16_777_216,
                state: None,
            }),
        ),
        (
            "welcome_with_state",
            Message::Welcome(Welcome {
                proto: 1,
                config_json: "{\"k\":1}".into(),
                heartbeat_ms: 0,
                max_frame: 65_536,
                state: Some(vec![0xde, 0xad]),
            }),
        ),
        ("reject", Message::Reject { reason: "no".into() }),
        ("ready", Message::Ready),
        (
            "call_json",
            Message::Call(Call {
                id: 1,
                method: "echo".into(),
                deadline_us: 2000,
                payload: Payload::raw(PayloadCodec::Json, b"{\"a\":1}".to_vec()),
            }),
        ),
        (
            "call_bincode",
            Message::Call(Call {
                id: 300,
                method: "on_tick".into(),
                deadline_us: 0,
                payload: Payload::raw(PayloadCodec::Bincode, vec![1, 2, 3]),
            }),
        ),
        (
            "reply_ok",
            Message::Reply(Reply {
                id: 1,
                result: Ok(Payload::raw(PayloadCodec::Json, b"{\"a\":1}".to_vec())),
            }),
        ),
        (
            "reply_err",
            Message::Reply(Reply {
                id: 2,
                result: Err(CallError::new(ErrorCode::UnknownMethod, "nope")),
            }),
        ),
        (
            "chunk",
            Message::Chunk { id: 3, payload: Payload::raw(PayloadCodec::Json, b"1".to_vec()) },
        ),
        ("cancel", Message::Cancel { id: 4 }),
        (
            "notify",
            Message::Notify {
                method: "tick".into(),
                payload: Payload::raw(PayloadCodec::Json, b"[]".to_vec()),
            },
        ),
        ("ping", Message::Ping { seq: 7 }),
        ("pong", Message::Pong { seq: 7 }),
        ("shutdown", Message::Shutdown { grace_ms: 5000 }),
        ("state", Message::State { blob: vec![1, 2, 3, 4] }),
        ("goodbye", Message::Goodbye),
        ("log", Message::Log { level: LogLevel::Warn, message: "hi".into() }),
        // Version 2: host calls.
        (
            "hello_v2",
            Message::Hello(Hello {
                magic: MAGIC,
                proto_min: 1,
                proto_max: 2,
                name: "strat".into(),
                version: "1.0.0".into(),
                methods: vec!["on_tick".into()],
                sdk: "rs/0.2".into(),
            }),
        ),
        (
            "welcome_v2",
            Message::Welcome(Welcome {
                proto: 2,
                config_json: "{}".into(),
                heartbeat_ms: 1000,
                max_frame: 16_777_216,
                state: None,
            }),
        ),
        (
            "host_call",
            Message::Call(Call {
                id: 1,
                method: "send_order".into(),
                deadline_us: 500,
                payload: Payload::raw(PayloadCodec::Json, b"{\"qty\":1}".to_vec()),
            }),
        ),
        (
            "host_reply",
            Message::Reply(Reply {
                id: 1,
                result: Ok(Payload::raw(PayloadCodec::Json, b"\"filled\"".to_vec())),
            }),
        ),
        // Version 3: a call with the caller's per-call configuration.
        (
            "call_cfg",
            Message::CallCfg {
                call: Call {
                    id: 5,
                    method: "search".into(),
                    deadline_us: 0,
                    payload: Payload::raw(PayloadCodec::Json, b"\"q\"".to_vec()),
                },
                cfg: Payload::raw(PayloadCodec::Json, b"{\"key\":\"k\"}".to_vec()),
            },
        ),
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn golden_file() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/golden/vectors.txt");
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next().unwrap().to_string(), parts.next().unwrap().to_string())
        })
        .collect()
}

#[test]
fn every_message_encodes_to_its_golden_vector() {
    let file = golden_file();
    let ours = vectors();
    if std::env::var_os("PLUGD_PRINT_GOLDEN").is_some() {
        for (name, msg) in &ours {
            let mut buf = Vec::new();
            encode_frame(msg, &mut buf).unwrap();
            println!("{name} {}", hex(&buf));
        }
    }
    assert_eq!(
        file.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ours.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        "golden/vectors.txt names differ from the test's list"
    );
    for ((name, want), (_, msg)) in file.iter().zip(&ours) {
        let mut buf = Vec::new();
        encode_frame(msg, &mut buf).unwrap();
        assert_eq!(&hex(&buf), want, "vector {name}");
        let back = read_frame(&mut &unhex(want)[..], DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(&back, msg, "vector {name} decodes back");
    }
}

#[test]
fn protocol_md_quotes_every_vector() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/PROTOCOL.md")).unwrap();
    for (name, hex) in golden_file() {
        assert!(doc.contains(&hex), "PROTOCOL.md does not show vector {name} ({hex})");
    }
}
