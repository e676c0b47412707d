"""Fuzz the real servers for a given time: many more cases than CI runs.

Starts its own tritonserver (the real model, configured as tests/gateway/conftest.py's
`triton_url` fixture configures it, with a SQLite session store in a temp dir) and a
gateway in front of it, then runs batches of generated cases of every family in turn (the
strategies and checks of tests/gateway/fuzz_requests.py and tests/triton/fuzz_tensors.py):
session calls, undecodable bytes, streams without turns, conversations, another caller's
ids, and the model's tensors. Batch k of a run started with `--seed s` uses Hypothesis seed
s + k, so a failure is replayed with the same seed. A failing batch is shrunk to a minimal
case (unless --no-shrink), recorded, and the run goes on with fresh fuzzers.

It stops by itself: once --minutes have passed no batch starts, and the cases left of the
batch running are skipped (a case already running finishes, within its own deadline).

Prints one JSON line at the end (cases, turns, counts by status code and by family,
failures with their seeds) and writes it to bench/results/fuzz-cpu-<cores>core.json.
Run: PYTHONPATH=. .venv/bin/python bench/fuzz.py [--minutes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from tqdm import tqdm

from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.engine.weights import default_model_path
from sinkserve.gateway.auth import Authenticator
from sinkserve.gateway.config import GatewayConfig
from sinkserve.gateway.server import Gateway
from sinkserve.triton_server.launcher import TritonServer
from tests.gateway.conftest import (
    E2E_MAX_SESSIONS,
    E2E_MAX_SESSIONS_PER_OWNER,
    REPO_ROOT,
    TOKENS,
    set_parameter,
    wait_serving,
)
from tests.gateway.fuzz_requests import (
    SETTLE_S,
    GatewayFuzzer,
    Tally,
    TokenCounter,
    chat_cases,
    chat_timeout,
    cross_cases,
    fuzz,
    read_limits,
    unary_cases,
    unary_timeout,
    wire_cases,
)
from tests.triton.fuzz_tensors import HIGH_STREAM, TensorFuzzer, tensor_cases

MAX_MINUTES = 24 * 60.0
MAX_TURN_CHARS = 3000  # as tests/gateway/test_fuzz.py
FAMILIES = ("unary", "wire", "streams", "turns", "cross", "tensors")


@dataclass
class Run:
    """What the run found, over all its batches."""

    tally: Tally = field(default_factory=Tally)
    by_family: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    batches: int = 0


def start_triton(state: Path) -> TritonServer:
    """tritonserver with the real model, configured as the gateway tests' fixture does."""
    repo = state / "triton_model_repo"
    shutil.copytree(REPO_ROOT / "triton_model_repo", repo)
    config = repo / "sinkserve" / "config.pbtxt"
    text = set_parameter(config.read_text(), "max_sessions", str(E2E_MAX_SESSIONS))
    text = set_parameter(text, "max_sessions_per_owner", str(E2E_MAX_SESSIONS_PER_OWNER))
    text = set_parameter(text, "sampling", "greedy")
    config.write_text(text)
    store = f"sqlite://{state / 'sessions.sqlite3'}"
    return TritonServer(model_repository=repo, log_path=state / "triton.log", session_store=store)


class Fuzzers:
    """The gateway fuzzer and the tensor fuzzer, made again after a failure (a failing
    case may leave their records of what each caller holds behind the truth)."""

    def __init__(self, target: str, triton_url: str, counter: TokenCounter, tally: Tally) -> None:
        self._args = (target, triton_url, counter, tally)
        self.gateway: GatewayFuzzer | None = None
        self.tensors: TensorFuzzer | None = None

    async def fresh(self) -> None:
        await self.close()
        target, triton_url, counter, tally = self._args
        limits = await read_limits(triton_url, MAX_TURN_CHARS, 1 << 20)
        self.gateway = GatewayFuzzer(target, triton_url, limits, counter, tally)
        await self.gateway.start()
        self.tensors = TensorFuzzer(triton_url, tally)
        await self.tensors.start()

    async def close(self) -> None:
        if self.gateway is not None:
            await self.gateway.close()
        if self.tensors is not None:
            await self.tensors.close()
        self.gateway = self.tensors = None


