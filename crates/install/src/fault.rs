//! Fault injection, for tests that must kill plugd at an exact point of an install.
//!
//! Built with the `fault-injection` feature (the test kit builds plugd with it; a plain
//! `cargo build` does not), `PLUGD_FAULT=<point>` makes the process stop for good when it
//! reaches that point, after writing the point's name to the file `PLUGD_FAULT_REACHED`
//! names: the test waits for that file, then sends its SIGKILL. Without the feature, a
//! point is nothing.

/// Marks a point a test may stop the process at (see the module doc).
pub fn point(name: &str) {
    #[cfg(feature = "fault-injection")]
    if std::env::var("PLUGD_FAULT").as_deref() == Ok(name) {
        if let Some(marker) = std::env::var_os("PLUGD_FAULT_REACHED") {
            let _ = std::fs::write(marker, name);
        }
        eprintln!("fault injection: stopped at {name} until killed");
        loop {
            std::thread::park();
        }
    }
    let _ = name;
}
