//! In-place upgrade (SIGUSR2): hand every Ready plugin's descriptors to a new image of
//! plugd in the same pid, and take them back over on the other side.

use super::*;

/// Environment variable naming the handover file of an in-place upgrade.
pub(super) const UPGRADE_ENV: &str = "PLUGD_UPGRADE";

/// One plugin handed over across exec: descriptor numbers valid in the new image.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct HandoverPlugin {
    pub(super) name: String,
    pub(super) manifest: PathBuf,
    pub(super) pid: i32,
    #[serde(default)]
    pub(super) plugin_pid: Option<i32>,
    #[serde(default)]
    pub(super) status: Option<RawFd>,
    pub(super) pidfd: RawFd,
    pub(super) socket: RawFd,
    pub(super) stdout: Option<RawFd>,
    pub(super) stderr: Option<RawFd>,
    pub(super) unread: Vec<u8>,
    pub(super) sdk: String,
    pub(super) lockdown: Vec<String>,
    /// The plugin's protocol version (absent from an older plugd: version 1).
    #[serde(default = "proto_v1")]
    pub(super) proto: u16,
    pub(super) restarts: u32,
    pub(super) sandbox: SandboxReport,
    /// Its `[listen]` sockets.
    #[serde(default)]
    pub(super) listeners: Vec<(supervisor::serving::ListenAddr, RawFd)>,
    /// The abstract name of its private health probe socket.
    #[serde(default)]
    pub(super) probe: Option<Vec<u8>>,
    /// The methods it described.
    #[serde(default)]
    pub(super) methods: Vec<supervisor::describe::MethodInfo>,
    /// Its shared mapping's memfd and wait strategy (`transport = "shm"`).
    #[serde(default)]
    pub(super) shm: Option<(RawFd, plugin_proto::shm::WaitStrategy)>,
}

fn proto_v1() -> u16 {
    1
}

/// What a plugd passes to the plugd that replaces it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Handover {
    pub(super) generation: u64,
    pub(super) listener: RawFd,
    pub(super) plugins: Vec<HandoverPlugin>,
    /// Plugins the operator had stopped: the new plugd loads them stopped.
    #[serde(default)]
    pub(super) stopped: Vec<String>,
    /// Control connections, parked between two requests: the new plugd serves them on.
    #[serde(default)]
    pub(super) connections: Vec<super::conns::ParkedConn>,
    /// The HTTP API's listening socket (connections made meanwhile wait in its queue).
    #[serde(default)]
    pub(super) http_listener: Option<RawFd>,
}

/// Takes ownership of a descriptor number inherited across exec, and makes it
/// close-on-exec again: the predecessor cleared the flag only to pass it through its own
/// exec; nothing this plugd starts later (a build, pip, the next upgrade's check) may
/// inherit the control listener or another plugin's socket.
pub(super) fn inherited(fd: RawFd) -> OwnedFd {
    // SAFETY: the predecessor cleared close-on-exec on exactly these descriptors and wrote
    // their numbers into the handover file; nothing else in this process owns them.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Err(e) = nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    ) {
        tracing::warn!("cannot mark inherited descriptor {} close-on-exec: {e}", fd.as_raw_fd());
    }
    fd
}

/// Rebuilds a handed-over plugin from inherited descriptors.
pub(super) fn thaw(h: HandoverPlugin) -> FrozenPlugin {
    FrozenPlugin {
        instance: Frozen {
            pid: h.pid,
            plugin_pid: h.plugin_pid.unwrap_or(h.pid),
            status: h.status.map(inherited),
            pidfd: inherited(h.pidfd),
            socket: inherited(h.socket),
            stdout: h.stdout.map(inherited),
            stderr: h.stderr.map(inherited),
            unread: h.unread,
            sdk: h.sdk,
            lockdown: h.lockdown,
            proto: h.proto,
            probe: h.probe,
            methods: h.methods,
            shm: h.shm.map(|(fd, wait)| (inherited(fd), wait)),
        },
        restarts: h.restarts,
        sandbox: h.sandbox,
        listeners: h.listeners.into_iter().map(|(a, fd)| (a, inherited(fd))).collect(),
    }
}

