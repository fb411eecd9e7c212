//! plugd-daemon: the `plugd` daemon on top of the host library.
//!
//! [`config`] reads plugd.toml, [`discovery`] scans the plugin folders, [`daemon`] owns
//! the supervisor, the control socket, signals (SIGHUP reload, SIGUSR2 in-place
//! upgrade, SIGTERM stop) and install jobs, [`http`] serves the HTTP API and `/metrics`,
//! and [`notify`] speaks systemd's notify protocol.

#![warn(missing_docs)]

// The host's and the installer's modules, under the names this crate's modules use.
pub(crate) use plugd_control as control;
pub(crate) use plugd_install::{install, jobs, python, signing, wheel};
pub(crate) use supervisor::{logs, manifest, router, sandbox, spawn};

pub mod config;
pub mod daemon;
pub mod discovery;
pub mod http;
pub mod mcp;
pub mod notify;
