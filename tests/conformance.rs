//! One conformance suite, run against both SDKs: the Rust `conformance` plugin and its
//! Python twin (`examples/conformance/`), each driven by a fake supervisor over a real
//! socketpair in a real child process. What one SDK does, the other must do alike:
//! the handshake, state handed over (in Welcome and by `plugd.state`), notify dispatch,
//! the no-exec lockdown, graceful shutdown, and the exit status of every way to fail.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use plugin_proto::frame::{read_frame, write_frame};
use plugin_proto::{Call, Message, Payload, Welcome, DEFAULT_MAX_FRAME, MAGIC};

#[derive(Debug, Clone, Copy)]
enum Sdk {
    Rust,
    Python,
}

const BOTH: [Sdk; 2] = [Sdk::Rust, Sdk::Python];

fn command(sdk: Sdk) -> Command {
    match sdk {
        Sdk::Rust => Command::new(env!("CARGO_BIN_EXE_conformance")),
        Sdk::Python => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let mut c = Command::new("python3");
            c.arg(root.join("conformance/main.py"))
                .env("PYTHONPATH", root.join("../plugin-runner/python"))
                .env("PYTHONDONTWRITEBYTECODE", "1");
            c
        }
    }
}

/// A plugin process and the supervisor's end of its socket.
struct Fake {
    child: Child,
    sock: UnixStream,
    sdk: Sdk,
}

impl Fake {
    /// Starts the plugin with its socket as fd 3 and `PLUGD_FD=3`.
    fn spawn(sdk: Sdk, env: &[(&str, &str)]) -> Fake {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let fd = theirs.as_raw_fd();
        let mut cmd = command(sdk);
        cmd.env("PLUGD_FD", "3").env("PLUGD_PLUGIN_NAME", "conformance").stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: between fork and exec the closure only calls dup2, which is
        // async-signal-safe, on descriptors that stay open in the parent until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(theirs);
        ours.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Fake { child, sock: ours, sdk }
    }

    fn send(&mut self, msg: &Message) {
        write_frame(&mut self.sock, msg, DEFAULT_MAX_FRAME).unwrap();
    }

    /// The next message that is not a Log line.
    fn recv(&mut self) -> Option<Message> {
        loop {
            match read_frame(&mut self.sock, DEFAULT_MAX_FRAME) {
                Ok(Message::Log { .. }) => continue,
                Ok(m) => return Some(m),
                Err(_) => return None,
            }
        }
    }

    /// Hello, then Welcome with `config` and `state`; returns Hello's method list and what
    /// came before Ready (a lockdown notice).
    fn handshake(&mut self, config: &str, state: Option<&[u8]>) -> (Vec<String>, Vec<Message>) {
        let Some(Message::Hello(hello)) = self.recv() else { panic!("{:?}: no Hello", self.sdk) };
        assert_eq!((hello.magic, hello.proto_min), (MAGIC, 1), "{:?}", self.sdk);
        self.send(&Message::Welcome(Welcome {
            proto: 1,
            config_json: config.into(),
            heartbeat_ms: 0,
            max_frame: DEFAULT_MAX_FRAME,
            state: state.map(<[u8]>::to_vec),
        }));
        let mut before = Vec::new();
        loop {
            match self.recv() {
                Some(Message::Ready) => return (hello.methods, before),
                Some(other) => before.push(other),
                None => panic!("{:?}: no Ready", self.sdk),
            }
        }
    }

    /// A JSON call and its JSON answer (or the error's message).
    fn call(&mut self, id: u64, method: &str, arg: serde_json::Value) -> serde_json::Value {
        let payload = Payload::json(&arg).unwrap();
        self.send(&Message::Call(Call { id, method: method.into(), deadline_us: 0, payload }));
        match self.recv() {
            Some(Message::Reply(r)) => {
                assert_eq!(r.id, id);
                match r.result {
                    Ok(p) => serde_json::from_slice(&p.data).unwrap(),
                    Err(e) => panic!("{:?}: {method} failed: {e:?}", self.sdk),
                }
            }
            other => panic!("{:?}: {method}: {other:?}", self.sdk),
        }
    }

    fn notify(&mut self, method: &str, payload: Payload) {
        self.send(&Message::Notify { method: method.into(), payload });
    }

