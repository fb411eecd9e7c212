"""Write plugd plugins in Python: ``from plugd_plugin import Plugin, method, serve``.

A plugin is a class with handlers marked by ``@method`` (or named in ``exports``); ``serve(MyPlugin())``
speaks the plugd protocol on the socket the supervisor passed as fd 3 and
returns only when the plugin is told to stop. Standard library only, so it
installs into any plugin's virtualenv (plugd puts it there itself).

    from dataclasses import dataclass
    from plugd_plugin import Plugin, method, serve

    @dataclass
    class Point:
        x: int
        y: int

    class Geometry(Plugin):
        def on_load(self, config):          # the [config] table of plugin.toml
            self.scale = config.get("scale", 1)

        @method                             # callable as "norm1", JSON in and out...
        def norm1(self, p: Point) -> int:   # ...and bincode, from the type hints
            return self.scale * (abs(p.x) + abs(p.y))

    serve(Geometry())

Calls are served one at a time, in order — unless a handler (or a hook: ``on_load``,
``on_start``, ``on_stop``, ...) is ``async def``: then the plugin is served on an asyncio
loop, each call to an async handler runs as its own task (calls are served concurrently;
``await self.host.acall(...)`` lets others run while it waits), and plain handlers still run
one at a time on the loop. A handler that raises
``PluginError`` answers the call with error code Failed; any other exception
answers Panicked (and the plugin keeps running). A handler written as a
generator streams: each ``yield`` is sent as a Chunk, its ``return`` value is
the final reply. Rust hosts send bincode: a handler whose argument and result
are annotated (``int``, ``float``, ``str``, ``bool``, ``bytes``, ``list[T]``,
``T | None``, ``@dataclass`` classes, ``enum.Enum``) takes those calls; other
shapes are declared with ``args=`` / ``returns=`` and :mod:`plugd_plugin.schema`.

``serve`` raises :class:`ServeError` when it cannot run the plugin; uncaught, it ends
the process with the same exit status as the Rust SDK: 2 when not started by plugd or
rejected, 1 when ``on_load`` (or the lockdown plugd asked for) failed, 3 on a protocol
error. After a graceful stop, or when plugd closed the socket, it returns.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
import json
import logging
import os
import select
import socket
import sys
import threading
import time
import traceback
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, overload

from . import lockdown, schema, serving, wire
from .wire import CODEC_BINCODE, CODEC_JSON, CallError, ErrorCode, LogLevel, Payload, ProtocolError

__all__ = ["Plugin", "PluginError", "ServeError", "NotSupervised", "Rejected", "LoadFailed",
           "ProtocolFailure", "ErrorCode", "Host", "HostCallError", "method", "serve", "schema",
           "wire", "SDK", "Context", "StrategyPlugin", "SignalPlugin", "AdapterPlugin",
           "EnginePlugin", "UtilityPlugin"]

SDK = "plugd-plugin-py/0.2.0"

# Notify methods with a meaning to plugd itself (PROTOCOL.md section 5).
_STATE_NOTIFY = "plugd.state"
_DESCRIBE_NOTIFY = "plugd.describe"

_log = logging.getLogger("plugd_plugin")

# Set once serve() runs: the launcher then knows a script or module served itself.
_serve_started = False


def _started() -> bool:
    """Whether :func:`serve` has run in this process."""
    return _serve_started

F = TypeVar("F", bound=Callable[..., Any])


class PluginError(Exception):
    """Raise from a handler to answer the call with error code Failed and this message."""


class ServeError(SystemExit):
    """:func:`serve` could not run the plugin. Uncaught, it exits with :attr:`status`."""

    status = 1

    def __init__(self, message: str) -> None:
        super().__init__(self.status)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotSupervised(ServeError):
    """The process was not started by plugd (no ``PLUGD_FD``, or it is not a socket)."""

    status = 2


class Rejected(ServeError):
    """The supervisor refused the handshake."""

    status = 2


class LoadFailed(ServeError):
    """``on_load`` raised, or the lockdown plugd asked for could not be applied."""

    status = 1


class ProtocolFailure(ServeError):
    """The socket failed or carried something that is not the protocol."""

    status = 3


@overload
def method(name: F) -> F: ...


@overload
def method(name: str | None = None, args: schema.Schema | None = None,
           returns: schema.Schema | None = None) -> Callable[[F], F]: ...


def method(name: Any = None, args: schema.Schema | None = None,
           returns: schema.Schema | None = None) -> Any:
    """Marks a plugin method as callable, bare (``@method``) or with arguments.

    ``name`` defaults to the function's name. ``args`` and ``returns`` are
    :mod:`plugd_plugin.schema` types for the bincode shape of the argument and result;
    without them the function's type hints are used, and without hints the handler serves
    JSON calls only.
    """
    if callable(name):  # bare @method
        return method()(name)

    def mark(fn: F) -> F:
        setattr(fn, "_plugd_method", (name or fn.__name__, args, returns))
        return fn

    return mark


class Plugin:
    """Base class of a plugin; override what you need."""

    #: Name sent in Hello; default: ``PLUGD_PLUGIN_NAME`` (set by plugd from the manifest).
    name: str | None = None
    #: Version sent in Hello; default: ``PLUGD_PLUGIN_VERSION``.
    version: str | None = None
    #: Plain methods callable by their own name (JSON only), besides those marked ``@method``.
    exports: tuple[str, ...] = ()
    #: The way to the host, set by :func:`serve` before the first call:
    #: ``self.host.call("send_order", order)``, ``self.host.call_plugin("exchange", "fill", x)``.
    host: Host

    def on_load(self, config: dict[str, Any]) -> None:
        """Called once before the first call with the manifest's ``[config]`` table (a dict).
        Raise :class:`PluginError` to fail the start with its message as the reason plugd
        shows; any other exception fails it too, named with its type."""

    def on_start(self) -> None:
        """Called after ``on_load`` (and ``restore_state``), before the plugin is Ready: start
        what serves (a server, a background task) here."""

    def on_stop(self) -> None:
        """Called on a graceful stop, before ``on_shutdown``: stop what ``on_start`` started."""

    def on_shutdown(self) -> bytes | None:
        """Called on a graceful stop; return bytes to hand to the next instance, or None."""
        return None

    def restore_state(self, state: bytes) -> None:
        """Receives what the previous instance returned from ``on_shutdown``: after
        ``on_load`` on a restart, before the first call on a hot update."""

    def on_notify(self, method_name: str, value: Any) -> None:
        """A one-way message from the host for which no handler of that name exists
        (JSON value, or bytes for a bincode payload)."""

    def register(self, name: str, fn: Callable[[Any], Any], args: schema.Schema | None = None,
                 returns: schema.Schema | None = None) -> None:
        """Adds a handler at run time (before ``serve``), like ``@method`` does statically."""
        self.__dict__.setdefault("_plugd_extra", {})[name] = _Handler(fn, args, returns, None)


@dataclasses.dataclass
class _Handler:
    fn: Callable[..., Any]
    args: schema.Schema | None
    returns: schema.Schema | None
    # The annotated argument type: JSON arguments are converted to it (dataclasses, enums).
    arg_type: Any
    # The annotated result type, and the first line of the docstring (`plugd.describe`).
    ret_type: Any = None
    doc: str | None = None
    # Whether the function takes the caller's per-call configuration as ``cfg=``.
    wants_cfg: bool = False


def _from_hints(fn: Callable[..., Any], args: schema.Schema | None,
                returns: schema.Schema | None) -> _Handler:
    """A handler whose missing schemas come from the function's type hints, where they can."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # unresolvable forward references: JSON only, as without hints
        hints = {}
    all_params = inspect.signature(fn).parameters
    # ``cfg`` is the caller's per-call configuration, not part of the method's input.
    params = [p for p in all_params.values() if p.name not in ("self", "cfg")]
    arg_type = hints.get(params[0].name) if params else None
    wants_cfg = "cfg" in all_params

    def schema_of(tp: Any) -> schema.Schema | None:
        if tp is None:
            return None
        try:
            return schema.of(tp)
        except TypeError:
            return None

    if args is None:
        args = schema_of(arg_type)
    if returns is None and not inspect.isgeneratorfunction(fn):
        returns = schema_of(hints.get("return"))
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    return _Handler(fn, args, returns, arg_type, hints.get("return"), doc[0] if doc else None,
                    wants_cfg)