/// In-place upgrade (SIGUSR2): check that the binary starts, let control requests in
/// flight finish, freeze every plugin, write the handover, and exec the binary in this
/// same pid. Returns only if the upgrade did not happen; then everything is running again.
pub(super) async fn upgrade(
    daemon: &std::sync::Arc<Daemon>,
    listener: &Listener,
    conns: &std::sync::Arc<super::conns::Conns>,
    mut http: Option<&mut crate::http::HttpServer>,
    exe: &std::path::Path,
) -> String {
    // 1. The new binary must at least start, or we keep running as we are.
    let mut check = tokio::process::Command::new(exe).arg("--version").output().await;
    for _ in 0..5 {
        // A binary that was just written may still be open for writing somewhere (ETXTBSY).
        match &check {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                check = tokio::process::Command::new(exe).arg("--version").output().await;
            }
            _ => break,
        }
    }
    match check {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return format!(
                "{} --version failed ({}): {}; not upgrading",
                exe.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        }
        Err(e) => return format!("cannot run {}: {e}; not upgrading", exe.display()),
    }
    // 2. Control requests in flight finish, and every connection is parked between two
    // requests (new connections wait in the listen backlog: this loop is not accepting).
    let parked = conns.park_all().await;
    // HTTP likewise: requests in flight finish, new connections wait in the queue.
    if let Some(server) = http.as_deref_mut() {
        server.drain(super::conns::DRAIN).await;
    }
    // An update, uninstall or install commit running as a background job finishes first
    // (held until the exec, or dropped if the upgrade gives up): nothing is frozen halfway.
    let _paused = daemon.ops.pause().await;
    // 3. Every Ready plugin finishes its in-flight calls and is handed over.
    let stopped: Vec<String> = daemon
        .sup
        .status()
        .into_iter()
        .filter(|p| p.state == supervisor::State::Stopped)
        .map(|p| p.name)
        .collect();
    let frozen = daemon.sup.freeze().await;
    let mut plugins = Vec::new();
    let mut keep: Vec<OwnedFd> = Vec::new();
    let manifests: BTreeMap<String, PathBuf> = daemon
        .book()
        .known
        .iter()
        .map(|(n, k)| (n.clone(), k.spec.manifest_path.clone()))
        .collect();
    for (name, result) in frozen {
        let f = match result {
            Ok(f) => f,
            Err(why) => {
                tracing::warn!(plugin = %name, "not handed over ({why}); the new plugd starts it afresh");
                let _ = daemon.sup.unload(&name).await;
                continue;
            }
        };
        let i = f.instance;
        let raw = |fd: &OwnedFd| fd.as_raw_fd();
        plugins.push(HandoverPlugin {
            manifest: manifests.get(&name).cloned().unwrap_or_default(),
            name,
            pid: i.pid,
            plugin_pid: Some(i.plugin_pid),
            status: i.status.as_ref().map(raw),
            pidfd: raw(&i.pidfd),
            socket: raw(&i.socket),
            stdout: i.stdout.as_ref().map(raw),
            stderr: i.stderr.as_ref().map(raw),
            unread: i.unread,
            sdk: i.sdk,
            lockdown: i.lockdown,
            proto: i.proto,
            restarts: f.restarts,
            sandbox: f.sandbox,
            listeners: f.listeners.iter().map(|(a, fd)| (a.clone(), raw(fd))).collect(),
            probe: i.probe,
            methods: i.methods,
            shm: i.shm.as_ref().map(|(fd, wait)| (raw(fd), *wait)),
        });
        keep.extend(i.shm.map(|(fd, _)| fd));
        keep.extend(f.listeners.into_iter().map(|(_, fd)| fd));
        keep.push(i.pidfd);
        keep.extend(i.status);
        keep.push(i.socket);
        keep.extend(i.stdout);
        keep.extend(i.stderr);
    }
    let generation = daemon.generation.load(std::sync::atomic::Ordering::Relaxed) + 1;
    let connections = parked.into_iter().map(|p| p.into_handover(&mut keep)).collect();
    let handover = Handover {
        generation,
        listener: listener.as_fd().as_raw_fd(),
        plugins,
        stopped,
        connections,
        http_listener: http.as_deref().map(|h| h.listener_fd().as_raw_fd()),
    };
    let state_dir = daemon.state_dir.clone();
    let file = state_dir.join("upgrade.json");
    let written = std::fs::create_dir_all(&state_dir)
        .and_then(|_| std::fs::write(&file, serde_json::to_vec(&handover).unwrap_or_default()));
    let error = match written {
        Err(e) => format!("cannot write {}: {e}", file.display()),
        Ok(()) => {
            let cstr = |s: &std::ffi::OsStr| std::ffi::CString::new(s.as_encoded_bytes()).ok();
            let argv: Vec<std::ffi::CString> =
                std::env::args_os().filter_map(|a| cstr(&a)).collect();
            let mut env: Vec<std::ffi::CString> = std::env::vars_os()
                .filter(|(k, _)| k != UPGRADE_ENV)
                .filter_map(|(k, v)| {
                    let mut kv = k;
                    kv.push("=");
                    kv.push(v);
                    cstr(&kv)
                })
                .collect();
            env.extend(cstr(std::ffi::OsStr::new(&format!("{UPGRADE_ENV}={}", file.display()))));
            let mut keep_fds: Vec<RawFd> = keep.iter().map(|f| f.as_raw_fd()).collect();
            keep_fds.push(handover.listener);
            keep_fds.extend(handover.http_listener);
            match cstr(exe.as_os_str()) {
                None => "the executable path contains a NUL byte".to_string(),
                Some(program) => {
                    tracing::info!(
                        "SIGUSR2: handing {} plugins over to {} (generation {generation})",
                        handover.plugins.len(),
                        exe.display()
                    );
                    daemon.sup.exec(ExecRequest { program, argv, env, keep_fds }).await.to_string()
                }
            }
        }
    };
    // 4. Still here: the exec failed. Take everything back and carry on.
    let _ = std::fs::remove_file(&file);
    std::mem::forget(keep); // the descriptors now belong to the records below
    for h in handover.plugins {
        let name = h.name.clone();
        match PluginSpec::from_manifest(&h.manifest) {
            Ok(spec) => {
                if let Err(e) = daemon.sup.adopt(spec, thaw(h)).await {
                    tracing::error!(plugin = %name, "cannot take back after a failed upgrade: {e}");
                }
            }
            Err(e) => {
                tracing::error!(plugin = %name, "cannot take back after a failed upgrade: {e}")
            }
        }
    }
    let parked = handover
        .connections
        .into_iter()
        .map(|c| super::conns::Parked { fd: inherited(c.fd), unread: c.unread })
        .collect();
    conns.resume(daemon, parked);
    if let Some(server) = http {
        if let Err(e) = server.serve() {
            tracing::error!("{e}");
        }
    }
    format!("upgrade failed, still running the old binary: {error}")
}
