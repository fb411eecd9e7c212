//! The HTTP admin API (off unless `[http] listen` is set in plugd.toml).
//!
//! Every endpoint maps onto a control-socket request (`control::Request`) and
//! runs through the same [`Daemon::handle`], so HTTP and plugctl can never
//! disagree. Every request needs `Authorization: Bearer <token>` with the token
//! from `[http] token_file` — reads too (they show every plugin's logs), unless
//! `[http] public_reads = true` — and the token is checked before a byte of the
//! body is read. A non-loopback listen needs a token file (plugd refuses to start
//! without one). Clients are treated as hostile: at most [`MAX_CONNECTIONS`] at
//! once (the rest wait in the accept queue), headers within [`HEADER_TIMEOUT`], a body within
//! [`BODY_TIMEOUT`] (408) and under the cap (413); a malformed argument is a 400
//! naming the problem.
//! `GET /metrics` is the Prometheus text format, built from the same status
//! snapshot plus each plugin process's RSS and CPU time from `/proc`.
//! `docs/http-api.md` shows every endpoint with a `curl` line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::control::{ErrorKind, Reply, Request, Secret, StatusEntry};
use crate::daemon::Daemon;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// `[http]` of plugd.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Address to listen on, e.g. `127.0.0.1:7070`.
    pub listen: SocketAddr,
    /// File holding the bearer token (required for POSTs, and for everything off loopback).
    pub token_file: Option<PathBuf>,
    /// Largest request body accepted, in bytes.
    pub max_body: usize,
    /// Largest body of an install or validate upload (an archive), in bytes.
    pub max_upload: usize,
    /// `GET`s without the token (on a trusted host: any local user can read every
    /// plugin's status and logs).
    pub public_reads: bool,
}

/// Connections served at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 256;

/// Time a client has to send a request's headers (and to start the next one on a
/// keep-alive connection).
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Time a client has to send a request's body.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Default request body cap.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// Default cap of an uploaded archive (`POST /v1/install`, `/v1/validate`).
pub const DEFAULT_MAX_UPLOAD: usize = 64 << 20;

struct Api {
    daemon: Arc<Daemon>,
    token: Option<String>,
    /// Reads need the token too (unless `public_reads`).
    guard_reads: bool,
    max_body: usize,
    max_upload: usize,
    started: std::time::Instant,
}

/// Reads the token and checks the listen address is allowed; the error says what to fix.
fn token_for(cfg: &HttpConfig) -> Result<Option<String>, String> {
    let token = match &cfg.token_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!("[http] token_file {}: cannot read it: {e}", path.display())
            })?;
            let token = text.trim().to_string();
            if token.len() < 16 {
                return Err(format!(
                    "[http] token_file {}: the token is shorter than 16 characters; write a long random one (e.g. `openssl rand -hex 32`)",
                    path.display()
                ));
            }
            Some(token)
        }
    };
    if !cfg.listen.ip().is_loopback() && token.is_none() {
        return Err(format!(
            "[http] listen = \"{}\" is not a loopback address; set [http] token_file to allow that",
            cfg.listen
        ));
    }
    Ok(token)
}

/// Binds the listener (so a bad address fails plugd's start) and returns the server future.
pub async fn bind(
    daemon: Arc<Daemon>,
    cfg: &HttpConfig,
    inherited: Option<std::os::fd::OwnedFd>,
) -> Result<HttpServer, String> {
    let token = token_for(cfg)?;
    let api = Arc::new(Api {
        daemon,
        token,
        guard_reads: !cfg.public_reads,
        max_body: cfg.max_body,
        max_upload: cfg.max_upload,
        started: std::time::Instant::now(),
    });
    let app = Router::new()
        .route("/v1/plugins", get(list))
        .route("/v1/plugins/{name}", get(one))
        .route("/v1/plugins/{name}/versions", get(versions))
        .route("/v1/plugins/{name}/logs", get(logs))
        .route("/v1/plugins/{name}/call/{method}", post(call))
        .route("/v1/plugins/{name}/{action}", post(action))
        .route("/v1/reload", post(reload))
        .route("/v1/install", post(install))
        .route("/v1/validate", post(validate))
        .route("/v1/jobs", get(jobs))
        .route("/v1/jobs/{id}", get(job))
        .route("/v1/jobs/{id}/{action}", post(job_action))
        .route("/metrics", get(metrics))
        .route_service("/mcp", crate::mcp::service(api.daemon.clone(), cfg.listen))
        .route("/", get(dashboard_page))
        .route("/assets/{file}", get(dashboard_asset))
        .fallback(|| async {
            failure(ErrorKind::NotFound, "no such endpoint; see docs/http-api.md")
        })
        .layer(DefaultBodyLimit::max(cfg.max_body.max(cfg.max_upload)))
        .layer(axum::middleware::from_fn_with_state(api.clone(), guard))
        .with_state(api);
    // The listener a previous plugd handed over, if it listens where the config says.
    let inherited = inherited.and_then(|fd| {
        let std = std::net::TcpListener::from(fd);
        (std.local_addr().ok() == Some(cfg.listen)).then_some(std)
    });
    let listener = match inherited {
        Some(std) => std,
        None => {
            // A deep accept queue: a burst of clients (a dashboard fleet, a load test)
            // waits in the kernel instead of being reset.
            let fresh = (|| {
                let socket = if cfg.listen.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                socket.set_reuseaddr(true)?;
                socket.bind(cfg.listen)?;
                socket.listen(4096)?.into_std()
            })()
            .map_err(|e| format!("[http] listen = \"{}\": {e}", cfg.listen))?;
            tracing::info!("HTTP admin API on http://{}", cfg.listen);
            fresh
        }
    };
    Ok(HttpServer { app, listener, running: None })
}

