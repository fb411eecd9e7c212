//! Jobs: installs, updates and uninstalls run in the background, one record each, kept on disk.
//!
//! A job is queued, then running (at most [`CONCURRENCY`] at a time), then
//! succeeded, failed or cancelled. Each change is written to
//! `<state>/jobs/<id>.json` (temp file and rename), so a restarted plugd still
//! lists them; a job that was queued or running when plugd died is marked
//! failed "interrupted by restart" at start, never left "running". A cancel
//! kills the running step's process group (see `install::Cancel`); the install
//! cleans up after itself, so a cancelled job leaves nothing half-installed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use serde::{Deserialize, Serialize};

use crate::install::Cancel;

/// How many jobs run at once.
pub const CONCURRENCY: usize = 2;

/// Lines of output kept per job.
const MAX_OUTPUT_LINES: usize = 2000;

/// How many ended jobs are kept (in memory and on disk); older ones are forgotten as new
/// jobs come, so a client that installs in a loop cannot grow plugd's state without bound.
pub const KEEP_ENDED: usize = 200;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for a free slot.
    Queued,
    /// Running now.
    Running,
    /// Done; `result` holds the answer.
    Succeeded,
    /// Done; `error` says why.
    Failed,
    /// Stopped by a cancel.
    Cancelled,
}

impl JobState {
    /// True once the job will not change any more.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Work {
    /// Install a plugin.
    Install(InstallParams),
    /// Hot-swap a plugin to its folder's contents or to an installed version.
    Update {
        /// The plugin.
        name: String,
        /// An installed version to switch to.
        #[serde(default)]
        version: Option<String>,
        /// Update even if it breaks another plugin's `requires`.
        #[serde(default)]
        force: bool,
    },
    /// Remove an installed plugin (or one of its versions).
    Uninstall {
        /// The plugin.
        name: String,
        /// Only this version.
        #[serde(default)]
        version: Option<String>,
        /// Also remove its state.
        #[serde(default)]
        purge: bool,
    },
}

impl Work {
    /// In words, for listings.
    pub fn describe(&self) -> String {
        match self {
            Work::Install(p) => format!("install {}", p.source),
            Work::Update { name, version, .. } => {
                format!(
                    "update {name}{}",
                    version.as_ref().map(|v| format!(" to {v}")).unwrap_or_default()
                )
            }
            Work::Uninstall { name, version, .. } => {
                format!(
                    "uninstall {name}{}",
                    version.as_ref().map(|v| format!(" {v}")).unwrap_or_default()
                )
            }
        }
    }
}

/// What an install job installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallParams {
    /// A folder, an archive, an http(s) archive URL or `git+URL#ref`.
    pub source: String,
    /// Replace an installed name@version.
    #[serde(default)]
    pub force: bool,
    /// Clear a persisted disable.
    #[serde(default)]
    pub enable: bool,
}

/// One job's record, as stored and shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// Its number.
    pub id: u64,
    /// What it does.
    pub work: Work,
    /// Where it is.
    pub state: JobState,
    /// What the steps printed (build, pip, git), last lines kept.
    pub output: Vec<String>,
    /// The answer, when it succeeded.
    pub result: Option<serde_json::Value>,
    /// Why not, when it failed.
    pub error: Option<String>,
    /// What kind of failure (`not_found`, `conflict`, `failed`, …): the same kinds, and so
    /// the same HTTP statuses, as the request had it run in the foreground.
    #[serde(default)]
    pub error_kind: Option<plugd_control::ErrorKind>,
    /// The job this one retries, if any.
    pub retry_of: Option<u64>,
    /// When it was created, ms since the epoch.
    pub created_ms: u64,
    /// When it ended, ms since the epoch.
    pub finished_ms: Option<u64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Entry {
    job: Job,
    cancel: Arc<Cancel>,
    done: Arc<tokio::sync::Notify>,
}

/// The jobs of one plugd.
pub struct Jobs {
    dir: PathBuf,
    entries: Mutex<BTreeMap<u64, Entry>>,
    slots: Arc<tokio::sync::Semaphore>,
}

fn lock<T>(m: &Mutex<T>) -> parking_lot::MutexGuard<'_, T> {
    m.lock()
}

/// Why a job could not be cancelled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CancelError {
    /// There is no job with this id.
    #[error("no job {0}")]
    NoJob(u64),
    /// The job has already ended.
    #[error("job {0} already ended ({state})", state = format!("{:?}", .1).to_lowercase())]
    Ended(u64, JobState),
}

