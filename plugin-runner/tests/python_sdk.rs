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

/// The SDK is typed (it ships `py.typed`), and `mypy --strict` finds nothing in it. mypy
/// comes from PyPI into a venv under cargo's target folder, once (pinned version).
#[test]
fn python_sdk_is_clean_under_mypy_strict() {
    const MYPY: &str = "mypy==2.4.1";
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    assert!(sdk.join("plugd_plugin/py.typed").exists(), "py.typed marks the package as typed");
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mypy-venv");
    let mypy = venv.join("bin/mypy");
    let stamp = venv.join(".installed");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(MYPY) {
        let _ = std::fs::remove_dir_all(&venv);
        let made = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().unwrap();
        assert!(made.success(), "python3 -m venv {} failed", venv.display());
        let out = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check", MYPY])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "installing {MYPY} from PyPI failed (this test needs the package registry):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&stamp, MYPY).unwrap();
    }
    let out = Command::new(&mypy)
        .args(["--strict", "--no-incremental", "plugd_plugin"])
        .current_dir(&sdk)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mypy --strict found problems in the Python SDK:\n{text}");
    assert!(text.contains("no issues found"), "{text}");
}