/// The HTTP API: bound (connections wait in the kernel's queue) until [`HttpServer::serve`],
/// drained and handed over across an in-place upgrade.
pub struct HttpServer {
    app: Router,
    /// The listening socket; the server runs on a duplicate, so this one outlives a drain.
    listener: std::net::TcpListener,
    running: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl HttpServer {
    /// Starts answering requests.
    pub fn serve(&mut self) -> Result<(), String> {
        let dup = self.listener.try_clone().and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)
        });
        let listener = dup.map_err(|e| format!("HTTP listener: {e}"))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = self.app.clone();
        let task = tokio::spawn(async move {
            accept_loop(listener, app, stopped).await;
        });
        self.running = Some((stop, task));
        Ok(())
    }

    /// Stops accepting (new connections wait in the kernel's queue) and waits up to
    /// `limit` for the requests in flight; idle keep-alive connections are closed.
    pub async fn drain(&mut self, limit: std::time::Duration) {
        if let Some((stop, mut task)) = self.running.take() {
            let _ = stop.send(());
            if tokio::time::timeout(limit, &mut task).await.is_err() {
                tracing::warn!(
                    "HTTP requests still running after {} s are cut by the upgrade",
                    limit.as_secs()
                );
                task.abort();
            }
        }
    }

    /// The listening socket, for the handover.
    pub fn listener_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.as_fd()
    }
}

