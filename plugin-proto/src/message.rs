//! The messages exchanged between the supervisor and a plugin.
//!
//! One enum carries both directions; [`Message::sent_by`] says which side may
//! send each variant, so a receiver can treat a wrong-way message as a
//! protocol violation. The variant order is the wire tag (bincode writes the
//! variant index as a varint): never reorder, only append.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::codec::{self, CodecError};

/// Which side of the socket may send a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The plugin process.
    Plugin,
    /// The supervisor (host) process.
    Supervisor,
    /// Either side.
    Both,
}

/// A protocol message. See PROTOCOL.md for the byte layout of every variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Tag 0, plugin → supervisor: the first frame, announcing who the plugin is.
    Hello(Hello),
    /// Tag 1, supervisor → plugin: the handshake is accepted.
    Welcome(Welcome),
    /// Tag 2, supervisor → plugin: the handshake is refused; the plugin should exit. From
    /// protocol 2 a plugin sends it too, in place of `Ready`, when its `on_load` failed.
    Reject {
        /// Why, in words for the plugin author.
        reason: String,
    },
    /// Tag 3, plugin → supervisor: `on_load` returned; calls may be routed.
    Ready,
    /// Tag 4, supervisor → plugin: invoke a method.
    Call(Call),
    /// Tag 5, plugin → supervisor: the final answer to a call.
    Reply(Reply),
    /// Tag 6, plugin → supervisor: one streamed piece of a call's answer, before its Reply.
    Chunk {
        /// The call this piece belongs to.
        id: u64,
        /// The piece.
        payload: Payload,
    },
    /// Tag 7, supervisor → plugin: the caller no longer wants this call's answer.
    Cancel {
        /// The call to cancel.
        id: u64,
    },
    /// Tag 8, either way: a one-way message that expects no reply.
    Notify {
        /// Method (or event) name.
        method: String,
        /// Its argument.
        payload: Payload,
    },
    /// Tag 9, supervisor → plugin: liveness probe.
    Ping {
        /// Echoed back in the Pong.
        seq: u64,
    },
    /// Tag 10, plugin → supervisor: answer to a Ping.
    Pong {
        /// The Ping's sequence number.
        seq: u64,
    },
    /// Tag 11, supervisor → plugin: finish up and exit within `grace_ms`.
    Shutdown {
        /// Milliseconds before the supervisor escalates to SIGTERM.
        grace_ms: u64,
    },
    /// Tag 12, plugin → supervisor: state to hand to the next instance of this plugin.
    State {
        /// Opaque to the supervisor.
        #[serde(with = "serde_bytes")]
        blob: Vec<u8>,
    },
    /// Tag 13, plugin → supervisor: the plugin is about to exit cleanly.
    Goodbye,
    /// Tag 14, plugin → supervisor: a log line for the host's log.
    Log {
        /// Severity.
        level: LogLevel,
        /// The text.
        message: String,
    },
    /// Tag 15, supervisor → plugin, from protocol 3 ([`crate::PROTO_CALL_CFG`]): a `Call`
    /// that carries the caller's per-call configuration (an API key, say) beside its
    /// argument. Answered like a `Call`.
    CallCfg {
        /// The call, as a `Call` carries it.
        call: Call,
        /// The caller's configuration for this one call (JSON by convention).
        cfg: Payload,
    },
}

impl Message {
    /// Whether `side` may send this message on a connection speaking protocol `proto`.
    /// From version 2 ([`crate::PROTO_HOST_CALLS`]) calls go both ways: a plugin may send
    /// `Call` and `Cancel` for its own calls to the host, and the supervisor answers them
    /// with `Reply` (each direction numbers its calls on its own); a plugin whose `on_load`
    /// failed sends `Reject` with the reason instead of `Ready`.
    pub fn may_be_sent_by(&self, side: Side, proto: u16) -> bool {
        let both_ways = proto >= crate::PROTO_HOST_CALLS
            && matches!(
                self,
                Message::Call(_)
                    | Message::Reply(_)
                    | Message::Chunk { .. }
                    | Message::Cancel { .. }
            );
        if matches!(self, Message::CallCfg { .. }) {
            return proto >= crate::PROTO_CALL_CFG && side == Side::Supervisor;
        }
        // A plugin that cannot start says why with Reject (PROTOCOL.md 5.2).
        let load_failed = proto >= crate::PROTO_HOST_CALLS
            && side == Side::Plugin
            && matches!(self, Message::Reject { .. });
        both_ways || load_failed || matches!(self.sent_by(), Side::Both) || self.sent_by() == side
    }

