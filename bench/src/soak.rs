//! plugd-soak: runs the real plugd under a storm for a given time and reports what broke.
//!
//! ```sh
//! cargo build --release --workspace && ./target/release/plugd-soak --seconds 600
//! ```
//!
//! Five echo plugins: two untouched (`steady-1`, `steady-2`), one SIGKILLed at random
//! (`victim`), one whose version is bumped and plugd sent SIGHUP (a hot update,
//! `updated`), one restarted, stopped and started (`cycled`). Callers hammer all five
//! over the control socket (persistent connections) and over HTTP (a connection per
//! call) while plugd itself gets SIGUSR2 every ~20 s. Every failed call is classified:
//! to a plugin that was being killed or cycled (expected), to the plugin being hot
//! updated, during a SIGUSR2 window, or to an untouched plugin. plugd's RSS, descriptors,
//! threads and zombie children are sampled every second. At the end plugd gets SIGTERM
//! and no plugin process may be left.
//!
//! The bar: no failed call to an untouched plugin, none during a hot update or SIGUSR2;
//! flat RSS and descriptors; no zombie, no orphan.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const TOKEN: &str = "soak-token-0123456789abcdef";
const PLUGINS: &[&str] = &["steady-1", "steady-2", "victim", "updated", "cycled"];

/// One call's outcome.
struct Outcome {
    at: Instant,
    plugin: &'static str,
    via: &'static str,
    error: Option<String>,
}

/// A time window in which a kind of chaos was under way.
#[derive(Clone)]
struct Window {
    kind: &'static str,
    plugin: Option<&'static str>,
    from: Instant,
    to: Instant,
}

struct Shared {
    stop: AtomicBool,
    /// Failed calls only (a 10-minute run makes millions of calls).
    failures: Mutex<Vec<Outcome>>,
    windows: Mutex<Vec<Window>>,
    calls: AtomicU64,
    /// Failed calls to the plugins killed or cycled on purpose.
    expected: AtomicU64,
    /// Per plugin: since when its calls fail (if they do), and the longest such run.
    down: Mutex<BTreeMap<&'static str, (Option<Instant>, Duration)>>,
}

