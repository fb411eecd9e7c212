//! Methods the host offers its plugins: the other direction of calls (protocol version 2).
//!
//! A host registers a handler by name ([`crate::Supervisor::host_method`]); a plugin that
//! sends `Call { method }` gets its `Reply`. Handlers run on the thread that reads the
//! plugin's socket — the engine thread itself when it is waiting for that plugin's answer
//! to its own call (inline, no thread hop), the instance actor's task otherwise — so they
//! must be quick (place an order in a queue, read a price): a handler that blocks holds up
//! that plugin's socket for as long. A panicking handler answers `Panicked`; the host
//! keeps running.

use std::collections::HashMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;
use plugin_proto::{Call, CallError, ErrorCode, Payload};
use serde::{de::DeserializeOwned, Serialize};

/// What a host handler knows about the call it serves.
#[derive(Debug, Clone)]
pub struct HostCall<'a> {
    /// The plugin that called.
    pub plugin: &'a str,
    /// The method it called.
    pub method: &'a str,
    /// When the plugin stops waiting for the answer (None: it set no deadline).
    pub deadline: Option<Instant>,
}

/// A registered handler: the payload as sent in, the reply payload out.
pub type HostHandler = dyn Fn(&HostCall<'_>, &Payload) -> Result<Payload, CallError> + Send + Sync;

/// An async host method's request: what [`HostCall`] says, owned, and the argument.
#[derive(Debug, Clone)]
pub struct HostRequest {
    /// The plugin that called.
    pub plugin: String,
    /// The method it called.
    pub method: String,
    /// When the plugin stops waiting for the answer (None: it set no deadline).
    pub deadline: Option<Instant>,
    /// The argument as sent.
    pub payload: Payload,
}

/// What an async host method returns: its answer, later.
pub type HostFuture = Pin<Box<dyn Future<Output = Result<Payload, CallError>> + Send>>;

/// A registered async handler (it may await other plugins; it runs as its own task).
pub type AsyncHostHandler = dyn Fn(HostRequest) -> HostFuture + Send + Sync;

enum Entry {
    Now(Arc<HostHandler>),
    Later(Arc<AsyncHostHandler>),
}

/// How a host call is answered.
pub(crate) enum Served {
    /// Right away.
    Now(Result<Payload, CallError>),
    /// When this future is done (run it with [`run_guarded`]).
    Later(HostFuture),
}

/// The host's methods, shared by every plugin of one supervisor.
#[derive(Default)]
pub(crate) struct HostMethods {
    methods: RwLock<HashMap<String, Entry>>,
}

/// Runs an async handler to its answer on the task that awaits this; a panic in it answers
/// `Panicked` (each poll runs under `catch_unwind`, so no extra task is spawned for it).
pub(crate) async fn run_guarded(method: String, mut fut: HostFuture) -> Result<Payload, CallError> {
    std::future::poll_fn(move |cx| match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
        Ok(poll) => poll,
        Err(panic) => std::task::Poll::Ready(Err(CallError::panicked(
            &format!("host method {method}"),
            &*panic,
        ))),
    })
    .await
}

impl HostMethods {
    /// Registers (or replaces) `name`.
    pub fn add(&self, name: &str, handler: Arc<HostHandler>) {
        self.methods.write().insert(name.to_string(), Entry::Now(handler));
    }

    /// Registers (or replaces) an async `name`.
    pub fn add_async(&self, name: &str, handler: Arc<AsyncHostHandler>) {
        self.methods.write().insert(name.to_string(), Entry::Later(handler));
    }

