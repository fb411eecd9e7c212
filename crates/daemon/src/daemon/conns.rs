//! The control socket's connections: at most [`MAX_CONNS`] served at a time (one more
//! gets an immediate refusal, never a wait that would hold up the main loop), an idle
//! timeout for a request that does not arrive, a write timeout for a client that does
//! not read, and parking across an in-place upgrade.
//!
//! On SIGUSR2 every connection stops taking new requests: each finishes the request it
//! is serving, then hands its descriptor and whatever it had read but not served to the
//! upgrade, which passes them to the next plugd; that one serves them on. A client
//! between two requests, or in the middle of writing one, never notices the upgrade.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Notify, Semaphore};

use super::{plugin_peer, Daemon};
use crate::control::{ApiError, ErrorKind, Reply, Request, MAX_LINE};

/// Control connections served at once; one more is refused with a reply saying so.
pub(super) const MAX_CONNS: u32 = 64;

/// How long a connection may take to send a complete request (or sit idle between two).
pub(super) const IDLE: Duration = Duration::from_secs(10);

/// How long a reply may take to be taken by the client.
const WRITE: Duration = Duration::from_secs(10);

/// How long an upgrade waits for requests in flight (an `install --wait` may run for minutes:
/// those are cut, and their clients told by the closed connection).
pub(super) const DRAIN: Duration = Duration::from_secs(5);

/// A control connection (Unix stream socket).
pub(super) type Conn = interprocess::os::unix::uds_local_socket::tokio::Stream;

/// A connection handed from one plugd to the next: its descriptor and the bytes it had
/// read and not yet served (the start of the next request).
#[derive(Debug)]
pub(super) struct Parked {
    pub(super) fd: OwnedFd,
    pub(super) unread: Vec<u8>,
}

/// [`Parked`] as written in the handover file (the descriptor number survives the exec).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct ParkedConn {
    pub(super) fd: RawFd,
    pub(super) unread: Vec<u8>,
}

/// Every control connection of this plugd.
pub(super) struct Conns {
    slots: Arc<Semaphore>,
    /// park_all holds every slot (forgotten permits) until resume gives them back.
    drained: std::sync::atomic::AtomicBool,
    upgrading: watch::Sender<bool>,
    parked: Mutex<Vec<Parked>>,
    stop: Arc<Notify>,
}

impl Conns {
    /// No connections yet; `stop` is notified by a `shutdown` request.
    pub(super) fn new(stop: Arc<Notify>) -> Arc<Conns> {
        Arc::new(Conns {
            slots: Arc::new(Semaphore::new(MAX_CONNS as usize)),
            drained: std::sync::atomic::AtomicBool::new(false),
            upgrading: watch::channel(false).0,
            parked: Mutex::new(Vec::new()),
            stop,
        })
    }

    /// Serves an accepted connection, or refuses it at once when [`MAX_CONNS`] are served.
    pub(super) fn accept(self: &Arc<Self>, daemon: Arc<Daemon>, conn: Conn) {
        self.serve(daemon, conn, Vec::new());
    }

    /// Serves a connection handed over by the previous plugd.
    pub(super) fn adopt(self: &Arc<Self>, daemon: Arc<Daemon>, parked: Parked) {
        match Conn::try_from(parked.fd) {
            Ok(conn) => self.serve(daemon, conn, parked.unread),
            Err(e) => tracing::warn!("cannot serve a control connection handed over: {e}"),
        }
    }

    fn serve(self: &Arc<Self>, daemon: Arc<Daemon>, conn: Conn, unread: Vec<u8>) {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let reply = Reply::err(ApiError::new(ErrorKind::Busy, format!(
                    "plugd is serving {MAX_CONNS} control connections, the most it takes at once; try again"
                )));
                let _ = send(&conn, &reply).await;
            });
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let parked = serve_connection(&daemon, &conn, unread, &me).await;
            if let Some(unread) = parked {
                match OwnedFd::try_from(conn) {
                    Ok(fd) => me.parked.lock().push(Parked { fd, unread }),
                    Err(e) => {
                        tracing::warn!("cannot keep a control connection across the upgrade: {e}")
                    }
                }
            }
            drop(permit);
        });
    }

    /// For an upgrade: stops every connection from taking new requests, waits up to a few
    /// seconds for the requests in flight, and returns the connections, parked.
    pub(super) async fn park_all(&self) -> Vec<Parked> {
        self.upgrading.send_replace(true);
        match tokio::time::timeout(DRAIN, self.slots.acquire_many(MAX_CONNS)).await {
            Ok(Ok(all)) => {
                all.forget();
                self.drained.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            _ => tracing::warn!(
                "control requests still running after {} s are cut by the upgrade",
                DRAIN.as_secs()
            ),
        }
        std::mem::take(&mut *self.parked.lock())
    }

    /// The upgrade did not happen: serve the parked connections again.
    pub(super) fn resume(self: &Arc<Self>, daemon: &Arc<Daemon>, parked: Vec<Parked>) {
        self.upgrading.send_replace(false);
        if self.drained.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.slots.add_permits(MAX_CONNS as usize);
        }
        for p in parked {
            self.adopt(daemon.clone(), p);
        }
    }
}