impl Shared {
    fn record(&self, o: Outcome) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        {
            let mut down = self.down.lock().unwrap();
            let (since, longest) = down.entry(o.plugin).or_default();
            match (&o.error, *since) {
                (None, Some(t)) => {
                    *longest = (*longest).max(o.at - t);
                    *since = None;
                }
                (Some(_), None) => *since = Some(o.at),
                _ => {}
            }
        }
        if o.error.is_some() {
            if o.plugin == "victim" || o.plugin == "cycled" {
                // Expected (the plugin was down on purpose): counted, a few kept as examples.
                if self.expected.fetch_add(1, Ordering::Relaxed) >= 3 {
                    return;
                }
            }
            self.failures.lock().unwrap().push(o);
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: u64 = match args.iter().position(|a| a == "--seconds" || a == "--minutes") {
        Some(i) => {
            let n: u64 = args
                .get(i + 1)
                .and_then(|v| v.parse().ok())
                .context("a number after --seconds/--minutes")?;
            if args[i] == "--minutes" {
                n * 60
            } else {
                n
            }
        }
        None => 60,
    };
    let bin = std::env::current_exe()?.parent().context("no folder")?.to_path_buf();
    for b in ["plugd", "echo"] {
        if !bin.join(b).is_file() {
            bail!(
                "{} is missing; run `cargo build --release --workspace` first",
                bin.join(b).display()
            );
        }
    }
    let root = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    for name in PLUGINS {
        write_plugin(root.path(), &bin, name, "1.0.0")?;
    }
    std::fs::write(root.path().join("token"), TOKEN)?;
    std::fs::write(
        root.path().join("plugd.toml"),
        format!("socket = \"run/plugd.sock\"\nplugin_dirs = [\"plugins\"]\nstate_dir = \"state\"\n[http]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"token\"\n"),
    )?;
    let log = std::fs::File::create(root.path().join("plugd.log"))?;
    let mut plugd = std::process::Command::new(bin.join("plugd"))
        .arg("--config")
        .arg(root.path().join("plugd.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()?;
    let socket = root.path().join("run/plugd.sock");
    let pid = plugd.id();
    let ready = Instant::now() + Duration::from_secs(30);
    while !all_ready(&socket) {
        if Instant::now() > ready {
            bail!("plugd did not get ready; see {}", root.path().join("plugd.log").display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "plugd {pid} ready; storming for {secs} s (port {port}, folder {})",
        root.path().display()
    );

    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        failures: Mutex::new(Vec::new()),
        windows: Mutex::new(Vec::new()),
        calls: AtomicU64::new(0),
        expected: AtomicU64::new(0),
        down: Mutex::new(BTreeMap::new()),
    });
    let mut threads = Vec::new();
    for w in 0..3 {
        let (s, sock) = (shared.clone(), socket.clone());
        threads.push(std::thread::spawn(move || control_caller(&s, &sock, w)));
    }
    for w in 0..2 {
        let s = shared.clone();
        threads.push(std::thread::spawn(move || http_caller(&s, port, w)));
    }
    let samples = Arc::new(Mutex::new(Vec::new()));
    {
        let (s, samples) = (shared.clone(), samples.clone());
        threads.push(std::thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                if let Some(sample) = sample(pid) {
                    samples.lock().unwrap().push(sample);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }));
    }
    chaos(&shared, root.path(), &bin, &socket, pid, Duration::from_secs(secs));
    shared.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }

    // The end: SIGTERM, then nothing of the plugins may be left.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = plugd.wait()?;
    std::thread::sleep(Duration::from_millis(300));
    let echo = bin.join("echo");
    let orphans: Vec<u32> = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|x| x == echo))
        .collect();

    report(&shared, &samples.lock().unwrap(), status, &orphans, secs);
    Ok(())
}

fn write_plugin(root: &Path, bin: &Path, name: &str, version: &str) -> Result<()> {
    let dir = root.join("plugins").join(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("plugin.toml"),
        format!(
            "name = \"{name}\"\nversion = \"{version}\"\napi_version = \"^1\"\nentrypoint = \"{}\"\n[restart]\npolicy = \"always\"\nmax_restarts = 1000\n",
            bin.join("echo").display()
        ),
    )?;
    Ok(())
}

fn ask(
    conn: &mut UnixStream,
    reader: &mut BufReader<UnixStream>,
    request: &str,
) -> std::io::Result<serde_json::Value> {
    conn.write_all(request.as_bytes())?;
    conn.write_all(b"\n")?;
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "plugd closed the connection",
        ));
    }
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

fn control(socket: &Path, request: &str) -> Option<serde_json::Value> {
    let mut conn = UnixStream::connect(socket).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    ask(&mut conn, &mut reader, request).ok()
}

fn all_ready(socket: &Path) -> bool {
    control(socket, r#"{"cmd":"status"}"#).is_some_and(|r| {
        r["data"]
            .as_array()
            .is_some_and(|a| a.len() == PLUGINS.len() && a.iter().all(|p| p["state"] == "ready"))
    })
}

