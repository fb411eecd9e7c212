"""Write plugd plugins in Python: ``from plugd_plugin import Plugin, method, serve``.

A plugin is a class with handlers marked by ``@method`` (or named in ``exports``); ``serve(MyPlugin())``
speaks the plugd protocol on the socket the supervisor passed as fd 3 and
returns only when the plugin is told to stop. Standard library only, so it
installs into any plugin's virtualenv (plugd puts it there itself).

    from plugd_plugin import Plugin, method, serve

    class Echo(Plugin):
        def on_load(self, config):          # the [config] table of plugin.toml
            self.prefix = config.get("prefix", "")

        @method()                           # callable as "echo", JSON in and out
        def echo(self, value):
            return self.prefix + value

    serve(Echo())

Calls are served one at a time, in order. A handler that raises
``PluginError`` answers the call with error code Failed; any other exception
answers Panicked (and the plugin keeps running). A handler written as a
generator streams: each ``yield`` is sent as a Chunk, its ``return`` value is
the final reply. Rust hosts send bincode: declare ``args=`` / ``returns=``
with :mod:`plugd_plugin.schema` types to accept those calls.
"""

import json
import logging
import os
import socket
import sys
import threading
import traceback
import types

from . import lockdown, schema, wire
from .wire import CODEC_BINCODE, CODEC_JSON, CallError, Payload, ProtocolError

__all__ = ["Plugin", "PluginError", "method", "serve", "schema", "wire", "SDK"]

SDK = "plugd-plugin-py/0.1.0"

# Notify methods with a meaning to plugd itself (PROTOCOL.md section 5).
_STATE_NOTIFY = "plugd.state"


class PluginError(Exception):
    """Raise from a handler to answer the call with error code Failed and this message."""


def method(name=None, args=None, returns=None):
    """Marks a plugin method as callable under ``name`` (default: the function's name).

    ``args`` and ``returns`` are :mod:`plugd_plugin.schema` types describing the bincode
    shape of the argument and result; without them the handler serves JSON calls only.
    """

    def mark(fn):
        fn._plugd_method = (name or fn.__name__, args, returns)
        return fn

    return mark


class Plugin:
    """Base class of a plugin; override what you need."""

    #: Name sent in Hello; default: ``PLUGD_PLUGIN_NAME`` (set by plugd from the manifest).
    name = None
    #: Version sent in Hello; default: ``PLUGD_PLUGIN_VERSION``.
    version = None
    #: Plain methods callable by their own name (JSON only), besides those marked ``@method``.
    exports = ()

    def on_load(self, config):
        """Called once before the first call with the manifest's ``[config]`` table (a dict)."""

    def on_shutdown(self):
        """Called on a graceful stop; return bytes to hand to the next instance, or None."""
        return None

    def restore_state(self, state):
        """Receives the bytes the previous instance returned from ``on_shutdown`` (after ``on_load``)."""

    def on_notify(self, method_name, value):
        """A one-way message from the host (JSON value, or bytes for a bincode payload)."""

    def register(self, name, fn, args=None, returns=None):
        """Adds a handler at run time (before ``serve``), like ``@method`` does statically."""
        self.__dict__.setdefault("_plugd_extra", {})[name] = (fn, args, returns)


def _handlers(plugin):
    found = {}
    for name in plugin.exports:
        fn = getattr(plugin, name, None)
        if not callable(fn):
            raise TypeError("exports names %r, which is not a method of %s"
                            % (name, type(plugin).__name__))
        found[name] = (fn, None, None)
    for attr in dir(type(plugin)):
        fn = getattr(type(plugin), attr, None)
        mark = getattr(fn, "_plugd_method", None)
        if mark is not None:
            name, args, returns = mark
            found[name] = (getattr(plugin, attr), args, returns)
    found.update(plugin.__dict__.get("_plugd_extra", {}))
    return found


