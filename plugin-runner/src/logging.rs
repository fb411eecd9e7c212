//! Routes the plugin's `tracing` events to the supervisor as `Log` frames.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use plugin_proto::{LogLevel, Message};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

use crate::run::Wire;

/// A `tracing_subscriber` layer that sends every event to the supervisor.
/// [`crate::serve`] installs it as the global default when none is set.
pub struct LogForwarder {
    wire: Arc<Mutex<Wire>>,
}

impl LogForwarder {
    pub(crate) fn new(wire: Arc<Mutex<Wire>>) -> Self {
        Self { wire }
    }
}

struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}{}", if self.0.is_empty() { "" } else { " " });
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogForwarder {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => LogLevel::Error,
            tracing::Level::WARN => LogLevel::Warn,
            tracing::Level::INFO => LogLevel::Info,
            tracing::Level::DEBUG => LogLevel::Debug,
            tracing::Level::TRACE => LogLevel::Trace,
        };
        let mut text = Text(String::new());
        event.record(&mut text);
        let message = text.0.trim().to_string();
        // A poisoned lock means a handler panicked mid-write; logging must not panic again.
        if let Ok(mut wire) = self.wire.lock() {
            let _ = wire.send(&Message::Log { level, message });
        }
    }
}
