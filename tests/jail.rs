//! End to end, as an attacker: `escapist` has the default manifest (no `[sandbox]`, no
//! `[limits]`) and skips the SDK's voluntary lockdown; each test has it try one way out
//! of its jail and asserts the denial and what plugd reports.
//!
//! These tests need root (a uid of its own needs root); without it they check what the
//! unprivileged mode reports instead (a user-namespace jail, or the jail missing and why).
//! `tests/daemon.rs` runs plugd as an ordinary user to test that mode end to end.

mod kit;

use std::time::Duration;

use kit::*;
use supervisor::{ExitReason, PluginHandle, State, Supervisor};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

async fn escapist(sup: &Supervisor) -> PluginHandle {
    sup.load(example("escapist")).await.unwrap()
}

async fn ask(h: &PluginHandle, method: &str, arg: impl serde::Serialize) -> String {
    h.call::<_, String>(method, &arg).await.unwrap_or_else(|e| panic!("{method}: {e}"))
}

async fn exit_of(h: &PluginHandle) -> ExitReason {
    eventually("plugin ended", || matches!(h.status().state, State::Exited | State::Failed)).await;
    h.status().last_exit.expect("an exit reason")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_root_the_jail_is_reported_missing() {
    if is_root() {
        return; // covered by every other test here
    }
    let sup = supervisor();
    let h = escapist(&sup).await;
    let missing = h.status().sandbox_unavailable;
    assert!(missing.iter().any(|m| m.starts_with("user: plugd is not root")), "{missing:?}");
    // A user namespace stands in for root where the machine allows one; else the jail
    // is reported missing, with the reason.
    let layers = h.status().sandbox;
    let userns = layers.iter().any(|l| l == "namespaces(user,pid,mount,ipc,uts,net)");
    let said = missing.iter().any(|m| m.starts_with("jail: plugd is not root"));
    assert!(userns != said, "{layers:?} / {missing:?}");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_plugin_has_its_own_uid_and_no_capabilities() {
    if !is_root() {
        return;
    }
    let sup = supervisor();
    let h = escapist(&sup).await;
    let layers = h.status().sandbox;
    for want in [
        "no-capabilities",
        "namespaces(pid,mount,ipc,uts,net)",
        "root(minimal, pivot_root)",
        "exec(entrypoint only)",
        "no-new-privs",
        "seccomp(default)",
    ] {
        assert!(layers.iter().any(|l| l == want), "missing {want} in {layers:?}");
    }
    assert!(
        !layers.iter().any(|l| l.contains("voluntary")),
        "escapist locks nothing itself: {layers:?}"
    );
    let uid_layer = layers.iter().find(|l| l.starts_with("user(uid ")).expect("a dynamic uid");
    let uid: u32 = uid_layer.trim_start_matches("user(uid ").trim_end_matches(')').parse().unwrap();
    assert!((61184..=65519).contains(&uid), "{uid}");

    let who = ask(&h, "whoami", ()).await;
    let field = |k: &str| -> Vec<String> {
        who.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("{k} in {who}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(field("Uid:"), vec![uid.to_string(); 4], "{who}");
    assert_eq!(field("Gid:"), vec![uid.to_string(); 4], "{who}");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(caps), ["0000000000000000"], "{caps} {who}");
    }
    assert_eq!(field("NoNewPrivs:"), ["1"]);
    // Its state folder is its own; the uid is stable across a restart.
    let state = sup.state_root().join("escapist");
    let meta = std::fs::metadata(&state).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), uid);
    sup.unload("escapist").await.unwrap();
    let h = escapist(&sup).await;
    assert!(h.status().sandbox.iter().any(|l| l == uid_layer), "{:?}", h.status().sandbox);
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_processes_are_out_of_reach() {
    if !is_root() {
        return;
    }
    let sup = supervisor();
    let h = escapist(&sup).await;
    let me = std::process::id() as i32;
    assert_eq!(ask(&h, "kill", (me, libc::SIGKILL)).await, "error: No such process (os error 3)");
    assert_eq!(ask(&h, "renice", me).await, "error: No such process (os error 3)");
    assert_eq!(ask(&h, "prlimit", me).await, "error: No such process (os error 3)");
    // All it can see of the process table is its init and itself.
    let procs = ask(&h, "list", "/proc").await;
    let pids: Vec<&str> = procs
        .trim_start_matches("ok: ")
        .split(' ')
        .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
        .collect();
    assert_eq!(pids, ["1", "2"], "{procs}");
    // Its init's memory and environment (a copy of the supervisor's) are not readable.
    assert!(ask(&h, "read", "/proc/1/environ").await.starts_with("error: Permission denied"));
    // uts and ipc are its own too.
    assert_eq!(ask(&h, "hostname", ()).await, "plugd-escapist");
    assert!(alive(std::process::id()), "the test (the host) is still here");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_file_system_is_not_there() {
    if !is_root() {
        return;
    }
    let sup = supervisor();
    // A control socket on the host, where plugd's would be.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("plugd.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let h = escapist(&sup).await;
    assert!(ask(&h, "connect", sock.display().to_string())
        .await
        .starts_with("error: No such file"));
    assert!(ask(&h, "read", "/etc/shadow").await.starts_with("error: No such file"));
    let etc = ask(&h, "list", "/etc").await;
    assert!(!etc.contains("shadow") && etc.contains("passwd"), "{etc}");
    // Other plugins' state and plugd's own files are not in its world.
    let root = sup.state_root().canonicalize().unwrap();
    assert_eq!(ask(&h, "list", root.display().to_string()).await, "ok: escapist");
    assert!(ask(&h, "list", "/root").await.starts_with("error: No such file"));
    // Read-only everywhere but its state folder and private /tmp.
    let state = root.join("escapist");
    assert_eq!(ask(&h, "write", state.join("note").display().to_string()).await, "ok: written");
    assert_eq!(ask(&h, "write", "/tmp/plugd-escapist-probe".to_string()).await, "ok: written");
    assert!(!std::path::Path::new("/tmp/plugd-escapist-probe").exists(), "its /tmp is private");
    for target in ["/etc/evil", "/usr/evil", "/evil"] {
        let r = ask(&h, "write", target.to_string()).await;
        assert!(r.starts_with("error: Read-only file system"), "{target}: {r}");
    }
    let own = example("escapist").dir.canonicalize().unwrap();
    let r = ask(&h, "write", own.join("dropped").display().to_string()).await;
    assert!(r.starts_with("error: Read-only file system"), "{r}");
    let devs = ask(&h, "list", "/dev").await;
    assert_eq!(devs, "ok: fd full null random shm stderr stdin stdout urandom zero");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_cannot_be_made() {
    if !is_root() {
        return;
    }
    let sup = supervisor();
    let h = escapist(&sup).await;
    let state = sup.state_root().canonicalize().unwrap().join("escapist");
    let _ = h.call::<_, String>("mknod", &state.join("disk").display().to_string()).await;
    assert_eq!(exit_of(&h).await.to_string(), "sandbox violation: mknodat");
    // With the syscall filter off, the next layers still refuse: no CAP_MKNOD, Landlock.
    let dir = tempfile::tempdir().unwrap();
    let off = plugin(
        &dir,
        "escapist-nofilter",
        "escapist",
        "[sandbox]\nsyscalls = \"off\"\n[restart]\npolicy = \"never\"\n",
    );
    let h = sup.load(off).await.unwrap();
    let state = sup.state_root().canonicalize().unwrap().join("escapist-nofilter");
    let r = ask(&h, "mknod", state.join("disk").display().to_string()).await;
    // Landlock answers first (no MAKE_CHAR anywhere); CAP_MKNOD is gone as well (see whoami).
    assert_eq!(r, "error: Permission denied (os error 13)");
    assert!(!state.join("disk").exists());
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_attack_surface_is_refused_by_name() {
    if !is_root() {
        return;
    }
    let sup = supervisor();
    for (method, syscall) in
        [("io_uring", "io_uring_setup"), ("clone_newuser", "clone"), ("sethostname", "sethostname")]
    {
        let h = escapist(&sup).await;
        let arg = serde_json::json!(if method == "sethostname" {
            "evil".into()
        } else {
            serde_json::Value::Null
        });
        let _ = h.call::<_, String>(method, &arg).await;
        assert_eq!(
            exit_of(&h).await.to_string(),
            format!("sandbox violation: {syscall}"),
            "{method}"
        );
        sup.unload("escapist").await.unwrap();
    }
    // clone3 cannot be filtered on its flags: it answers ENOSYS (libc falls back to clone).
    let h = escapist(&sup).await;
    assert_eq!(ask(&h, "clone3", ()).await, "error: Function not implemented (os error 38)");
    assert_eq!(h.status().state, State::Ready);
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_is_refused_without_the_sdk_lockdown() {
    if !is_root() {
        return;
    }
    let sup = supervisor();
    let h = escapist(&sup).await;
    assert_eq!(ask(&h, "exec_sh", ()).await, "error: Permission denied (os error 13)");
    assert_eq!(h.status().state, State::Ready);
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_its_own_descriptors_reach_the_plugin() {
    let sup = supervisor();
    // Descriptors the supervisor holds, which must not leak: a listener and a file.
    let dir = tempfile::tempdir().unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
    let _file = std::fs::File::create(dir.path().join("f")).unwrap();
    let _echo = sup.load(example("echo")).await.unwrap();
    let h = escapist(&sup).await;
    let fds: Vec<String> = h.call("fds", &()).await.unwrap();
    let target = |n: &str| -> String {
        fds.iter().find_map(|f| f.strip_prefix(&format!("{n}="))).unwrap_or_default().to_string()
    };
    assert_eq!(target("0"), "/dev/null", "{fds:?}");
    assert!(target("1").starts_with("pipe:") && target("2").starts_with("pipe:"), "{fds:?}");
    assert!(target("3").starts_with("socket:"), "{fds:?}");
    // Whatever else is open, the SDK made it (copies of these, and the folder being listed):
    // nothing the supervisor holds reached the plugin.
    let handed: Vec<String> = ["0", "1", "2", "3"].iter().map(|n| target(n)).collect();
    for f in &fds {
        let t = f.split_once('=').map(|x| x.1).unwrap_or_default();
        assert!(handed.iter().any(|h| h == t) || t.ends_with("/fd"), "leaked: {f} in {fds:?}");
    }
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outlives_stop_not_even_a_setsid_double_fork() {
    if !is_root() {
        return;
    }
    let sup = supervisor();
    let h = escapist(&sup).await;
    let pid = h.status().pid.unwrap();
    assert_eq!(ask(&h, "double_fork", ()).await, "ok: forked");
    let members = jail_members(pid);
    assert_eq!(members.len(), 3, "init, plugin and the runaway grandchild: {members:?}");
    sup.unload("escapist").await.unwrap();
    eventually("every process of the plugin is gone", || members.iter().all(|p| !alive(*p))).await;
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_capped_over_all_processes_by_default_and_when_set() {
    if !is_root() {
        return;
    }
    let sup = supervisor();
    let h = escapist(&sup).await;
    assert!(
        h.status().sandbox.iter().any(|l| l == "memory-watch(512 MiB, all processes)"),
        "a default cap: {:?}",
        h.status().sandbox
    );
    let dir = tempfile::tempdir().unwrap();
    let capped = plugin(
        &dir,
        "escapist-128",
        "escapist",
        "[limits]\nmemory = \"128MiB\"\n[restart]\npolicy = \"never\"\n",
    );
    let h = sup.load(capped).await.unwrap();
    // Eight children of 48 MiB: each under the cap, 384 MiB together.
    let r = ask(&h, "hog_children", (8u32, 48u64)).await;
    assert!(r.starts_with("ok: "), "{r}");
    let reason = tokio::time::timeout(Duration::from_secs(60), exit_of(&h)).await.unwrap();
    assert_eq!(reason, ExitReason::MemoryLimit { limit_bytes: 128 << 20 });
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_its_uid_cannot_run_fails_to_start_with_the_fix_named() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("private");
    std::fs::create_dir_all(&folder).unwrap();
    let exe = folder.join("echo");
    std::fs::copy(bin_dir().join("echo"), &exe).unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::write(
        folder.join("plugin.toml"),
        "name = \"private\"\nversion = \"1.0.0\"\napi_version = \"^1\"\nentrypoint = \"echo\"\n[restart]\npolicy = \"never\"\n",
    )
    .unwrap();
    let sup = supervisor();
    let err = sup.load(supervisor::PluginSpec::from_manifest(&folder).unwrap()).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("Permission denied"), "{text}");
    assert!(text.contains("must be readable and executable by it"), "{text}");
    sup.shutdown().await;
}
