//! What a plugin process costs, read from /proc: its resident memory (with every
//! descendant) and its CPU time.
//!
//! Hand-written rather than through sysinfo (the design card's crate) or procfs, on
//! measurement: the memory watch reads every plugin's tree on each tick, and status, `top`
//! and `/metrics` read it per row. Here the tree is found through
//! `/proc/<pid>/task/*/children`, touching only the plugin's own processes; sysinfo finds
//! children only by refreshing every process on the machine, which measured 31-40x slower
//! for a five-process tree on a machine running ~90 processes, and grows with the machine
//! (`plugd-bench --proc-usage`, bench/RESULTS.md). procfs would add five crates to the
//! host library's budget for the same three files.

/// Direct children of `pid` (every thread's), from /proc.
pub(crate) fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<i32>>()
        })
        .collect()
}

/// Every process below `root` (not `root` itself), following /proc's children lists.
pub(crate) fn descendants(root: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for c in children_of(p) {
            // A bound on pathological trees; a plugin's processes are capped far below.
            if out.len() < 65536 {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// Resident memory (bytes, with every descendant) and CPU time used (seconds, user +
/// system) of a plugin process, from /proc; for status displays and metrics.
pub fn proc_usage(pid: u32) -> Option<(u64, f64)> {
    let rss =
        rss_of(pid as i32)? + descendants(pid as i32).into_iter().filter_map(rss_of).sum::<u64>();
    Some((rss, zombie_cpu_secs(pid as i32)?))
}

/// Resident memory of a process in bytes, from /proc/<pid>/statm.
pub(crate) fn rss_of(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf with a constant name has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some(pages * page)
}

/// utime + stime (+ reaped children's) of a process (running, or exited and not yet reaped), from /proc/<pid>/stat.
pub(crate) fn zombie_cpu_secs(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command name: state is field 3, utime field 14, stime field 15 (1-based).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // cutime and cstime: children it reaped (in a jail, the init reaps the plugin).
    let cutime: f64 = fields.get(13)?.parse().ok()?;
    let cstime: f64 = fields.get(14)?.parse().ok()?;
    // SAFETY: sysconf with a constant name has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime + cutime + cstime) / hz)
}
