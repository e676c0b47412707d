"""`sinkserve bench`: decode and prefill throughput, latency percentiles and peak memory.

Two targets run the same workload:
- `engine`: an `Engine` in this process (`Engine.submit`, timestamps taken in its callback);
- `e2e`: through the gRPC gateway and Triton. Without `--gateway`, a tritonserver (on a
  private copy of the model repository, with the engine settings given here) and a gateway
  are started on free 127.0.0.1 ports, and stopped at the end.

Workload, for each concurrency N in `--sessions`: N fresh sessions each send one raw-text
turn of about `--prompt-tokens` tokens at the same moment and generate `--new-tokens`
tokens (greedy). The aggregate decode rate counts the tokens that arrive while *all* N
sessions are decoding (from the last first-token to the first last-token), so queueing
of the prefills does not dilute it. Repeated `--repeats` times; medians are reported.
Prefill rate: one session, a `--prefill-tokens` prompt, one new token: prompt / TTFT.

Prints one JSON object; saves it and a PNG of aggregate tok/s against sessions under
`--out` (default bench/results/), named after target, device, cores, model and dtype.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import platform
import resource
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sinkserve.config import EngineConfig, add_engine_flags, engine_config

if TYPE_CHECKING:  # imported where used: torch loads only for an in-process engine
    from sinkserve.engine.engine import Engine

PASSAGE = (
    "The river runs past the old mill and under the stone bridge, where the children of "
    "the village gather each evening to watch the boats come home with the day's catch. "
)

Prompt = str | list[int]  # raw text, or token ids
Driver = Callable[[int, Prompt, int], Coroutine[Any, Any, list["Trace"]]]


@dataclass
class Trace:
    """One turn as the client saw it: when it was sent, when each token arrived."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    deltas: int = 0  # messages the tokens came in (through the gateway)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 in milliseconds (nearest rank)."""
    if not values:
        return {}
    s = sorted(values)

    def rank(p: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))] * 1000

    return {
        "p50_ms": round(rank(50), 2),
        "p90_ms": round(rank(90), 2),
        "p99_ms": round(rank(99), 2),
    }


def steady_decode_rate(traces: Sequence[Trace]) -> float:
    """Tokens/s summed over sessions while all of them were decoding."""
    live = [t for t in traces if len(t.token_times) >= 2]
    if not live:
        return 0.0
    start = max(t.token_times[0] for t in live)
    end = min(t.token_times[-1] for t in live)
    if end <= start:  # not overlapping (one session, or too few tokens): per-session rates
        return sum((len(t.token_times) - 1) / (t.token_times[-1] - t.token_times[0]) for t in live)
    n = sum(sum(start < x <= end for x in t.token_times) for t in live)
    return n / (end - start)


def prompt_text(tokens: int) -> str:
    """Raw text of roughly `tokens` tokens (about 1.08 tokens per word for this passage)."""
    words = PASSAGE.split()
    n = max(1, round(tokens / 1.08))
    return " ".join(words[i % len(words)] for i in range(n))


# ---- targets ---------------------------------------------------------------------------


def engine_driver(engine: Engine) -> Driver:
    """Runs turns on an in-process Engine."""
    from sinkserve.engine.types import Event, SamplingParams, TokenEvent, TurnEnd

    async def run(n: int, prompt: Prompt, new_tokens: int) -> list[Trace]:
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        sids = [engine.open_session() for _ in range(n)]
        traces = [Trace(sent=0.0) for _ in range(n)]
        left = [n]
        done = threading.Event()

        def recorder(trace: Trace) -> Callable[[list[Event]], None]:
            def on_events(events: list[Event]) -> None:
                now = time.perf_counter()
                for e in events:
                    if isinstance(e, TokenEvent):
                        trace.token_times.append(now)
                    elif isinstance(e, TurnEnd):
                        trace.prompt_tokens = e.usage.prompt_tokens
                        left[0] -= 1
                        if not left[0]:
                            done.set()

            return on_events

        for sid, trace in zip(sids, traces, strict=True):
            trace.sent = time.perf_counter()
            engine.submit(sid, prompt, params, recorder(trace), raw=True)
        await asyncio.to_thread(done.wait)
        for sid in sids:
            engine.end_session(sid)
        return traces

    return run


