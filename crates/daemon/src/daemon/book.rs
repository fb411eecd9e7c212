//! The daemon's book of plugins, and the one task that writes it.
//!
//! Everything the daemon knows beside the supervisor (the config, the discovered plugins
//! in start order, which are disabled, why some failed to start) is a [`Book`]. One task
//! owns it. Reloads, starts and stops, enables and disables, updates, uninstalls and an
//! install's commit are jobs sent to that task: they run one after another, each to its
//! end with `&mut Book`, so two of them never interleave their writes, and a caller that
//! goes away (a closed connection, a dropped HTTP request) does not cancel a job halfway.
//!
//! Readers (status, calls, logs, the dashboard, an install's checks before its commit)
//! never wait for a job: they read the copy the task publishes after every job, and
//! whenever a long job says so with [`Published::set`] (a reload publishes the new plugin
//! list before it starts the new plugins).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};

use crate::config::DaemonConfig;
use crate::control::ApiError;
use crate::manifest::PluginSpec;

/// A plugin the daemon discovered: its spec, and the fingerprint a reload compares.
#[derive(Clone)]
pub(super) struct Known {
    /// What it runs.
    pub spec: PluginSpec,
    /// Manifest, binary and operator defaults, hashed: a change means restart or update.
    pub fingerprint: String,
}

/// What the daemon knows of its plugins; written only by the jobs of [`Ops`].
#[derive(Clone)]
pub(super) struct Book {
    /// The settings (re-read by a reload when they came from a file).
    pub config: DaemonConfig,
    /// Discovered valid plugins, in start order.
    pub known: Vec<(String, Known)>,
    /// Plugins the operator disabled (persisted in `<state>/disabled.json`).
    pub disabled: BTreeSet<String>,
    /// Why a plugin that should run failed to start.
    pub start_errors: BTreeMap<String, String>,
}

impl Book {
    /// The spec of `name`, if it is known.
    pub fn spec(&self, name: &str) -> Option<&PluginSpec> {
        self.known.iter().find(|(n, _)| n == name).map(|(_, k)| &k.spec)
    }

    /// The error for a plugin name nobody knows, listing the known ones.
    pub fn unknown(&self, name: &str) -> ApiError {
        let names: Vec<&str> = self.known.iter().map(|(n, _)| n.as_str()).collect();
        ApiError::not_found(format!("no plugin named {name}; known plugins: {}", names.join(", ")))
    }

    /// The spec of `name`, or the error that lists the known plugins.
    pub fn spec_or_unknown(&self, name: &str) -> Result<PluginSpec, ApiError> {
        self.spec(name).cloned().ok_or_else(|| self.unknown(name))
    }
}

/// A boxed future that may borrow the book.
pub(super) type BookFuture<'b, R> = Pin<Box<dyn Future<Output = R> + Send + 'b>>;

type Job = Box<dyn for<'b> FnOnce(&'b mut Book) -> BookFuture<'b, ()> + Send>;

/// The published copy of the book, for readers.
#[derive(Clone)]
pub(super) struct Published(Arc<ArcSwap<Book>>);

impl Published {
    /// The book as the last job left it (or as a running job last published it).
    pub fn get(&self) -> Arc<Book> {
        self.0.load_full()
    }

    /// Publishes `book` now, for a job that runs long and has changed it.
    pub fn set(&self, book: &Book) {
        self.0.store(Arc::new(book.clone()));
    }
}

/// The sender of jobs to the task that owns the book.
pub(super) struct Ops {
    tx: mpsc::UnboundedSender<Job>,
    /// The task's end, until the first job starts the task (inside the runtime).
    idle: parking_lot::Mutex<Option<(mpsc::UnboundedReceiver<Job>, Book)>>,
    /// What readers see.
    pub published: Published,
}

impl Ops {
    /// The operations of a daemon whose book starts as `book`.
    pub fn new(book: Book) -> Ops {
        let (tx, rx) = mpsc::unbounded_channel();
        let published = Published(Arc::new(ArcSwap::from_pointee(book.clone())));
        Ops { tx, idle: parking_lot::Mutex::new(Some((rx, book))), published }
    }