    /// The registered names, sorted (for an `UnknownMethod` answer).
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.methods.read().keys().cloned().collect();
        names.sort();
        names
    }

    /// Serves one call from `plugin`: now, or with a future to run.
    pub fn serve(&self, plugin: &str, call: Call) -> Served {
        let entry = match self.methods.read().get(&call.method) {
            Some(Entry::Now(h)) => Some(Entry::Now(h.clone())),
            Some(Entry::Later(h)) => Some(Entry::Later(h.clone())),
            None => None,
        };
        let deadline = (call.deadline_us > 0)
            .then(|| Instant::now() + std::time::Duration::from_micros(call.deadline_us));
        match entry {
            Some(Entry::Later(h)) => Served::Later(h(HostRequest {
                plugin: plugin.to_string(),
                method: call.method,
                deadline,
                payload: call.payload,
            })),
            Some(Entry::Now(h)) => Served::Now(self.run(plugin, &call, deadline, h)),
            None => Served::Now(Err(CallError::new(
                ErrorCode::UnknownMethod,
                format!(
                    "the host has no method {:?} (plugin {plugin} called it); it offers {:?}",
                    call.method,
                    self.names()
                ),
            ))),
        }
    }

    fn run(
        &self,
        plugin: &str,
        call: &Call,
        deadline: Option<Instant>,
        handler: Arc<HostHandler>,
    ) -> Result<Payload, CallError> {
        let info = HostCall { plugin, method: &call.method, deadline };
        match catch_unwind(AssertUnwindSafe(|| handler(&info, &call.payload))) {
            Ok(answer) => answer,
            Err(panic) => {
                let err = CallError::panicked(&format!("host method {}", call.method), &*panic);
                tracing::error!(plugin, "{}", err.message);
                Err(err)
            }
        }
    }
}

/// Wraps a typed handler: its argument decoded from bincode or JSON (whichever the plugin
/// sent), its result encoded the same way.
pub(crate) fn typed<A, R, E, F>(name: &str, f: F) -> Arc<HostHandler>
where
    A: DeserializeOwned,
    R: Serialize,
    E: std::fmt::Display,
    F: Fn(&HostCall<'_>, A) -> Result<R, E> + Send + Sync + 'static,
{
    let name = name.to_string();
    Arc::new(move |call: &HostCall<'_>, payload: &Payload| {
        let arg: A = payload.decode().map_err(|e| {
            CallError::new(ErrorCode::BadPayload, format!("host method {name}: {e}"))
        })?;
        let out = f(call, arg).map_err(|e| CallError::new(ErrorCode::Failed, e.to_string()))?;
        payload
            .encode_like(&out)
            .map_err(|e| CallError::new(ErrorCode::Internal, format!("host method {name}: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: &str, payload: Payload) -> Call {
        Call { id: 1, method: method.into(), deadline_us: 0, payload }
    }

    fn now(host: &HostMethods, call: Call) -> Result<Payload, CallError> {
        match host.serve("strat", call) {
            Served::Now(answer) => answer,
            Served::Later(_) => panic!("a sync method answers now"),
        }
    }

    #[test]
    fn typed_methods_answer_unknown_ones_are_named_and_panics_are_caught() {
        let host = HostMethods::default();
        host.add(
            "double",
            typed("double", |c: &HostCall<'_>, x: i64| -> Result<i64, String> {
                assert_eq!(c.plugin, "strat");
                Ok(2 * x)
            }),
        );
        host.add(
            "boom",
            typed("boom", |_: &HostCall<'_>, _: ()| -> Result<(), String> { panic!("kaput") }),
        );
        let r = now(&host, call("double", Payload::json(&21).unwrap())).unwrap();
        assert_eq!(r.data, b"42", "answered in the caller's codec");
        let e = now(&host, call("triple", Payload::empty())).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownMethod);
        assert!(e.message.contains("\"triple\"") && e.message.contains("double"), "{e}");
        let e = now(&host, call("boom", Payload::empty())).unwrap_err();
        assert_eq!(e.code, ErrorCode::Panicked);
        assert!(e.message.contains("kaput"), "{e}");
        let e = now(&host, call("double", Payload::json(&"x").unwrap())).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadPayload);
    }
}
