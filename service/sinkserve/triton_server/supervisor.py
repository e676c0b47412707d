"""Keep a tritonserver and its model answering, without a person: restart tritonserver
when it exits, and reload the model when its Python-backend process has died.

Triton 2.51 neither restarts a dead Python-backend stub nor reports the model unready:
every request then fails with "Stub process ... is not healthy" until the model is loaded
again. Unloading and loading it starts a fresh stub, whose engine rebuilds each session
from the session store on its next turn. Only these two faults are acted on: a model
that a person unloaded stays unloaded, and a reload in progress is left alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from sinkserve.gateway.backend import TritonBackend
from sinkserve.triton_server.launcher import TritonLaunchError, TritonServer

log = structlog.get_logger("sinkserve.supervisor")
STUB_DEAD = "is not healthy"  # Triton's message for a model whose stub process died


class Supervisor:
    """Watches one `TritonServer` (already started) and repairs it; see the module doc."""

    def __init__(self, server: TritonServer, *, interval_s: float = 0.5) -> None:
        self.server = server
        self.interval_s = interval_s
        self.recoveries = 0

    async def run(self, stopping: Callable[[], bool]) -> None:
        """Probe every `interval_s` until `stopping()` is true."""
        # Long enough to hear Triton's own verdict on a dead stub (it waits about 1 s).
        backend = TritonBackend(self.server.grpc_url, self.server.models[0], probe_timeout_s=5.0)
        try:
            while not stopping():
                await self._check(backend, stopping)
                await asyncio.sleep(self.interval_s)
        finally:
            await backend.close()

    async def _check(self, backend: TritonBackend, stopping: Callable[[], bool]) -> None:
        proc = self.server.process
        if proc is not None and proc.poll() is not None and not stopping():
            await self._recover("tritonserver exited", self._restart, code=proc.returncode)
            return
        why = await backend.ready()
        if why is not None and STUB_DEAD in why and not stopping():
            await self._recover("the model's process died", lambda: self._reload(backend))

    async def _recover(
        self, fault: str, repair: Callable[[], Awaitable[None]], **facts: object
    ) -> None:
        started = time.monotonic()
        log.warning("recovering", fault=fault, **facts)
        try:
            await repair()
        except (TritonLaunchError, OSError, RuntimeError) as exc:
            log.error("recovery failed; retrying", fault=fault, error=str(exc))
            return
        self.recoveries += 1
        log.info("recovered", fault=fault, seconds=round(time.monotonic() - started, 2))

    async def _restart(self) -> None:
        """Start tritonserver again on the same ports (they were fixed at the first start)."""
        self.server.stop()
        await asyncio.to_thread(self.server.start)

    async def _reload(self, backend: TritonBackend) -> None:
        """Unload and load the model; a tritonserver that cannot is restarted."""
        try:
            await backend.reload()
        except Exception as exc:  # any failure of the repository API: restart the server
            log.warning("model reload failed; restarting tritonserver", error=str(exc))
            await self._restart()
