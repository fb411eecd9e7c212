//! systemd's notification protocol (`Type=notify`), spoken by hand.
//!
//! One datagram per message to the socket named by `NOTIFY_SOCKET` (a path,
//! or `@name` for the abstract namespace). Without `NOTIFY_SOCKET` every call
//! is a no-op, so plugd runs the same outside systemd.
//!
//! Hand-written rather than the `sd-notify` crate: its 0.4 line connects to
//! `NOTIFY_SOCKET` as a file path, so an abstract `@name` socket (which systemd and
//! container managers hand out) would never be reached. Revisit when it supports them.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to systemd's notification socket, if there is one.
pub struct Notifier {
    sock: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

fn address(path: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        std::os::unix::net::SocketAddr::from_pathname(path)
    }
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`.
    pub fn from_env() -> Notifier {
        let sock = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            let addr = address(&path).ok()?;
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        Notifier { sock }
    }

    /// Whether systemd is listening.
    pub fn enabled(&self) -> bool {
        self.sock.is_some()
    }

    /// Sends one message (`KEY=value` lines).
    pub fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.sock {
            if let Err(e) = sock.send_to_addr(msg.as_bytes(), addr) {
                tracing::warn!("cannot notify systemd ({msg:?}): {e}");
            }
        }
    }

    /// READY=1 with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}\nMAINPID={}", std::process::id()));
    }

    /// RELOADING=1 with MONOTONIC_USEC, as `Type=notify-reload` requires.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// STOPPING=1.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// STATUS=… only.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    /// The watchdog ping interval (half of WATCHDOG_USEC), if systemd asked for one for this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok()? != std::process::id() {
                return None;
            }
        }
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}

/// CLOCK_MONOTONIC in microseconds.
pub fn monotonic_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
}