fn control_caller(s: &Shared, socket: &Path, worker: usize) {
    let mut i = worker;
    let mut conn: Option<(UnixStream, BufReader<UnixStream>)> = None;
    while !s.stop.load(Ordering::Relaxed) {
        let plugin = PLUGINS[i % PLUGINS.len()];
        i += 1;
        if conn.is_none() {
            conn = UnixStream::connect(socket).ok().and_then(|c| {
                c.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
                let r = BufReader::new(c.try_clone().ok()?);
                Some((c, r))
            });
        }
        let at = Instant::now();
        let error = match conn.as_mut() {
            None => Some("cannot connect".to_string()),
            Some((c, r)) => {
                let req =
                    format!(r#"{{"cmd":"call","name":"{plugin}","method":"echo","json":"{i}"}}"#);
                match ask(c, r, &req) {
                    Ok(v) if v["ok"] == true && v["data"] == serde_json::json!(i) => None,
                    Ok(v) => Some(v["error"].as_str().unwrap_or("wrong answer").to_string()),
                    Err(e) => {
                        conn = None;
                        Some(format!("connection: {e}"))
                    }
                }
            }
        };
        s.record(Outcome { at, plugin, via: "control", error });
    }
}

fn http_caller(s: &Shared, port: u16, worker: usize) {
    let mut i = worker;
    while !s.stop.load(Ordering::Relaxed) {
        let plugin = PLUGINS[i % PLUGINS.len()];
        i += 1;
        let at = Instant::now();
        let body = i.to_string();
        let error = (|| -> std::io::Result<Option<String>> {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
            c.set_read_timeout(Some(Duration::from_secs(30)))?;
            write!(
                c,
                "POST /v1/plugins/{plugin}/call/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            let mut out = String::new();
            c.read_to_string(&mut out)?;
            let ok = out.starts_with("HTTP/1.1 200") && out.trim_end().ends_with(&body);
            Ok((!ok).then(|| out.lines().next().unwrap_or("no answer").to_string() + " " + out.rsplit("\r\n").next().unwrap_or("")))
        })()
        .unwrap_or_else(|e| Some(format!("connection: {e}")));
        s.record(Outcome { at, plugin, via: "http", error });
    }
}

fn pid_of(socket: &Path, plugin: &str) -> Option<i32> {
    let r = control(socket, &format!(r#"{{"cmd":"status","name":"{plugin}"}}"#))?;
    r["data"][0]["pid"].as_i64().map(|p| p as i32)
}

fn generation(socket: &Path) -> Option<u64> {
    control(socket, r#"{"cmd":"info"}"#)?["data"]["generation"].as_u64()
}

fn chaos(s: &Shared, root: &Path, bin: &Path, socket: &Path, plugd: u32, length: Duration) {
    let end = Instant::now() + length;
    let mut version = 0u32;
    let mut step = 0u64;
    let mut last_upgrade = Instant::now();
    let record = |kind, plugin, from: Instant| {
        s.windows.lock().unwrap().push(Window {
            kind,
            plugin,
            from,
            to: Instant::now() + Duration::from_millis(500),
        });
    };
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(700 + (step * 7919 % 900)));
        step += 1;
        let from = Instant::now();
        if last_upgrade.elapsed() > Duration::from_secs(20) {
            last_upgrade = Instant::now();
            let before = generation(socket).unwrap_or(0);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(plugd as i32),
                nix::sys::signal::Signal::SIGUSR2,
            );
            let give_up = Instant::now() + Duration::from_secs(30);
            while generation(socket).unwrap_or(before) == before && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(20));
            }
            record("sigusr2", None, from);
            continue;
        }
        match step % 3 {
            0 => {
                if let Some(p) = pid_of(socket, "victim") {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                // Until it is back (restart with backoff).
                let give_up = Instant::now() + Duration::from_secs(30);
                while pid_of(socket, "victim").is_none() && Instant::now() < give_up {
                    std::thread::sleep(Duration::from_millis(20));
                }
                record("kill", Some("victim"), from);
            }
            1 => {
                version += 1;
                let _ = write_plugin(root, bin, "updated", &format!("1.0.{version}"));
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(plugd as i32),
                    nix::sys::signal::Signal::SIGHUP,
                );
                // Until the new version serves (the hot update is done).
                let want = format!("1.0.{version}");
                let give_up = Instant::now() + Duration::from_secs(30);
                while Instant::now() < give_up
                    && control(socket, r#"{"cmd":"status","name":"updated"}"#)
                        .is_none_or(|r| r["data"][0]["version"] != want.as_str())
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                record("hot update", Some("updated"), from);
            }
            _ => {
                let cmd = ["restart", "stop", "start"][(step / 3 % 3) as usize];
                let _ = control(socket, &format!(r#"{{"cmd":"{cmd}","name":"cycled"}}"#));
                record("cycle", Some("cycled"), from);
            }
        }
    }
    // Everything back before the end, so the last calls count.
    let _ = control(socket, r#"{"cmd":"start","name":"cycled"}"#);
}

/// plugd's RSS (KiB), descriptors, threads and zombie children.
fn sample(pid: u32) -> Option<(u64, usize, u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| -> Option<u64> {
        status.lines().find_map(|l| l.strip_prefix(k))?.split_whitespace().next()?.parse().ok()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let zombies = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let rest: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().collect())
                .unwrap_or_default();
            rest.first() == Some(&"Z")
                && rest.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid)
        })
        .count();
    Some((field("VmRSS:")?, fds, field("Threads:")?, zombies))
}

fn report(
    s: &Shared,
    samples: &[(u64, usize, u64, usize)],
    status: std::process::ExitStatus,
    orphans: &[u32],
    secs: u64,
) {
    let failures = s.failures.lock().unwrap();
    let windows = s.windows.lock().unwrap();
    let in_window = |o: &Outcome, kind: &str| {
        windows.iter().any(|w| {
            w.kind == kind
                && (w.plugin.is_none() || w.plugin == Some(o.plugin))
                && o.at >= w.from
                && o.at <= w.to
        })
    };
    let mut classes: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for o in failures.iter() {
        let class = if o.plugin == "victim" || o.plugin == "cycled" {
            "to a killed or cycled plugin (expected)"
        } else if in_window(o, "sigusr2") {
            "during SIGUSR2"
        } else if o.plugin == "updated" {
            "to the plugin being hot updated"
        } else {
            "to an untouched plugin"
        };
        let e = o.error.as_deref().unwrap_or_default();
        classes.entry(class).or_default().push(format!("{} via {}: {e}", o.plugin, o.via));
    }
    let calls = s.calls.load(Ordering::Relaxed);
    let longest: BTreeMap<&str, Duration> =
        s.down.lock().unwrap().iter().map(|(p, (_, l))| (*p, *l)).collect();
    let count = |k: &str| windows.iter().filter(|w| w.kind == k).count();
    println!("\n{} calls in {secs} s ({:.0}/s); chaos: {} SIGKILLs, {} hot updates, {} restart/stop/start, {} SIGUSR2",
        calls, calls as f64 / secs as f64, count("kill"), count("hot update"), count("cycle"), count("sigusr2"));
    println!("failed calls:");
    for class in [
        "to an untouched plugin",
        "to the plugin being hot updated",
        "during SIGUSR2",
        "to a killed or cycled plugin (expected)",
    ] {
        let list = classes.get(class).cloned().unwrap_or_default();
        let n = if class.ends_with("(expected)") {
            s.expected.load(Ordering::Relaxed)
        } else {
            list.len() as u64
        };
        println!("  {class}: {n}");
        for e in list.iter().take(3) {
            println!("      e.g. {e}");
        }
    }
    println!("longest run of failed calls per plugin (unavailability):");
    for p in PLUGINS {
        println!("  {p}: {} ms", longest.get(p).map(|d| d.as_millis()).unwrap_or(0));
    }
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        let max_rss = samples.iter().map(|s| s.0).max().unwrap_or(0);
        let max_fds = samples.iter().map(|s| s.1).max().unwrap_or(0);
        let max_threads = samples.iter().map(|s| s.2).max().unwrap_or(0);
        let max_zombies = samples.iter().map(|s| s.3).max().unwrap_or(0);
        println!("plugd over time (first / max / last): RSS {} / {max_rss} / {} KiB, fds {} / {max_fds} / {}, threads {} / {max_threads} / {}, zombie children max {max_zombies}",
            first.0, last.0, first.1, last.1, first.2, last.2);
    }
    println!("plugd exit after SIGTERM: {status}; plugin processes left: {}", orphans.len());
}