async fn send(conn: &Conn, reply: &Reply) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(reply).unwrap_or_default();
    out.push(b'\n');
    let mut w = conn;
    match tokio::time::timeout(WRITE, w.write_all(&out)).await {
        Ok(r) => r,
        Err(_) => {
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client does not read"))
        }
    }
}

/// Serves requests until the client hangs up, misbehaves or idles; returns the unread
/// bytes if the connection is to be parked for an upgrade instead.
async fn serve_connection(
    daemon: &Arc<Daemon>,
    conn: &Conn,
    mut pending: Vec<u8>,
    conns: &Conns,
) -> Option<Vec<u8>> {
    use interprocess::local_socket::traits::StreamCommon as _;
    let me = nix::unistd::geteuid().as_raw();
    let creds = conn.peer_creds().ok();
    let peer = creds.as_ref().and_then(|c| c.euid());
    let peer_pid = creds.as_ref().and_then(|c| c.pid());
    // A plugin process (even one running as root, `sandbox.user = "root"`) lives in a pid
    // namespace of its own: whatever its uid, it may not control plugd.
    let refusal = match peer_pid.and_then(plugin_peer) {
        Some(why) => {
            tracing::warn!("refused a control connection from a plugin process ({why})");
            Some(format!("permission denied: {why}; plugins may not control plugd"))
        }
        None if !matches!(peer, Some(uid) if uid == 0 || uid == me) => Some(format!(
            "permission denied: uid {} may not control this plugd (only root and uid {me})",
            peer.map(|u| u.to_string()).unwrap_or_else(|| "unknown".into())
        )),
        None => None,
    };
    if let Some(refusal) = refusal {
        // Read (and ignore) the request first, so the client gets the refusal as an answer
        // rather than a broken pipe.
        let mut buf = vec![0u8; 4096];
        let mut r = conn;
        let _ = tokio::time::timeout(Duration::from_secs(2), r.read(&mut buf)).await;
        let _ = send(conn, &Reply::err(ApiError::new(ErrorKind::Forbidden, refusal))).await;
        return None;
    }
    let mut upgrading = conns.upgrading.subscribe();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        // One complete request, if one is buffered.
        if let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let reply = match serde_json::from_slice::<Request>(&line) {
                Ok(Request::Shutdown) => {
                    conns.stop.notify_one();
                    Reply::ok(serde_json::json!("shutting down"))
                }
                Ok(req) => daemon.handle(req).await,
                Err(e) => {
                    // A line that is not a request: answered, then the connection closes.
                    let _ =
                        send(conn, &Reply::err(ApiError::bad_request(format!("bad request: {e}"))))
                            .await;
                    return None;
                }
            };
            if send(conn, &reply).await.is_err() {
                return None;
            }
            continue;
        }
        if pending.len() > MAX_LINE {
            let _ = send(
                conn,
                &Reply::err(ApiError::bad_request(format!("request longer than {MAX_LINE} bytes"))),
            )
            .await;
            return None;
        }
        if *upgrading.borrow_and_update() {
            return Some(pending);
        }
        let mut r = conn;
        tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => return None,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            },
            _ = upgrading.changed() => {}
            _ = tokio::time::sleep(IDLE) => {
                let why = if pending.is_empty() { "idle" } else { "no complete request" };
                let _ = send(conn, &Reply::err(ApiError::new(ErrorKind::Timeout, format!("{why} for {} s; closing the connection", IDLE.as_secs())))).await;
                return None;
            }
        }
    }
}

impl Parked {
    /// The handover form (the descriptor stays open, owned by `keep`).
    pub(super) fn into_handover(self, keep: &mut Vec<OwnedFd>) -> ParkedConn {
        let fd = self.fd.as_raw_fd();
        keep.push(self.fd);
        ParkedConn { fd, unread: self.unread }
    }
}
