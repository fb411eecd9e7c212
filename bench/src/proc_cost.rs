//! What reading one plugin's memory and CPU costs: plugd's targeted /proc reads against
//! sysinfo, measured in one run (`plugd-bench --proc-usage`).
//!
//! plugd reads a plugin's resident memory (its whole process tree) on every memory-watch
//! tick and on every `status`, `top` and `/metrics` row. The tree is found through
//! `/proc/<pid>/task/*/children`; sysinfo finds children only by refreshing every process
//! on the machine and following parent links. Both sums are printed beside the timings,
//! so the comparison is of the same answer.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Result;
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// Runs the comparison and prints one line per reader; returns (ours, sysinfo) in µs/read.
pub fn run(reads: usize) -> Result<(f64, f64)> {
    // A plugin-like tree: a parent with four children.
    let mut tree = Command::new("sh")
        .args(["-c", "for i in 1 2 3 4; do sleep 60 & done; wait"])
        .stdout(Stdio::null())
        .spawn()?;
    let root = tree.id();
    std::thread::sleep(std::time::Duration::from_millis(200));

    let t = Instant::now();
    let mut ours = (0, 0.0);
    for _ in 0..reads {
        ours = supervisor::spawn::proc_usage(root).unwrap_or_default();
    }
    let ours_us = t.elapsed().as_secs_f64() * 1e6 / reads as f64;

    let mut sys = System::new()?;
    let kind = ProcessRefreshKind::nothing().with_memory().with_cpu();
    let t = Instant::now();
    let mut theirs = 0;
    for _ in 0..reads {
        sys.refresh_processes_specifics(ProcessesToUpdate::All, true, kind);
        let procs = sys.processes();
        let mut todo = vec![Pid::from_u32(root)];
        theirs = 0;
        while let Some(p) = todo.pop() {
            if let Some(proc_) = procs.get(&p) {
                theirs += proc_.memory();
            }
            todo.extend(procs.values().filter(|c| c.parent() == Some(p)).map(|c| c.pid()));
        }
    }
    let theirs_us = t.elapsed().as_secs_f64() * 1e6 / reads as f64;
    let processes = sys.processes().len();
    let _ = tree.kill();
    let _ = Command::new("pkill").args(["-P", &root.to_string()]).status();
    let _ = tree.wait();
    println!("plugd /proc reader: {ours_us:.1} µs per read (tree RSS {} KiB)", ours.0 >> 10);
    println!(
        "sysinfo (refresh all {processes} processes, follow parents): {theirs_us:.1} µs per read (tree RSS {} KiB) = {:.1}x",
        theirs >> 10,
        theirs_us / ours_us
    );
    Ok((ours_us, theirs_us))
}
