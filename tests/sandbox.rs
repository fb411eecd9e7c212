//! End to end: every hostile plugin is contained, with the right classified reason,
//! while a well-behaved neighbour keeps answering calls at the same time.

mod kit;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kit::*;
use supervisor::{Deadline, ErrorCode, ExitReason, PluginHandle, State, Supervisor};

/// Calls the echo neighbour every few milliseconds until dropped; checks every call succeeded.
struct Neighbour {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Neighbour {
    fn start(echo: PluginHandle) -> Neighbour {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let back: u64 =
                    echo.call("echo", &n).await.expect("the neighbour must keep answering");
                assert_eq!(back, n);
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        });
        Neighbour { stop, task }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let n = self.task.await.expect("neighbour task panicked");
        assert!(n > 0, "the neighbour answered no call at all");
        n
    }
}

async fn with_neighbour(sup: &Supervisor) -> Neighbour {
    let echo = sup.load(example("echo")).await.unwrap();
    Neighbour::start(echo)
}

async fn exit_of(h: &PluginHandle) -> ExitReason {
    eventually("plugin ended", || matches!(h.status().state, State::Exited | State::Failed)).await;
    h.status().last_exit.expect("an exit reason")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_the_layers_in_force_and_those_missing() {
    let sup = supervisor();
    let echo = sup.load(example("echo")).await.unwrap();
    let layers = echo.status().sandbox;
    for want in [
        "rlimits(core=0)",
        "netns",
        "seccomp(no-inet)",
        "no-new-privs",
        "seccomp(default)",
        "no-exec(sdk, voluntary)",
    ] {
        assert!(layers.iter().any(|l| l == want), "missing {want} in {layers:?}");
    }
    assert!(layers.iter().any(|l| l.starts_with("landlock(abi ")), "{layers:?}");
    // The default memory cap asks for the cgroup layer too: listed with its reason where
    // this machine has no delegated cgroup, and nothing else is missing.
    let missing = echo.status().sandbox_unavailable;
    let want: usize = if supervisor::sandbox::cgroup::detect().is_ok() { 0 } else { 1 };
    assert_eq!(missing.len(), want, "{missing:?}");
    assert!(missing.iter().all(|m| m.starts_with("cgroup: ")), "{missing:?}");

    // memhog sets a memory limit: the supervisor's watch is in force; the cgroup layer is
    // either in force or listed as unavailable with its reason — never silently missing.
    let hog = sup.load(example("memhog")).await.unwrap();
    let st = hog.status();
    assert!(
        st.sandbox.iter().any(|l| l == "memory-watch(128 MiB, all processes)"),
        "{:?}",
        st.sandbox
    );
    let cgroup_on = st.sandbox.iter().any(|l| l.starts_with("cgroup("));
    let cgroup_why = st.sandbox_unavailable.iter().find(|u| u.starts_with("cgroup: "));
    assert!(cgroup_on != cgroup_why.is_some(), "{st:?}");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memhog_hits_its_memory_limit() {
    let sup = supervisor();
    let neighbour = with_neighbour(&sup).await;
    let hog = sup.load(example("memhog")).await.unwrap();
    let err = hog
        .call_with::<_, u64>("hog", &8u64, Deadline::after(Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::PluginExited, "{err}");
    assert!(err.message.contains("memory limit (128 MiB)"), "the caller learns why: {err}");
    let reason = exit_of(&hog).await;
    assert_eq!(reason, ExitReason::MemoryLimit { limit_bytes: 128 << 20 });
    assert_eq!(reason.to_string(), "memory limit (128 MiB)");
    neighbour.finish().await;
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpuspin_hits_its_cpu_time_limit() {
    let sup = supervisor();
    let neighbour = with_neighbour(&sup).await;
    let spin = sup.load(example("cpuspin")).await.unwrap();
    let err = spin.call::<_, u64>("spin", &()).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::PluginExited, "{err}");
    let reason = exit_of(&spin).await;
    assert_eq!(reason.to_string(), "CPU-time limit (2 s)");
    neighbour.finish().await;
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forkbomb_is_capped_and_its_children_die_with_it() {
    let sup = supervisor();
    let neighbour = with_neighbour(&sup).await;
    let bomb = sup.load(example("forkbomb")).await.unwrap();
    let pid = bomb.status().pid.unwrap();
    assert!(
        bomb.status().sandbox.iter().any(|l| l.starts_with("user(uid ")),
        "RLIMIT_NPROC binds because the plugin has a uid of its own: {:?}",
        bomb.status().sandbox
    );
    #[derive(serde::Deserialize, Debug)]
    struct Outcome {
        forked: u32,
        error: String,
    }
    let out: Outcome = bomb.call("bomb", &10_000u32).await.unwrap();
    assert!(out.forked < 16, "{out:?}");
    assert!(out.error.contains("Resource temporarily unavailable"), "{out:?}");
    // RLIMIT_NPROC counts the processes of the plugin's own uid: its init, itself and its
    // children; all of them sit in the plugin's pid namespace.
    let members = jail_members(pid);
    assert!(members.len() > out.forked as usize, "the children run in the plugin's jail");
    sup.unload("forkbomb").await.unwrap();
    eventually("every forked child is gone", || members.iter().all(|p| !alive(*p))).await;
    neighbour.finish().await;
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netcaller_has_no_network_and_the_supervisor_still_does() {
    let sup = supervisor();
    let neighbour = with_neighbour(&sup).await;
    // The supervisor process is not sandboxed: it can listen on loopback.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let net = sup.load(example("netcaller")).await.unwrap();
    let tcp: String = net.call("tcp", &addr).await.unwrap();
    assert_eq!(tcp, "error: Permission denied (os error 13)");
    let udp: String = net.call("udp", &addr).await.unwrap();
    assert!(udp.starts_with("error: Permission denied"), "{udp}");
    let nl: String = net.call("netlink", &()).await.unwrap();
    assert!(nl.starts_with("error: Permission denied"), "{nl}");
    let theirs: String = net.call("netns", &()).await.unwrap();
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap().display().to_string();
    assert_ne!(theirs, ours, "the plugin has its own network namespace");
    assert_eq!(net.status().state, State::Ready, "a refused socket is an error, not a death");

    // The next plugin gets a fresh sandbox: with network = "host" it connects.
    let dir = tempfile::tempdir().unwrap();
    let open = plugin(&dir, "netcaller-host", "netcaller", "[sandbox]\nnetwork = \"host\"\n");
    let open = sup.load(open).await.unwrap();
    let tcp: String = open.call("tcp", &addr).await.unwrap();
    assert_eq!(tcp, "connected");
    listener.set_nonblocking(false).unwrap();
    let (_conn, _) = listener.accept().unwrap();
    neighbour.finish().await;
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filewriter_writes_only_its_state_folder() {
    let sup = supervisor();
    let neighbour = with_neighbour(&sup).await;
    let w = sup.load(example("filewriter")).await.unwrap();
    let state: String = w.call("state_dir", &()).await.unwrap();
    let ok: String = w.call("write", &format!("{state}/note.txt")).await.unwrap();
    assert_eq!(ok, "written");
    assert!(std::path::Path::new(&state).join("note.txt").exists());
    let plugin_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/filewriter");
    let tmp = std::env::temp_dir().join(format!("plugd-filewriter-{}", std::process::id()));
    for target in [
        format!("/etc/plugd-filewriter-{}", std::process::id()),
        plugin_dir.join("dropped.txt").display().to_string(),
    ] {
        let r: String = w.call("write", &target).await.unwrap();
        assert_eq!(r, "error: Read-only file system (os error 30)", "writing {target}");
        assert!(!std::path::Path::new(&target).exists(), "{target} must not exist");
    }
    // /tmp is the plugin's own: what it writes there never reaches the host's.
    let r: String = w.call("write", &tmp.display().to_string()).await.unwrap();
    assert_eq!(r, "written");
    assert!(!tmp.exists(), "{} must not exist on the host", tmp.display());
    let r: String =
        w.call("read", &plugin_dir.join("plugin.toml").display().to_string()).await.unwrap();
    assert_eq!(r, "read", "its own folder stays readable");
    let r: String = w.call("read", &"/root/.bash_history".to_string()).await.unwrap();
    assert!(r.starts_with("error"), "{r}");
    neighbour.finish().await;
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execve_is_a_named_sandbox_violation() {
    let sup = supervisor();
    let neighbour = with_neighbour(&sup).await;
    let x = sup.load(example("execve")).await.unwrap();
    // A shell spawned as a child never runs: the child dies at its execve.
    let out: String = x.call("spawn", &()).await.unwrap();
    assert_eq!(out, "shell failed: signal: 31 (SIGSYS)");
    // Replacing the plugin itself with a shell ends the plugin, and the syscall is named.
    let err = x.call::<_, String>("exec_self", &()).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::PluginExited, "{err}");
    let reason = exit_of(&x).await;
    assert_eq!(reason.to_string(), "sandbox violation: execve");

    // With execve = true the same plugin may run a shell.
    let dir = tempfile::tempdir().unwrap();
    let free = plugin(&dir, "execve-allowed", "execve", "[sandbox]\nexecve = true\n");
    let free = sup.load(free).await.unwrap();
    assert!(!free.status().sandbox.iter().any(|l| l.starts_with("no-exec")));
    let out: String = free.call("spawn", &()).await.unwrap();
    assert_eq!(out, "shell ran");
    neighbour.finish().await;
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ptracer_is_stopped_by_the_default_profile() {
    let sup = supervisor();
    let neighbour = with_neighbour(&sup).await;
    let p = sup.load(example("ptracer")).await.unwrap();
    let _ = p.call::<_, String>("ptrace", &()).await.unwrap_err();
    assert_eq!(exit_of(&p).await.to_string(), "sandbox violation: ptrace");
    sup.unload("ptracer").await.unwrap();
    let p = sup.load(example("ptracer")).await.unwrap();
    let _ = p.call::<_, String>("vm_read", &()).await.unwrap_err();
    assert_eq!(exit_of(&p).await.to_string(), "sandbox violation: process_vm_readv");
    neighbour.finish().await;
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bigfile_hits_its_file_size_limit() {
    let sup = supervisor();
    let neighbour = with_neighbour(&sup).await;
    let b = sup.load(example("bigfile")).await.unwrap();
    let _ = b.call::<_, u64>("write", &(8u64 << 20)).await.unwrap_err();
    assert_eq!(exit_of(&b).await, ExitReason::FileSizeLimit { limit_bytes: 1 << 20 });
    neighbour.finish().await;
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_profile_runs_the_sdk_and_traps_the_rest() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let echo = plugin(&dir, "echo-strict", "echo", "[sandbox]\nsyscalls = \"strict\"\n");
    let echo = sup.load(echo).await.unwrap();
    assert!(echo.status().sandbox.iter().any(|l| l == "seccomp(strict)"));
    for i in 0..100u64 {
        let back: u64 = echo.call("echo", &i).await.unwrap();
        assert_eq!(back, i);
    }
    let net = plugin(
        &dir,
        "net-strict",
        "netcaller",
        "[sandbox]\nsyscalls = \"strict\"\n[restart]\npolicy = \"never\"\n",
    );
    let net = sup.load(net).await.unwrap();
    let _ = net.call::<_, String>("netlink", &()).await.unwrap_err();
    assert_eq!(exit_of(&net).await.to_string(), "sandbox violation: socket");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_layer_that_is_missing_fails_the_start() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    // cgroup v2 without controllers here: requiring the cgroup layer must refuse to start.
    if supervisor::sandbox::cgroup::detect().is_ok() {
        return; // a machine with a delegated cgroup has the layer; nothing to refuse
    }
    let spec = plugin(
        &dir,
        "needs-cgroup",
        "echo",
        "[limits]\nmemory = \"64MiB\"\n[sandbox]\nrequire = [\"cgroup\"]\n",
    );
    let err = sup.load(spec).await.unwrap_err().to_string();
    assert!(
        err.contains("`sandbox.require` names \"cgroup\"") && err.contains("unavailable"),
        "{err}"
    );
    let spec = plugin(
        &dir,
        "needs-landlock",
        "echo",
        "[sandbox]\nrequire = [\"landlock\", \"netns\", \"seccomp\"]\n",
    );
    sup.load(spec).await.expect("layers this machine has are satisfied");
    sup.shutdown().await;
}

/// `require = ["user"]` asks for a uid of its own: a plugin that runs as root has none,
/// so the start fails and says why; without `user = "root"` it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requiring_the_user_layer_refuses_a_plugin_that_runs_as_root() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let manifest = "[sandbox]\nuser = \"root\"\nrequire = [\"user\"]\n";
    let err = sup.load(plugin(&dir, "as-root", "echo", manifest)).await.unwrap_err().to_string();
    assert!(err.contains("`sandbox.require` names \"user\""), "{err}");
    // As root (CI), the reason is the root user itself; otherwise no plugin gets a uid
    // of its own, and the reason says that instead.
    let root = nix::unistd::geteuid().is_root();
    assert_eq!(err.contains("runs it as root"), root, "{err}");
    if root {
        let spec = plugin(&dir, "own-uid", "echo", "[sandbox]\nrequire = [\"user\"]\n");
        sup.load(spec).await.expect("a uid of its own satisfies require = [\"user\"]");
    }
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_cpus_pins_the_plugin() {
    let sup = supervisor();
    let dir = tempfile::tempdir().unwrap();
    let pinned = sup.load(plugin(&dir, "pinned", "echo", "[limits]\ncpus = [0]\n")).await.unwrap();
    assert!(
        pinned.status().sandbox.iter().any(|l| l == "cpus(0)"),
        "{:?}",
        pinned.status().sandbox
    );
    let pid = pinned.status().pid.unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let allowed = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim();
    assert_eq!(allowed, "0");
    let back: u64 = pinned.call("echo", &7u64).await.unwrap();
    assert_eq!(back, 7);
    // The supervisor itself is not pinned.
    let ours = std::fs::read_to_string("/proc/self/status").unwrap();
    let ours =
        ours.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string();
    if std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) > 1 {
        assert_ne!(ours, "0");
    }
    sup.shutdown().await;
}
