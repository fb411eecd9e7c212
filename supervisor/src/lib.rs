//! supervisor: the host side of plugd.
pub mod exit;
pub mod lifecycle;
pub mod manifest;
pub mod units;