    /// Which side may send this message in protocol version 1 (see
    /// [`Message::may_be_sent_by`] for later versions).
    pub fn sent_by(&self) -> Side {
        match self {
            Message::Hello(_)
            | Message::Ready
            | Message::Reply(_)
            | Message::Chunk { .. }
            | Message::Pong { .. }
            | Message::State { .. }
            | Message::Goodbye
            | Message::Log { .. } => Side::Plugin,
            Message::Welcome(_)
            | Message::Reject { .. }
            | Message::Call(_)
            | Message::CallCfg { .. }
            | Message::Cancel { .. }
            | Message::Ping { .. }
            | Message::Shutdown { .. } => Side::Supervisor,
            Message::Notify { .. } => Side::Both,
        }
    }

    /// A short name of the variant, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Reject { .. } => "Reject",
            Message::Ready => "Ready",
            Message::Call(_) => "Call",
            Message::Reply(_) => "Reply",
            Message::Chunk { .. } => "Chunk",
            Message::Cancel { .. } => "Cancel",
            Message::Notify { .. } => "Notify",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
            Message::Shutdown { .. } => "Shutdown",
            Message::State { .. } => "State",
            Message::Goodbye => "Goodbye",
            Message::Log { .. } => "Log",
            Message::CallCfg { .. } => "CallCfg",
        }
    }
}

/// The plugin's introduction, the first frame it sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal [`crate::MAGIC`]; anything else is not a plugd plugin.
    pub magic: u32,
    /// Lowest protocol version the plugin speaks.
    pub proto_min: u16,
    /// Highest protocol version the plugin speaks.
    pub proto_max: u16,
    /// The plugin's name as it knows itself.
    pub name: String,
    /// The plugin's version (semver text).
    pub version: String,
    /// Method names the plugin handles (informational; calls to others get `UnknownMethod`).
    pub methods: Vec<String>,
    /// Name and version of the SDK that built this plugin, e.g. `plugin-runner/0.1.0`.
    pub sdk: String,
}

/// The supervisor's acceptance of a Hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version both sides will speak.
    pub proto: u16,
    /// The `[config]` table of the manifest, as JSON text.
    pub config_json: String,
    /// How often the supervisor will Ping, in milliseconds (0 = never).
    pub heartbeat_ms: u64,
    /// Largest frame body either side may send, in bytes.
    pub max_frame: u32,
    /// State left by the previous instance of this plugin, if any — protocol 1 only; from
    /// version 2 it is always None and the state comes as `Notify "plugd.state"` after Ready.
    #[serde(with = "serde_bytes")]
    pub state: Option<Vec<u8>>,
}

/// A method invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    /// Chosen by the supervisor, unique among calls in flight on this socket.
    pub id: u64,
    /// The method name.
    pub method: String,
    /// Time budget left when the call was sent, in microseconds (0 = no deadline).
    pub deadline_us: u64,
    /// The argument.
    pub payload: Payload,
}

/// A [`Call`] borrowed from a frame body or about to be written into one: the method
/// name and the argument's bytes are not copied. The same bytes on the wire as `Call`
/// (see [`crate::frame::encode_call_frame`] and [`CallRef::read`]); the hot path of both
/// sides uses it to spare the allocations an owned `Call` costs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CallRef<'a> {
    /// As [`Call::id`].
    pub id: u64,
    /// As [`Call::method`].
    pub method: &'a str,
    /// As [`Call::deadline_us`].
    pub deadline_us: u64,
    /// As [`Call::payload`].
    #[serde(borrow)]
    pub payload: PayloadRef<'a>,
}

