"""A router in this very process, on its own event-loop thread: no Ray.

A config whose engines are all external (`replicas.count: 0`, one router, no cluster
address) needs nothing from Ray: starting GCS, a raylet and their monitors to proxy
HTTP costs memory and a steady share of a core while idle. `InProcessRouter` runs the
same `RouterService` here instead, and answers the same calls the Ray actor does.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

from kvroute.events.curve import CurveKeyPair
from kvroute.router.config import Config
from kvroute.router.service.router_service import RouterService

CALL_TIMEOUT_S = 120.0


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (less CPU per request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class InProcessRouter:
    """One `RouterService` on a daemon thread's event loop. `call(method, *args)` runs
    one of its methods there (awaiting it if it is a coroutine) and returns the result,
    or raises TimeoutError after `timeout_s`."""

    def __init__(self, config: Config, curve: CurveKeyPair | None, http: bool = True) -> None:
        self._loop = new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kvroute-router", daemon=True
        )
        self._thread.start()

        async def build() -> RouterService:
            return RouterService(
                config, serve_http=http, curve=curve, api_keys=config.router.api_keys()
            )

        try:
            self.service = self._run(build(), CALL_TIMEOUT_S)
            self.url: str | None = self.call("ready")
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coroutine: Any, timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    def call(self, method: str, *args: Any, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        function = getattr(self.service, method)

        async def invoke() -> Any:
            result = function(*args)
            return await result if inspect.isawaitable(result) else result

        return self._run(invoke(), timeout_s)

    def stop(self) -> None:
        """Shut the service down (HTTP, event streams, engine connections), then the loop."""
        try:
            self.call("shutdown", timeout_s=30.0)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30.0)
        if not self._thread.is_alive():
            self._loop.close()
