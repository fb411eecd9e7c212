//! The `[health]` watch of one instance (see [`crate::serving`] for the configuration).
//!
//! It runs beside the instance from the end of its handshake. Until the check first
//! passes the instance is not reported Ready, so the plugin stays `starting`, a start
//! waits, and a hot update keeps the old version serving; past `start_timeout` without a
//! pass, or after `failures` failed checks in a row once healthy, it asks the instance to
//! kill the plugin as `unhealthy: …` and the restart policy takes over. Every change is
//! reported to the slot, the one writer of the status.
//!
//! The HTTP probe is a few lines over a socket rather than an HTTP client crate: it sends
//! one GET and reads one status line, and the host library stays small (its footprint
//! test counts crates).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::conn::Conn;
use crate::instance::InstanceEvent;
use crate::serving::{HealthCheck, HealthConfig};

/// Where a check connects.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// The instance's private probe socket (an abstract unix name; see `serving`).
    Probe(Vec<u8>),
    /// An address in plugd's network (a plugin with `network = "host"` and no `[listen]`).
    Inet(SocketAddr),
    /// A plugin method, over the instance's own connection.
    Method,
}

/// The health of a plugin's current instance, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthView {
    /// The check, in words (`http GET /health every 5 s`).
    pub check: String,
    /// `starting` (no pass yet), `healthy` or `failing`.
    pub state: HealthState,
    /// Failed checks in a row.
    pub failures: u32,
    /// What the last failed check got.
    pub last_error: Option<String>,
}

/// Where an instance's health stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Its check has not passed yet.
    Starting,
    /// The last check passed.
    Healthy,
    /// The last check failed (fewer times than the threshold).
    Failing,
}

impl std::fmt::Display for HealthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HealthState::Starting => "starting",
            HealthState::Healthy => "healthy",
            HealthState::Failing => "failing",
        })
    }
}

/// What one instance's watch needs.
pub(crate) struct Watch {
    pub config: HealthConfig,
    pub target: Target,
    pub conn: Arc<Conn>,
    pub generation: u64,
    pub events: mpsc::UnboundedSender<(u64, InstanceEvent)>,
    /// Sent on the first pass (the instance's Ready report, held back until then).
    pub ready: Option<InstanceEvent>,
    /// Asks the instance to kill the plugin, with the reason; closed when it is gone.
    pub kill: oneshot::Sender<String>,
}

impl Watch {
    fn view(&self, state: HealthState, failures: u32, last_error: Option<String>) -> HealthView {
        let c = &self.config;
        let check = format!("{} every {} s", c.check, c.interval.as_secs_f64());
        HealthView { check, state, failures, last_error }
    }

    fn report(&self, view: HealthView) {
        let _ = self.events.send((self.generation, InstanceEvent::Health(view)));
    }

    /// Waits `d`; false when the instance is gone first.
    async fn pause(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = self.kill.closed() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// One check; None when the instance went away meanwhile.
    async fn check(&mut self) -> Option<Result<(), String>> {
        let timeout = self.config.timeout;
        let probe = probe(&self.config.check, &self.target, &self.conn, timeout);
        tokio::select! {
            _ = self.kill.closed() => None,
            r = tokio::time::timeout(timeout, probe) => Some(r.unwrap_or_else(|_| {
                Err(format!("no answer within {} ms", timeout.as_millis()))
            })),
        }
    }
}

/// Runs the watch until the instance is gone (or has been asked to die).
pub(crate) async fn watch(mut w: Watch) {
    let started = Instant::now();
    let mut last: Option<String> = None;
    w.report(w.view(HealthState::Starting, 0, None));
    loop {
        match w.check().await {
            None => return,
            Some(Ok(())) => break,
            Some(Err(e)) => {
                if last.as_ref() != Some(&e) {
                    w.report(w.view(HealthState::Starting, 0, Some(e.clone())));
                    last = Some(e);
                }
            }
        }
        if started.elapsed() >= w.config.start_timeout {
            let why = format!(
                "{} did not pass within {} s (start_timeout): {}",
                w.config.check,
                w.config.start_timeout.as_secs_f64(),
                last.unwrap_or_default()
            );
            let _ = w.kill.send(why);
            return;
        }
        if !w.pause(w.config.start_interval()).await {
            return;
        }
    }
    w.report(w.view(HealthState::Healthy, 0, None));
    if let Some(ready) = w.ready.take() {
        let _ = w.events.send((w.generation, ready));
    }
    let mut failures = 0u32;
    loop {
        if !w.pause(w.config.interval).await {
            return;
        }
        match w.check().await {
            None => return,
            Some(Ok(())) => {
                if failures > 0 {
                    w.report(w.view(HealthState::Healthy, 0, None));
                }
                failures = 0;
            }
            Some(Err(e)) => {
                failures += 1;
                w.report(w.view(HealthState::Failing, failures, Some(e.clone())));
                if failures >= w.config.failures {
                    let why = format!("{} failed {failures} times in a row: {e}", w.config.check);
                    let _ = w.kill.send(why);
                    return;
                }
            }
        }
    }
}

/// One probe of `check` at `target`.
async fn probe(
    check: &HealthCheck,
    target: &Target,
    conn: &Conn,
    timeout: Duration,
) -> Result<(), String> {
    match check {
        HealthCheck::Method(method) => {
            let payload = plugin_proto::Payload::json(&serde_json::Value::Null)
                .map_err(|e| format!("cannot encode the probe: {e}"))?;
            match conn.probe(method, payload, Instant::now() + timeout).await {
                Ok(_) => Ok(()),
                Err(e) => Err(format!("{method}: {e}")),
            }
        }
        _ => probe_net(check, target).await,
    }
}

/// One HTTP or TCP probe of `check` at `target`.
async fn probe_net(check: &HealthCheck, target: &Target) -> Result<(), String> {
    match check {
        HealthCheck::Method(_) => Err("a method check goes over the plugin's connection".into()),
        HealthCheck::Tcp { .. } => connect(target).await.map(drop),
        HealthCheck::Http { addr, path } => {
            let mut s = connect(target).await?;
            let host = addr.map_or("localhost".to_string(), |a| a.to_string());
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: plugd-health\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.map_err(|e| format!("sending GET {path}: {e}"))?;
            let mut head = Vec::with_capacity(64);
            let mut buf = [0u8; 256];
            while !head.contains(&b'\n') && head.len() < 1024 {
                let n = s.read(&mut buf).await.map_err(|e| format!("reading the answer: {e}"))?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let line = String::from_utf8_lossy(&head);
            let line = line.lines().next().unwrap_or_default().trim();
            let mut words = line.split_whitespace();
            let code = match (words.next(), words.next().and_then(|c| c.parse::<u16>().ok())) {
                (Some(v), Some(code)) if v.starts_with("HTTP/") => code,
                _ if line.is_empty() => {
                    return Err(format!("GET {path}: closed without an answer"))
                }
                _ => return Err(format!("GET {path}: not an HTTP answer ({:?})", cut(line))),
            };
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("GET {path}: {}", cut(line)))
            }
        }
    }
}

