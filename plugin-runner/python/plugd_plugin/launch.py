"""``python -m plugd_plugin.launch module:Class``: serves the class a manifest names.

(``--script main.py`` runs a script plugin, which calls ``serve()`` itself; an import that
fails before it does — a package missing from requirements.txt, a file the sandbox does
not let it read — fails its load with the reason, instead of a bare exit status.)

plugd runs this for ``entrypoint = "plugin:HedgeV2"`` (or ``plugin.HedgeV2``, or a
plugin.json ``class_path``) in the plugin's own virtualenv, in the plugin folder: no
``main.py`` and no ``serve()`` call of the plugin author's. The class is made at load time
(with ``config=`` when its ``__init__`` takes a ``config``), its hooks (``on_load``,
``on_start``, ``on_stop``, plain or ``async def``, with or without the config argument)
are called, and its methods are served by name: every public method of a class that is
not a :class:`plugd_plugin.Plugin`, or of one of the kind bases in
:mod:`plugd_plugin.kinds`; the ``@method``-marked ones (and ``exports``) of any other
``Plugin``. A class that cannot be imported still answers the handshake, and its load
fails with the import error as the reason plugd shows.
"""

from __future__ import annotations

import importlib
import inspect
import os
import runpy
import sys
from typing import Any, Callable

from . import Plugin, PluginError, _from_hints, _Handler, _started, serve
from .kinds import Context

_HOOKS = frozenset({"on_load", "on_start", "on_stop", "on_shutdown", "restore_state",
                    "on_notify"})