/// Accepts connections until `stop`, then waits for the ones open to finish (idle
/// keep-alive connections are closed at once). Each connection is served by hyper with a
/// header timeout; at [`MAX_CONNECTIONS`], accepting pauses until one ends.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        // At the limit, stop accepting: the next clients wait in the kernel's queue (4096
        // deep) until a connection ends — an idle one within HEADER_TIMEOUT.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: back off instead of spinning.
                    tracing::warn!("HTTP accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    // A connection accepted a moment ago may not have sent its request yet, and hyper's
    // graceful shutdown closes a connection with no request in progress: give the young
    // ones a moment to start theirs, so only truly idle keep-alive connections are closed.
    let young = std::time::Instant::now() + std::time::Duration::from_millis(100);
    while slots.available_permits() < MAX_CONNECTIONS && std::time::Instant::now() < young {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    graceful.shutdown().await;
}

/// Before any handler: the token (before a byte of the body is read), then the body,
/// whole, within [`BODY_TIMEOUT`] and the size cap.
async fn guard(
    State(api): State<Arc<Api>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    // MCP calls tools: the token always, whatever the method.
    let mutating = !matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD)
        || path == "/mcp";
    // The dashboard's page and scripts are public: it asks for the token itself and sends
    // it with every API request.
    if !mutating && (path == "/" || path.starts_with("/assets/")) {
        return next.run(req).await;
    }
    if let Some(r) = api.check(req.headers(), mutating) {
        return r;
    }
    if path == "/mcp" && api.daemon.mcp_config().is_none() {
        return failure(
            ErrorKind::NotFound,
            "MCP is off: add [mcp] expose = [\"plugin.*\"] to plugd.toml and reload",
        );
    }
    // Archives are bigger than API requests.
    let (limit, key) = if matches!(path, "/v1/install" | "/v1/validate") {
        (api.max_upload, "max_upload")
    } else {
        (api.max_body, "max_body")
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return failure(
            ErrorKind::TooLarge,
            format!("the body is over {limit} bytes ([http] {key})"),
        );
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Err(_) => {
            return failure(
                ErrorKind::Timeout,
                format!("the body did not arrive within {} s", BODY_TIMEOUT.as_secs()),
            )
        }
        Ok(Err(_)) => {
            return failure(
                ErrorKind::TooLarge,
                format!("the body is over {limit} bytes ([http] {key}), or broke off"),
            )
        }
        Ok(Ok(b)) => b,
    };
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// An error response: the status from its kind, and `{"error": message, "kind": kind}`.
fn failure(kind: ErrorKind, message: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(kind.http_status()).unwrap_or(StatusCode::CONFLICT);
    (status, Json(serde_json::json!({ "error": message.into(), "kind": kind }))).into_response()
}

impl Api {
    /// None if the request may proceed; the 401 otherwise.
    fn check(&self, headers: &HeaderMap, mutating: bool) -> Option<Response> {
        if !mutating && !self.guard_reads {
            return None;
        }
        let Some(token) = &self.token else {
            return Some(failure(
                ErrorKind::Unauthorized,
                "this needs a token: set [http] token_file in plugd.toml and send `Authorization: Bearer <token>` (or [http] public_reads = true to open reads)",
            ));
        };
        let sent = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(sent.as_bytes(), token.as_bytes()) {
            None
        } else {
            Some(failure(ErrorKind::Unauthorized, "missing or wrong bearer token"))
        }
    }

    async fn run(&self, req: Request) -> Response {
        reply_to_response(self.daemon.handle(req).await)
    }
}

/// Compares without leaking where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The HTTP status for a daemon answer.
fn reply_to_response(reply: Reply) -> Response {
    match reply.error {
        None => Json(reply.data.unwrap_or(serde_json::Value::Null)).into_response(),
        Some(e) => failure(e.kind, e.message),
    }
}

async fn list(State(api): State<Arc<Api>>) -> Response {
    api.run(Request::Status { name: None }).await
}

async fn one(State(api): State<Arc<Api>>, Path(name): Path<String>) -> Response {
    match api.daemon.handle(Request::Status { name: Some(name) }).await {
        Reply { ok: true, data: Some(serde_json::Value::Array(mut list)), .. }
            if !list.is_empty() =>
        {
            Json(list.swap_remove(0)).into_response()
        }
        other => reply_to_response(other),
    }
}

async fn versions(State(api): State<Arc<Api>>, Path(name): Path<String>) -> Response {
    api.run(Request::Versions { name }).await
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    n: Option<usize>,
    since_ms: Option<u64>,
    since_seq: Option<u64>,
    #[serde(default)]
    follow: bool,
}

async fn logs(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Response {
    let n = q.n.unwrap_or(100).min(10_000);
    if !q.follow {
        return api
            .run(Request::Logs { name, n, since_ms: q.since_ms, since_seq: q.since_seq })
            .await;
    }
    // Follow: the tail, then every new line as the plugin's log gets it (a subscription,
    // not polling), as SSE `log` events; lines a slow client missed are said as a `gap`
    // event. Ends when the client goes away or the plugin is unloaded (`end`).
    let live = api.daemon.plugin(&name).map(|h| h.subscribe_logs());
    let first = api
        .daemon
        .handle(Request::Logs {
            name: name.clone(),
            n,
            since_ms: q.since_ms,
            since_seq: q.since_seq,
        })
        .await;
    if !first.ok {
        return reply_to_response(first);
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let daemon = api.daemon.clone();
    if let Some(mut live) = live {
        tokio::spawn(async move {
            let mut last = 0u64;
            for line in first.data.as_ref().and_then(|d| d.as_array()).into_iter().flatten() {
                last = line["seq"].as_u64().unwrap_or(last).max(last);
                if tx.send(Event::default().event("log").data(line.to_string())).is_err() {
                    return;
                }
            }
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let event = tokio::select! {
                    r = live.recv() => match r {
                        Ok(line) if line.seq <= last => continue,
                        Ok(line) => {
                            last = line.seq;
                            Event::default().event("log").data(serde_json::to_string(&line).unwrap_or_default())
                        }
                        Err(RecvError::Lagged(n)) => Event::default().event("gap").data(format!("{n} lines were not sent: this client read too slowly")),
                        Err(RecvError::Closed) => {
                            let _ = tx.send(Event::default().event("end").data("the plugin was unloaded"));
                            return;
                        }
                    },
                    _ = tx.closed() => return,
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        return Sse::new(EventStream(rx)).keep_alive(KeepAlive::default()).into_response();
    }
    // Not loaded (disabled, say): its log is empty until it is; poll for that.
    tokio::spawn(async move {
        let mut reply = first;
        let mut last = q.since_seq.unwrap_or(0);
        loop {
            for line in reply.data.as_ref().and_then(|d| d.as_array()).into_iter().flatten() {
                last = line["seq"].as_u64().unwrap_or(last).max(last);
                if tx.send(Event::default().event("log").data(line.to_string())).is_err() {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            if tx.is_closed() {
                return;
            }
            let req =
                Request::Logs { name: name.clone(), n: 0, since_ms: None, since_seq: Some(last) };
            reply = daemon.handle(req).await;
            if !reply.ok {
                let _ = tx.send(Event::default().event("error").data(reply.message()));
                return;
            }
        }
    });
    Sse::new(EventStream(rx)).keep_alive(KeepAlive::default()).into_response()
}

/// SSE events from a channel.
struct EventStream(tokio::sync::mpsc::UnboundedReceiver<Event>);

impl futures_core::Stream for EventStream {
    type Item = Result<Event, std::convert::Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|e| e.map(Ok))
    }
}

/// `?stream=true` on a call: each piece the plugin streams is a `chunk` event, then the
/// `reply` (or `error`) event ends the stream.
async fn call_streamed(
    api: &Api,
    name: String,
    method: String,
    json: String,
    cfg: Option<Secret>,
) -> Response {
    if api.daemon.plugin(&name).is_none() {
        return reply_to_response(api.daemon.handle(Request::Status { name: Some(name) }).await);
    }
    let (chunk_tx, mut chunk_rx) = tokio::sync::mpsc::unbounded_channel::<supervisor::Payload>();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let as_json = |p: &supervisor::Payload| match p.codec {
        supervisor::PayloadCodec::Json => String::from_utf8_lossy(&p.data).into_owned(),
        supervisor::PayloadCodec::Bincode => {
            serde_json::json!({ "bincode_bytes": p.data.len() }).to_string()
        }
    };
    let daemon = api.daemon.clone();
    tokio::spawn(async move {
        // The same path as a plain call (schema check, cfg), with the pieces sent on.
        let call = daemon.call(&name, &method, json, cfg, Some(chunk_tx));
        tokio::pin!(call);
        let result = loop {
            tokio::select! {
                Some(chunk) = chunk_rx.recv() => {
                    let _ = tx.send(Event::default().event("chunk").data(as_json(&chunk)));
                }
                r = &mut call => break r,
            }
        };
        // Pieces that arrived just before the reply.
        while let Ok(chunk) = chunk_rx.try_recv() {
            let _ = tx.send(Event::default().event("chunk").data(as_json(&chunk)));
        }
        let last = match result {
            Ok(v) => Event::default().event("reply").data(v.to_string()),
            Err(e) => Event::default()
                .event("error")
                .data(serde_json::json!({ "error": e.message, "kind": e.kind }).to_string()),
        };
        let _ = tx.send(last);
    });
    Sse::new(EventStream(rx)).into_response()
}

#[derive(serde::Deserialize)]
struct CallQuery {
    #[serde(default)]
    stream: bool,
}

/// The header that carries a call's `cfg` (JSON: an API key, say). A header, not the
/// query: URLs end up in access logs.
pub const CFG_HEADER: &str = "x-plugd-cfg";

async fn call(
    State(api): State<Arc<Api>>,
    Path((name, method)): Path<(String, String)>,
    Query(q): Query<CallQuery>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let cfg = match headers.get(CFG_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(text)) => Some(Secret::new(text)),
        Some(Err(_)) => {
            return failure(ErrorKind::BadRequest, format!("the {CFG_HEADER} header is not text"))
        }
    };
    let json = match std::str::from_utf8(&body) {
        Ok(t) if t.trim().is_empty() => "null".to_string(),
        Ok(t) => t.to_string(),
        Err(_) => return failure(ErrorKind::BadRequest, "the body is not UTF-8 JSON"),
    };
    if let Err(e) = serde_json::from_str::<serde_json::Value>(&json) {
        return failure(
            ErrorKind::BadRequest,
            format!("the body (the argument of {name}.{method}) is not valid JSON: {e}"),
        );
    }
    if q.stream {
        return call_streamed(&api, name, method, json, cfg).await;
    }
    api.run(Request::Call { name, method, json, cfg }).await
}

/// The query of a plugin action: `?dry_run=true` on `update` answers the plan (what
/// would change, the dependency diff) at once instead of starting a job.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ActionQuery {
    #[serde(default)]
    dry_run: bool,
}

async fn action(
    State(api): State<Arc<Api>>,
    Path((name, action)): Path<(String, String)>,
    Query(q): Query<ActionQuery>,
    body: Bytes,
) -> Response {
    let req = match action.as_str() {
        "update" if q.dry_run => return dry_run_update(&api, name, &body).await,
        "update" | "uninstall" => return job_for(&api, name, &action, &body).await,
        "start" => Request::Start { name },
        "stop" => Request::Stop { name },
        "restart" => Request::Restart { name },
        "enable" => Request::Enable { name },
        "disable" => Request::Disable { name },
        other => {
            return failure(
                ErrorKind::NotFound,
                format!(
                    "no action {other:?}; use start, stop, restart, enable, disable, update, uninstall or call/METHOD"
                ),
            )
        }
    };
    api.run(req).await
}

async fn reload(State(api): State<Arc<Api>>) -> Response {
    api.run(Request::Reload).await
}

/// The query of `POST /v1/install` when the body is an uploaded archive.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct InstallQuery {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    enable: bool,
}

async fn install(
    State(api): State<Arc<Api>>,
    Query(q): Query<InstallQuery>,
    body: Bytes,
) -> Response {
    // An uploaded .tar.gz or .zip (the dashboard's file input): kept under the state folder
    // for the job (and a retry), then installed like an archive on disk.
    let gz = body.starts_with(&[0x1f, 0x8b]);
    if gz || body.starts_with(b"PK\x03\x04") {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = api.daemon.uploads_dir();
        let file = dir.join(format!(
            "upload-{}-{n}.{}",
            std::process::id(),
            if gz { "tar.gz" } else { "zip" }
        ));
        let written = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&file, &body));
        if let Err(e) = written {
            return failure(
                ErrorKind::Failed,
                format!("cannot keep the upload at {}: {e}", file.display()),
            );
        }
        // A wheel is a .zip too: it keeps the file name pip wants, in a folder of its own.
        let file = match crate::wheel::file_name(&file) {
            Some(name) => {
                let own = dir.join(format!("wheel-{}-{n}", std::process::id()));
                let named = own.join(name);
                match std::fs::create_dir_all(&own).and_then(|_| std::fs::rename(&file, &named)) {
                    Ok(()) => named,
                    Err(e) => {
                        return failure(ErrorKind::Failed, format!("cannot keep the wheel: {e}"))
                    }
                }
            }
            None => file,
        };
        let source = file.display().to_string();
        return accepted(
            api.daemon
                .handle(Request::InstallJob { source, force: q.force, enable: q.enable })
                .await,
        );
    }
    let params: crate::jobs::InstallParams = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return failure(
                ErrorKind::BadRequest,
                format!(
                "the body must be {{\"source\": \"…\", \"force\": false, \"enable\": false}}: {e}"
            ),
            )
        }
    };
    let req =
        Request::InstallJob { source: params.source, force: params.force, enable: params.enable };
    accepted(api.daemon.handle(req).await)
}

