"""Client Manager Service: a FastAPI app that runs its own uvicorn server.

Ported as its authors wrote it for their runtime (plugin.json with ``class_path``, a
class with async ``on_load``/``on_start``/``on_stop``), with one change: uvicorn serves
the socket plugd binds for it (``listen`` in plugin.json) instead of binding
``0.0.0.0:10000`` itself. The plugin keeps its own network namespace, a hot update hands
the same socket to the new version (no refused connection), and plugd's ``health``
check (``GET /health``) decides when it is ready and restarts it when it wedges.
"""

import asyncio
import os

from fastapi import FastAPI

from plugd_plugin import serving

VERSION = os.environ.get("PLUGD_PLUGIN_VERSION", "dev")


def create_app(state: dict) -> FastAPI:
    app = FastAPI(title="client-manager")

    @app.get("/health")
    async def health() -> dict:
        if state["wedged"]:
            await asyncio.Event().wait()  # a wedged server: alive, answering nothing
        return {"status": "ok"}

    @app.get("/api/clients")
    async def clients() -> dict:
        return {"clients": sorted(state["clients"]), "version": VERSION}

    @app.post("/api/clients/{name}")
    async def add(name: str) -> dict:
        state["clients"].add(name)
        return {"added": name, "version": VERSION}

    @app.post("/debug/wedge")
    async def wedge() -> dict:
        # Simulates the bug the port found: the app stops answering while the process
        # (and its event loop) lives on. Only a health check notices.
        state["wedged"] = True
        return {"wedged": True}

    return app


class ClientManagerPlugin:
    def __init__(self, config=None):
        self.config = config or {}
        self._state = {"clients": set(), "wedged": False}
        self._app = None
        self._server = None

    async def on_load(self):
        self._app = create_app(self._state)

    async def on_start(self):
        self._server = await serving.start_asgi(self._app, log_level="warning")

    async def on_stop(self):
        if self._server:
            await self._server.stop()

    def clients(self) -> list:
        """The connected clients (also at GET /api/clients)."""
        return sorted(self._state["clients"])