def gateway_driver(target: str, token: str | None) -> Driver:
    """Runs turns through the gRPC gateway, one Chat stream per session."""
    from sinkserve.client import ChatClient, sampling

    async def one(client: ChatClient, prompt: str, new_tokens: int, go: asyncio.Event) -> Trace:
        # Greedy, no penalty, whatever the server's defaults: the engine-direct runs' work.
        params = sampling(max_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)
        async with client.conversation() as chat:
            await go.wait()
            trace = Trace(sent=time.perf_counter())
            async for delta in chat.send(prompt, raw=True, params=params):
                now = time.perf_counter()  # a delta may carry several tokens (StreamPacer)
                trace.token_times.extend(now for _ in delta.token_ids)
                trace.deltas += 1
            assert chat.last_turn is not None
            trace.prompt_tokens = chat.last_turn.usage.prompt_tokens
            await chat.end()
        return trace

    async def run(n: int, prompt: Prompt, new_tokens: int) -> list[Trace]:
        assert isinstance(prompt, str), "the gateway takes text"
        async with ChatClient(target, token) as client:
            go = asyncio.Event()
            tasks = [asyncio.create_task(one(client, prompt, new_tokens, go)) for _ in range(n)]
            await asyncio.sleep(0.2)  # every stream open before the turns start together
            go.set()
            return list(await asyncio.gather(*tasks))

    return run


# ---- the workload ----------------------------------------------------------------------


async def measure(drivers: dict[str, Driver], args: argparse.Namespace) -> dict[str, Any]:
    """Run the workload on each driver, interleaved (every repeat of every N runs on each
    driver back to back, the order alternating), so machine noise hits all of them."""
    prompt = prompt_text(args.prompt_tokens)
    for driver in drivers.values():
        await driver(1, prompt, 4)  # warm-up
    names = list(drivers)
    raw: dict[str, dict[str, list[list[Trace]]]] = {k: {} for k in names}
    for n in args.sessions:
        for rep in range(args.repeats):
            for name in names if rep % 2 == 0 else names[::-1]:
                traces = await drivers[name](n, prompt, args.new_tokens)
                raw[name].setdefault(str(n), []).append(traces)
    long_prompt = prompt_text(args.prefill_tokens)
    prefill: dict[str, list[Trace]] = {k: [] for k in names}
    for _ in range(args.repeats):
        for name in names:
            prefill[name] += await drivers[name](1, long_prompt, 1)
    return {name: summarize(raw[name], prefill[name]) for name in names}


def summarize(runs: dict[str, list[list[Trace]]], prefill: list[Trace]) -> dict[str, Any]:
    by_n: dict[str, Any] = {}
    for n, repeats in runs.items():
        rates = [steady_decode_rate(traces) for traces in repeats]
        flat = [t for traces in repeats for t in traces]
        by_n[n] = {
            "decode_tok_s": round(statistics.median(rates), 2),
            "decode_tok_s_runs": [round(r, 2) for r in rates],
            "prompt_tokens": flat[0].prompt_tokens,
            "ttft": percentiles([t.ttft for t in flat if t.token_times]),
            "itl": percentiles([b - a for t in flat for a, b in itertools.pairwise(t.token_times)]),
        }
        if deltas := sum(t.deltas for t in flat):
            by_n[n]["tokens_per_delta"] = round(sum(len(t.token_times) for t in flat) / deltas, 2)
    return {
        "single_session_decode_tok_s": by_n.get("1", {}).get("decode_tok_s"),
        "aggregate_decode_tok_s": {n: r["decode_tok_s"] for n, r in by_n.items()},
        "prefill_tok_s": round(statistics.median(t.prompt_tokens / t.ttft for t in prefill), 1),
        "prefill_prompt_tokens": prefill[0].prompt_tokens,
        "by_sessions": by_n,
    }


def run_engine(config: EngineConfig, args: argparse.Namespace) -> dict[str, Any]:
    from sinkserve.engine.engine import Engine

    engine = Engine.load(config)
    machine = engine_roofline(engine, config.threads)
    engine.start()
    try:
        result: dict[str, Any] = asyncio.run(measure({"engine": engine_driver(engine)}, args))[
            "engine"
        ]
    finally:
        engine.shutdown()
    result["roofline"] = machine
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["peak_rss_of"] = "this process (engine + benchmark)"
    return result


