//! plugin-runner: the SDK a plugin links to talk to the plugd supervisor.
//!
//! A plugin is a small binary. It implements [`Plugin`] — `on_load` with the
//! manifest's `[config]`, typed handlers registered by method name,
//! `on_shutdown` that may hand state to the next instance — and calls
//! [`serve`] from `main`. The run loop is blocking and single-threaded: no
//! async runtime is forced on plugin authors. Calls are served in the order
//! they arrive; a panic inside a handler becomes an error reply for that call
//! and the plugin keeps serving.
//!
//! ```no_run
//! use plugin_runner::{Methods, Plugin};
//!
//! #[derive(Default)]
//! struct Counter { n: u64 }
//!
//! impl Plugin for Counter {
//!     fn methods(m: &mut Methods<Self>) {
//!         m.typed("add", |me: &mut Counter, by: u64| -> Result<u64, String> {
//!             me.n += by;
//!             Ok(me.n)
//!         });
//!     }
//! }
//!
//! fn main() { plugin_runner::serve(Counter::default()) }
//! ```
//!
//! Everything here speaks the protocol documented in `plugin-proto/PROTOCOL.md`.

#![warn(missing_docs)]

mod ctx;
mod lockdown;
mod logging;
mod methods;
mod run;

pub use ctx::Ctx;
pub use logging::LogForwarder;
pub use methods::Methods;
pub use plugin_proto::{CallError, ErrorCode, LogLevel, OwnStatus, Payload, PayloadCodec};
pub use run::{serve, serve_with, LoadContext, ServeError, ServeOptions};

/// What a plugin implements.
pub trait Plugin: Sized + 'static {
    /// Registers the methods this plugin answers.
    fn methods(methods: &mut Methods<Self>);

    /// Runs once after the handshake, before the plugin is marked Ready.
    /// An error here stops the plugin; the supervisor reports the message.
    fn on_load(&mut self, _ctx: &LoadContext) -> Result<(), String> {
        Ok(())
    }

    /// Runs on a graceful shutdown. A returned blob is handed to the next
    /// instance of this plugin: in [`LoadContext::state`] after a restart, or in
    /// [`Plugin::restore_state`] after a hot update (the new instance is already
    /// loaded then; it receives the blob before its first call).
    fn on_shutdown(&mut self) -> Option<Vec<u8>> {
        None
    }

    /// Receives the state the previous instance returned from `on_shutdown` (after a
    /// restart or a hot update), after `on_load` and before this instance serves any call.
    fn restore_state(&mut self, _blob: &[u8]) {}

    /// A one-way message from the host for which no handler of that name is registered
    /// (a Notify naming a registered method runs that handler, its result dropped).
    fn on_notify(&mut self, _method: &str, _payload: &Payload) {}
}