/// Validates a plugin without installing it: `{"path": "/folder"}`, or the bytes of a
/// `.tar.gz` / `.zip` as the body (unpacked with the install's safety checks).
async fn validate(State(api): State<Arc<Api>>, body: Bytes) -> Response {
    let daemon = api.daemon.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, String> {
        let gz = body.starts_with(&[0x1f, 0x8b]);
        let zip = body.starts_with(b"PK\x03\x04");
        if !gz && !zip {
            #[derive(serde::Deserialize)]
            struct ByPath {
                path: std::path::PathBuf,
            }
            let p: ByPath = serde_json::from_slice(&body).map_err(|e| {
                format!(
                    "send {{\"path\": \"/plugin/folder\"}} or the bytes of a .tar.gz or .zip: {e}"
                )
            })?;
            return daemon.validate_folder(&p.path);
        }
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let scratch =
            std::env::temp_dir().join(format!("plugd-validate-{}-{n}", std::process::id()));
        let checked = (|| {
            std::fs::create_dir_all(&scratch).map_err(|e| format!("temp folder: {e}"))?;
            let archive = scratch.join(if zip { "upload.zip" } else { "upload.tar.gz" });
            std::fs::write(&archive, &body)
                .map_err(|e| format!("write {}: {e}", archive.display()))?;
            let unpacked = scratch.join("unpacked");
            if zip {
                crate::install::unpack_zip(&archive, &unpacked)?;
            } else {
                crate::install::unpack_tar_gz(&archive, &unpacked)?;
            }
            let folder = crate::install::plugin_folder(&unpacked)?;
            daemon.validate_folder(&folder)
        })();
        let _ = std::fs::remove_dir_all(&scratch);
        checked
    })
    .await
    .unwrap_or_else(|e| Err(format!("validation task failed: {e}")));
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(serde_json::json!({ "valid": false, "error": e })),
        )
            .into_response(),
    }
}