impl<'a> CallRef<'a> {
    /// Reads `body` in place if it is a [`Message::Call`]; `Ok(None)` for any other
    /// message (decode that one with [`crate::frame::decode_body`]). A body that is a
    /// Call but malformed is an error, as it would be decoded whole.
    pub fn read(body: &'a [u8]) -> Result<Option<CallRef<'a>>, CodecError> {
        match body.split_first() {
            Some((&codec::hot::CALL, rest)) => match codec::hot::read_call(rest) {
                Some(c) => Ok(Some(c)),
                // Something unusual: the general way, which says what is wrong.
                None => codec::decode_borrowed(rest).map(Some),
            },
            _ => Ok(None),
        }
    }

    /// The owned [`Call`].
    pub fn to_call(&self) -> Call {
        Call {
            id: self.id,
            method: self.method.to_string(),
            deadline_us: self.deadline_us,
            payload: self.payload.to_payload(),
        }
    }
}

/// A [`Payload`] borrowed: its codec and its bytes in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadRef<'a> {
    /// How `data` is encoded.
    pub codec: PayloadCodec,
    /// The encoded value.
    #[serde(borrow, with = "serde_bytes")]
    pub data: &'a [u8],
}

impl PayloadRef<'_> {
    /// The owned [`Payload`].
    pub fn to_payload(&self) -> Payload {
        Payload { codec: self.codec, data: self.data.to_vec() }
    }

    /// Copies the bytes into `into` (its buffer is reused: no allocation once it is big
    /// enough).
    pub fn copy_into(&self, into: &mut Payload) {
        into.codec = self.codec;
        into.data.clear();
        into.data.extend_from_slice(self.data);
    }
}

/// The final answer to a call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The call's id.
    pub id: u64,
    /// The answer or the reason there is none.
    pub result: Result<Payload, CallError>,
}

/// How a payload's bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadCodec {
    /// Tag 0: bincode `standard()`, the fast path between Rust peers.
    Bincode,
    /// Tag 1: UTF-8 JSON, for tooling and other languages.
    Json,
}

/// Bytes that carry their own codec, so a handler can decode either.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// How `data` is encoded.
    pub codec: PayloadCodec,
    /// The encoded value.
    #[serde(with = "blob")]
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.codec {
            PayloadCodec::Json => write!(f, "Json({})", String::from_utf8_lossy(&self.data)),
            PayloadCodec::Bincode => write!(f, "Bincode({} bytes)", self.data.len()),
        }
    }
}

impl Payload {
    /// Encodes `value` with bincode.
    pub fn bincode<T: Serialize + ?Sized>(value: &T) -> Result<Self, CodecError> {
        Ok(Self { codec: PayloadCodec::Bincode, data: codec::encode(value)? })
    }

    /// Encodes `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, CodecError> {
        Ok(Self { codec: PayloadCodec::Json, data: codec::json_encode(value)? })
    }

    /// Wraps bytes that are already encoded with `codec`.
    pub fn raw(codec: PayloadCodec, data: Vec<u8>) -> Self {
        Self { codec, data }
    }

    /// The empty bincode payload (the encoding of `()` is zero bytes).
    pub fn empty() -> Self {
        Self { codec: PayloadCodec::Bincode, data: Vec::new() }
    }

    /// This payload borrowed (to write it into a [`CallRef`]).
    pub fn as_ref(&self) -> PayloadRef<'_> {
        PayloadRef { codec: self.codec, data: &self.data }
    }

    /// Decodes the payload with whichever codec it carries.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        match self.codec {
            PayloadCodec::Bincode => codec::decode(&self.data),
            PayloadCodec::Json => codec::json_decode(&self.data),
        }
    }

    /// Encodes `value` with the same codec as this payload (reply in the caller's codec).
    pub fn encode_like<T: Serialize + ?Sized>(&self, value: &T) -> Result<Self, CodecError> {
        match self.codec {
            PayloadCodec::Bincode => Self::bincode(value),
            PayloadCodec::Json => Self::json(value),
        }
    }
}

/// Why a call has no answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallError {
    /// The class of failure, for programs.
    pub code: ErrorCode,
    /// Details, for people.
    pub message: String,
}

