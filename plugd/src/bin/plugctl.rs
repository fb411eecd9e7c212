//! plugctl: control a running plugd over its control socket.
//!
//! Exit codes: 0 ok, 1 the operation failed, 2 usage error, 3 plugd not reachable.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use interprocess::local_socket::{prelude::*, GenericFilePath, Stream};
use plugd_control::{Reply, Request, StatusEntry};

/// Control a running plugd.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Control socket (default: $PLUGD_SOCKET, else $XDG_RUNTIME_DIR/plugd.sock or /tmp/plugd-<uid>/plugd.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show plugins: name, version, kind, state, pid, uptime, restarts, last exit, sandbox.
    Status {
        /// Only this plugin.
        name: Option<String>,
    },
    /// Show one plugin in full: its status, the name its manifest wrote (`HedgeV2`), and
    /// the keys of a plugin.yaml/plugin.json plugd keeps but has no use for.
    Show {
        /// The plugin.
        name: String,
    },
    /// Start a plugin.
    Start {
        /// The plugin.
        name: String,
    },
    /// Stop a plugin gracefully.
    Stop {
        /// The plugin.
        name: String,
    },
    /// Restart a plugin.
    Restart {
        /// The plugin.
        name: String,
    },
    /// Re-read config and plugin folders and apply the difference (same as SIGHUP).
    Reload,
    /// Hot-swap a running plugin to what its folder holds now, or to an installed VERSION (no call is lost).
    Update {
        /// The plugin.
        name: String,
        /// An installed version to switch to.
        version: Option<String>,
        /// Update even if it breaks another plugin's `requires`.
        #[arg(long)]
        force: bool,
        /// Only show what would change (version, manifest sections, broken requires).
        #[arg(long)]
        dry_run: bool,
    },
    /// Install a plugin from a local folder (validated, copied, started if new).
    Install {
        /// The plugin folder.
        source: PathBuf,
        /// Replace an installed name@version.
        #[arg(long)]
        force: bool,
        /// Clear a persisted disable.
        #[arg(long)]
        enable: bool,
        /// Only show what would be installed (version, changed sections, the dependencies
        /// pip would install); nothing is copied, built or installed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Install jobs (what `install` and the HTTP API ran): all, or one with its output.
    Jobs {
        /// Only this job.
        id: Option<u64>,
    },
    /// Cancel a queued or running install job.
    CancelJob {
        /// The job.
        id: u64,
    },
    /// List a plugin's installed versions.
    Versions {
        /// The plugin.
        name: String,
    },
    /// Hot-swap back to an installed version (default: the newest below the current one).
    Rollback {
        /// The plugin.
        name: String,
        /// The version.
        version: Option<String>,
    },
    /// Stop and remove an installed plugin, or one of its non-current versions.
    Uninstall {
        /// The plugin.
        name: String,
        /// Only this version.
        #[arg(long)]
        version: Option<String>,
        /// Also remove its state folder.
        #[arg(long)]
        purge: bool,
    },
    /// Enable a plugin (persisted) and start it.
    Enable {
        /// The plugin.
        name: String,
    },
    /// Stop a plugin and keep it disabled across daemon restarts.
    Disable {
        /// The plugin.
        name: String,
    },
    /// Call METHOD on a plugin with a JSON argument and print the JSON reply.
    Call {
        /// The plugin.
        name: String,
        /// The method.
        method: String,
        /// The argument as JSON (default: null).
        #[arg(default_value = "null", value_name = "JSON")]
        arg: String,
        /// Configuration for this one call, as JSON (an API key, say): the handler gets it
        /// beside the argument; plugd never logs it.
        #[arg(long, value_name = "JSON", conflicts_with = "cfg_file")]
        cfg: Option<String>,
        /// Like --cfg, read from FILE (keeps a secret out of the shell's history).
        #[arg(long, value_name = "FILE")]
        cfg_file: Option<std::path::PathBuf>,
    },
    /// Show a plugin's recent output and supervisor notes.
    Logs {
        /// The plugin.
        name: String,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// How many lines.
        #[arg(short, default_value_t = 50)]
        n: usize,
        /// Times in UTC (default: local time; --json keeps the raw milliseconds).
        #[arg(long)]
        utc: bool,
    },
    /// Check a plugin folder without a daemon: manifest, entrypoint, and a real start and stop.
    /// Check a plugin folder or archive without a daemon: its signature (an archive's
    /// .minisig, checked with the trusted keys), manifest, entrypoint, and a real start and stop.
    Validate {
        /// The plugin folder (or its plugin.toml), or a .tar.gz / .zip archive.
        dir: PathBuf,
        /// A trusted minisign public key (base64, or a minisign.pub file); repeatable.
        #[arg(long = "trusted-key", value_name = "KEY")]
        trusted_keys: Vec<String>,
        /// Take the trusted keys from this plugd.toml's [install] section.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Stop every plugin and the daemon.
    Shutdown,
    /// The daemon's pid, exec generation (bumped by each SIGUSR2 upgrade) and version.
    Info,
    /// A live table of what each plugin costs: state, CPU %, RSS, calls/s, p99, restarts.
    Top {
        /// Print one table (measured over one interval) and exit; with --json, as JSON.
        #[arg(long)]
        once: bool,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

struct Client {
    reader: BufReader<Stream>,
}

fn connect(socket: &std::path::Path) -> Result<Client, String> {
    let name = socket.to_path_buf().to_fs_name::<GenericFilePath>().map_err(|e| e.to_string())?;
    let stream = Stream::connect(name).map_err(|e| {
        format!(
            "cannot reach plugd at {}: {e}; is it running? (use --socket or PLUGD_SOCKET)",
            socket.display()
        )
    })?;
    Ok(Client { reader: BufReader::new(stream) })
}

impl Client {
    fn ask(&mut self, req: &Request) -> Result<Reply, String> {
        let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.reader
            .get_mut()
            .write_all(&line)
            .map_err(|e| format!("plugd closed the connection: {e}"))?;
        let mut answer = String::new();
        self.reader
            .read_line(&mut answer)
            .map_err(|e| format!("plugd closed the connection: {e}"))?;
        if answer.is_empty() {
            return Err("plugd closed the connection without answering".into());
        }
        serde_json::from_str(&answer).map_err(|e| format!("plugd sent an unreadable answer: {e}"))
    }
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn uptime(ms: Option<u64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 60_000 => format!("{}s", ms / 1000),
        Some(ms) if ms < 3_600_000 => format!("{}m", ms / 60_000),
        Some(ms) => format!("{}h", ms / 3_600_000),
    }
}

/// `plugctl show`: every field of each status entry, one per line (maps indented).
fn print_detail(rows: &serde_json::Value) {
    for row in rows.as_array().cloned().unwrap_or_default() {
        for (key, value) in row.as_object().cloned().unwrap_or_default() {
            match value {
                serde_json::Value::Object(map) if !map.is_empty() => {
                    println!("{key}:");
                    for (k, v) in map {
                        println!("  {k}: {}", cell(&v));
                    }
                }
                serde_json::Value::Array(items) => {
                    let items: Vec<String> = items.iter().map(cell).collect();
                    println!("{key}: {}", items.join(", "));
                }
                other => println!("{key}: {}", cell(&other)),
            }
        }
    }
}

fn print_table(rows: &serde_json::Value) {
    let rows: Vec<StatusEntry> = serde_json::from_value(rows.clone())
        .or_else(|_| serde_json::from_value(rows.clone()).map(|one| vec![one]))
        .unwrap_or_default();
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let table: Vec<[String; 9]> = rows
        .into_iter()
        .map(|r| {
            [
                r.name,
                r.version,
                r.kind,
                match &r.health {
                    Some(h) if h.state != "healthy" => format!("{} (health: {})", r.state, h.state),
                    _ => r.state,
                },
                or_dash(r.pid.map(|p| p.to_string())),
                uptime(r.uptime_ms),
                r.restarts.to_string(),
                or_dash(r.last_exit),
                if r.sandbox.is_empty() { "-".into() } else { r.sandbox.join(",") },
            ]
        })
        .collect();
    let head =
        ["NAME", "VERSION", "KIND", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT", "SANDBOX"];
    let mut width: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for row in &table {
        for (i, c) in row.iter().enumerate().take(8) {
            width[i] = width[i].max(c.chars().count().min(60));
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 8 {
                s.push_str(c);
            } else {
                let c: String = c.chars().take(60).collect();
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(head.iter().map(|h| h.to_string()).collect());
    for row in table {
        line(row.to_vec());
    }
}

/// An archive's signature status for `validate`, and the folder to validate (unpacked
/// into `scratch` for an archive).
fn signature_and_folder(
    path: &std::path::Path,
    trusted_keys: &[String],
    config: Option<&std::path::Path>,
    scratch: &std::path::Path,
) -> Result<(String, PathBuf), String> {
    let name = path.to_string_lossy();
    let zip = name.ends_with(".zip");
    if !(zip || name.ends_with(".tar.gz") || name.ends_with(".tgz")) {
        return Ok(("a folder: no signature to check".into(), path.to_path_buf()));
    }
    let trust = match config {
        Some(c) => plugd_daemon::config::DaemonConfig::load(c).map_err(|e| e.to_string())?.trust,
        None => plugd_install::signing::Trust::from_config(
            trusted_keys,
            false,
            std::path::Path::new("."),
        )?,
    };
    let signature = plugd_install::signing::signature_beside(path);
    let line = match (&signature, trust.has_keys()) {
        (None, _) => "not signed (no .minisig beside it)".to_string(),
        (Some(_), false) => {
            "has a .minisig, not checked: give --trusted-key KEY or --config plugd.toml".to_string()
        }
        (Some(sig), true) => match trust.check_archive(path, Some(sig))? {
            Some(who) => format!("signed by {who}"),
            None => "not signed".to_string(),
        },
    };
    let unpacked = scratch.join("unpacked");
    if zip {
        plugd_install::install::unpack_zip(path, &unpacked)?;
    } else {
        plugd_install::install::unpack_tar_gz(path, &unpacked)?;
    }
    Ok((line, plugd_install::install::plugin_folder(&unpacked)?))
}

fn validate(
    dir: PathBuf,
    json: bool,
    trusted_keys: &[String],
    config: Option<&std::path::Path>,
) -> Result<(), String> {
    let scratch = std::env::temp_dir().join(format!("plugctl-unpack-{}", std::process::id()));
    let checked = signature_and_folder(&dir, trusted_keys, config, &scratch);
    let result =
        checked.and_then(|(signature, folder)| validate_folder(folder, json, &signature, config));
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Checks `requires` as plugd would: against the plugins in the configured folders and
/// the installed ones. Without a config there is nothing to check against (said, not failed).
fn check_requires(spec: &supervisor::PluginSpec, config: Option<&Path>) -> Result<String, String> {
    let reqs = &spec.manifest.requires;
    if reqs.is_empty() {
        return Ok("none".into());
    }
    let Some(config) = config else {
        return Ok(
            "not checked: give --config plugd.toml to check them against what plugd runs".into()
        );
    };
    let c = plugd_daemon::config::DaemonConfig::load(config).map_err(|e| e.to_string())?;
    let mut dirs = c.plugin_dirs.clone();
    dirs.push(plugd_install::install::root(&c.state_dir));
    let found = plugd_daemon::discovery::discover(&dirs, &c.defaults, &c.instances, None);
    let mut problems = Vec::new();
    for req in reqs {
        match found.plugins.iter().find(|p| p.name() == req.name) {
            None => problems.push(format!(
                "requires {}, which is not among the plugins of {}",
                req.name,
                config.display()
            )),
            Some(p) if !req.version.matches(&p.manifest.version) => problems.push(format!(
                "requires {} {}, but {} {} is what {} runs",
                req.name,
                req.version,
                req.name,
                p.manifest.version,
                config.display()
            )),
            Some(_) => {}
        }
    }
    if problems.is_empty() {
        let names: Vec<String> = reqs.iter().map(|r| format!("{} {}", r.name, r.version)).collect();
        Ok(format!("{} (all present)", names.join(", ")))
    } else {
        Err(format!(
            "{}: {}; plugd would not start it (install what it needs, or fix `requires`)",
            spec.manifest_path.display(),
            problems.join("; ")
        ))
    }
}

fn validate_folder(
    dir: PathBuf,
    json: bool,
    signature: &str,
    config: Option<&Path>,
) -> Result<(), String> {
    let spec = supervisor::PluginSpec::from_manifest(&dir).map_err(|e| e.to_string())?;
    let requires = check_requires(&spec, config)?;
    let name = spec.name().to_string();
    let state = std::env::temp_dir().join(format!("plugctl-validate-{}", std::process::id()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let result = rt.block_on(async {
        let sup = supervisor::Supervisor::new(supervisor::SupervisorConfig {
            state_dir: state.clone(),
            prepare: Some(std::sync::Arc::new(plugd_install::python::Venvs)),
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
        let h = sup.load(spec).await.map_err(|e| e.to_string())?;
        let st = h.status();
        sup.shutdown().await;
        Ok::<_, String>(st)
    });
    let _ = std::fs::remove_dir_all(&state);
    let st = result?;
    if json {
        let mut v = serde_json::to_value(&st).unwrap_or_default();
        v["signature"] = serde_json::json!(signature);
        v["requires"] = serde_json::json!(requires);
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!(
            "ok: {name} {} ({}) started, answered the handshake and stopped cleanly",
            st.version, st.kind
        );
        println!("  signature: {signature}");
        println!("  requires: {requires}");
        println!("  sdk: {}", st.sdk.unwrap_or_default());
        println!("  sandbox: {}", st.sandbox.join(", "));
        for u in st.sandbox_unavailable {
            println!("  unavailable here: {u}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // Printing into a closed pipe (`plugctl status | head`) should end quietly, as in C tools.
    // SAFETY: restoring the default disposition of SIGPIPE runs no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = Args::parse();
    let socket = args.socket.clone().unwrap_or_else(plugd_daemon::config::default_socket);
    let follow = matches!(args.cmd, Cmd::Logs { follow: true, .. });
    let utc = matches!(args.cmd, Cmd::Logs { utc: true, .. });
    let detail = matches!(&args.cmd, Cmd::Show { .. });
    let req = match args.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Args::command(), "plugctl", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Cmd::Top { once, interval } => {
            return match top(&socket, once, interval, args.json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("plugctl: {e}");
                    ExitCode::from(3)
                }
            };
        }
        Cmd::Validate { dir, trusted_keys, config } => {
            return match validate(dir, args.json, &trusted_keys, config.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("plugctl: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Cmd::Status { name } => Request::Status { name },
        Cmd::Show { name } => Request::Status { name: Some(name) },
        Cmd::Start { name } => Request::Start { name },
        Cmd::Stop { name } => Request::Stop { name },
        Cmd::Restart { name } => Request::Restart { name },
        Cmd::Reload => Request::Reload,
        Cmd::Update { name, version, force, dry_run } => {
            Request::Update { name, version, force, dry_run }
        }
        Cmd::Install { source, force, enable, dry_run } => {
            // The daemon resolves the path, so make it absolute here.
            let source = std::fs::canonicalize(&source).unwrap_or(source).display().to_string();
            if dry_run {
                Request::InstallPlan { source }
            } else {
                Request::InstallJob { source, force, enable }
            }
        }
        Cmd::Versions { name } => Request::Versions { name },
        Cmd::Jobs { id: None } => Request::Jobs,
        Cmd::Jobs { id: Some(id) } => Request::Job { id },
        Cmd::CancelJob { id } => Request::CancelJob { id },
        Cmd::Rollback { name, version } => Request::Rollback { name, version },
        Cmd::Uninstall { name, version, purge } => Request::Uninstall { name, version, purge },
        Cmd::Enable { name } => Request::Enable { name },
        Cmd::Disable { name } => Request::Disable { name },
        Cmd::Call { name, method, arg, cfg, cfg_file } => {
            let cfg = match (cfg, cfg_file) {
                (Some(text), _) => Some(text),
                (None, Some(file)) => match std::fs::read_to_string(&file) {
                    Ok(text) => Some(text),
                    Err(e) => {
                        eprintln!(
                            "plugctl: cannot read the cfg file {}: {e}; check the path",
                            file.display()
                        );
                        return ExitCode::from(2);
                    }
                },
                (None, None) => None,
            };
            Request::Call { name, method, json: arg, cfg: cfg.map(plugd_control::Secret::new) }
        }
        Cmd::Logs { ref name, n, .. } => {
            Request::Logs { name: name.clone(), n, since_ms: None, since_seq: None }
        }
        Cmd::Shutdown => Request::Shutdown,
        Cmd::Info => Request::Info,
    };
    let mut client = match connect(&socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("plugctl: {e}");
            return ExitCode::from(3);
        }
    };
    let reply = match client.ask(&req) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("plugctl: {e}");
            return ExitCode::from(3);
        }
    };
    // An install runs as a job: follow it to its end, then show its result as before.
    let (req, reply) = match req {
        Request::InstallJob { source, force, enable } if reply.ok => {
            let id = reply.data.as_ref().and_then(|d| d["job_id"].as_u64()).unwrap_or(0);
            let done = match follow_job(&mut client, id) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("plugctl: {e}");
                    return ExitCode::from(3);
                }
            };
            (Request::Install { source, force, enable }, done)
        }
        other => (other, reply),
    };
    if !reply.ok {
        if args.json {
            println!("{}", serde_json::to_string(&reply).unwrap_or_default());
        }
        eprintln!("plugctl: {}", reply.message());
        return ExitCode::from(1);
    }
    let data = reply.data.unwrap_or_default();
    match &req {
        Request::Logs { name, n, .. } => {
            let mut last = 0u64;
            let print = |lines: &serde_json::Value, last: &mut u64| {
                for l in lines.as_array().cloned().unwrap_or_default() {
                    *last = (*last).max(l["seq"].as_u64().unwrap_or(0));
                    if args.json {
                        println!("{l}");
                    } else {
                        // Fields a plugin logged with the line (plugd.log), as key="value".
                        let fields: String = l["fields"]
                            .as_object()
                            .map(|m| m.iter().map(|(k, v)| format!(" {k}={:?}", cell(v))).collect())
                            .unwrap_or_default();
                        println!(
                            "{} {:<10} {:<5} {}{fields}",
                            clock(l["ts_ms"].as_u64().unwrap_or(0), utc),
                            cell(&l["source"]),
                            cell(&l["level"]),
                            cell(&l["text"])
                        );
                    }
                }
            };
            print(&data, &mut last);
            // Follow until plugd goes away (then exit 3) or the user interrupts.
            if follow {
                loop {
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    match client.ask(&Request::Logs {
                        name: name.clone(),
                        n: *n,
                        since_ms: None,
                        since_seq: Some(last),
                    }) {
                        Ok(Reply { ok: true, data: Some(d), .. }) => print(&d, &mut last),
                        _ => return ExitCode::from(3),
                    }
                }
            }
        }
        _ if args.json => println!("{}", serde_json::to_string_pretty(&data).unwrap_or_default()),
        Request::Jobs => {
            let jobs = data.as_array().cloned().unwrap_or_default();
            if jobs.is_empty() {
                println!("no jobs yet (installs, updates and uninstalls run as jobs)");
            }
            for j in jobs {
                println!(
                    "{:>4}  {:<10} {}{}",
                    cell(&j["id"]),
                    cell(&j["state"]),
                    describe(&j["work"]),
                    j["error"]
                        .as_str()
                        .map(|e| format!("  ({})", e.lines().next().unwrap_or("")))
                        .unwrap_or_default()
                );
            }
        }
        Request::Job { .. } | Request::CancelJob { .. } => {
            println!(
                "job {} {}: {}",
                cell(&data["id"]),
                cell(&data["state"]),
                describe(&data["work"])
            );
            for line in data["output"].as_array().cloned().unwrap_or_default() {
                println!("  {}", cell(&line));
            }
            if let Some(e) = data["error"].as_str() {
                println!("error: {e}");
            }
        }
        Request::Reload => {
            println!("{}", serde_json::to_string_pretty(&data).unwrap_or_default());
            let problems = data["problems"].as_array().map(|p| p.len()).unwrap_or(0);
            if problems > 0 {
                eprintln!("plugctl: the reload found {problems} problem(s), listed above");
                return ExitCode::from(1);
            }
        }
        Request::Versions { .. } | Request::Uninstall { .. } if data.is_array() => {
            for v in data.as_array().cloned().unwrap_or_default() {
                println!(
                    "{}{}",
                    cell(&v["version"]),
                    if v["current"] == true { "  (current)" } else { "" }
                );
            }
        }
        Request::Update { .. } | Request::InstallPlan { .. } if data.get("changes").is_some() => {
            print_plan(&data)
        }
        Request::Install { .. } | Request::Rollback { .. } | Request::Update { .. }
            if !data.is_array() =>
        {
            println!("{}", cell(&data))
        }
        Request::Status { .. } if detail => print_detail(&data),
        Request::Status { .. }
        | Request::Update { .. }
        | Request::Install { .. }
        | Request::Rollback { .. }
        | Request::Start { .. }
        | Request::Stop { .. }
        | Request::Restart { .. }
        | Request::Enable { .. }
        | Request::Disable { .. } => print_table(&data),
        _ => println!(
            "{}",
            match &data {
                serde_json::Value::String(s) => s.clone(),
                other => serde_json::to_string_pretty(other).unwrap_or_default(),
            }
        ),
    }
    ExitCode::SUCCESS
}

/// Prints an update dry run: what would change, the dependency diff, and what blocks it.
fn print_plan(plan: &serde_json::Value) {
    for line in plugd_control::plan_lines(plan) {
        println!("{line}");
    }
}

/// One plugin's figures at one moment, for `top`.
struct Sample {
    state: String,
    pid: Option<u64>,
    restarts: u64,
    calls: u64,
    cpu_secs: Option<f64>,
    rss: Option<u64>,
    p99_us: Option<u64>,
}

fn sample(client: &mut Client) -> Result<(std::time::Instant, Vec<(String, Sample)>), String> {
    let reply = client.ask(&Request::Status { name: None })?;
    let list: Vec<StatusEntry> = match reply {
        Reply { ok: true, data: Some(data), .. } => {
            serde_json::from_value(data).map_err(|e| format!("plugd sent a bad status: {e}"))?
        }
        other => return Err(other.error.map(|e| e.message).unwrap_or_else(|| "no status".into())),
    };
    let now = std::time::Instant::now();
    let out = list
        .into_iter()
        .map(|p| {
            let usage = p.pid.and_then(supervisor::spawn::proc_usage);
            let sample = Sample {
                pid: p.pid.map(u64::from),
                restarts: u64::from(p.restarts),
                calls: p.calls_ok + p.calls_err,
                cpu_secs: usage.map(|u| u.1),
                rss: usage.map(|u| u.0),
                p99_us: p.latency.quantile_us(0.99),
                state: p.state,
            };
            (p.name, sample)
        })
        .collect();
    Ok((now, out))
}

/// `plugctl top`: two samples an interval apart give CPU % and calls/s.
fn top(socket: &std::path::Path, once: bool, interval: f64, json: bool) -> Result<(), String> {
    let mut client = connect(socket)?;
    let interval = std::time::Duration::from_secs_f64(interval.clamp(0.1, 3600.0));
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut before = sample(&mut client)?;
    loop {
        std::thread::sleep(interval);
        let after = sample(&mut client)?;
        let secs = after.0.duration_since(before.0).as_secs_f64().max(1e-6);
        let rows: Vec<serde_json::Value> = after
            .1
            .iter()
            .map(|(name, s)| {
                let prev = before.1.iter().find(|(n, _)| n == name).map(|(_, p)| p);
                let same = prev.filter(|p| p.pid == s.pid);
                let cpu = match (same.and_then(|p| p.cpu_secs), s.cpu_secs) {
                    (Some(a), Some(b)) => Some((b - a).max(0.0) / secs * 100.0),
                    _ => None,
                };
                let calls = prev.map(|p| s.calls.saturating_sub(p.calls) as f64 / secs);
                serde_json::json!({
                    "name": name, "state": s.state, "pid": s.pid, "cpu_percent": cpu,
                    "rss_bytes": s.rss, "calls_per_s": calls,
                    "p99_us": s.p99_us.filter(|v| *v != u64::MAX), "restarts": s.restarts,
                })
            })
            .collect();
        if json {
            println!("{}", serde_json::Value::Array(rows));
        } else {
            if tty && !once {
                print!("\x1b[2J\x1b[H"); // clear and home: a redrawn table
            }
            println!(
                "{:<16} {:<9} {:>7} {:>7} {:>10} {:>9} {:>10} {:>8}",
                "PLUGIN", "STATE", "PID", "CPU%", "RSS", "CALLS/S", "P99", "RESTARTS"
            );
            for r in &rows {
                let f = |v: &serde_json::Value, unit: &str, scale: f64, digits: usize| {
                    v.as_f64()
                        .map(|x| format!("{:.*}{unit}", digits, x / scale))
                        .unwrap_or_else(|| "-".into())
                };
                let p99 = match r["p99_us"].as_u64() {
                    Some(us) if us >= 1000 => format!("≤{} ms", us / 1000),
                    Some(us) => format!("≤{us} µs"),
                    None => "-".into(),
                };
                println!(
                    "{:<16} {:<9} {:>7} {:>7} {:>10} {:>9} {:>10} {:>8}",
                    cell(&r["name"]),
                    cell(&r["state"]),
                    cell(&r["pid"]),
                    f(&r["cpu_percent"], "", 1.0, 1),
                    f(&r["rss_bytes"], " MiB", 1048576.0, 1),
                    f(&r["calls_per_s"], "", 1.0, 0),
                    p99,
                    cell(&r["restarts"]),
                );
            }
        }
        if once {
            return Ok(());
        }
        before = after;
    }
}

/// Shows an install job's progress on stderr until it ends: a spinner line on a terminal,
/// plain lines otherwise, and each line of output as it appears. Returns the job's outcome.
fn follow_job(client: &mut Client, id: u64) -> Result<Reply, String> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let start = std::time::Instant::now();
    let (mut shown_lines, mut last_state, mut tick) = (0usize, String::new(), 0usize);
    loop {
        let job = match client.ask(&Request::Job { id })? {
            Reply { ok: true, data: Some(j), .. } => j,
            other => return Ok(other),
        };
        let state = cell(&job["state"]);
        let lines = job["output"].as_array().cloned().unwrap_or_default();
        if tty && (lines.len() > shown_lines || state != last_state) {
            eprint!("\r\x1b[K");
        }
        for l in lines.iter().skip(shown_lines) {
            eprintln!("  {}", cell(l));
        }
        shown_lines = shown_lines.max(lines.len());
        if tty {
            tick += 1;
            eprint!(
                "\r\x1b[K{} install job {id}: {state} ({:.0}s)",
                frames[tick % frames.len()],
                start.elapsed().as_secs_f64()
            );
        } else if state != last_state {
            eprintln!("install job {id}: {state}");
        }
        last_state = state.clone();
        match state.as_str() {
            "succeeded" | "failed" | "cancelled" => {
                if tty {
                    eprintln!();
                }
                return Ok(if state == "succeeded" {
                    Reply::ok(job["result"].clone())
                } else {
                    Reply::err(job["error"].as_str().unwrap_or(&state).to_string().into())
                });
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(150)),
        }
    }
}

/// A job's work in words (as `jobs::Work::describe`), from its JSON.
fn describe(work: &serde_json::Value) -> String {
    serde_json::from_value::<plugd_install::jobs::Work>(work.clone())
        .map(|w| w.describe())
        .unwrap_or_else(|_| work.to_string())
}

/// A log time as `YYYY-MM-DD HH:MM:SS.mmm`, in local time or UTC.
fn clock(ts_ms: u64, utc: bool) -> String {
    let secs = (ts_ms / 1000) as libc::time_t;
    // SAFETY: an all-zero tm is a valid value of this plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: the _r variants write only into `tm`, which we own; `secs` is a valid time_t.
    let ok = unsafe {
        if utc {
            !libc::gmtime_r(&secs, &mut tm).is_null()
        } else {
            !libc::localtime_r(&secs, &mut tm).is_null()
        }
    };
    if !ok {
        return ts_ms.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        ts_ms % 1000
    )
}