/// The body of `update` and `uninstall`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct JobOptions {
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    purge: bool,
}

impl JobOptions {
    /// The options in `body` (empty: the defaults), or what is wrong with it.
    fn from_body(body: &[u8], action: &str) -> Result<JobOptions, String> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(JobOptions::default());
        }
        serde_json::from_slice(body)
            .map_err(|e| format!("the body of {action} takes version, force and purge: {e}"))
    }
}

/// `update` / `uninstall` as a background job: `{"version": "2.0.0", "force": false}` or
/// `{"version": null, "purge": true}` (an empty body takes the defaults).
async fn job_for(api: &Api, name: String, action: &str, body: &[u8]) -> Response {
    let o = match JobOptions::from_body(body, action) {
        Ok(o) => o,
        Err(e) => return failure(ErrorKind::BadRequest, e),
    };
    // Unknown plugins answer 404 now rather than as a failed job.
    let known = api.daemon.handle(Request::Status { name: Some(name.clone()) }).await;
    if !known.ok {
        return reply_to_response(known);
    }
    let req = if action == "update" {
        Request::UpdateJob { name, version: o.version, force: o.force }
    } else {
        Request::UninstallJob { name, version: o.version, purge: o.purge }
    };
    accepted(api.daemon.handle(req).await)
}