def _describe(handlers: dict[str, _Handler]) -> list[dict[str, Any]]:
    """What ``plugd.describe`` tells plugd of each method: its description and the JSON
    Schemas of its input and result, from its docstring and type hints."""
    out: list[dict[str, Any]] = []
    for name, h in sorted(handlers.items()):
        entry: dict[str, Any] = {"name": name}
        if h.doc:
            entry["description"] = h.doc
        for key, tp in (("input", h.arg_type), ("output", h.ret_type)):
            found = schema.json_schema(tp)
            if found is not None:
                entry[key] = found
        out.append(entry)
    return out


def _handlers(plugin: Plugin) -> dict[str, _Handler]:
    found: dict[str, _Handler] = {}
    for name in plugin.exports:
        fn = getattr(plugin, name, None)
        if not callable(fn):
            raise TypeError("exports names %r, which is not a method of %s"
                            % (name, type(plugin).__name__))
        found[name] = _Handler(fn, None, None, None)
    for attr in dir(type(plugin)):
        fn = getattr(type(plugin), attr, None)
        mark = getattr(fn, "_plugd_method", None)
        if fn is not None and mark is not None:
            name, args, returns = mark
            handler = _from_hints(fn, args, returns)
            handler.fn = getattr(plugin, attr)
            found[name] = handler
    found.update(plugin.__dict__.get("_plugd_extra", {}))
    return found