_LEVELS = ((logging.ERROR, wire.LOG_ERROR), (logging.WARNING, wire.LOG_WARN),
           (logging.INFO, wire.LOG_INFO), (logging.DEBUG, wire.LOG_DEBUG))


class _LogForwarder(logging.Handler):
    """Sends Python log records to the host as Log frames."""

    def __init__(self, conn):
        super().__init__()
        self.conn = conn

    def emit(self, record):
        level = next((tag for floor, tag in _LEVELS if record.levelno >= floor), wire.LOG_TRACE)
        try:
            self.conn.send(wire.Log(level, self.format(record)))
        except Exception:  # the socket is gone; the supervisor will notice on its own
            pass


class _Connection:
    """The protocol socket: whole frames in, whole frames out (sends may come from threads)."""

    def __init__(self, sock):
        self.sock = sock
        # Not sock.makefile(): every read must offer a whole record's room (seqpacket).
        self.reader = wire.SocketReader(sock)
        self.lock = threading.Lock()
        self.max_frame = wire.DEFAULT_MAX_FRAME

    def send(self, msg):
        data = wire.frame(msg, self.max_frame)
        with self.lock:
            wire.send_all(self.sock, data)

    def recv(self):
        body = wire.read_frame(self.reader, self.max_frame)
        return None if body is None else wire.decode(body)


def _decode_arg(payload, args):
    if payload.codec == CODEC_JSON:
        return json.loads(payload.data.decode("utf-8")) if payload.data else None
    if args is not None:
        return schema.decode(args, payload.data)
    if not payload.data:
        return None  # bincode of () is empty
    raise ValueError("this handler takes JSON; declare args= with plugd_plugin.schema types "
                     "to accept bincode calls")


def _encode(value, codec, returns):
    if codec == CODEC_JSON:
        return Payload(CODEC_JSON, json.dumps(value, separators=(",", ":")).encode("utf-8"))
    if returns is not None:
        return Payload(CODEC_BINCODE, schema.encode(returns, value))
    if value is None:
        return Payload(CODEC_BINCODE, b"")
    raise ValueError("the caller wants bincode; declare returns= with plugd_plugin.schema types")


def _serve_call(conn, handlers, call):
    entry = handlers.get(call.method)
    if entry is None:
        known = ", ".join(sorted(handlers)) or "none"
        return CallError(wire.UNKNOWN_METHOD,
                         "no method %r in this plugin (it has: %s)" % (call.method, known))
    fn, args, returns = entry
    try:
        arg = _decode_arg(call.payload, args)
    except Exception as e:
        return CallError(wire.BAD_PAYLOAD, "argument of %s: %s" % (call.method, e))
    try:
        result = fn(arg)
        if isinstance(result, types.GeneratorType):
            gen = result
            while True:
                try:
                    piece = next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                conn.send(wire.Chunk(call.id, _encode(piece, call.payload.codec, returns)))
    except PluginError as e:
        return CallError(wire.FAILED, str(e))
    except Exception as e:
        logging.getLogger("plugd_plugin").warning(
            "handler %s raised:\n%s", call.method, traceback.format_exc().rstrip())
        return CallError(wire.PANICKED, "%s raised %s: %s" % (call.method, type(e).__name__, e))
    try:
        return _encode(result, call.payload.codec, returns)
    except Exception as e:
        return CallError(wire.FAILED, "result of %s cannot be encoded: %s" % (call.method, e))


def _fail(message, code):
    sys.stderr.write("plugd_plugin: %s\n" % message)
    sys.stderr.flush()
    sys.exit(code)