/// `update?dry_run=true`: the plan, now (`{"version": ..., "force": ...}` as for update).
async fn dry_run_update(api: &Api, name: String, body: &[u8]) -> Response {
    let o = match JobOptions::from_body(body, "update") {
        Ok(o) => o,
        Err(e) => return failure(ErrorKind::BadRequest, e),
    };
    api.run(Request::Update { name, version: o.version, force: o.force, dry_run: true }).await
}

/// The dashboard's files, built into the binary (plain JavaScript: no Node toolchain).
const DASHBOARD: &[(&str, &str, &str)] = &[
    ("dashboard.js", "text/javascript; charset=utf-8", include_str!("dashboard/dashboard.js")),
    ("dashboard.css", "text/css; charset=utf-8", include_str!("dashboard/dashboard.css")),
];

/// Headers of every dashboard response: its own scripts only, never framed, no sniffing.
fn dashboard_headers() -> [(header::HeaderName, &'static str); 4] {
    [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-cache"),
    ]
}

async fn dashboard_page() -> Response {
    let page = include_str!("dashboard/index.html");
    (dashboard_headers(), [(header::CONTENT_TYPE, "text/html; charset=utf-8")], page)
        .into_response()
}

async fn dashboard_asset(Path(file): Path<String>) -> Response {
    match DASHBOARD.iter().find(|(name, _, _)| *name == file) {
        Some((_, kind, text)) => {
            (dashboard_headers(), [(header::CONTENT_TYPE, *kind)], *text).into_response()
        }
        None => failure(ErrorKind::NotFound, format!("no dashboard file {file:?}")),
    }
}

/// 202 with the job id, for requests that start a job.
fn accepted(reply: Reply) -> Response {
    if reply.ok {
        (StatusCode::ACCEPTED, Json(reply.data.unwrap_or_default())).into_response()
    } else {
        reply_to_response(reply)
    }
}

async fn jobs(State(api): State<Arc<Api>>) -> Response {
    api.run(Request::Jobs).await
}

async fn job(State(api): State<Arc<Api>>, Path(id): Path<u64>) -> Response {
    api.run(Request::Job { id }).await
}

async fn job_action(
    State(api): State<Arc<Api>>,
    Path((id, action)): Path<(u64, String)>,
) -> Response {
    match action.as_str() {
        "cancel" => api.run(Request::CancelJob { id }).await,
        "retry" => accepted(api.daemon.handle(Request::RetryJob { id }).await),
        other => {
            failure(ErrorKind::NotFound, format!("no job action {other:?}; use cancel or retry"))
        }
    }
}

async fn metrics(State(api): State<Arc<Api>>) -> Response {
    let status = match api.daemon.entries(None) {
        Ok(list) => list,
        Err(e) => return failure(e.kind, e.message),
    };
    let jobs = match api.daemon.handle(Request::Jobs).await {
        Reply { ok: true, data: Some(serde_json::Value::Array(list)), .. } => list,
        _ => Vec::new(),
    };
    let job_states = ["queued", "running", "succeeded", "failed", "cancelled"]
        .map(|state| (state, jobs.iter().filter(|j| j["state"] == state).count() as u64));
    let text = render_metrics(&status, &job_states, api.started.elapsed().as_secs_f64());
    let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, kind)], text).into_response()
}