_LEVEL_NAMES = {"error": LogLevel.ERROR, "warn": LogLevel.WARN, "warning": LogLevel.WARN,
                "info": LogLevel.INFO, "debug": LogLevel.DEBUG, "trace": LogLevel.TRACE}

_LEVELS = ((logging.ERROR, LogLevel.ERROR), (logging.WARNING, LogLevel.WARN),
           (logging.INFO, LogLevel.INFO), (logging.DEBUG, LogLevel.DEBUG))


class _LogForwarder(logging.Handler):
    """Sends Python log records to the host as Log frames."""

    def __init__(self, conn: _Connection) -> None:
        super().__init__()
        self.conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        level = next((tag for floor, tag in _LEVELS if record.levelno >= floor), LogLevel.TRACE)
        try:
            self.conn.send(wire.Log(level, self.format(record)))
        except Exception:  # the socket is gone; the supervisor will notice on its own
            pass


class HostCallError(Exception):
    """A call to the host failed: ``code`` says how (``ErrorCode.DENIED``, ``UNKNOWN_METHOD``,
    ``DEADLINE_EXCEEDED``, ...), ``message`` says why, in the host's words."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__("%s: %s" % (code.name, message))
        self.code = code
        self.message = message


def _json(value: Any) -> Payload:
    return Payload(CODEC_JSON, json.dumps(schema.to_plain(value)).encode("utf-8"))


def _unjson(answer: Payload) -> Any:
    return json.loads(answer.data.decode("utf-8")) if answer.data else None


class Host:
    """The plugin's way to the host (protocol version 2). A call made while the plugin serves
    a call never outlives that call's deadline; arguments and answers are JSON.

    ``call`` waits on the spot (from any handler); in an ``async def`` handler, ``await
    acall(...)`` lets the plugin serve other calls meanwhile."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    def call(self, method: str, arg: Any = None, timeout: float | None = None) -> Any:
        """Calls the host's ``method``; its answer, or :class:`HostCallError`."""
        return _unjson(self._conn.call_host(method, _json(arg), timeout))

    async def acall(self, method: str, arg: Any = None, timeout: float | None = None) -> Any:
        """:meth:`call` for ``async def`` handlers: other calls are served while it waits."""
        return _unjson(await self._conn.acall_host(method, _json(arg), timeout))

    def status(self) -> dict[str, Any]:
        """This plugin's own status as plugd sees it (``plugd.status``): ``state``,
        ``restarts``, ``uptime_ms``, ``sandbox`` layers in force, ..."""
        status: dict[str, Any] = self.call(wire.PLUGD_STATUS)
        return status

    def log(self, message: str, level: str = "info", **fields: Any) -> None:
        """Logs ``message`` with named fields into this plugin's log (``plugd.log``), one way:
        nothing waits. Values are written as text; keys are letters, digits, ``_ . -``."""
        if level not in _LEVEL_NAMES:
            raise ValueError("log level %r is not one of %s" % (level, ", ".join(_LEVEL_NAMES)))
        shown = {k: v if isinstance(v, str) else json.dumps(schema.to_plain(v))
                 for k, v in fields.items()}
        if self._conn.proto < wire.PROTO_HOST_CALLS:
            text = message + "".join(" %s=%s" % (k, json.dumps(v)) for k, v in shown.items())
            self._conn.send(wire.Log(_LEVEL_NAMES[level], text))
            return
        record = {"level": level, "message": message, "fields": shown}
        self._conn.send(wire.Notify(wire.PLUGD_LOG, _json(record)))

    def call_plugin(self, plugin: str, method: str, arg: Any = None,
                    timeout: float | None = None) -> Any:
        """Calls ``method`` of another plugin through the host (``plugd.call``); this plugin's
        manifest must list it under ``[calls] allow``, else :class:`HostCallError` DENIED."""
        outer = Payload(CODEC_BINCODE, wire.plugin_call(plugin, method, _json(arg)))
        return _unjson(self._conn.call_host(wire.PLUGIN_CALL, outer, timeout))

    async def acall_plugin(self, plugin: str, method: str, arg: Any = None,
                           timeout: float | None = None) -> Any:
        """:meth:`call_plugin` for ``async def`` handlers."""
        outer = Payload(CODEC_BINCODE, wire.plugin_call(plugin, method, _json(arg)))
        return _unjson(await self._conn.acall_host(wire.PLUGIN_CALL, outer, timeout))


class _TimedOut(Exception):
    """An awaited host call passed its deadline."""


