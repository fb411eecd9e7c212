//! garbage: writes bytes that are not the protocol, to prove the supervisor survives them.
//!
//! `GARBAGE_MODE` (set in the manifest's `[env]`): "noise" (random bytes
//! instead of Hello), "oversized" (a 4 GiB length header), "after-ready"
//! (a proper handshake, then random bytes on the first call), "wrong-way"
//! (after Ready, sends a Shutdown, which only the supervisor may send), "call-on-v1"
//! (offers only protocol 1, then calls the host, which needs protocol 2), "raw-magic" (a
//! Hello whose magic is four raw bytes instead of the varint; it prints what comes back and
//! exits), "big-record" (with
//! `transport = "seqpacket"`: answers the first call with a well-formed reply in a single
//! 100 KiB record, longer than the 64 KiB a record may be), "host-flood" (after Ready,
//! calls the host's `plugd.status` over and over and never reads an answer).

use std::io::{BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;

use plugin_proto::frame::{self, read_frame, write_frame};
use plugin_proto::*;

fn noise(out: &mut UnixStream) {
    let mut bytes = vec![0u8; 4096];
    // A length header that is plausible (under the limit) followed by nonsense.
    bytes[..4].copy_from_slice(&100u32.to_le_bytes());
    for b in &mut bytes[4..] {
        *b = fastrand::u8(..);
    }
    bytes[4] = 200; // no message has tag 200
    let _ = out.write_all(&bytes);
}

fn main() {
    let mode = std::env::var("GARBAGE_MODE").unwrap_or_else(|_| "noise".into());
    // SAFETY: plugd passes the protocol socket as fd 3 and nothing else in this process uses it.
    let mut sock = unsafe { UnixStream::from_raw_fd(3) };
    let max = DEFAULT_MAX_FRAME;
    match mode.as_str() {
        "oversized" => {
            let _ = sock.write_all(&0xFFFF_FFF0u32.to_le_bytes());
        }
        "raw-magic" => {
            // Tag 0, then "PLGD" as four bytes (the spec says a varint: fc 50 4c 47 44).
            let body = [0x00, 0x50, 0x4c, 0x47, 0x44, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00];
            let mut frame = (body.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&body);
            let _ = sock.write_all(&frame);
            let mut reader = BufReader::new(sock.try_clone().expect("clone socket"));
            match read_frame(&mut reader, max) {
                Ok(Message::Reject { reason }) => eprintln!("got Reject: {reason}"),
                Ok(other) => eprintln!("got {}", other.kind()),
                Err(e) => eprintln!("got no answer: {e}"),
            }
            std::process::exit(2);
        }
        "after-ready" | "wrong-way" | "call-on-v1" | "big-record" | "host-flood" => {
            let hello = Message::Hello(Hello {
                magic: MAGIC,
                proto_min: PROTO_MIN,
                proto_max: if mode == "call-on-v1" { 1 } else { PROTO_MAX },
                name: "garbage".into(),
                version: "0.1.0".into(),
                methods: vec!["anything".into()],
                sdk: "handmade".into(),
            });
            let mut reader = BufReader::new(sock.try_clone().expect("clone socket"));
            write_frame(&mut sock, &hello, max).expect("send Hello");
            let _welcome = read_frame(&mut reader, max).expect("read Welcome");
            write_frame(&mut sock, &Message::Ready, max).expect("send Ready");
            if mode == "wrong-way" {
                let _ = write_frame(&mut sock, &Message::Shutdown { grace_ms: 0 }, max);
            } else if mode == "host-flood" {
                // Each answer is a few hundred bytes; none is read. The loop ends when plugd
                // closes the socket (or kills us).
                for id in 1u64.. {
                    let call = Message::Call(Call {
                        id,
                        method: PLUGD_STATUS.into(),
                        deadline_us: 0,
                        payload: Payload::empty(),
                    });
                    if write_frame(&mut sock, &call, max).is_err() {
                        break;
                    }
                }
            } else if mode == "call-on-v1" {
                let call = Message::Call(Call {
                    id: 1,
                    method: "x".into(),
                    deadline_us: 0,
                    payload: Payload::empty(),
                });
                let _ = write_frame(&mut sock, &call, max);
            } else {
                // Wait for the first call, then answer it with noise. If the socket closes
                // first, fall through to the sleep: this plugin ignores a vanished supervisor.
                loop {
                    match read_frame(&mut reader, max) {
                        Ok(Message::Call(call)) if mode == "big-record" => {
                            let reply = Message::Reply(Reply {
                                id: call.id,
                                result: Ok(Payload::raw(PayloadCodec::Bincode, vec![1; 100 << 10])),
                            });
                            let mut bytes = Vec::new();
                            frame::encode_frame(&reply, &mut bytes).expect("encode");
                            // One write on a seqpacket socket is one record.
                            let _ = sock.write_all(&bytes);
                            break;
                        }
                        Ok(Message::Call(_)) => {
                            noise(&mut sock);
                            break;
                        }
                        Ok(_) => continue,
                        Err(_) => break,
                    }
                }
            }
        }
        _ => noise(&mut sock),
    }
    // Stay alive: the supervisor must notice the garbage, not our exit.
    std::thread::sleep(std::time::Duration::from_secs(3600));
}