    /// Runs `f` with the book, after every job sent before it, and returns what it returns.
    /// The job runs to its end even if this future is dropped. `f` must not wait for
    /// another job (it would wait for itself): the helpers a job calls take `&mut Book`.
    pub async fn run<R, F>(&self, f: F) -> Result<R, ApiError>
    where
        R: Send + 'static,
        F: for<'b> FnOnce(&'b mut Book) -> BookFuture<'b, R> + Send + 'static,
    {
        self.start();
        let (done, answer) = oneshot::channel();
        let job = job(move |book| {
            Box::pin(async move {
                let _ = done.send(f(book).await);
            })
        });
        if self.tx.send(job).is_err() {
            return Err(ApiError::conflict("plugd is stopping; the operation was not run"));
        }
        answer.await.map_err(|_| ApiError::conflict("plugd is stopping; the operation did not end"))
    }

    /// Stops the task between two jobs until the returned guard is dropped: for the
    /// in-place upgrade, which freezes every plugin and must see no job start meanwhile.
    pub async fn pause(&self) -> Option<Paused> {
        self.start();
        let (resume, wait) = oneshot::channel::<()>();
        let (started, paused) = oneshot::channel::<()>();
        let job = job(move |_book| {
            Box::pin(async move {
                let _ = started.send(());
                let _ = wait.await;
            })
        });
        self.tx.send(job).ok()?;
        paused.await.ok()?;
        Some(Paused { _resume: resume })
    }

    fn start(&self) {
        let Some((mut rx, mut book)) = self.idle.lock().take() else { return };
        let published = self.published.clone();
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                // A job that panics (a bug) fails its own request, which sees the job
                // "did not end"; the task lives on for the next one.
                if Contained(job(&mut book)).await.is_err() {
                    tracing::error!("an operation panicked; its request failed, plugd goes on");
                }
                published.set(&book);
            }
        });
    }
}

/// Polls a job's future with panics caught, so one bad job does not end the task.
struct Contained<'b>(BookFuture<'b, ()>);

impl Future for Contained<'_> {
    type Output = Result<(), ()>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let fut = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(())) => std::task::Poll::Ready(Ok(())),
            Err(_) => std::task::Poll::Ready(Err(())),
        }
    }
}

/// The task that owns the book is paused while this lives.
pub(super) struct Paused {
    _resume: oneshot::Sender<()>,
}

/// Names the type of a job closure (a closure passed straight to a function with this
/// bound gets the higher-ranked signature the job type needs).
fn job<F>(f: F) -> Job
where
    F: for<'b> FnOnce(&'b mut Book) -> BookFuture<'b, ()> + Send + 'static,
{
    Box::new(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ops() -> Ops {
        let config = DaemonConfig::builtin();
        Ops::new(Book {
            config,
            known: Vec::new(),
            disabled: BTreeSet::new(),
            start_errors: BTreeMap::new(),
        })
    }

    /// Writes two numbered marks for `tag` into `start_errors`, with an await between: two
    /// interleaved jobs would leave their marks mixed.
    fn marks(tag: &'static str) -> impl for<'b> FnOnce(&'b mut Book) -> BookFuture<'b, ()> {
        move |b: &mut Book| {
            Box::pin(async move {
                let n = b.start_errors.len();
                b.start_errors.insert(format!("{n:03}"), format!("{tag} begins"));
                tokio::time::sleep(Duration::from_millis(20)).await;
                b.start_errors.insert(format!("{:03}", n + 1), format!("{tag} ends"));
            })
        }
    }

    #[tokio::test]
    async fn jobs_run_one_at_a_time_in_the_order_sent() {
        let ops = Arc::new(ops());
        let mut sent = Vec::new();
        for tag in ["a", "b", "c", "d"] {
            let ops = ops.clone();
            sent.push(tokio::spawn(async move { ops.run(marks(tag)).await }));
            tokio::task::yield_now().await;
        }
        for s in sent {
            s.await.unwrap().unwrap();
        }
        let log: Vec<String> = ops.published.get().start_errors.values().cloned().collect();
        assert_eq!(
            log,
            [
                "a begins", "a ends", "b begins", "b ends", "c begins", "c ends", "d begins",
                "d ends"
            ]
        );
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_does_not_cancel_its_job_halfway() {
        let ops = Arc::new(ops());
        let started = ops.run(marks("x"));
        // Dropped after its job began (the job's first mark is written at once).
        let _ = tokio::time::timeout(Duration::from_millis(5), started).await;
        let after = ops.run(|b| Box::pin(async move { b.start_errors.len() })).await.unwrap();
        assert_eq!(after, 2, "the dropped caller's job still wrote both marks");
    }

    #[tokio::test]
    async fn a_panicking_job_fails_its_caller_and_the_next_job_runs() {
        let ops = ops();
        let bad = ops
            .run(|b| {
                Box::pin(async move {
                    if b.known.is_empty() {
                        panic!("a bug in an operation");
                    }
                })
            })
            .await;
        assert!(bad.is_err());
        let next = ops.run(|b| Box::pin(async move { b.known.len() })).await;
        assert_eq!(next.unwrap(), 0);
    }

    #[tokio::test]
    async fn no_job_runs_while_paused_and_readers_never_wait() {
        let ops = Arc::new(ops());
        let paused = ops.pause().await.expect("paused");
        let queued = {
            let ops = ops.clone();
            tokio::spawn(async move {
                ops.run(|b| Box::pin(async move { b.disabled.insert("x".into()) })).await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!queued.is_finished(), "a job ran during the pause");
        // A reader gets the published book meanwhile.
        assert!(ops.published.get().disabled.is_empty());
        drop(paused);
        assert!(queued.await.unwrap().unwrap());
        assert!(ops.published.get().disabled.contains("x"));
    }
}
