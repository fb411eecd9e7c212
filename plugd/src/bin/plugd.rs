//! plugd: the plugin supervisor daemon. Thin: parse arguments, set up logging, run.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use plugd_daemon::config::DaemonConfig;

/// Runs plugins from the configured folders as sandboxed, supervised processes.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Config file (plugd.toml). Without it, the built-in default serves the bundled examples.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Refuse to start if any plugin folder has a problem (default: start the valid ones).
    #[arg(long)]
    strict: bool,
    /// Override the config's log format.
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => match DaemonConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("plugd: {e}");
                return std::process::ExitCode::from(2);
            }
        },
        None => DaemonConfig::builtin(),
    };
    let format = args
        .log_format
        .as_deref()
        .and_then(plugd_daemon::config::LogFormat::from_word)
        .unwrap_or(config.log_format);
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    if format == plugd_daemon::config::LogFormat::Json {
        builder.json().init();
    } else {
        builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
    // Plugins are forked on the main thread, and the daemon runs on another: SIGUSR2's
    // exec keeps only the thread that calls it, and the parent-death signal of every
    // plugin is tied to the thread that forked it; so that one thread must be the same in
    // every generation, and only the main thread is (see `SpawnerLoop::run`).
    let (spawner, forks) = supervisor::spawn::Spawner::on_current_thread();
    let quit = spawner.clone();
    let daemon = std::thread::Builder::new().name("plugd-runtime".into()).spawn(move || {
        let result: anyhow::Result<()> = (|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(plugd_daemon::daemon::run(config, args.strict, spawner))?;
            Ok(())
        })();
        quit.stop_loop();
        result
    });
    let result = match daemon {
        Ok(thread) => {
            forks.run();
            thread.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the daemon thread panicked")))
        }
        Err(e) => Err(anyhow::anyhow!("cannot start the daemon thread: {e}")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plugd: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
