//! Plugins that serve a network protocol: `[listen]` (sockets plugd binds and hands over,
//! systemd socket-activation style) and `[health]` (how plugd knows the server answers).
//!
//! A server plugin keeps its own network namespace and needs no inet `socket()`: plugd
//! binds each `[listen]` address itself, before the first instance starts, and every
//! instance — including a hot update's new one, which runs beside the old one for a
//! moment — inherits the same listening sockets. The kernel's accept queue is shared, so
//! no connection is refused while instances change.
//!
//! The handed descriptors follow `sd_listen_fds(3)`: they start at 3, `LISTEN_FDS` says
//! how many, `LISTEN_FDNAMES` names them (`tcp`, `unix`, and `plugd-health`, see below),
//! `LISTEN_PID` is the plugin's own pid. The plugd protocol socket follows them
//! (`PLUGD_FD` says where).
//!
//! A `[health]` check by HTTP or TCP must reach *this* instance, not whichever instance
//! the kernel hands a shared socket's connection to. So each instance of a plugin with
//! `[listen]` also gets a private listening socket of its own (a unix socket in plugd's
//! network namespace, named `plugd-health`), served like the others, and the probe
//! connects there.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// One `[listen]` address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub enum ListenAddr {
    /// `tcp = ["127.0.0.1:10000"]`.
    Tcp(SocketAddr),
    /// `unix = ["/run/my-plugin.sock"]`.
    Unix(PathBuf),
}

impl ListenAddr {
    /// The name it gets in `LISTEN_FDNAMES`.
    pub fn fd_name(&self) -> &'static str {
        match self {
            ListenAddr::Tcp(_) => "tcp",
            ListenAddr::Unix(_) => "unix",
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp {a}"),
            ListenAddr::Unix(p) => write!(f, "unix {}", p.display()),
        }
    }
}

/// What a `[health]` check asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// `http = "/health"` (or a full `http://host:port/path`): a GET answered 2xx or 3xx.
    Http {
        /// Where to connect when the plugin has no `[listen]` (from a full URL).
        addr: Option<SocketAddr>,
        /// The request path.
        path: String,
    },
    /// `tcp = "127.0.0.1:10000"` (or `true` with `[listen]`): a connection is accepted.
    Tcp {
        /// Where to connect when the plugin has no `[listen]`.
        addr: Option<SocketAddr>,
    },
    /// `method = "health"`: the plugin's method answers without an error.
    Method(String),
}

impl std::fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HealthCheck::Http { addr: Some(a), path } => write!(f, "http GET http://{a}{path}"),
            HealthCheck::Http { addr: None, path } => write!(f, "http GET {path}"),
            HealthCheck::Tcp { addr: Some(a) } => write!(f, "tcp connect {a}"),
            HealthCheck::Tcp { addr: None } => write!(f, "tcp connect"),
            HealthCheck::Method(m) => write!(f, "method {m}"),
        }
    }
}

/// `[health]`: a check, how often, and when a plugin counts as unhealthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// The check.
    pub check: HealthCheck,
    /// Time between checks once healthy (`interval`, default 5 s).
    pub interval: Duration,
    /// How long one check may take (`timeout`, default 2 s).
    pub timeout: Duration,
    /// Consecutive failed checks that make it unhealthy (`failures`, default 3).
    pub failures: u32,
    /// How long a new instance may take to pass its first check (`start_timeout`,
    /// default 60 s); it is `starting` until then.
    pub start_timeout: Duration,
}

impl HealthConfig {
    /// Time between checks while a new instance waits for its first pass.
    pub fn start_interval(&self) -> Duration {
        self.interval.min(Duration::from_millis(200))
    }
}

/// `[listen]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListen {
    #[serde(default)]
    tcp: Vec<String>,
    #[serde(default)]
    unix: Vec<PathBuf>,
}

/// `[health]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    http: Option<String>,
    tcp: Option<toml::Value>,
    method: Option<String>,
    pub(crate) interval: Option<String>,
    pub(crate) timeout: Option<String>,
    pub(crate) start_timeout: Option<String>,
    pub(crate) failures: Option<i64>,
}