impl CallError {
    /// Builds an error of class `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// A `Panicked` error for `what` (e.g. "method on_tick"), with the panic's text.
    pub fn panicked(what: &str, panic: &(dyn std::any::Any + Send)) -> Self {
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-text panic".into());
        Self::new(ErrorCode::Panicked, format!("{what} panicked: {text}"))
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for CallError {}

/// The class of a call failure. The variant order is the wire tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Tag 0: the plugin is not Ready (starting, restarting, stopped, failed).
    Unavailable,
    /// Tag 1: the plugin has no handler for this method.
    UnknownMethod,
    /// Tag 2: the payload could not be decoded as the handler's argument type.
    BadPayload,
    /// Tag 3: the deadline passed before the reply arrived.
    DeadlineExceeded,
    /// Tag 4: the call was cancelled.
    Cancelled,
    /// Tag 5: the handler panicked.
    Panicked,
    /// Tag 6: the handler returned an error of its own.
    Failed,
    /// Tag 7: the plugin process exited or was killed while the call was in flight.
    PluginExited,
    /// Tag 8: anything else that went wrong inside plugd.
    Internal,
    /// Tag 9: the caller may not make this call (a plugin calling another plugin that its
    /// manifest's `[calls] allow` does not list).
    Denied,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::UnknownMethod => "unknown method",
            ErrorCode::BadPayload => "bad payload",
            ErrorCode::DeadlineExceeded => "deadline exceeded",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Panicked => "handler panicked",
            ErrorCode::Failed => "failed",
            ErrorCode::PluginExited => "plugin exited",
            ErrorCode::Internal => "internal error",
            ErrorCode::Denied => "denied",
        };
        f.write_str(s)
    }
}

/// Severity of a Log message. The variant order is the wire tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
/// In JSON the lowercase names are accepted too (`"info"`).
pub enum LogLevel {
    /// Tag 0.
    #[serde(alias = "error")]
    Error,
    /// Tag 1.
    #[serde(alias = "warn", alias = "warning")]
    Warn,
    /// Tag 2.
    #[serde(alias = "info")]
    Info,
    /// Tag 3.
    #[serde(alias = "debug")]
    Debug,
    /// Tag 4.
    #[serde(alias = "trace")]
    Trace,
}

/// Payload bytes, written exactly as `serde_bytes` writes them (one length, then the
/// bytes) but read with a single copy out of the frame: `serde_bytes` asks the decoder for
/// an owned buffer, which bincode zero-fills and then copies into.
mod blob {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_bytes(Bytes)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<Vec<u8>, E> {
            Ok(v.as_bytes().to_vec())
        }

        // Self-describing formats (JSON) write bytes as a list of numbers.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// The host method through which a plugin calls another plugin (protocol version 2).
pub const PLUGIN_CALL: &str = "plugd.call";

/// The argument of [`PLUGIN_CALL`]: which plugin, which method, with what. The answer is
/// that method's answer, as its plugin sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginCall {
    /// The plugin to call.
    pub plugin: String,
    /// Its method.
    pub method: String,
    /// The argument, encoded for that method.
    pub payload: Payload,
}

/// The host method through which a plugin reads its own status (protocol version 2): no
/// argument, answers [`OwnStatus`].
pub const PLUGD_STATUS: &str = "plugd.status";

/// What [`PLUGD_STATUS`] answers: the calling plugin's status as plugd sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnStatus {
    /// The plugin's name in its manifest.
    pub name: String,
    /// The version running.
    pub version: String,
    /// Lifecycle state ("ready", "draining", …).
    pub state: String,
    /// Process id of the instance that asks.
    pub pid: Option<u32>,
    /// Restarts since the plugin was loaded.
    pub restarts: u32,
    /// Why the last instance ended, in words.
    pub last_exit: Option<String>,
    /// Time since this instance became ready, in milliseconds.
    pub uptime_ms: Option<u64>,
    /// Calls answered with a result.
    pub calls_ok: u64,
    /// Calls that failed.
    pub calls_err: u64,
    /// Sandbox layers in force.
    pub sandbox: Vec<String>,
    /// Layers asked for that this machine cannot provide, with the reason.
    pub sandbox_unavailable: Vec<String>,
}

/// The host method (and one-way Notify) through which a plugin logs a line with fields
/// (protocol version 2); the argument is a [`LogRecord`].
pub const PLUGD_LOG: &str = "plugd.log";

/// A log line with structured fields, the argument of [`PLUGD_LOG`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Severity.
    pub level: LogLevel,
    /// The text.
    pub message: String,
    /// Named values (`order_id = "42"`): keys of 1-64 letters, digits, `_`, `.` or `-`.
    #[serde(default)]
    pub fields: std::collections::BTreeMap<String, String>,
}
