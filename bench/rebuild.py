"""Time of a turn that first rebuilds a full cache from its token ids, against the same
turn on the session as it is.

A session moved without its KV (`Engine.export_sessions(with_kv=False)`, then
`import_sessions`: another process, a reload) keeps only its ids, and its next turn
prefills its sinks and window again (sinks + window tokens once the cache is full)
before its own prompt. One session streams text until its cache is full and its window
has rolled; then, `--repeats` times in turn: (1) a turn on the session as it is, (2) the
same turn after exporting it without KV, ending it and importing it back. Each turn
prefills the last turn's sampled token (owed) plus the same `--prompt-tokens` ids and
generates `--new-tokens` greedy tokens. One unmeasured pair warms up first.

Prints one JSON object and writes it to bench/results/rebuild-turn-cpu-<cores>core.json:
medians of time to first token and of the whole turn, and what the rebuild adds.
Run: PYTHONPATH=. .venv/bin/python bench/rebuild.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.streaming import TEXT, run_turn
from sinkserve.bench import machine_name, model_name
from sinkserve.config import EngineConfig
from sinkserve.engine.engine import Engine
from sinkserve.engine.perplexity import read_text
from sinkserve.engine.types import SamplingParams, Usage


def cpu_model() -> str:
    """The CPU's model name, as `lscpu` shows it."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def fill(
    engine: Engine, sid: str, ids: list[int], position: int, turn_tokens: int
) -> tuple[int, Usage]:
    """Stream raw turns of `turn_tokens` ids (one new token each) until the session is at
    `position` or past it; returns the offset into `ids` reached and the last usage."""
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    offset = 0
    while True:
        _, end = run_turn(engine, sid, ids[offset : offset + turn_tokens], params)
        offset += turn_tokens
        if end.usage.position >= position:
            return offset, end.usage


def timed_turn(
    engine: Engine, sid: str, prompt: list[int], new_tokens: int
) -> tuple[float, float, Usage]:
    """(time to first token, whole turn) in seconds from submit, and the turn's usage."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    ttft, end = run_turn(engine, sid, prompt, params)
    total = time.perf_counter() - start
    assert end.usage.generated_tokens == new_tokens, end
    return ttft, total, end.usage


def rebuild_from_ids(engine: Engine, sid: str) -> int:
    """Move the (only) session out without its KV and back; returns the ids its next turn
    rebuilds the cache from."""
    (snap,) = engine.export_sessions(with_kv=False)
    assert snap.session_id == sid and snap.kv is None
    engine.end_session(sid)
    engine.import_sessions([snap])
    return len(snap.sink_tokens) + len(snap.window_tokens)


def summary(ttft: list[float], turn: list[float]) -> dict[str, Any]:
    return {
        "ttft_ms": round(statistics.median(ttft) * 1000, 1),
        "turn_ms": round(statistics.median(turn) * 1000, 1),
        "ttft_ms_runs": [round(t * 1000, 1) for t in ttft],
        "turn_ms_runs": [round(t * 1000, 1) for t in turn],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fill-position", type=int, default=1200, help="stream this far first")
    ap.add_argument("--fill-turn-tokens", type=int, default=300)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    started, load_start = time.time(), os.getloadavg()
    engine = Engine.load(EngineConfig(sinks=4, window=1020, max_sessions=2))
    config = engine.config
    ids = engine.tokenizer.encode(read_text(TEXT))
    engine.start()
    try:
        sid = engine.open_session()
        offset, usage = fill(engine, sid, ids, args.fill_position, args.fill_turn_tokens)
        prompt = ids[offset : offset + args.prompt_tokens]
        # A full cache whose window has rolled: the rebuild recomputes all of it.
        full = config.sinks + config.window
        assert usage.cached_tokens == full and usage.evicted_tokens > 0, usage
        timed_turn(engine, sid, prompt, args.new_tokens)  # warm-up pair
        rebuild_from_ids(engine, sid)
        timed_turn(engine, sid, prompt, args.new_tokens)
        runs: dict[str, tuple[list[float], list[float]]] = {"normal": ([], []), "rebuilt": ([], [])}
        rebuilt_tokens = []
        for _ in tqdm(range(args.repeats), desc="normal / rebuilt turn", unit="pair"):
            for name in runs:
                if name == "rebuilt":
                    rebuilt_tokens.append(rebuild_from_ids(engine, sid))
                ttft, total, usage = timed_turn(engine, sid, prompt, args.new_tokens)
                runs[name][0].append(ttft)
                runs[name][1].append(total)
    finally:
        engine.shutdown()
    normal, rebuilt = (summary(*runs[k]) for k in ("normal", "rebuilt"))
    result = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores ({platform.node()})",
        # 1/5/15-minute load averages: on a shared machine, other work shows here.
        "load_avg_start_end": [[round(x, 2) for x in t] for t in (load_start, os.getloadavg())],
        "command": "PYTHONPATH=. " + shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "model": model_name(config),
            "dtype": config.dtype,
            "quant": config.quant,
            "sinks": config.sinks,
            "window": config.window,
            "threads": config.threads,
            "step_token_budget": config.step_token_budget,
        },
        "workload": {
            "prompt_tokens": args.prompt_tokens + 1,  # the owed token of the last turn too
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "rebuilt_tokens": rebuilt_tokens,
            "position_end": usage.position,
            "evicted_tokens_end": usage.evicted_tokens,
        },
        "normal": normal,
        "rebuilt": rebuilt,
        "extra_ttft_ms": round(rebuilt["ttft_ms"] - normal["ttft_ms"], 1),
        "extra_turn_ms": round(rebuilt["turn_ms"] - normal["turn_ms"], 1),
        "ratio_ttft": round(rebuilt["ttft_ms"] / normal["ttft_ms"], 2),
        "ratio_turn": round(rebuilt["turn_ms"] / normal["turn_ms"], 2),
        "wall_s": round(time.time() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"rebuild-turn-{machine_name(config)}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
