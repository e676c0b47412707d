"""Real processes for fault tests: `sinkserve serve` (tritonserver with the engine, and
the gateway) or a lone `sinkserve gateway`, on free loopback ports, and the tools to kill
parts of them and to watch health while they recover."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import cluster
from service.triton.launcher import free_port

SINKSERVE = str(Path(sys.executable).with_name("sinkserve"))
TOKENS = "alice:alice-token\nbob:bob-token\n"
# Small and quick on 2 cores; a window long enough that the tests' turns never evict.
PARAMETERS = {
    "sinks": "4",
    "window": "252",
    "max_sessions": "4",
    "max_new_tokens": "64",
    "step_token_budget": "64",
}
SERVING = health_pb2.HealthCheckResponse.SERVING


def model_repository(root: Path, **overrides: str) -> Path:
    """A copy of the model repository with `PARAMETERS` (and `overrides`)."""
    return cluster.model_repository(root, **{**PARAMETERS, **overrides})


def process_tree(root: int) -> dict[int, str]:
    """pid -> command name of `root` and all its living descendants (from /proc)."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if state != "Z":  # a dead child its parent has not reaped (a killed stub)
            parents[int(entry.name)] = (int(ppid), name)
    tree = {root: parents.get(root, (0, "?"))[1]}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, name) in parents.items():
            if ppid in tree and pid not in tree:
                tree[pid] = name
                grew = True
    return tree


@dataclass
class Process:
    """One sinkserve command as a child process, its output in `log`."""

    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [SINKSERVE, "--log-json", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )

    def child(self, name: str) -> int:
        """The pid of the one descendant whose command name starts with `name`."""
        assert self.proc is not None
        found = [p for p, n in process_tree(self.proc.pid).items() if n.startswith(name)]
        assert len(found) == 1, (name, process_tree(self.proc.pid))
        return found[0]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        # Whatever of its process group is left (a test failed midway) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait() if rc is None else rc


@dataclass
class Stack:
    """`sinkserve serve` on free ports with a session store of the test's choosing."""

    root: Path
    store: str
    port: int = field(default_factory=free_port)
    triton_grpc: int = field(default_factory=free_port)
    triton_metrics: int = field(default_factory=free_port)
    process: Process | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def triton_url(self) -> str:
        return f"127.0.0.1:{self.triton_grpc}"

    def start(self) -> None:
        tokens = self.root / "tokens"
        tokens.write_text(TOKENS)
        repo = self.root / "model_repo"
        if not repo.exists():
            model_repository(self.root)
        args = [
            "serve",
            f"--port={self.port}",
            f"--metrics-port={free_port()}",
            f"--model-repository={repo}",
            f"--triton-grpc-port={self.triton_grpc}",
            f"--triton-http-port={free_port()}",
            f"--triton-metrics-port={self.triton_metrics}",
            f"--tokens-file={tokens}",
            f"--session-store={self.store}",
        ]
        self.process = Process(args, self.root / "serve.log")
        self.process.start()

    def stop(self) -> int:
        assert self.process is not None
        return self.process.stop()

    def metric(self, name: str) -> float | None:
        """A sinkserve metric on Triton's metrics port (None when absent)."""
        url = f"http://127.0.0.1:{self.triton_metrics}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        m = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, flags=re.M)
        return float(m.group(1)) if m else None


async def health(target: str) -> int | None:
    """The gateway's overall health status, or None when it does not answer."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.aio.AioRpcError:
            return None
        return int(reply.status)


async def wait_health(target: str, serving: bool, timeout_s: float) -> float:
    """The time (time.monotonic) at which health was seen to be (or not be) SERVING;
    fails after `timeout_s`."""
    start = time.monotonic()
    while ((await health(target)) == SERVING) != serving:
        assert time.monotonic() - start < timeout_s, f"health not {serving} in {timeout_s}s"
        await asyncio.sleep(0.05)
    return time.monotonic()
