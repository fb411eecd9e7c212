//! supervisor: the host side of plugd.
//!
//! A host — a trading engine, a service, or the `plugd` daemon — links this
//! crate to run plugins as supervised child processes and call them:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use supervisor::{Deadline, PluginSpec, Supervisor, SupervisorConfig};
//! let sup = Supervisor::new(SupervisorConfig::default())?;
//! let echo = sup.load(PluginSpec::from_manifest("examples/plugins/echo/plugin.toml")?).await?;
//! let back: String = echo.call("echo", "hello").await?;
//! sup.unload("echo").await?;
//! # Ok(()) }
//! ```
//!
//! Rooms: [`manifest`] (plugin.toml), [`spawn`] (fork/exec, pidfd, process
//! groups), `instance` (the actor owning one plugin's socket), [`lifecycle`]
//! (the pure restart state machine), `stop` (the pure stop sequence of one instance:
//! drain, Shutdown, SIGTERM, SIGKILL), `slot` (one task per plugin performing
//! lifecycle actions), [`router`] (handles and call routing), [`logs`]
//! (captured output), [`exit`] (classified exit reasons), [`python`] (finding a Python
//! plugin's venv; building one is `plugd-install`'s job, handed in as a
//! [`PrepareRuntime`]).
//!
//! This crate is what an engine links: no HTTP, no archives, no command line, no pip.
//! The daemon (`plugd-daemon`), the installer (`plugd-install`), the control protocol
//! (`plugd-control`) and the binaries (`plugd`) are crates of their own on top of it.

#![warn(missing_docs)]

mod calls;
mod conn;
pub mod describe;
pub mod exit;
pub mod foreign;
mod handshake;
pub mod health;
pub mod host;
mod instance;
pub mod lifecycle;
pub mod logs;
pub mod manifest;
mod proc;
pub mod python;
pub mod router;
pub mod sandbox;
pub mod serving;
mod slot;
pub mod spawn;
mod stop;
mod supervisor;
mod swap;
pub mod units;
mod wire;

pub use exit::ExitReason;
pub use host::{HostCall, HostRequest};
pub use instance::Frozen;
pub use lifecycle::State;
pub use manifest::{Manifest, ManifestError, PluginKind, PluginSpec, RestartPolicy, Transport};
pub use plugin_proto::{CallError, ErrorCode, Payload, PayloadCodec};
pub use router::{Deadline, PluginHandle, PluginStatus};
pub use slot::FrozenPlugin;
pub use supervisor::{PrepareRuntime, Supervisor, SupervisorConfig, SupervisorError};
