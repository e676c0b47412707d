"""Real processes for fault tests: `sinkserve serve` (sinkserve.cluster.Replica) on free
loopback ports with a small model configuration, and the tools to find the processes
under it, read its metrics and watch its health while it recovers."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path

from sinkserve import cluster
from sinkserve.cluster import SINKSERVE, Child, Replica

TOKENS = "alice:alice-token\nbob:bob-token\n"
# Small and quick on 2 cores; a window long enough that the tests' turns never evict.
PARAMETERS = {
    "sinks": "4",
    "window": "252",
    "max_sessions": "4",
    "max_new_tokens": "64",
    "step_token_budget": "64",
    # Replies after a fault must equal those without it: greedy, no penalty.
    "sampling": "greedy",
}


def model_repository(root: Path, **overrides: str) -> Path:
    """A copy of the model repository with `PARAMETERS` (and `overrides`)."""
    return cluster.model_repository(root, **{**PARAMETERS, **overrides})


def tokens_file(root: Path) -> Path:
    path = root / "tokens"
    path.write_text(TOKENS)
    return path


def stack(root: Path, store: str) -> Replica:
    """`sinkserve serve` in `root` (its log: root/stack.log) with callers alice and bob."""
    return Replica("stack", root, store, model_repository(root), tokens_file(root))


def gateway(root: Path, name: str, port: int, triton_url: str) -> Child:
    """A lone `sinkserve gateway` on `port` in front of the Triton at `triton_url`."""
    args = [SINKSERVE, "--log-json", "gateway", f"--port={port}", "--metrics-port=-1"]
    args += [f"--tokens-file={tokens_file(root)}", f"--triton-url={triton_url}"]
    return Child(args, root / f"{name}.log")


def metric(replica: Replica, name: str) -> float | None:
    """A sinkserve metric on the replica's Triton metrics port (None when absent)."""
    url = f"http://127.0.0.1:{replica.triton_metrics}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    m = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, flags=re.M)
    return float(m.group(1)) if m else None


async def wait_health(target: str, serving: bool, timeout_s: float) -> float:
    """The time (time.monotonic) at which health was seen to be (or not be) SERVING;
    fails after `timeout_s`."""
    start = time.monotonic()
    while (await cluster.serving(target)) != serving:
        assert time.monotonic() - start < timeout_s, f"health not {serving} in {timeout_s}s"
        await asyncio.sleep(0.05)
    return time.monotonic()