impl Jobs {
    /// Loads the jobs kept in `dir`; those a previous plugd left unfinished are marked failed.
    pub fn load(dir: &Path) -> Jobs {
        let mut entries = BTreeMap::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
            let Ok(mut job) = serde_json::from_str::<Job>(&text) else { continue };
            if !job.state.is_final() {
                job.state = JobState::Failed;
                job.error = Some("interrupted by restart".into());
                job.error_kind = Some(plugd_control::ErrorKind::Failed);
                job.finished_ms = Some(now_ms());
                let _ = save(dir, &job);
            }
            let cancel = Arc::new(Cancel::default());
            entries.insert(job.id, Entry { job, cancel, done: Default::default() });
        }
        Jobs {
            dir: dir.to_path_buf(),
            entries: Mutex::new(entries),
            slots: Arc::new(tokio::sync::Semaphore::new(CONCURRENCY)),
        }
    }

    /// Records a new queued job; returns its id and what the runner needs.
    pub fn create(&self, work: Work, retry_of: Option<u64>) -> (u64, Arc<Cancel>) {
        let mut entries = lock(&self.entries);
        let id = entries.keys().next_back().copied().unwrap_or(0) + 1;
        let job = Job {
            id,
            work,
            state: JobState::Queued,
            output: Vec::new(),
            result: None,
            error: None,
            error_kind: None,
            retry_of,
            created_ms: now_ms(),
            finished_ms: None,
        };
        let _ = save(&self.dir, &job);
        let cancel = Arc::new(Cancel::default());
        entries.insert(id, Entry { job, cancel: cancel.clone(), done: Default::default() });
        (id, cancel)
    }

    /// Waits for a free slot (bounded concurrency), then marks the job running.
    /// None if it was cancelled while queued.
    pub async fn start(&self, id: u64) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        let mut entries = lock(&self.entries);
        let e = entries.get_mut(&id)?;
        if e.job.state != JobState::Queued {
            return None;
        }
        e.job.state = JobState::Running;
        let _ = save(&self.dir, &e.job);
        Some(permit)
    }

    /// Appends output lines to a job (the last [`MAX_OUTPUT_LINES`] are kept).
    pub fn output(&self, id: u64, lines: Vec<String>) {
        if let Some(e) = lock(&self.entries).get_mut(&id) {
            e.job.output.extend(lines);
            let over = e.job.output.len().saturating_sub(MAX_OUTPUT_LINES);
            e.job.output.drain(..over);
        }
    }

    /// Records how a job ended.
    pub fn finish(&self, id: u64, result: Result<serde_json::Value, plugd_control::ApiError>) {
        let mut entries = lock(&self.entries);
        let Some(e) = entries.get_mut(&id) else { return };
        let cancelled = e.cancel.is_cancelled();
        match result {
            Ok(v) => {
                e.job.state = JobState::Succeeded;
                e.job.result = Some(v);
            }
            Err(err) => {
                e.job.state = if cancelled { JobState::Cancelled } else { JobState::Failed };
                e.job.error = Some(err.message);
                e.job.error_kind = Some(err.kind);
            }
        }
        e.job.finished_ms = Some(now_ms());
        let _ = save(&self.dir, &e.job);
        e.done.notify_waiters();
    }

    /// Cancels a queued or running job. Err if there is no such job or it already ended.
    pub fn cancel(&self, id: u64) -> Result<Job, CancelError> {
        let mut entries = lock(&self.entries);
        let e = entries.get_mut(&id).ok_or(CancelError::NoJob(id))?;
        if e.job.state.is_final() {
            return Err(CancelError::Ended(id, e.job.state));
        }
        e.cancel.cancel();
        if e.job.state == JobState::Queued {
            e.job.state = JobState::Cancelled;
            e.job.error = Some("cancelled before it started".into());
            e.job.finished_ms = Some(now_ms());
            let _ = save(&self.dir, &e.job);
            e.done.notify_waiters();
        }
        Ok(e.job.clone())
    }

    /// Forgets the oldest ended jobs past [`KEEP_ENDED`] (their files too) and returns
    /// them, for the caller to remove what they kept (an uploaded archive).
    pub fn prune(&self) -> Vec<Job> {
        self.prune_to(KEEP_ENDED)
    }

    /// [`Jobs::prune`] keeping `keep` ended jobs (at least one: the newest id is never
    /// forgotten, so no id is handed out twice).
    pub fn prune_to(&self, keep: usize) -> Vec<Job> {
        let mut entries = lock(&self.entries);
        let ended: Vec<u64> =
            entries.values().filter(|e| e.job.state.is_final()).map(|e| e.job.id).collect();
        let over = ended.len().saturating_sub(keep.max(1));
        let mut gone = Vec::with_capacity(over);
        for id in &ended[..over] {
            if let Some(e) = entries.remove(id) {
                let _ = std::fs::remove_file(self.dir.join(format!("{id}.json")));
                gone.push(e.job);
            }
        }
        gone
    }

    /// Whether a kept job (in any state) installs from `source`.
    pub fn uses_source(&self, source: &str) -> bool {
        lock(&self.entries)
            .values()
            .any(|e| matches!(&e.job.work, Work::Install(p) if p.source == source))
    }

    /// One job.
    pub fn get(&self, id: u64) -> Option<Job> {
        lock(&self.entries).get(&id).map(|e| e.job.clone())
    }

    /// Every job, oldest first.
    pub fn list(&self) -> Vec<Job> {
        lock(&self.entries).values().map(|e| e.job.clone()).collect()
    }

    /// Waits until job `id` has ended and returns it.
    pub async fn wait(&self, id: u64) -> Option<Job> {
        loop {
            let done = {
                let entries = lock(&self.entries);
                let e = entries.get(&id)?;
                if e.job.state.is_final() {
                    return Some(e.job.clone());
                }
                e.done.clone()
            };
            let notified = done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.get(id).is_some_and(|j| j.state.is_final()) {
                continue;
            }
            notified.await;
        }
    }
}

