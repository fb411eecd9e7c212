"""The plugd plugin protocol on the wire: frames and bincode 2 ``standard()`` bodies.

This is a transcription of ``plugin-proto/PROTOCOL.md``; the golden vectors in
``plugin-proto/golden/vectors.txt`` are checked against it by
``tests/test_wire.py``. Standard library only.
"""

from __future__ import annotations

import dataclasses
import enum
import socket
import struct
from dataclasses import dataclass
from typing import Any, Protocol, Union

MAGIC = 0x4447_4C50  # "PLGD" little-endian
PROTO_MIN = 1
PROTO_MAX = 3  # 2: the plugin may call the host (section 5.8); 3: CallCfg (section 5.9)
PROTO_HOST_CALLS = 2
PROTO_CALL_CFG = 3

#: The host method through which a plugin calls another plugin.
PLUGIN_CALL = "plugd.call"
#: The host method a plugin reads its own status with (JSON answer).
PLUGD_STATUS = "plugd.status"
#: The one-way Notify (or host method) a plugin logs a line with fields with.
PLUGD_LOG = "plugd.log"
DEFAULT_MAX_FRAME = 16 * 1024 * 1024

CODEC_BINCODE = 0
CODEC_JSON = 1


class ErrorCode(enum.IntEnum):
    """Why a call failed (PROTOCOL.md section 3); the value is the wire tag."""

    UNAVAILABLE = 0
    UNKNOWN_METHOD = 1
    BAD_PAYLOAD = 2
    DEADLINE_EXCEEDED = 3
    CANCELLED = 4
    PANICKED = 5
    FAILED = 6
    PLUGIN_EXITED = 7
    INTERNAL = 8
    DENIED = 9


class LogLevel(enum.IntEnum):
    """Severity of a Log frame; the value is the wire tag."""

    ERROR = 0
    WARN = 1
    INFO = 2
    DEBUG = 3
    TRACE = 4


# The tags under their historical names, for plugins written against earlier SDKs.
UNAVAILABLE, UNKNOWN_METHOD, BAD_PAYLOAD, DEADLINE_EXCEEDED, CANCELLED, PANICKED, FAILED, \
    PLUGIN_EXITED, INTERNAL, DENIED = tuple(ErrorCode)
LOG_ERROR, LOG_WARN, LOG_INFO, LOG_DEBUG, LOG_TRACE = tuple(LogLevel)


class ProtocolError(Exception):
    """Bytes that are not a valid plugd frame or message."""


@dataclass(frozen=True)
class Payload:
    """An argument or result: the codec tag and the encoded bytes."""

    codec: int
    data: bytes


@dataclass(frozen=True)
class CallError:
    """A failed call: its code and a message for people."""

    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Hello:
    """Plugin → supervisor: who it is and what it serves."""

    magic: int
    proto_min: int
    proto_max: int
    name: str
    version: str
    methods: list[str]
    sdk: str


@dataclass(frozen=True)
class Welcome:
    """Supervisor → plugin: the handshake's answer."""

    proto: int
    config_json: str
    heartbeat_ms: int
    max_frame: int
    state: bytes | None


@dataclass(frozen=True)
class Reject:
    """Supervisor → plugin: the handshake is refused."""

    reason: str


@dataclass(frozen=True)
class Ready:
    """Plugin → supervisor: loaded, serving calls."""


@dataclass(frozen=True)
class Call:
    """Supervisor → plugin: run a method."""

    id: int
    method: str
    deadline_us: int
    payload: Payload


@dataclass(frozen=True)
class Reply:
    """Plugin → supervisor: a call's result (a Payload) or error (a CallError)."""

    id: int
    result: Payload | CallError


@dataclass(frozen=True)
class Chunk:
    """Plugin → supervisor: one piece of a streamed result."""

    id: int
    payload: Payload


@dataclass(frozen=True)
class Cancel:
    """Supervisor → plugin: the caller no longer waits for this call."""

    id: int


@dataclass(frozen=True)
class Notify:
    """Either way: a one-way message."""

    method: str
    payload: Payload


@dataclass(frozen=True)
class Ping:
    """Supervisor → plugin: a heartbeat."""

    seq: int


@dataclass(frozen=True)
class Pong:
    """Plugin → supervisor: the heartbeat's answer."""

    seq: int


@dataclass(frozen=True)
class Shutdown:
    """Supervisor → plugin: finish and say goodbye within ``grace_ms``."""

    grace_ms: int


@dataclass(frozen=True)
class State:
    """Plugin → supervisor: the blob to hand to the next instance."""

    blob: bytes


@dataclass(frozen=True)
class Goodbye:
    """Plugin → supervisor: done; the process exits next."""


@dataclass(frozen=True)
class Log:
    """Plugin → supervisor: a log line."""

    level: LogLevel
    message: str


@dataclass(frozen=True)
class CallCfg(Call):
    """Supervisor → plugin (protocol 3): a Call with the caller's per-call configuration
    (JSON by convention; an API key, say). Served like a Call, which it is."""

    cfg: Payload