/// Reads one counter of a plugin's status.
type PerPlugin = fn(&StatusEntry) -> u64;

/// The plugin states `plugd_plugin_state` has a sample for.
const STATES: &[&str] =
    &["starting", "ready", "draining", "stopping", "exited", "failed", "stopped", "disabled"];

/// One scrape's snapshot, written out by prometheus-client's OpenMetrics encoder.
#[derive(Debug)]
struct Snapshot {
    status: Vec<StatusEntry>,
    jobs: Vec<(&'static str, u64)>,
    uptime_secs: f64,
}

impl Collector for Snapshot {
    fn encode(&self, mut out: DescriptorEncoder<'_>) -> std::fmt::Result {
        let help = "Seconds since this plugd process started its HTTP API.";
        let mut m = out.encode_descriptor("plugd_uptime_seconds", help, None, MetricType::Gauge)?;
        m.encode_gauge(&self.uptime_secs)?;

        let help = "1 for the state the plugin is in.";
        let mut m = out.encode_descriptor("plugd_plugin_state", help, None, MetricType::Gauge)?;
        for p in &self.status {
            for s in STATES {
                let labels = [("plugin", p.name.as_str()), ("state", s)];
                m.encode_family(&labels)?.encode_gauge(&u64::from(*s == p.state))?;
            }
        }

        let help = "1 while the plugin's [health] check passes (plugins with a check only).";
        let mut m = out.encode_descriptor("plugd_plugin_healthy", help, None, MetricType::Gauge)?;
        for p in &self.status {
            if let Some(h) = &p.health {
                let labels = [("plugin", p.name.as_str())];
                m.encode_family(&labels)?.encode_gauge(&u64::from(h.state == "healthy"))?;
            }
        }
        let help = "Failed [health] checks in a row.";
        let name = "plugd_plugin_health_failures";
        let mut m = out.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for p in &self.status {
            if let Some(h) = &p.health {
                let labels = [("plugin", p.name.as_str())];
                m.encode_family(&labels)?.encode_gauge(&u64::from(h.failures))?;
            }
        }

        // Counters: the encoder adds `_total` to these names.
        let per_plugin: [(&str, &str, PerPlugin); 2] = [
            ("plugd_plugin_restarts", "Restarts since the plugin was loaded.", |p| {
                u64::from(p.restarts)
            }),
            (
                "plugd_plugin_log_lines_dropped",
                "Log lines over the rate limit, not written to plugd's log.",
                |p| p.log_lines_dropped,
            ),
        ];
        for (name, help, value) in per_plugin {
            let mut m = out.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in &self.status {
                let labels = [("plugin", p.name.as_str())];
                m.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(&value(p), None)?;
            }
        }

        let help = "Calls answered, by result.";
        let mut m = out.encode_descriptor("plugd_plugin_calls", help, None, MetricType::Counter)?;
        for p in &self.status {
            for (result, n) in [("ok", p.calls_ok), ("error", p.calls_err)] {
                let labels = [("plugin", p.name.as_str()), ("result", result)];
                m.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }

        let usage: Vec<(&str, (u64, f64))> = self
            .status
            .iter()
            .filter_map(|p| Some((p.name.as_str(), crate::spawn::proc_usage(p.pid?)?)))
            .collect();
        let help = "Resident memory of the plugin's processes.";
        let name = "plugd_plugin_resident_memory_bytes";
        let mut m = out.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (plugin, (rss, _)) in &usage {
            m.encode_family(&[("plugin", *plugin)])?.encode_gauge(rss)?;
        }
        let help = "CPU time used by the plugin's processes.";
        let name = "plugd_plugin_cpu_seconds";
        let mut m = out.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (plugin, (_, cpu)) in &usage {
            m.encode_family(&[("plugin", *plugin)])?
                .encode_counter::<NoLabelSet, _, u64>(cpu, None)?;
        }

        let help = "1 for each sandbox layer in force.";
        let name = "plugd_plugin_sandbox_layer";
        let mut m = out.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for p in &self.status {
            for layer in &p.sandbox {
                let labels = [("plugin", p.name.as_str()), ("layer", layer.as_str())];
                m.encode_family(&labels)?.encode_gauge(&1u64)?;
            }
        }

        let help = "Instance ends, by kind of reason.";
        let mut m = out.encode_descriptor("plugd_plugin_exits", help, None, MetricType::Counter)?;
        for p in &self.status {
            for (reason, n) in &p.exits {
                let labels = [("plugin", p.name.as_str()), ("reason", reason.as_str())];
                m.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(n, None)?;
            }
        }

        let help = "Call round-trip time seen by the host.";
        let name = "plugd_plugin_call_duration_seconds";
        let mut m = out.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for p in &self.status {
            let lat = &p.latency;
            if lat.counts.len() != lat.bounds_us.len() + 1 {
                continue;
            }
            let buckets: Vec<(f64, u64)> = lat
                .counts
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    (lat.bounds_us.get(i).map(|b| *b as f64 / 1e6).unwrap_or(f64::INFINITY), *c)
                })
                .collect();
            let count = lat.counts.iter().sum();
            let labels = [("plugin", p.name.as_str())];
            m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                lat.sum_us as f64 / 1e6,
                count,
                &buckets,
                None,
            )?;
        }

