//! plugd-install: putting plugin versions on disk, side by side, and making them runnable.
//!
//! [`install`] fetches a folder, an archive or a git ref into `<plugins>/<name>/<version>`
//! (every fetch and build step jailed as the plugin's uid), [`signing`] checks minisign
//! signatures against the operator's trusted keys, [`python`] builds a Python plugin's
//! virtualenv in its build jail, and [`jobs`] runs installs as cancellable jobs with
//! their output kept. The daemon and `plugctl validate` use it; an engine that only runs
//! plugins does not need it.

#![warn(missing_docs)]

// The host's modules, under the names this crate's modules have always used.
pub(crate) use supervisor::{exit, manifest, sandbox, spawn};

pub mod fault;
pub mod install;
pub mod jobs;
pub mod python;
pub mod signing;
pub mod wheel;