Message = Union[Hello, Welcome, Reject, Ready, Call, Reply, Chunk, Cancel, Notify, Ping, Pong,
                Shutdown, State, Goodbye, Log, CallCfg]

# The wire tag of a message is its index here: append only, never reorder.
MESSAGES: list[type[Any]] = [Hello, Welcome, Reject, Ready, Call, Reply, Chunk, Cancel, Notify,
                             Ping, Pong, Shutdown, State, Goodbye, Log, CallCfg]

# Field types, in order, of every message.
FIELDS: dict[type[Any], tuple[str, ...]] = {
    Hello: ("u32", "u16", "u16", "str", "str", "strs", "str"),
    Welcome: ("u16", "str", "u64", "u32", "optbytes"),
    Reject: ("str",),
    Ready: (),
    Call: ("u64", "str", "u64", "payload"),
    Reply: ("u64", "result"),
    Chunk: ("u64", "payload"),
    Cancel: ("u64",),
    Notify: ("str", "payload"),
    Ping: ("u64",),
    Pong: ("u64",),
    Shutdown: ("u64",),
    State: ("bytes",),
    Goodbye: (),
    Log: ("u8tag", "str"),
    CallCfg: ("u64", "str", "u64", "payload", "payload"),
}

_WIDTH: dict[str, int] = {"u16": 16, "u32": 32, "u64": 64}


# ---- primitive encoding -------------------------------------------------------------------

def put_varint(out: bytearray, value: int, bits: int = 64) -> None:
    """Appends an unsigned integer as a bincode varint (checked against its width)."""
    if value < 0 or value >= 1 << bits:
        raise ProtocolError("integer %d does not fit in u%d" % (value, bits))
    if value < 251:
        out.append(value)
    elif value < 1 << 16:
        out.append(251)
        out += struct.pack("<H", value)
    elif value < 1 << 32:
        out.append(252)
        out += struct.pack("<I", value)
    else:
        out.append(253)
        out += struct.pack("<Q", value)


def put_bytes(out: bytearray, data: bytes) -> None:
    """Appends a length-prefixed byte string."""
    put_varint(out, len(data))
    out += data


def put_str(out: bytearray, text: str) -> None:
    """Appends a length-prefixed UTF-8 string."""
    put_bytes(out, text.encode("utf-8"))