async def batch(
    fuzzers: Fuzzers, family: str, examples: int, seed: int, stop_at: float, shrink: bool
) -> None:
    """One batch of `family`; cases drawn after `stop_at` are skipped."""
    gateway, tensors = fuzzers.gateway, fuzzers.tensors
    assert gateway is not None and tensors is not None
    runs: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], Awaitable[None]], Any]] = {
        "unary": (unary_cases(), gateway.unary, unary_timeout),
        "wire": (wire_cases(), gateway.wire, unary_timeout),
        "streams": (chat_cases(gateway.limits, turns=False), gateway.chat, chat_timeout),
        "turns": (chat_cases(gateway.limits, turns=True), gateway.chat, chat_timeout),
        "cross": (cross_cases(), gateway.cross, unary_timeout),
        "tensors": (
            tensor_cases(tensors.specs, tensors.outputs, tensors.limits),
            tensors.run,
            lambda _: HIGH_STREAM + 3 * SETTLE_S,
        ),
    }
    strategy, run_case, timeout_s = runs[family]

    async def bounded(case: Any) -> None:
        if time.monotonic() < stop_at:
            await run_case(case)

    await fuzz(
        strategy, bounded, examples=examples, timeout_s=timeout_s, random_seed=seed, shrink=shrink
    )
    if time.monotonic() < stop_at:
        await (tensors.check_batch() if family == "tensors" else gateway.check_batch())


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    run = Run()
    seconds = args.minutes * 60.0
    with (
        tempfile.TemporaryDirectory(prefix="sinkserve-fuzz-") as tmp,
        start_triton(Path(tmp)) as triton,
    ):
        config = GatewayConfig(
            port=0, metrics_port=-1, triton_url=triton.grpc_url, max_turn_chars=MAX_TURN_CHARS
        )
        gateway = Gateway(config, Authenticator(TOKENS))
        await gateway.start()
        target = f"127.0.0.1:{gateway.port}"
        await wait_serving(target)
        counter = TokenCounter(Tokenizer.load(default_model_path()))
        fuzzers = Fuzzers(target, triton.grpc_url, counter, run.tally)
        await fuzzers.fresh()
        started = time.monotonic()
        stop_at = started + seconds
        progress = tqdm(total=round(seconds), unit="s", desc="fuzz", dynamic_ncols=True)
        try:
            while time.monotonic() < stop_at:
                family = FAMILIES[run.batches % len(FAMILIES)]
                seed = args.seed + run.batches
                before = run.tally.cases
                try:
                    await batch(fuzzers, family, args.batch, seed, stop_at, not args.no_shrink)
                except Exception as exc:  # a failing case (AssertionError) or a broken server
                    # Hypothesis adds the minimal falsifying example as a note.
                    notes = "\n".join(getattr(exc, "__notes__", []))
                    message = f"{type(exc).__name__}: {exc}\n{notes}".strip()
                    run.failures.append({"family": family, "seed": seed, "error": message[:4000]})
                    tqdm.write(f"[{family} seed {seed}] {message[:300]}")
                    try:
                        await fuzzers.fresh()
                    except Exception as broken:  # the servers no longer answer: stop here
                        run.failures.append({"family": "-", "seed": seed, "error": repr(broken)})
                        break
                run.by_family[family] = run.by_family.get(family, 0) + run.tally.cases - before
                run.batches += 1
                progress.update(min(round(time.monotonic() - started), round(seconds)) - progress.n)
                progress.set_postfix(cases=run.tally.cases, failures=len(run.failures))
        finally:
            progress.close()
            await fuzzers.close()
            await gateway.stop(grace_s=0)
        wall = time.monotonic() - started
    return {
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "cores": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "minutes": args.minutes,
        "wall_s": round(wall, 1),
        "seed": args.seed,
        "batch": args.batch,
        "batches": run.batches,
        "cases": run.tally.cases,
        "turns_answered": run.tally.turns,
        "by_code": run.tally.by_code(),
        "by_family": run.by_family,
        "by_family_and_code": dict(sorted(run.tally.codes.items())),
        "failures": run.failures,
    }


def minutes(value: str) -> float:
    m = float(value)
    if not 0 < m <= MAX_MINUTES:
        raise argparse.ArgumentTypeError(f"--minutes must be in (0, {MAX_MINUTES:g}]")
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=minutes, default=10.0, help="how long to fuzz (default 10)")
    ap.add_argument("--batch", type=int, default=40, help="cases per batch (default 40)")
    ap.add_argument("--seed", type=int, default=0, help="Hypothesis seed of the first batch")
    ap.add_argument("--no-shrink", action="store_true", help="record failures unshrunk")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    result = asyncio.run(soak(args))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fuzz-cpu-{os.cpu_count()}core.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