/// Checks `[listen]`: (key, problem) on a bad entry.
pub(crate) fn parse_listen(raw: RawListen) -> Result<Vec<ListenAddr>, (String, String)> {
    let mut out = Vec::new();
    for (i, a) in raw.tcp.iter().enumerate() {
        let addr: SocketAddr = a.trim().parse().map_err(|_| {
            (
                format!("listen.tcp[{i}]"),
                format!("= {a:?} is not an address with a port; write e.g. \"127.0.0.1:10000\""),
            )
        })?;
        if addr.port() == 0 {
            return Err((format!("listen.tcp[{i}]"), format!("= {a:?} needs a fixed port")));
        }
        out.push(ListenAddr::Tcp(addr));
    }
    for (i, p) in raw.unix.iter().enumerate() {
        if !p.is_absolute() {
            return Err((
                format!("listen.unix[{i}]"),
                format!("= {:?} must be an absolute path, e.g. \"/run/my-plugin.sock\"", p),
            ));
        }
        if p.as_os_str().len() >= 100 {
            return Err((format!("listen.unix[{i}]"), "is too long for a unix socket".into()));
        }
        out.push(ListenAddr::Unix(p.clone()));
    }
    for (i, a) in out.iter().enumerate() {
        if out[..i].contains(a) {
            return Err(("listen".into(), format!("names {a} twice")));
        }
    }
    Ok(out)
}

/// Checks `[health]`'s check (the durations are checked by the caller): (key, problem).
pub(crate) fn parse_check(
    raw: &RawHealth,
    listen: &[ListenAddr],
    host_network: bool,
) -> Result<HealthCheck, (String, String)> {
    let bad = |key: &str, p: String| (format!("health.{key}"), p);
    let given = [raw.http.is_some(), raw.tcp.is_some(), raw.method.is_some()];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err((
            "health".into(),
            "must name exactly one check: http = \"/health\", tcp = \"127.0.0.1:8080\" or method = \"health\"".into(),
        ));
    }
    let reachable = |key: &str, addr: Option<SocketAddr>| {
        if listen.is_empty() && !host_network {
            return Err(bad(
                key,
                "cannot reach the plugin: it has its own network namespace; add [listen] (plugd binds the socket and checks this instance) or sandbox.network = \"host\"".into(),
            ));
        }
        if listen.is_empty() && addr.is_none() {
            return Err(bad(
                key,
                "needs an address without [listen]: write e.g. \"127.0.0.1:8080\"".into(),
            ));
        }
        Ok(())
    };
    if let Some(url) = &raw.http {
        let (addr, path) = if url.starts_with('/') {
            (None, url.clone())
        } else if let Some(rest) = url.strip_prefix("http://") {
            let (hostport, path) = match rest.find('/') {
                Some(i) => (&rest[..i], rest[i..].to_string()),
                None => (rest, "/".to_string()),
            };
            let addr: SocketAddr = hostport.parse().map_err(|_| {
                bad(
                    "http",
                    format!(
                        "= {url:?}: {hostport:?} is not an IP address with a port; write e.g. \"http://127.0.0.1:8080/health\" or just \"/health\""
                    ),
                )
            })?;
            (Some(addr), path)
        } else {
            return Err(bad(
                "http",
                format!("= {url:?} is not a path (\"/health\") or an http:// URL"),
            ));
        };
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(
                "http",
                format!("= {url:?}: the path has spaces or control characters"),
            ));
        }
        reachable("http", addr)?;
        return Ok(HealthCheck::Http { addr, path });
    }
    if let Some(tcp) = &raw.tcp {
        let addr = match tcp {
            toml::Value::Boolean(true) => None,
            toml::Value::String(s) => Some(s.trim().parse::<SocketAddr>().map_err(|_| {
                bad(
                    "tcp",
                    format!("= {s:?} is not an address with a port, e.g. \"127.0.0.1:8080\""),
                )
            })?),
            other => {
                return Err(bad(
                    "tcp",
                    format!(
                    "must be an address such as \"127.0.0.1:8080\" (or true with [listen]), not {}",
                    other.type_str()
                ),
                ))
            }
        };
        reachable("tcp", addr)?;
        return Ok(HealthCheck::Tcp { addr });
    }
    let method = raw.method.clone().unwrap_or_default();
    if method.is_empty() || method.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("method", format!("= {method:?} is not a method name")));
    }
    Ok(HealthCheck::Method(method))
}

/// Binds one `[listen]` address (a unix path left by a previous run is replaced). The
/// error names the address and what to do.
pub fn bind(addr: &ListenAddr) -> Result<OwnedFd, String> {
    Ok(match addr {
        ListenAddr::Tcp(a) => std::net::TcpListener::bind(a)
            .map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                    "; another program (or plugin) listens there: stop it or change listen.tcp"
                } else {
                    ""
                };
                format!("cannot listen on {addr}: {e}{hint}")
            })?
            .into(),
        ListenAddr::Unix(path) => {
            if std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(path);
            }
            std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?
                .into()
        }
    })
}

/// A private listening socket for one instance's health probe: a unix socket with an
/// unguessable abstract name in plugd's network namespace (nothing to clean up on disk).
pub(crate) fn probe_socket(plugin: &str) -> std::io::Result<(OwnedFd, Vec<u8>)> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("plugd-health/{plugin}/{:016x}", fastrand::u64(..));
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let l = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    Ok((l.into(), name.into_bytes()))
}