    /// The exit status, after the plugin ended on its own.
    fn status(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut self.child.stderr.take().unwrap(), &mut err).unwrap();
        (status.code(), err)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn both_sdks_restore_state_dispatch_notifies_and_shut_down_alike() {
    for sdk in BOTH {
        let mut p = Fake::spawn(sdk, &[]);
        let (methods, _) = p.handshake("{}", Some(b"from-the-last-instance"));
        for m in ["bump", "count", "last_notify", "state"] {
            assert!(methods.iter().any(|x| x == m), "{sdk:?}: {m} not in {methods:?}");
        }
        // State in Welcome reaches restore_state.
        assert_eq!(p.call(1, "state", serde_json::Value::Null), "from-the-last-instance");
        // A notify naming a method runs it; any other goes to on_notify.
        p.notify("bump", Payload::json(&4).unwrap());
        assert_eq!(p.call(2, "count", serde_json::Value::Null), 4, "{sdk:?}");
        p.notify("mystery", Payload::json(&1).unwrap());
        assert_eq!(p.call(3, "last_notify", serde_json::Value::Null), "mystery", "{sdk:?}");
        // plugd.state (the one way from protocol 2; a hot update in version 1) reaches it too.
        p.notify("plugd.state", Payload::raw(plugin_proto::PayloadCodec::Bincode, b"s2".to_vec()));
        assert_eq!(p.call(4, "state", serde_json::Value::Null), "s2", "{sdk:?}");
        // Shutdown: the state for the next instance, Goodbye, exit 0.
        p.send(&Message::Shutdown { grace_ms: 1000 });
        assert_eq!(p.recv(), Some(Message::State { blob: b"4".to_vec() }), "{sdk:?}");
        assert_eq!(p.recv(), Some(Message::Goodbye), "{sdk:?}");
        assert_eq!(p.status().0, Some(0), "{sdk:?}");
    }
}

#[test]
fn both_sdks_exit_with_the_same_status_for_each_way_to_end() {
    for sdk in BOTH {
        // The supervisor goes away: 0.
        let mut p = Fake::spawn(sdk, &[]);
        p.handshake("{}", None);
        p.sock.shutdown(std::net::Shutdown::Both).unwrap();
        assert_eq!(p.status().0, Some(0), "{sdk:?}: socket closed");

        // Rejected: 2, with the reason.
        let mut p = Fake::spawn(sdk, &[]);
        assert!(matches!(p.recv(), Some(Message::Hello(_))));
        p.send(&Message::Reject { reason: "api_version mismatch".into() });
        let (code, err) = p.status();
        assert_eq!(code, Some(2), "{sdk:?}: rejected: {err}");
        assert!(err.contains("api_version mismatch"), "{sdk:?}: {err}");

        // on_load fails: 1, with the reason.
        let mut p = Fake::spawn(sdk, &[]);
        assert!(matches!(p.recv(), Some(Message::Hello(_))));
        p.send(&Message::Welcome(Welcome {
            proto: 1,
            config_json: r#"{"fail_load": true}"#.into(),
            heartbeat_ms: 0,
            max_frame: DEFAULT_MAX_FRAME,
            state: None,
        }));
        let (code, err) = p.status();
        assert_eq!(code, Some(1), "{sdk:?}: on_load failed: {err}");
        assert!(err.contains("asked to fail in on_load"), "{sdk:?}: {err}");

        // The same on protocol 2: the reason is also sent as Reject (PROTOCOL.md 5.2).
        let mut p = Fake::spawn(sdk, &[]);
        assert!(matches!(p.recv(), Some(Message::Hello(_))));
        p.send(&Message::Welcome(Welcome {
            proto: 2,
            config_json: r#"{"fail_load": true}"#.into(),
            heartbeat_ms: 0,
            max_frame: DEFAULT_MAX_FRAME,
            state: None,
        }));
        let said = p.recv();
        let Some(Message::Reject { reason }) = said else {
            panic!("{sdk:?}: expected Reject after a failed on_load, got {said:?}")
        };
        assert!(reason.contains("asked to fail in on_load"), "{sdk:?}: {reason}");
        assert_eq!(p.status().0, Some(1), "{sdk:?}: exits 1 after saying why");

        // A message only a plugin may send: a protocol error, 3.
        let mut p = Fake::spawn(sdk, &[]);
        p.handshake("{}", None);
        p.send(&Message::Ready);
        let (code, err) = p.status();
        assert_eq!(code, Some(3), "{sdk:?}: wrong-way message: {err}");
        assert!(err.contains("only a plugin may send"), "{sdk:?}: {err}");

        // Garbage instead of a frame: 3.
        let mut p = Fake::spawn(sdk, &[]);
        p.handshake("{}", None);
        std::io::Write::write_all(&mut p.sock, &[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
        assert_eq!(p.status().0, Some(3), "{sdk:?}: garbage frame");

        // Not started by plugd: 2.
        let out = command(sdk).env_remove("PLUGD_FD").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{sdk:?}: not supervised");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not started by a plugd"), "{sdk:?}");
    }
}

#[test]
fn both_sdks_lock_down_execve_when_plugd_asks() {
    for sdk in BOTH {
        let mut p = Fake::spawn(sdk, &[("PLUGD_LOCK_EXEC", "1")]);
        let (_, before_ready) = p.handshake("{}", None);
        let notice = before_ready.iter().find_map(|m| match m {
            Message::Notify { method, payload } if method == "plugd.lockdown" => {
                Some(payload.decode::<Vec<String>>().unwrap())
            }
            _ => None,
        });
        assert_eq!(notice, Some(vec!["no-exec".to_string()]), "{sdk:?}: {before_ready:?}");
        assert_eq!(p.call(1, "bump", serde_json::json!(2)), 2, "{sdk:?}: serves after lockdown");
    }
}