def engine_roofline(engine: Engine, threads: int) -> dict[str, float] | None:
    """The machine's memory roofline for this engine's model (CPU runners; None on a GPU,
    where bench/gpu.py measures its own)."""
    import torch

    from sinkserve.engine.runner import TorchRunner
    from sinkserve.roofline import roofline

    runner = engine.runner
    if not isinstance(runner, TorchRunner) or runner.model.device.type != "cpu":
        return None
    return roofline(runner.model, threads or torch.get_num_threads())


def run_e2e(config: EngineConfig, args: argparse.Namespace) -> dict[str, Any]:
    if args.gateway:
        result = asyncio.run(_e2e(args.gateway, None, config, args))
        result["peak_rss_mb"] = None
        result["peak_rss_of"] = "unknown (external gateway)"
        return result
    from sinkserve.triton_server.launcher import TritonServer, default_model_repository

    with tempfile.TemporaryDirectory(prefix="sinkserve-bench-") as tmp:
        repo = Path(tmp) / "models"
        shutil.copytree(default_model_repository(), repo)
        budget = args.stream_responses_per_s
        adapter = {} if budget is None else {"stream_responses_per_s": str(budget)}
        write_engine_parameters(repo / "sinkserve" / "config.pbtxt", config, adapter)
        log = Path(tmp) / "triton.log"
        # A store of its own: the bench's sessions must not land in (or meet) the user's.
        store = f"sqlite://{Path(tmp) / 'sessions.sqlite3'}"
        with TritonServer(
            model_repository=repo, log_path=log, ready_timeout_s=600, session_store=store
        ) as triton:
            result = asyncio.run(_e2e(None, triton.grpc_url, config, args))
            assert triton.process is not None
            result["peak_rss_mb"] = round(tree_peak_rss_mb(triton.process.pid), 1)
            result["peak_rss_of"] = "tritonserver + its Python stub (engine), sum of peaks"
    return result


async def _e2e(
    gateway: str | None, triton_url: str | None, config: EngineConfig, args: argparse.Namespace
) -> dict[str, Any]:
    """The gateway's figures; unless --no-engine, an in-process engine with the same
    settings runs interleaved with it, for the ratio e2e / engine-direct."""
    from sinkserve.engine.engine import Engine
    from sinkserve.gateway.auth import Authenticator
    from sinkserve.gateway.config import GatewayConfig
    from sinkserve.gateway.server import Gateway

    engine = None if args.no_engine else Engine.load(config)
    machine = engine_roofline(engine, config.threads) if engine is not None else None
    gw = None
    if gateway is None:
        assert triton_url is not None
        most = max(args.sessions) + 8
        gw_config = GatewayConfig(
            port=0,
            metrics_port=-1,
            triton_url=triton_url,
            auth_disabled=True,
            max_streams_per_caller=most,
            max_turns_per_caller=most,
            health_interval_s=0.5,
        )
        auth = Authenticator.from_environ(disabled=True, tokens_file="", tokens_env="")
        gw = Gateway(gw_config, auth)
        await gw.start()
        gateway = f"127.0.0.1:{gw.port}"
    try:
        await _wait_serving(gateway)
        drivers = {"e2e": gateway_driver(gateway, args.token)}
        if engine is not None:
            engine.start()
            drivers["engine"] = engine_driver(engine)
        results = await measure(drivers, args)
    finally:
        if gw is not None:
            await gw.stop(1.0)
        if engine is not None:
            engine.shutdown()
    result: dict[str, Any] = results["e2e"]
    result["roofline"] = machine
    if "engine" in results:
        direct = results["engine"]
        result["engine_direct"] = direct
        result["e2e_vs_engine"] = {
            n: round(rate / direct["aggregate_decode_tok_s"][n], 3)
            for n, rate in result["aggregate_decode_tok_s"].items()
        }
    return result


async def _wait_serving(target: str, timeout_s: float = 60.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            reply = await stub.Check(health_pb2.HealthCheckRequest())
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"gateway {target} not serving after {timeout_s}s")


