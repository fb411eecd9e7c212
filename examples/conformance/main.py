"""The SDK behaviours both SDKs must share, in Python.

Its twin in Rust is ``main.rs`` beside it; ``tests/conformance.rs`` drives both alike.
"""

from __future__ import annotations

from typing import Any

from plugd_plugin import Plugin, method, serve


class Conformance(Plugin):
    def on_load(self, config: dict[str, Any]) -> None:
        if config.get("fail_load"):
            raise RuntimeError("asked to fail in on_load")
        self.total = 0
        self.state: str | None = None
        self.last: str | None = None

    def restore_state(self, state: bytes) -> None:
        self.state = state.decode("utf-8", "replace")

    def on_notify(self, method_name: str, value: Any) -> None:
        self.last = method_name

    def on_shutdown(self) -> bytes:
        return str(self.total).encode()

    @method
    def bump(self, n: int) -> int:
        self.total += n
        return self.total

    @method
    def count(self, _: None) -> int:
        return self.total

    @method("state")
    def get_state(self, _: None) -> str | None:
        return self.state

    @method
    def last_notify(self, _: None) -> str | None:
        return self.last


serve(Conformance())
