//! Runs the Python SDK's own tests (golden vectors, a served plugin) from `cargo test`,
//! so a change of the Rust protocol that breaks Python plugins fails CI.

use std::path::Path;
use std::process::Command;

#[test]
fn python_sdk_unittests_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    let out = Command::new("python3")
        .args(["-m", "unittest", "discover", "-s", "tests", "-v"])
        .current_dir(&dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3 is needed for the Python SDK tests; install it (apt-get install python3)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "Python SDK tests failed in {}:\n{stderr}", dir.display());
    // A run that found no tests would also exit 0.
    assert!(stderr.contains("Ran ") && !stderr.contains("Ran 0 tests"), "{stderr}");
}