def write_engine_parameters(
    pbtxt: Path, config: EngineConfig, adapter: dict[str, str] | None = None
) -> None:
    """Replace the `parameters [...]` block of a config.pbtxt with `config`'s fields and
    the adapter's settings in `adapter`."""
    import dataclasses
    import re

    values = {f.name: str(getattr(config, f.name)) for f in dataclasses.fields(config)}
    values.update(adapter or {})
    entries = ",\n".join(
        f'  {{ key: "{k}", value: {{ string_value: "{v}" }} }}' for k, v in values.items()
    )
    text, n = re.subn(
        r"^parameters \[.*?^\]\n",
        lambda _: f"parameters [\n{entries}\n]\n",
        pbtxt.read_text(),
        flags=re.S | re.M,
    )
    if n != 1:
        raise ValueError(f"{pbtxt}: expected one parameters block")
    pbtxt.write_text(text)


def tree_peak_rss_mb(pid: int) -> float:
    """Sum of the peak RSS (VmHWM) of a process and its descendants, in MiB."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


# ---- output ----------------------------------------------------------------------------


def machine_name(config: EngineConfig) -> str:
    if config.device.startswith("cuda"):
        import torch

        return "gpu-" + torch.cuda.get_device_name(config.device).replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def model_name(config: EngineConfig) -> str:
    from sinkserve.engine.loader import model_path

    return model_path(config).stem.split(".")[0]


def result_stem(target: str, config: EngineConfig) -> str:
    quant = "" if config.quant == "none" else f"-{config.quant}"
    return f"{target}-{machine_name(config)}-{model_name(config)}-{config.dtype}{quant}"


def plot(series: dict[str, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        xs = sorted(int(n) for n in points)
        ax.plot(xs, [points[str(x)] for x in xs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_bench_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    d = EngineConfig()
    p = subparsers.add_parser("bench", help="throughput/latency benchmark (prints JSON)")
    p.add_argument("--target", choices=("engine", "e2e"), default="engine")
    p.add_argument("--gateway", default="", help="host:port of a running gateway (e2e)")
    p.add_argument("--token", default=None, help="bearer token for --gateway")
    p.add_argument(
        "--no-engine", action="store_true", help="e2e: skip the interleaved engine-direct run"
    )
    p.add_argument(
        "--sessions",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8, 32],
        help="concurrency levels, comma-separated (default 1,8,32)",
    )
    p.add_argument(
        "--stream-responses-per-s",
        type=float,
        default=None,
        help="e2e: the model's streamed-response budget (default: the model's; 0 = a "
        "response per token)",
    )
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    add_engine_flags(p)
    p.add_argument("--step-token-budget", type=int, default=d.step_token_budget)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--no-save", action="store_true", help="print only")
    p.set_defaults(func=main_bench)
    return p


def bench_config(args: argparse.Namespace) -> EngineConfig:
    return engine_config(
        args,
        step_token_budget=args.step_token_budget,
        max_sessions=max(args.sessions),
        max_new_tokens=max(args.new_tokens, 1),
    )


def main_bench(args: argparse.Namespace) -> int:
    config = bench_config(args)
    started = time.time()
    result = run_engine(config, args) if args.target == "engine" else run_e2e(config, args)
    stem = result_stem(args.target, config)
    out = {
        "target": args.target,
        "machine": f"{machine_name(config)} {platform.node()} ({platform.processor()})",
        "config": {
            "dtype": config.dtype,
            "quant": config.quant,
            "sinks": config.sinks,
            "window": config.window,
            "threads": config.threads,
            "model": model_name(config),
        },
        "workload": {
            "sessions": args.sessions,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "prefill_tokens": args.prefill_tokens,
            "repeats": args.repeats,
            "stream_responses_per_s": args.stream_responses_per_s,
        },
        **result,
        "wall_s": round(time.time() - started, 1),
    }
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
        series = {args.target: out["aggregate_decode_tok_s"]}
        if "engine_direct" in out:
            series["engine (same run)"] = out["engine_direct"]["aggregate_decode_tok_s"]
        plot(series, args.out / f"{stem}.png", stem)
    print(json.dumps(out))
    return 0
