//! What an engine pays to link the host library: the crates it compiles.
//!
//! The host crate must stay free of the daemon's weight (HTTP, archives, the command
//! line, pip). This test asks cargo for the normal (non-dev, non-build) dependency tree
//! of `supervisor`, prints it, and fails when it reaches 60 crates.

use std::collections::BTreeSet;
use std::process::Command;

#[test]
fn the_host_library_compiles_fewer_than_60_crates() {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "-p", "supervisor", "-e", "normal", "--prefix", "none", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let crates: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            Some(format!("{} {}", words.next()?, words.next()?))
        })
        .filter(|c| !c.starts_with("supervisor "))
        .collect();
    println!("the host library pulls in {} crates:", crates.len());
    for c in &crates {
        println!("  {c}");
    }
    for heavy in ["axum ", "hyper ", "clap ", "tar ", "flate2 ", "zip ", "tracing-subscriber "] {
        assert!(
            !crates.iter().any(|c| c.starts_with(heavy)),
            "the host library must not depend on {heavy}: it belongs to the daemon or the installer"
        );
    }
    assert!(crates.len() < 60, "the host library pulls in {} crates (limit 59)", crates.len());
}