/// At most 80 characters of what a plugin answered, control characters replaced.
fn cut(text: &str) -> String {
    text.chars().take(80).map(|c| if c.is_control() { '\u{fffd}' } else { c }).collect()
}

/// A stream to the target: `Box` over the two socket kinds.
type Stream = Box<dyn AsyncStream>;
trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncStream for T {}

async fn connect(target: &Target) -> Result<Stream, String> {
    match target {
        Target::Inet(addr) => tokio::net::TcpStream::connect(addr)
            .await
            .map(|s| Box::new(s) as Stream)
            .map_err(|e| format!("connect {addr}: {e}")),
        Target::Probe(name) => {
            // A non-blocking connect: a full backlog (a wedged server) fails at once
            // (EAGAIN) instead of blocking a runtime thread.
            let fd = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_NONBLOCK
                    | nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(|e| format!("probe socket: {e}"))?;
            let ua = nix::sys::socket::UnixAddr::new_abstract(name)
                .map_err(|e| format!("probe socket: {e}"))?;
            match nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &ua) {
                Ok(()) => {}
                Err(nix::errno::Errno::EAGAIN) => {
                    return Err("the server accepts no connection (its backlog is full)".into())
                }
                Err(e) => return Err(format!("connect: {e}")),
            }
            let std = std::os::unix::net::UnixStream::from(fd);
            tokio::net::UnixStream::from_std(std)
                .map(|s| Box::new(s) as Stream)
                .map_err(|e| format!("probe socket: {e}"))
        }
        Target::Method => Err("no socket to connect to".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A server on 127.0.0.1 that answers every connection with `answer` and closes.
    async fn answering(answer: &'static [u8]) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
            }
        });
        addr
    }

    fn http(addr: SocketAddr) -> HealthCheck {
        HealthCheck::Http { addr: Some(addr), path: "/health".into() }
    }

    #[tokio::test]
    async fn an_http_check_passes_on_2xx_and_3xx_and_says_what_it_got_otherwise() {
        for (answer, want) in [
            (&b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..], Ok(())),
            (b"HTTP/1.0 302 Found\r\n\r\n", Ok(())),
            (
                b"HTTP/1.1 503 Service Unavailable\r\n\r\n",
                Err("GET /health: HTTP/1.1 503 Service Unavailable".to_string()),
            ),
            (
                b"SSH-2.0-OpenSSH\r\n",
                Err("GET /health: not an HTTP answer (\"SSH-2.0-OpenSSH\")".to_string()),
            ),
            (b"", Err("GET /health: closed without an answer".to_string())),
            // A hostile answer is cut and its control characters replaced.
            (
                b"HTTP/1.1 500 \x1b[2Jgone\r\n\r\n",
                Err("GET /health: HTTP/1.1 500 \u{fffd}[2Jgone".to_string()),
            ),
        ] {
            let addr = answering(answer).await;
            assert_eq!(probe_net(&http(addr), &Target::Inet(addr)).await, want);
        }
        // Nobody listening: the connect error, naming the address.
        let addr = answering(b"").await;
        let free = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = probe_net(&http(addr), &Target::Inet(free)).await.unwrap_err();
        assert!(e.starts_with(&format!("connect {free}:")), "{e}");
        assert_eq!(probe_net(&HealthCheck::Tcp { addr: None }, &Target::Inet(addr)).await, Ok(()));
    }

    #[tokio::test]
    async fn a_probe_socket_with_nobody_behind_it_fails_without_blocking() {
        let (fd, name) = crate::serving::probe_socket("t").unwrap();
        let tcp = HealthCheck::Tcp { addr: None };
        // Listening: a connection is queued, which is a pass for a TCP check.
        assert_eq!(probe_net(&tcp, &Target::Probe(name.clone())).await, Ok(()));
        drop(fd);
        let e = probe_net(&tcp, &Target::Probe(name)).await.unwrap_err();
        assert!(e.starts_with("connect:"), "{e}");
    }
}
