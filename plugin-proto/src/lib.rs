//! plugin-proto: the wire protocol between the plugd supervisor and a plugin.
//!
//! This crate is the contract of the process boundary and nothing more: the
//! message set ([`message`]), the framing ([`frame`]: `u32` little-endian
//! length, then a bincode body), the one module that knows the serialization
//! library ([`codec`]), and version negotiation ([`version`]). It holds no I/O
//! policy and no async runtime types, so both the blocking plugin SDK and the
//! tokio-based supervisor build on it.
//!
//! `PROTOCOL.md` beside this crate documents every byte, with golden vectors
//! that `tests/golden.rs` checks; an SDK in another language is written from
//! that document alone.

#![warn(missing_docs)]

pub mod codec;
pub mod frame;
pub mod message;
pub mod shm;
pub mod version;

pub use codec::CodecError;
pub use frame::{FrameDecoder, FrameError, DEFAULT_MAX_FRAME, HEADER_LEN, MAX_FRAME_CEILING};
pub use message::{
    Call, CallError, CallRef, ErrorCode, Hello, LogLevel, LogRecord, Message, OwnStatus, Payload,
    PayloadCodec, PayloadRef, PluginCall, Reply, Side, Welcome, PLUGD_LOG, PLUGD_STATUS,
    PLUGIN_CALL,
};
pub use version::{
    negotiate, MAGIC, PROTO_CALL_CFG, PROTO_HOST_CALLS, PROTO_MAX, PROTO_MIN, PROTO_RING_HOST_CALLS,
};

/// The one rule for a plugin name, wherever a name comes from (a manifest, a control
/// request, an HTTP path): 1-64 lowercase letters, digits, `-` or `_` — so a name can
/// never climb out of the folders it names.
pub fn check_plugin_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-' || ch == '_');
    if ok {
        Ok(())
    } else {
        let shown: String = name.chars().take(80).collect();
        Err(format!(
            "{shown:?} is not a valid plugin name; use 1-64 lowercase letters, digits, '-' or '_'"
        ))
    }
}