def _fit(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Calls ``fn`` with as many of ``args`` as it takes (``on_load(self)`` or
    ``on_load(self, config)``, a method with no argument or one), and ``kw`` (a call's
    ``cfg``, only ever passed to a method that declares it)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return fn(*args, **kw)
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return fn(*args, **kw)
    positional = [p for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in kw]
    return fn(*args[:len(positional)], **kw)


def _served(cls: type) -> dict[str, tuple[str, Any, Any, Any]]:
    """The methods of ``cls`` to serve: name → (attribute, function, args schema, returns)."""
    found: dict[str, tuple[str, Any, Any, Any]] = {}
    is_plugin = isinstance(cls, type) and issubclass(cls, Plugin)
    public = not is_plugin or getattr(cls, "expose_public", False)
    # A Plugin subclass inherits the SDK's own API (register, schema_of, …), which is not
    # served; a plain class's methods are its own, whatever their names.
    base_api = set(dir(Plugin)) if is_plugin else set()
    for attr in dir(cls):
        fn = getattr(cls, attr, None)
        if not inspect.isfunction(fn):
            continue
        mark = getattr(fn, "_plugd_method", None)
        if mark is not None:
            name, args, returns = mark
            found[name] = (attr, fn, args, returns)
        elif public and not attr.startswith("_") and attr not in _HOOKS and attr not in base_api:
            found[attr] = (attr, fn, None, None)
    for attr in getattr(cls, "exports", ()) if is_plugin else ():
        found.setdefault(attr, (attr, getattr(cls, attr), None, None))
    return found


class ClassPlugin(Plugin):
    """Serves an instance of ``cls``, made at ``on_load``."""

    def __init__(self, cls: type, version: str | None = None) -> None:
        self.cls = cls
        self.obj: Any = None
        context = set(getattr(cls, "context_methods", ()))
        extra: dict[str, _Handler] = {}
        for name, (attr, fn, args, returns) in _served(cls).items():
            handler = _from_hints(fn, args, returns)
            handler.fn = self._delegate(attr, fn, attr in context)
            # A Context argument is not data: its type hint says nothing of the wire.
            if attr in context:
                handler.args, handler.arg_type = None, None
            extra[name] = handler
        self.__dict__["_plugd_extra"] = extra
        # Hooks take the shape of the class's own: async where it is async (then the
        # plugin is served on asyncio).
        for hook in ("on_load", "on_start", "on_stop"):
            own = getattr(cls, hook, None)
            if inspect.iscoroutinefunction(own):
                setattr(self, hook, getattr(self, "_a" + hook))

    def _delegate(self, attr: str, fn: Any, wants_ctx: bool) -> Callable[..., Any]:
        # ``kw`` is the call's ``cfg``, passed only when the method declares it.
        def arg_of(arg: Any) -> Any:
            return Context(arg, self.host) if wants_ctx else arg

        if inspect.isasyncgenfunction(fn):
            async def stream(arg: Any, **kw: Any) -> Any:
                async for piece in _fit(getattr(self.obj, attr), arg_of(arg), **kw):
                    yield piece
            return stream
        if inspect.iscoroutinefunction(fn):
            async def later(arg: Any, **kw: Any) -> Any:
                return await _fit(getattr(self.obj, attr), arg_of(arg), **kw)
            return later

        def now(arg: Any, **kw: Any) -> Any:
            return _fit(getattr(self.obj, attr), arg_of(arg), **kw)
        return now

    def _make(self, config: dict[str, Any]) -> None:
        try:
            params = inspect.signature(self.cls).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        takes_config = "config" in params or any(
            p.kind == p.VAR_KEYWORD for p in params.values())
        self.obj = self.cls(config=config) if takes_config else self.cls()
        try:
            self.obj.host = self.host
        except AttributeError:
            pass  # a class with __slots__ does without

    def _hook(self, name: str, *args: Any) -> Any:
        fn = getattr(self.obj, name, None)
        return None if fn is None else _fit(fn, *args)

    def on_load(self, config: dict[str, Any]) -> None:
        self._make(config)
        self._hook("on_load", config)

    async def _aon_load(self, config: dict[str, Any]) -> None:
        self._make(config)
        await self._hook("on_load", config)

    def on_start(self) -> None:
        self._hook("on_start")

    async def _aon_start(self) -> None:
        await self._hook("on_start")

    def on_stop(self) -> None:
        self._hook("on_stop")

    async def _aon_stop(self) -> None:
        await self._hook("on_stop")

    def on_shutdown(self) -> bytes | None:
        state: bytes | None = self._hook("on_shutdown")
        return state

    def restore_state(self, state: bytes) -> None:
        self._hook("restore_state", state)

    def on_notify(self, method_name: str, value: Any) -> None:
        self._hook("on_notify", method_name, value)


class _Unloadable(Plugin):
    """Stands in for a class that cannot be imported: the handshake completes, and the
    load fails with the reason (plugd shows it as the plugin's "load failed")."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def on_load(self, config: dict[str, Any]) -> None:
        raise PluginError(self.reason)


def _import_failure(what: str, e: BaseException) -> str:
    """Why ``what`` could not be imported, and what to change."""
    here = os.getcwd()
    if isinstance(e, PermissionError):
        # The jail lets a plugin read its folder, its venv and what the manifest grants.
        return ("cannot import %s from %s: %s cannot be read inside the plugin's sandbox "
                "(%s); if the plugin needs it, add its folder to sandbox.read_paths in the "
                "manifest" % (what, here, e.filename or "a file it needs", e.strerror))
    return ("cannot import %s from %s: %s: %s (check the manifest's entrypoint, and "
            "requirements.txt for the packages it imports)" % (what, here, type(e).__name__, e))


def _the_plugin_class(own: list[type]) -> list[type]:
    """Of the classes a module defines (its models and helpers too), the plugin: the
    first rule that leaves exactly one wins — a subclass of a plugd base class; the class
    whose ``id`` or ``name`` is the plugin's name; one named ``…Plugin``; one with a
    lifecycle hook; the only class."""
    me = os.environ.get("PLUGD_PLUGIN_NAME", "")
    rules: list[Callable[[type], bool]] = [
        lambda c: issubclass(c, Plugin),
        lambda c: me != "" and me in (getattr(c, "id", None), getattr(c, "name", None)),
        lambda c: c.__name__.endswith("Plugin"),
        lambda c: any(callable(getattr(c, h, None)) for h in ("on_load", "on_start")),
    ]
    for rule in rules:
        found = [c for c in own if rule(c)]
        if len(found) == 1:
            return found
    return own


def load(target: str) -> Plugin | None:
    """The plugin for ``module:Class``, or a stand-in that fails its load saying why; None
    when importing the module served it already (a module that calls ``serve()`` itself)."""
    module_name, _, class_name = target.partition(":")
    here = os.getcwd()
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        if _started():
            raise
        return _Unloadable(_import_failure(module_name, e))
    if _started():
        return None
    if class_name == "*":
        # A single-file plugin: the one class its module defines (a plugd base class's
        # subclass first, when it defines several).
        own = [c for c in vars(module).values()
               if isinstance(c, type) and c.__module__ == module.__name__]
        pick = _the_plugin_class(own)
        if len(pick) != 1:
            return _Unloadable("%s defines %s classes (%s); a single-file plugin defines one, "
                               "or marks its plugin class (a plugd_plugin base class, or a "
                               "name ending in Plugin)"
                               % (getattr(module, "__file__", module_name),
                                  len(own) or "no", ", ".join(c.__name__ for c in own)))
        return ClassPlugin(pick[0])
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        return _Unloadable("module %s (%s) has no class %s; the manifest's entrypoint names it"
                           % (module_name, getattr(module, "__file__", here), class_name))
    return ClassPlugin(cls)


def run_script(path: str) -> None:
    """Runs the script plugin ``path`` as ``__main__``; an import that fails before it
    calls ``serve()`` is answered with a load failure that says why."""
    sys.argv = [path]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        runpy.run_path(path, run_name="__main__")
    except (ImportError, PermissionError) as e:
        if _started():
            raise
        serve(_Unloadable(_import_failure(path, e)))


def main() -> None:
    """Entry point of ``python -m plugd_plugin.launch module:Class`` (or ``--script
    main.py``)."""
    if len(sys.argv) == 3 and sys.argv[1] == "--script":
        run_script(sys.argv[2])
        return
    if len(sys.argv) != 2 or ":" not in sys.argv[1]:
        sys.stderr.write("usage: python -m plugd_plugin.launch module:Class | --script main.py\n")
        raise SystemExit(2)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    plugin = load(sys.argv[1])
    if plugin is not None:
        serve(plugin)


if __name__ == "__main__":
    main()