        let help = "Install jobs known to plugd, by state.";
        let mut m = out.encode_descriptor("plugd_jobs", help, None, MetricType::Gauge)?;
        for (state, n) in &self.jobs {
            m.encode_family(&[("state", *state)])?.encode_gauge(n)?;
        }
        Ok(())
    }
}

/// The OpenMetrics text of a status snapshot (one sample per plugin and series), written
/// by prometheus-client; label values are escaped by it.
pub fn render_metrics(
    status: &[StatusEntry],
    jobs: &[(&'static str, u64)],
    uptime_secs: f64,
) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot {
        status: status.to_vec(),
        jobs: jobs.to_vec(),
        uptime_secs,
    }));
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::warn!("encoding /metrics failed: {e}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_has_one_sample_per_plugin_and_series() {
        let status: Vec<StatusEntry> = serde_json::from_value(serde_json::json!([{
            "name": "echo", "state": "ready", "restarts": 2, "calls_ok": 7, "calls_err": 1,
            "pid": std::process::id(), "sandbox": ["netns", "landlock(abi 7)"],
            "exits": {"crashed": 2},
            "latency": {"bounds_us": [100, 1000], "counts": [3, 4, 1], "sum_us": 2500},
        }]))
        .unwrap();
        let text = render_metrics(&status, &[("failed", 2)], 1.5);
        for line in [
            "plugd_plugin_state{plugin=\"echo\",state=\"ready\"} 1",
            "plugd_plugin_state{plugin=\"echo\",state=\"failed\"} 0",
            "plugd_plugin_restarts_total{plugin=\"echo\"} 2",
            "plugd_plugin_calls_total{plugin=\"echo\",result=\"ok\"} 7",
            "plugd_plugin_calls_total{plugin=\"echo\",result=\"error\"} 1",
            "plugd_plugin_sandbox_layer{plugin=\"echo\",layer=\"landlock(abi 7)\"} 1",
            "plugd_uptime_seconds 1.5",
            "plugd_jobs{state=\"failed\"} 2",
            "plugd_plugin_exits_total{plugin=\"echo\",reason=\"crashed\"} 2",
            "plugd_plugin_call_duration_seconds_bucket{le=\"0.0001\",plugin=\"echo\"} 3",
            "plugd_plugin_call_duration_seconds_bucket{le=\"0.001\",plugin=\"echo\"} 7",
            "plugd_plugin_call_duration_seconds_bucket{le=\"+Inf\",plugin=\"echo\"} 8",
            "plugd_plugin_call_duration_seconds_sum{plugin=\"echo\"} 0.0025",
            "plugd_plugin_call_duration_seconds_count{plugin=\"echo\"} 8",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains("plugd_plugin_resident_memory_bytes{plugin=\"echo\"} "));
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    }

    #[test]
    fn tokens_are_required_off_loopback_and_must_be_long() {
        let cfg = |listen: &str, token_file: Option<PathBuf>| HttpConfig {
            listen: listen.parse().unwrap(),
            token_file,
            max_body: DEFAULT_MAX_BODY,
            max_upload: DEFAULT_MAX_UPLOAD,
            public_reads: false,
        };
        let e = token_for(&cfg("0.0.0.0:7070", None)).unwrap_err();
        assert!(e.contains("not a loopback address") && e.contains("token_file"), "{e}");
        assert_eq!(token_for(&cfg("127.0.0.1:7070", None)).unwrap(), None);
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let e = token_for(&cfg("127.0.0.1:7070", Some(short))).unwrap_err();
        assert!(e.contains("shorter than 16"), "{e}");
        assert!(constant_time_eq(b"same-token", b"same-token"));
        assert!(!constant_time_eq(b"same-token", b"same-tokex"));
        assert!(!constant_time_eq(b"short", b"longer"));
    }
}