#: When the supervisor stops waiting for the call being served (monotonic seconds); one per
#: asyncio task, so concurrent async handlers each keep their own call's deadline.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("plugd_deadline",
                                                                        default=None)


def _answer(method: str, reply: wire.Reply) -> Payload:
    if isinstance(reply.result, CallError):
        raise HostCallError(ErrorCode(reply.result.code), reply.result.message)
    return reply.result


class _Connection:
    """The protocol socket: whole frames in, whole frames out (sends may come from threads)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # Not sock.makefile(): every read must offer a whole record's room (seqpacket).
        self.reader = wire.SocketReader(sock)
        self.lock = threading.Lock()
        self.max_frame = wire.DEFAULT_MAX_FRAME
        self.proto = wire.PROTO_MIN
        #: Frames read while a host call waited, for the serving loop to handle next.
        self.deferred: list[wire.Message] = []
        self.next_id = 1
        #: Host calls of async handlers waiting for their Reply, by id.
        self.pending: dict[int, asyncio.Future[wire.Reply]] = {}
        #: Set by the asyncio server: run after a blocking host call left frames deferred.
        self.wake: Callable[[], None] | None = None

    def _start_host_call(self, method: str, payload: Payload,
                         timeout: float | None) -> tuple[int, float | None]:
        """Sends the Call with the deadline it may have; its id and that deadline."""
        if self.proto < wire.PROTO_HOST_CALLS:
            raise HostCallError(ErrorCode.UNAVAILABLE,
                                "the host speaks protocol %d: it takes no calls from plugins "
                                "(it needs %d); update the host" % (self.proto,
                                                                    wire.PROTO_HOST_CALLS))
        now = time.monotonic()
        deadline = None
        served = _deadline.get()
        if served is not None:
            # A little before the call being served ends, so a failure comes back in time
            # for its handler to answer (a tenth of what is left, at most 10 ms).
            deadline = served - min((served - now) / 10, 0.010)
        if timeout is not None:
            deadline = now + timeout if deadline is None else min(deadline, now + timeout)
        if deadline is not None and deadline <= now:
            raise HostCallError(ErrorCode.DEADLINE_EXCEEDED,
                                "host method %s: no time left before it was sent" % method)
        deadline_us = 0 if deadline is None else max(1, int((deadline - now) * 1e6))
        cid = self.next_id
        self.next_id += 1
        self.send(wire.Call(cid, method, deadline_us, payload))
        return cid, deadline

    def call_host(self, method: str, payload: Payload, timeout: float | None) -> Payload:
        """Sends a Call to the host and reads until its Reply (answering Pings, keeping
        other frames for later); the answer's payload, or :class:`HostCallError`."""
        cid, deadline = self._start_host_call(method, payload, timeout)
        try:
            while True:
                if not self._readable(deadline):
                    self.send(wire.Cancel(cid))
                    raise HostCallError(ErrorCode.DEADLINE_EXCEEDED,
                                        "host method %s did not answer in time" % method)
                msg = self.recv()
                if msg is None:
                    raise HostCallError(ErrorCode.UNAVAILABLE,
                                        "host method %s: the host closed the connection" % method)
                if isinstance(msg, wire.Reply) and msg.id == cid:
                    return _answer(method, msg)
                if isinstance(msg, wire.Reply):
                    self.deliver(msg)  # another handler's host call, or one given up on
                elif isinstance(msg, wire.Ping):
                    self.send(wire.Pong(msg.seq))
                else:
                    self.deferred.append(msg)
        finally:
            # Frames it read for others, or bytes of one it read in part: the asyncio reader
            # must look again (the socket itself may have nothing more to say).
            if (self.deferred or self.buffered()) and self.wake is not None:
                self.wake()

    async def acall_host(self, method: str, payload: Payload, timeout: float | None) -> Payload:
        """:meth:`call_host` for async handlers: the reply comes through the asyncio reader."""
        cid, deadline = self._start_host_call(method, payload, timeout)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[wire.Reply] = loop.create_future()
        self.pending[cid] = waiter
        # A timer on the loop's clock rather than asyncio.wait_for, which costs a task and
        # more per call on this hot path.
        timer = None
        if deadline is not None:
            at = loop.time() + max(0.0, deadline - time.monotonic())

            def expire() -> None:
                if not waiter.done():
                    waiter.set_exception(_TimedOut())

            timer = loop.call_at(at, expire)
        try:
            reply = await waiter
        except _TimedOut:
            self.send(wire.Cancel(cid))
            raise HostCallError(ErrorCode.DEADLINE_EXCEEDED,
                                "host method %s did not answer in time" % method) from None
        except asyncio.CancelledError:
            self.send(wire.Cancel(cid))
            raise
        finally:
            self.pending.pop(cid, None)
            if timer is not None:
                timer.cancel()
        return _answer(method, reply)

    def deliver(self, reply: wire.Reply) -> None:
        """Hands a host Reply to the async handler waiting for it; a late one is dropped."""
        waiter = self.pending.pop(reply.id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def _readable(self, deadline: float | None) -> bool:
        """True once a frame can be read; False if ``deadline`` passed first."""
        while True:
            if self.buffered():
                return True
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return False
            ready, _, _ = select.select([self.sock], [], [], wait)
            if ready:
                return True

    def buffered(self) -> bool:
        """Whether bytes of a frame are already read from the socket."""
        return self.reader.start < self.reader.end

    def send(self, msg: wire.Message) -> None:
        data = wire.frame(msg, self.max_frame)
        with self.lock:
            wire.send_all(self.sock, data)

    def recv(self) -> wire.Message | None:
        body = wire.read_frame(self.reader, self.max_frame)
        return None if body is None else wire.decode(body)


def _decode_arg(payload: Payload, h: _Handler) -> Any:
    if payload.codec == CODEC_JSON:
        value = json.loads(payload.data.decode("utf-8")) if payload.data else None
        return value if h.arg_type is None else schema.from_plain(h.arg_type, value)
    if h.args is not None:
        return schema.decode(h.args, payload.data)
    if not payload.data:
        return None  # bincode of () is empty
    raise ValueError("this handler takes JSON; annotate its argument, or declare args= with "
                     "plugd_plugin.schema types, to accept bincode calls")


def _decode_cfg(call: wire.Call) -> Any:
    """The caller's per-call configuration (None without one); JSON only."""
    if not isinstance(call, wire.CallCfg):
        return None
    if call.cfg.codec != CODEC_JSON:
        raise ValueError("its cfg is not JSON (the Python SDK takes JSON cfg only)")
    return json.loads(call.cfg.data.decode("utf-8")) if call.cfg.data else None


def _encode(value: Any, codec: int, returns: schema.Schema | None) -> Payload:
    if codec == CODEC_JSON:
        text = json.dumps(schema.to_plain(value), separators=(",", ":"))
        return Payload(CODEC_JSON, text.encode("utf-8"))
    if returns is not None:
        return Payload(CODEC_BINCODE, schema.encode(returns, value))
    if value is None:
        return Payload(CODEC_BINCODE, b"")
    raise ValueError("the caller wants bincode; annotate the result, or declare returns= with "
                     "plugd_plugin.schema types")


def _failed(call: wire.Call, e: BaseException) -> CallError:
    """The error answer for an exception a handler raised."""
    if isinstance(e, (PluginError, HostCallError)):
        return CallError(ErrorCode.FAILED, str(e))
    _log.warning("handler %s raised:\n%s", call.method, traceback.format_exc().rstrip())
    return CallError(ErrorCode.PANICKED, "%s raised %s: %s" % (call.method, type(e).__name__, e))


def _result(call: wire.Call, h: _Handler, value: Any) -> Payload | CallError:
    try:
        return _encode(value, call.payload.codec, h.returns)
    except Exception as e:
        return CallError(ErrorCode.FAILED, "result of %s cannot be encoded: %s" % (call.method, e))


def _start_call(conn: _Connection, handlers: dict[str, _Handler],
                call: wire.Call) -> tuple[_Handler, Any] | Payload | CallError:
    """Runs a handler up to its first wait: the answer when it is a plain function (a
    generator's chunks sent), or the handler and the awaitable (or async generator) it
    returned, for the asyncio server to finish."""
    h = handlers.get(call.method)
    if h is None:
        known = ", ".join(sorted(handlers)) or "none"
        return CallError(ErrorCode.UNKNOWN_METHOD,
                         "no method %r in this plugin (it has: %s)" % (call.method, known))
    try:
        arg = _decode_arg(call.payload, h)
        cfg = _decode_cfg(call)
    except Exception as e:
        return CallError(ErrorCode.BAD_PAYLOAD, "argument of %s: %s" % (call.method, e))
    try:
        result = h.fn(arg, cfg=cfg) if h.wants_cfg else h.fn(arg)
        if inspect.isawaitable(result) or isinstance(result, types.AsyncGeneratorType):
            return h, result
        if isinstance(result, types.GeneratorType):
            gen = result
            while True:
                try:
                    piece = next(gen)
                except StopIteration as stop:
                    result = stop.value
                    break
                conn.send(wire.Chunk(call.id, _encode(piece, call.payload.codec, h.returns)))
    except Exception as e:
        return _failed(call, e)
    return _result(call, h, result)


async def _finish_call(conn: _Connection, call: wire.Call, h: _Handler,
                       pending: Any) -> Payload | CallError:
    """Awaits what an async handler returned; an async generator streams (its answer is
    null: an async generator cannot return a value)."""
    try:
        if isinstance(pending, types.AsyncGeneratorType):
            async for piece in pending:
                conn.send(wire.Chunk(call.id, _encode(piece, call.payload.codec, h.returns)))
            result = None
        else:
            result = await pending
    except asyncio.CancelledError:
        raise
    except Exception as e:
        return _failed(call, e)
    return _result(call, h, result)


def _serve_call(conn: _Connection, handlers: dict[str, _Handler],
                call: wire.Call) -> Payload | CallError:
    """Serves one call to the end (the one-at-a-time server)."""
    started = _start_call(conn, handlers, call)
    if isinstance(started, tuple):  # only a plugin with async handlers gets here
        return CallError(ErrorCode.INTERNAL, "%s is async but the plugin is not served on "
                         "asyncio" % call.method)
    return started


def _fail(error: ServeError) -> ServeError:
    """Says why on stderr (plugd keeps it in the plugin's log) and hands the error back."""
    sys.stderr.write("plugd_plugin: %s\n" % error.message)
    sys.stderr.flush()
    return error


async def _maybe(value: Any) -> Any:
    """``value``, awaited if it is awaitable (a hook may be a plain or an ``async def``)."""
    return await value if inspect.isawaitable(value) else value


async def _hook(plugin: Plugin, name: str, *args: Any) -> Any:
    """Runs the hook ``name`` (plain or ``async def``) to its result."""
    fn: Callable[..., Any] = getattr(plugin, name)
    return await _maybe(fn(*args))


def _drive(coro: Any) -> Any:
    """Runs a coroutine that never waits (every hook it calls is plain) without a loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("an async hook was awaited outside asyncio")


_HOOKS = ("on_load", "on_start", "restore_state", "on_stop", "on_shutdown", "on_notify")


def _wants_asyncio(plugin: Plugin, handlers: dict[str, _Handler]) -> bool:
    """Whether any handler or hook is ``async def`` (then the plugin is served on asyncio)."""
    fns = [h.fn for h in handlers.values()] + [getattr(plugin, n) for n in _HOOKS]
    return any(inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn) for fn in fns)


def serve(plugin: Plugin, fd: int | None = None) -> None:
    """Runs ``plugin`` until plugd stops it; returns after a graceful stop.

    ``fd`` defaults to ``PLUGD_FD`` (3). Raises :class:`NotSupervised` or :class:`Rejected`
    (exit status 2), :class:`LoadFailed` (1) or :class:`ProtocolFailure` (3).
    """
    global _serve_started
    _serve_started = True
    serving.install_inet_hint()
    if fd is None:
        env = os.environ.get("PLUGD_FD")
        if env is None or not env.isdigit():
            raise _fail(NotSupervised(
                "not started by a plugd supervisor (no PLUGD_FD); run this plugin through "
                "plugd or a host that links the supervisor crate"))
        fd = int(env)
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise _fail(NotSupervised("fd %s is not the plugd socket: %s" % (fd, e))) from None
    conn = _Connection(sock)
    handlers = _handlers(plugin)
    name = plugin.name or os.environ.get("PLUGD_PLUGIN_NAME") or os.path.basename(sys.argv[0])
    version = plugin.version or os.environ.get("PLUGD_PLUGIN_VERSION") or "0.0.0"
    try:
        conn.send(wire.Hello(wire.MAGIC, wire.PROTO_MIN, wire.PROTO_MAX, name, version,
                             sorted(handlers), SDK))
        welcome = conn.recv()
    except (OSError, ProtocolError) as e:
        raise _fail(ProtocolFailure("handshake failed: %s" % e)) from None
    if isinstance(welcome, wire.Reject):
        raise _fail(Rejected("the supervisor rejected this plugin: %s" % welcome.reason))
    if not isinstance(welcome, wire.Welcome):
        raise _fail(ProtocolFailure("expected Welcome, got %r" % (welcome,)))
    conn.max_frame = welcome.max_frame

    forwarder = _LogForwarder(conn)
    forwarder.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(forwarder)
    if root.level == logging.WARNING:  # the untouched default
        root.setLevel(logging.INFO)

    try:
        if _wants_asyncio(plugin, handlers):
            asyncio.run(_AsyncServer(conn, plugin, handlers).run(welcome))
        else:
            _drive(_start(conn, plugin, welcome))
            _loop(conn, plugin, handlers)
    except (OSError, ProtocolError) as e:
        raise _fail(ProtocolFailure("protocol error: %s" % e)) from None
    finally:
        root.removeHandler(forwarder)
        logging.shutdown()


async def _start(conn: _Connection, plugin: Plugin, welcome: wire.Welcome) -> None:
    """on_load, the handed-over state, on_start, the lockdown, then Ready; a failure is
    said to the supervisor (Reject, protocol 2) and raised as :class:`LoadFailed`."""

    def refuse(reason: str) -> ServeError:
        # From protocol 2 the supervisor is told why (PROTOCOL.md 5.2): the plugin's status
        # then shows the reason, not only exit status 1.
        if welcome.proto >= wire.PROTO_HOST_CALLS:
            try:
                conn.send(wire.Reject(reason))
            except OSError:
                pass
        return _fail(LoadFailed(reason))

    conn.proto = welcome.proto
    plugin.host = Host(conn)
    try:
        await _hook(plugin, "on_load", json.loads(welcome.config_json) if welcome.config_json else {})
        if welcome.state is not None:
            await _hook(plugin, "restore_state", welcome.state)
        await _hook(plugin, "on_start")
    except PluginError as e:
        # Raised on purpose: its words are the reason, as they are.
        raise refuse(str(e)) from None
    except Exception as e:
        _log.error("on_load failed:\n%s", traceback.format_exc().rstrip())
        raise refuse("on_load failed: %s: %s" % (type(e).__name__, e)) from None
    # Lock down after on_load (which may legitimately start helpers) and before Ready.
    try:
        layers = lockdown.apply_requested()
    except OSError as e:
        raise refuse("cannot apply the lockdown plugd asked for: %s" % e) from None
    if layers:
        conn.send(wire.Notify("plugd.lockdown", Payload(CODEC_JSON, json.dumps(layers).encode())))
    described = _describe(_handlers(plugin))
    if any(len(d) > 1 for d in described):
        conn.send(wire.Notify(_DESCRIBE_NOTIFY, Payload(CODEC_JSON, json.dumps(described).encode())))
    conn.send(wire.Ready())


async def _stop(conn: _Connection, plugin: Plugin) -> None:
    """On Shutdown: on_stop, then on_shutdown's state handed over, then Goodbye."""
    state = None
    try:
        await _hook(plugin, "on_stop")
        state = await _hook(plugin, "on_shutdown")
    except Exception:
        _log.error("on_stop/on_shutdown raised:\n%s", traceback.format_exc().rstrip())
    if state is not None:
        conn.send(wire.State(bytes(state)))
    conn.send(wire.Goodbye())


def _notify(plugin: Plugin, handlers: dict[str, _Handler], msg: wire.Notify) -> Any:
    """A notify runs the handler of that name (its result is dropped), else ``on_notify``;
    what an async one returned is handed back, to be awaited."""
    try:
        if msg.method == _STATE_NOTIFY:
            return plugin.restore_state(msg.payload.data)
        if msg.method in handlers:
            h = handlers[msg.method]
            return h.fn(_decode_arg(msg.payload, h))
        value: Any = msg.payload.data
        if msg.payload.codec == CODEC_JSON:
            value = json.loads(value.decode("utf-8")) if value else None
        return plugin.on_notify(msg.method, value)
    except Exception:
        _log.warning("notify %s raised:\n%s", msg.method, traceback.format_exc().rstrip())
        return None


def _wrong_way(msg: wire.Message) -> ProtocolError:
    return ProtocolError("the supervisor sent %s, which only a plugin may send"
                         % type(msg).__name__)


def _loop(conn: _Connection, plugin: Plugin, handlers: dict[str, _Handler]) -> None:
    """Serves calls one at a time until Shutdown or the socket closes."""
    while True:
        # Frames a host call read while it waited come first, in the order they came.
        msg = conn.deferred.pop(0) if conn.deferred else conn.recv()
        if msg is None:  # the supervisor closed the socket: nothing left to serve
            return
        if isinstance(msg, wire.Call):
            token = _deadline.set(time.monotonic() + msg.deadline_us / 1e6
                                  if msg.deadline_us else None)
            try:
                conn.send(wire.Reply(msg.id, _serve_call(conn, handlers, msg)))
            finally:
                _deadline.reset(token)
        elif isinstance(msg, wire.Reply) and conn.proto >= wire.PROTO_HOST_CALLS:
            pass  # the answer to a host call its handler gave up on
        elif isinstance(msg, wire.Ping):
            conn.send(wire.Pong(msg.seq))
        elif isinstance(msg, wire.Cancel):
            pass  # calls run one at a time: a cancelled call has already been answered
        elif isinstance(msg, wire.Notify):
            _notify(plugin, handlers, msg)
        elif isinstance(msg, wire.Shutdown):
            _drive(_stop(conn, plugin))
            return
        else:
            raise _wrong_way(msg)


class _AsyncServer:
    """Serves a plugin with ``async def`` handlers on an asyncio loop: each call to an async
    handler runs as its own task (calls are served concurrently; a Cancel cancels the task),
    plain handlers run on the loop one at a time, and the socket is read by the loop, so
    pings are answered while handlers await."""

    def __init__(self, conn: _Connection, plugin: Plugin, handlers: dict[str, _Handler]) -> None:
        self.conn = conn
        self.plugin = plugin
        self.handlers = handlers
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.others: set[asyncio.Task[Any]] = set()
        self.done: asyncio.Future[None] | None = None
        #: Set while an async restore_state runs: no frame is handled before the state is in.
        self.paused = False

    async def run(self, welcome: wire.Welcome) -> None:
        await _start(self.conn, self.plugin, welcome)
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()

        def wake() -> None:
            loop.call_soon(self.drain)

        self.conn.wake = wake
        fd = self.conn.sock.fileno()
        loop.add_reader(fd, self.drain)
        if self.conn.buffered():
            loop.call_soon(self.drain)  # frames that came with the Welcome
        try:
            await self.done
        finally:
            loop.remove_reader(fd)
            self.conn.wake = None
            for task in list(self.tasks.values()) + list(self.others):
                task.cancel()

    def drain(self) -> None:
        """Handles every frame there is now (the socket is readable, or frames wait)."""
        assert self.done is not None
        if self.done.done() or self.paused:
            return
        try:
            while True:
                msg: wire.Message | None = (self.conn.deferred.pop(0) if self.conn.deferred
                                            else self.conn.recv())
                if msg is None:  # the supervisor closed the socket
                    self.done.set_result(None)
                    return
                self.handle(msg)
                if self.done.done() or self.paused:
                    return
                if not (self.conn.deferred or self.conn.buffered()):
                    return
        except Exception as e:  # OSError, ProtocolError: serve() says why
            if not self.done.done():
                self.done.set_exception(e)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.others.add(task)
        task.add_done_callback(self.others.discard)

    def handle(self, msg: wire.Message) -> None:
        conn = self.conn
        if isinstance(msg, wire.Call):
            token = _deadline.set(time.monotonic() + msg.deadline_us / 1e6
                                  if msg.deadline_us else None)
            try:
                started = _start_call(conn, self.handlers, msg)
                if isinstance(started, tuple):
                    # The task copies the context: it keeps this call's deadline.
                    task = asyncio.get_running_loop().create_task(self.finish(msg, *started))
                    self.tasks[msg.id] = task
                else:
                    conn.send(wire.Reply(msg.id, started))
            finally:
                _deadline.reset(token)
        elif isinstance(msg, wire.Reply) and conn.proto >= wire.PROTO_HOST_CALLS:
            conn.deliver(msg)
        elif isinstance(msg, wire.Ping):
            conn.send(wire.Pong(msg.seq))
        elif isinstance(msg, wire.Cancel):
            given_up = self.tasks.pop(msg.id, None)
            if given_up is not None:
                given_up.cancel()  # the caller gave up: no answer is owed
        elif isinstance(msg, wire.Notify):
            pending = _notify(self.plugin, self.handlers, msg)
            if inspect.isawaitable(pending) and msg.method == _STATE_NOTIFY:
                self.hold(pending)
            elif inspect.isawaitable(pending):
                self.spawn(self.notified(msg.method, pending))
        elif isinstance(msg, wire.Shutdown):
            self.spawn(self.shutdown())
        else:
            raise _wrong_way(msg)

    async def finish(self, call: wire.Call, h: _Handler, pending: Any) -> None:
        try:
            answer = await _finish_call(self.conn, call, h, pending)
            self.conn.send(wire.Reply(call.id, answer))
        except asyncio.CancelledError:
            pass
        except Exception as e:  # the socket failed
            if self.done is not None and not self.done.done():
                self.done.set_exception(e)
        finally:
            if call.id in self.tasks:
                del self.tasks[call.id]

    def hold(self, pending: Any) -> None:
        """Stops reading until ``pending`` (an async restore_state) is done, so that the
        handed-over state is in before any call is served (PROTOCOL.md 5.7)."""
        loop = asyncio.get_running_loop()
        fd = self.conn.sock.fileno()
        loop.remove_reader(fd)
        self.paused = True

        async def resume() -> None:
            await self.notified(_STATE_NOTIFY, pending)
            self.paused = False
            loop.add_reader(fd, self.drain)
            self.drain()

        self.spawn(resume())

    async def notified(self, method: str, pending: Any) -> None:
        try:
            await pending
        except Exception:
            _log.warning("notify %s raised:\n%s", method, traceback.format_exc().rstrip())

    async def shutdown(self) -> None:
        # Calls still running finish first (plugd drains before it sends Shutdown, so these
        # are calls whose callers already gave up), then the hooks.
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()))
        try:
            await _stop(self.conn, self.plugin)
        finally:
            if self.done is not None and not self.done.done():
                self.done.set_result(None)


# The kind bases (they build on Plugin and Host, defined above).
from .kinds import (AdapterPlugin, Context, EnginePlugin, SignalPlugin,  # noqa: E402
                    StrategyPlugin, UtilityPlugin)