class Reader:
    """Reads bincode values from a bytes object, failing on anything short or malformed."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError("message ends early: wanted %d more bytes at offset %d"
                                % (n, self.pos))
        chunk = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self, bits: int = 64) -> int:
        first = self.u8()
        if first < 251:
            return first
        size = {251: 2, 252: 4, 253: 8}.get(first)
        if size is None:
            raise ProtocolError("invalid varint marker %d at offset %d" % (first, self.pos - 1))
        if size * 8 > bits:
            raise ProtocolError("varint of %d bytes does not fit in u%d" % (size, bits))
        return int.from_bytes(self.take(size), "little")

    def bytes_(self) -> bytes:
        n = self.varint()
        return self.take(n)

    def str_(self) -> str:
        raw = self.bytes_()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError("string is not UTF-8: %s" % e) from None

    def done(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("%d bytes left over after the message" % (len(self.data) - self.pos))


# ---- fields ---------------------------------------------------------------------------------

def _put_payload(out: bytearray, p: Payload) -> None:
    if p.codec not in (CODEC_BINCODE, CODEC_JSON):
        raise ProtocolError("unknown payload codec %r" % (p.codec,))
    out.append(p.codec)
    put_bytes(out, p.data)


def _read_payload(r: Reader) -> Payload:
    codec = r.varint(32)
    if codec not in (CODEC_BINCODE, CODEC_JSON):
        raise ProtocolError("unknown payload codec %d" % codec)
    return Payload(codec, r.bytes_())


def _put_field(out: bytearray, kind: str, value: Any) -> None:
    if kind in _WIDTH:
        put_varint(out, value, _WIDTH[kind])
    elif kind == "str":
        put_str(out, value)
    elif kind == "bytes":
        put_bytes(out, value)
    elif kind == "strs":
        put_varint(out, len(value))
        for s in value:
            put_str(out, s)
    elif kind == "optbytes":
        if value is None:
            out.append(0)
        else:
            out.append(1)
            put_bytes(out, value)
    elif kind == "payload":
        _put_payload(out, value)
    elif kind == "result":
        if isinstance(value, CallError):
            out.append(1)
            put_varint(out, value.code, 32)
            put_str(out, value.message)
        else:
            out.append(0)
            _put_payload(out, value)
    elif kind == "u8tag":
        put_varint(out, value, 32)
    else:  # pragma: no cover - a typo in FIELDS
        raise AssertionError(kind)


def _read_field(r: Reader, kind: str) -> Any:
    if kind in _WIDTH:
        return r.varint(_WIDTH[kind])
    if kind == "str":
        return r.str_()
    if kind == "bytes":
        return r.bytes_()
    if kind == "strs":
        return [r.str_() for _ in range(r.varint())]
    if kind == "optbytes":
        flag = r.u8()
        if flag == 0:
            return None
        if flag == 1:
            return r.bytes_()
        raise ProtocolError("invalid Option tag %d" % flag)
    if kind == "payload":
        return _read_payload(r)
    if kind == "result":
        tag = r.varint(32)
        if tag == 0:
            return _read_payload(r)
        if tag == 1:
            code = r.varint(32)
            if code > max(ErrorCode):
                raise ProtocolError("unknown error code %d" % code)
            return CallError(ErrorCode(code), r.str_())
        raise ProtocolError("invalid Result tag %d" % tag)
    if kind == "u8tag":
        level = r.varint(32)
        if level > LOG_TRACE:
            raise ProtocolError("unknown log level %d" % level)
        return LogLevel(level)
    raise AssertionError(kind)  # pragma: no cover


# ---- messages and frames --------------------------------------------------------------------

def encode(msg: Message) -> bytes:
    """The body bytes of one message (no length header)."""
    cls = type(msg)
    try:
        tag = MESSAGES.index(cls)
    except ValueError:
        raise ProtocolError("%r is not a protocol message" % (msg,)) from None
    out = bytearray()
    put_varint(out, tag, 32)
    values = [getattr(msg, f.name) for f in dataclasses.fields(msg)]
    for kind, value in zip(FIELDS[cls], values):
        _put_field(out, kind, value)
    return bytes(out)


def plugin_call(plugin: str, method: str, payload: Payload) -> bytes:
    """The bincode argument of ``plugd.call``: ``PluginCall { plugin, method, payload }``."""
    out = bytearray()
    _put_field(out, "str", plugin)
    _put_field(out, "str", method)
    _put_field(out, "payload", payload)
    return bytes(out)


def decode(body: bytes) -> Message:
    """The message in one frame body; raises ProtocolError on anything malformed."""
    r = Reader(body)
    tag = r.varint(32)
    if tag >= len(MESSAGES):
        raise ProtocolError("unknown message tag %d" % tag)
    cls = MESSAGES[tag]
    msg: Message = cls(*[_read_field(r, kind) for kind in FIELDS[cls]])
    r.done()
    return msg


def frame(msg: Message, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """One whole frame: u32 little-endian body length, then the body."""
    body = encode(msg)
    if len(body) > max_frame:
        raise ProtocolError("frame of %d bytes exceeds the limit of %d" % (len(body), max_frame))
    return struct.pack("<I", len(body)) + body


RECORD_MAX = 64 * 1024
"""On a seqpacket socket (``transport = "seqpacket"``) no record may be longer than this,
and every read must offer at least this much room (PROTOCOL.md, section 1)."""


class SocketReader:
    """Reads a plugd socket as a byte stream, offering RECORD_MAX bytes of room on every
    recv: the same code then serves a stream socket and a seqpacket one, whose records
    would lose their tails if read into less."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.scratch = bytearray(RECORD_MAX)
        self.view = memoryview(self.scratch)
        self.start = 0
        self.end = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at the end of the stream."""
        if self.start == self.end:
            got = self.sock.recv_into(self.view, RECORD_MAX)
            if got == 0:
                return b""
            self.start, self.end = 0, got
        take = min(n, self.end - self.start)
        chunk = bytes(self.view[self.start:self.start + take])
        self.start += take
        return chunk

    def close(self) -> None:
        self.view.release()


def send_all(sock: socket.socket, data: bytes) -> None:
    """Writes ``data`` in pieces of at most RECORD_MAX bytes (one record each on a seqpacket
    socket; a stream does not mind)."""
    view = memoryview(data)
    for i in range(0, len(view), RECORD_MAX):
        sock.sendall(view[i:i + RECORD_MAX])


class _Stream(Protocol):
    """Anything with ``read(n) -> bytes`` (a SocketReader, a binary file)."""

    def read(self, n: int, /) -> bytes: ...


def read_frame(stream: _Stream, max_frame: int = DEFAULT_MAX_FRAME) -> bytes | None:
    """Reads one frame body from a binary file object; None at a clean end of stream."""
    header = _read_exact(stream, 4, allow_eof=True)
    if header is None:
        return None
    (n,) = struct.unpack("<I", header)
    if n == 0:
        raise ProtocolError("empty frame (length 0)")
    if n > max_frame:
        raise ProtocolError("frame of %d bytes exceeds the limit of %d" % (n, max_frame))
    return _read_exact(stream, n, allow_eof=False)


def _read_exact(stream: _Stream, n: int, allow_eof: bool) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            if allow_eof and not buf:
                return None
            raise ProtocolError("stream ended inside a frame (%d of %d bytes)" % (len(buf), n))
        buf += chunk
    return bytes(buf)
