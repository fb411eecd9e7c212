"""Servers in a plugin: the listening sockets plugd binds for it (``[listen]``).

A plugin keeps its own network namespace and makes no inet socket: plugd binds each
``[listen]`` address itself and hands the sockets over the systemd way (``LISTEN_FDS``,
``LISTEN_FDNAMES``, ``LISTEN_PID``, from descriptor 3). A hot update gives the new
instance the same sockets, so no connection is refused while versions change.

Serve *every* socket :func:`listen_sockets` returns: with a ``[health]`` check over HTTP
or TCP one of them (named ``plugd-health``) is this instance's private probe socket.

For an ASGI app (FastAPI, Starlette) one call does it::

    self.server = await plugd_plugin.serving.start_asgi(app)   # in async on_start
    await self.server.stop()                                    # in async on_stop

For plain asyncio: ``await asyncio.start_server(handle, sock=s)`` for each socket.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
import sys
from typing import Any

_FIRST_FD = 3
_sockets: list[socket.socket] | None = None
_names: list[str] = []


def listen_sockets() -> list[socket.socket]:
    """The listening sockets plugd handed to this process, in ``[listen]`` order (then the
    health probe's); empty when there are none. The same objects on every call."""
    global _sockets, _names
    if _sockets is not None:
        return list(_sockets)
    _sockets = []
    count = os.environ.get("LISTEN_FDS", "")
    pid = os.environ.get("LISTEN_PID")
    if not count.isdigit() or (pid is not None and pid != str(os.getpid())):
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for i in range(int(count)):
        _sockets.append(socket.socket(fileno=_FIRST_FD + i))
        _names.append(names[i] if i < len(names) else "")
    return list(_sockets)


def listen_names() -> list[str]:
    """The ``LISTEN_FDNAMES`` of :func:`listen_sockets` (``tcp``, ``unix``, ``plugd-health``)."""
    listen_sockets()
    return list(_names)


class Served:
    """An ASGI app served on the handed sockets; :meth:`stop` ends it gracefully."""

    def __init__(self, server: Any, task: asyncio.Task[Any]) -> None:
        self.server = server
        self.task = task

    async def stop(self, drain: float = 2.0) -> None:
        """Stops accepting (connections still queued go to the next instance, which has
        the same sockets), waits until every connection accepted just before has its
        request under way (at most ``drain`` seconds: uvicorn's shutdown closes a
        connection that has none at once, which its client sees as a reset), lets open
        requests finish, and returns when it is done."""
        for server in getattr(self.server, "servers", []):
            server.close()
        loop = asyncio.get_running_loop()
        until = loop.time() + drain
        state = getattr(self.server, "server_state", None)
        if state is not None:
            _spare_unread_connections(state, loop, until)
        await asyncio.sleep(0.05)
        while state is not None and loop.time() < until:
            if not any(_unread(c) for c in state.connections):
                break
            await asyncio.sleep(0.01)
        self.server.should_exit = True
        await self.task


def _unread(connection: Any) -> bool:
    """Whether uvicorn has not read a request on ``connection`` yet (its protocols have no
    request cycle until then)."""
    return getattr(connection, "cycle", True) is None


def _spare_unread_connections(state: Any, loop: asyncio.AbstractEventLoop,
                              until: float) -> None:
    """Makes uvicorn's shutdown of a connection whose request it has not read yet wait for
    that request (until ``until``) instead of closing it at once. Such a connection can
    still turn up after :meth:`Served.stop` looked: one accepted just before the server
    closed whose protocol the event loop sets up late (a busy machine); closed with the
    request unread, its client would see a reset. Patches the connections' protocol
    classes in this process, which is stopping anyway."""
    classes = {type(c) for c in state.connections}
    # The classes of connections not made yet: uvicorn's HTTP protocols (each needs its
    # parser installed).
    for module, name in (("uvicorn.protocols.http.h11_impl", "H11Protocol"),
                         ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol")):
        try:
            classes.add(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    for cls in classes:
        original = cls.__dict__.get("_plugd_shutdown") or getattr(cls, "shutdown", None)
        if original is None:
            continue

        def shutdown(self: Any, original: Any = original) -> None:
            transport = getattr(self, "transport", None)
            closing = transport is None or transport.is_closing()
            if _unread(self) and not closing and loop.time() < until:
                loop.call_later(0.01, self.shutdown)
                return
            original(self)

        cls._plugd_shutdown = original
        cls.shutdown = shutdown


async def start_asgi(app: Any, **config: Any) -> Served:
    """Serves ``app`` with uvicorn on every handed socket; returns once it accepts.

    ``config`` goes to ``uvicorn.Config`` (``log_level``, ``timeout_keep_alive``, …).
    Raises ``RuntimeError`` when the manifest has no ``[listen]``.
    """
    import uvicorn  # type: ignore[import-not-found, unused-ignore]

    sockets = listen_sockets()
    if not sockets:
        raise RuntimeError(
            "plugd handed this plugin no listening socket: add [listen] tcp = "
            "[\"127.0.0.1:8000\"] to its manifest (or \"listen\": {\"tcp\": [...]} in "
            "plugin.json)")
    config.setdefault("log_level", "info")
    server = uvicorn.Server(uvicorn.Config(app, **config))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=sockets))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn ended before it started serving")
        await asyncio.sleep(0.01)
    return Served(server, task)


_HINT = (
    "plugd: this plugin's sandbox refuses inet sockets (sandbox.network = \"none\"); to "
    "serve, list the address under [listen] in the manifest and serve "
    "plugd_plugin.serving.listen_sockets(); for outbound traffic set "
    "sandbox.network = \"host\"\n")


def install_inet_hint() -> None:
    """Says, once, which manifest key allows it when the sandbox refuses the plugin an inet
    socket (the refusal itself is the kernel's; this only explains it, from the one place
    every socket is made: ``socket.socket.__init__``)."""
    if os.environ.get("PLUGD_NETWORK") != "none":
        return
    made = socket.socket.__init__
    hinted = False

    def init(self: socket.socket, family: Any = -1, type: Any = -1, proto: int = -1,
             fileno: Any = None) -> None:
        nonlocal hinted
        try:
            made(self, family, type, proto, fileno)
        except PermissionError:
            inet = family in (socket.AF_INET, socket.AF_INET6) or family == -1
            if fileno is None and inet and not hinted:
                hinted = True
                sys.stderr.write(_HINT)
            raise

    socket.socket.__init__ = init  # type: ignore[method-assign]