fn save(dir: &Path, job: &Job) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.json.tmp", job.id));
    std::fs::write(&tmp, serde_json::to_vec_pretty(job).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, dir.join(format!("{}.json", job.id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Work {
        Work::Install(InstallParams { source: "/src".into(), force: false, enable: false })
    }

    #[tokio::test]
    async fn a_failed_job_keeps_the_kind_of_its_failure() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::load(dir.path());
        let (f, _) = jobs.create(params(), None);
        let permit = jobs.start(f).await.unwrap();
        jobs.finish(f, Err(plugd_control::ApiError::not_found("no plugin ghost")));
        drop(permit);
        let failed = jobs.wait(f).await.unwrap();
        assert_eq!(
            (failed.state, failed.error_kind),
            (JobState::Failed, Some(plugd_control::ErrorKind::NotFound))
        );
        // Kept across a restart of the daemon (jobs are files).
        let again = Jobs::load(dir.path()).get(f).unwrap();
        assert_eq!(again.error_kind, Some(plugd_control::ErrorKind::NotFound));
    }

    #[tokio::test]
    async fn jobs_move_through_their_states_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::load(dir.path());
        let (a, _) = jobs.create(params(), None);
        let (b, _) = jobs.create(params(), None);
        let (c, _) = jobs.create(params(), None);
        assert_eq!((a, b, c), (1, 2, 3));
        let permit = jobs.start(a).await.unwrap();
        jobs.output(a, vec!["building".into()]);
        jobs.finish(a, Ok(serde_json::json!("installed")));
        drop(permit);
        assert_eq!(jobs.wait(a).await.unwrap().state, JobState::Succeeded);
        let _running = jobs.start(b).await.unwrap();
        assert_eq!(jobs.cancel(c).unwrap().state, JobState::Cancelled, "queued: cancelled at once");
        assert!(
            matches!(jobs.cancel(a), Err(CancelError::Ended(id, JobState::Succeeded)) if id == a)
        );
        // b is left running, as if plugd died now.
        let again = Jobs::load(dir.path());
        let b = again.get(b).unwrap();
        assert_eq!(b.state, JobState::Failed);
        assert_eq!(b.error.as_deref(), Some("interrupted by restart"));
        assert_eq!(b.error_kind, Some(plugd_control::ErrorKind::Failed));
        assert_eq!(again.get(a).unwrap().output, vec!["building".to_string()]);
        assert_eq!(again.get(c).unwrap().state, JobState::Cancelled);
        let (d, _) = again.create(params(), Some(2));
        assert_eq!(d, 4, "ids continue after the kept ones");
    }

    #[tokio::test]
    async fn the_oldest_ended_jobs_are_forgotten_past_the_limit_and_running_ones_never() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::load(dir.path());
        let ids: Vec<u64> = (0..5).map(|_| jobs.create(params(), None).0).collect();
        // 1 stays running; 2..=5 end.
        let _running = jobs.start(ids[0]).await.unwrap();
        for &id in &ids[1..] {
            assert_eq!(jobs.cancel(id).unwrap().state, JobState::Cancelled);
        }
        let gone: Vec<u64> = jobs.prune_to(2).iter().map(|j| j.id).collect();
        assert_eq!(gone, [2, 3]);
        let kept: Vec<u64> = jobs.list().iter().map(|j| j.id).collect();
        assert_eq!(kept, [1, 4, 5]);
        assert!(!dir.path().join("2.json").exists() && dir.path().join("4.json").exists());
        assert_eq!(Jobs::load(dir.path()).list().len(), 3, "forgotten on disk too");
        // Even asked to keep none, the newest stays: its id is never handed out again.
        assert_eq!(jobs.prune_to(0).len(), 1);
        assert_eq!(jobs.create(params(), None).0, 6);
        assert!(jobs.uses_source("/src") && !jobs.uses_source("/other"));
    }
}