def serve(plugin, fd=None):
    """Runs ``plugin`` until plugd stops it; exits the process with 0 after a graceful stop.

    ``fd`` defaults to ``PLUGD_FD`` (3). Exits with status 2 if the process was not
    started by plugd or was rejected, 1 if ``on_load`` raised, 3 on a protocol error.
    """
    if fd is None:
        env = os.environ.get("PLUGD_FD")
        if env is None:
            _fail("not started by a plugd supervisor (no PLUGD_FD); run this plugin through "
                  "plugd or a host that links the supervisor crate", 2)
        fd = int(env)
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        _fail("fd %s is not the plugd socket: %s" % (fd, e), 2)
    conn = _Connection(sock)
    handlers = _handlers(plugin)
    name = plugin.name or os.environ.get("PLUGD_PLUGIN_NAME") or os.path.basename(sys.argv[0])
    version = plugin.version or os.environ.get("PLUGD_PLUGIN_VERSION") or "0.0.0"
    try:
        conn.send(wire.Hello(wire.MAGIC, wire.PROTO_MIN, wire.PROTO_MAX, name, version,
                             sorted(handlers), SDK))
        welcome = conn.recv()
    except (OSError, ProtocolError) as e:
        _fail("handshake failed: %s" % e, 3)
    if isinstance(welcome, wire.Reject):
        _fail("the supervisor rejected this plugin: %s" % welcome.reason, 2)
    if not isinstance(welcome, wire.Welcome):
        _fail("expected Welcome, got %r" % (welcome,), 3)
    conn.max_frame = welcome.max_frame

    forwarder = _LogForwarder(conn)
    forwarder.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(forwarder)
    if root.level == logging.WARNING:  # the untouched default
        root.setLevel(logging.INFO)

    try:
        plugin.on_load(json.loads(welcome.config_json) if welcome.config_json else {})
        if welcome.state is not None:
            plugin.restore_state(welcome.state)
    except Exception:
        logging.getLogger("plugd_plugin").error("on_load failed:\n%s",
                                                traceback.format_exc().rstrip())
        sys.stderr.write(traceback.format_exc())
        sys.exit(1)
    # Lock down after on_load (which may legitimately start helpers) and before Ready.
    try:
        layers = lockdown.apply_requested()
    except OSError as e:
        logging.getLogger("plugd_plugin").warning("cannot block execve: %s", e)
        layers = []
    if layers:
        conn.send(wire.Notify("plugd.lockdown", Payload(CODEC_JSON, json.dumps(layers).encode())))
    conn.send(wire.Ready())

    try:
        _loop(conn, plugin, handlers)
    except (OSError, ProtocolError) as e:
        root.removeHandler(forwarder)
        _fail("protocol error: %s" % e, 3)


def _loop(conn, plugin, handlers):
    while True:
        msg = conn.recv()
        if msg is None:  # the supervisor closed the socket: nothing left to serve
            sys.exit(0)
        kind = type(msg)
        if kind is wire.Call:
            conn.send(wire.Reply(msg.id, _serve_call(conn, handlers, msg)))
        elif kind is wire.Ping:
            conn.send(wire.Pong(msg.seq))
        elif kind is wire.Cancel:
            pass  # calls run one at a time: a cancelled call has already been answered
        elif kind is wire.Notify:
            try:
                if msg.method == _STATE_NOTIFY:
                    plugin.restore_state(msg.payload.data)
                else:
                    value = msg.payload.data
                    if msg.payload.codec == CODEC_JSON:
                        value = json.loads(value.decode("utf-8")) if value else None
                    plugin.on_notify(msg.method, value)
            except Exception:
                logging.getLogger("plugd_plugin").warning(
                    "notify %s raised:\n%s", msg.method, traceback.format_exc().rstrip())
        elif kind is wire.Shutdown:
            state = None
            try:
                state = plugin.on_shutdown()
            except Exception:
                logging.getLogger("plugd_plugin").error(
                    "on_shutdown raised:\n%s", traceback.format_exc().rstrip())
            if state is not None:
                conn.send(wire.State(bytes(state)))
            conn.send(wire.Goodbye())
            logging.shutdown()
            sys.exit(0)
        else:
            raise ProtocolError("the supervisor sent %s, which only a plugin may send"
                                % kind.__name__)
