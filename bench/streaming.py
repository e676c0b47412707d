"""Engine benchmark: flat memory over a long stream, and per-turn cost.

1. Streams `--stream-tokens` tokens through one session (turns of raw text chunks, each
   generating a few tokens) and records RSS after every turn: RSS at the end must stay
   within 5% of RSS after 2,000 tokens.
2. Runs a `--turns`-turn conversation with equal user turns: every turn must prefill only
   its own tokens (engine usage), and time to first token must not grow with the turn.

Prints one JSON object and writes it (plus a PNG of TTFT over turns) under bench/results/.
Run: .venv/bin/python bench/streaming.py [--stream-tokens 100000] [--turns 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from pathlib import Path

from sinkserve.config import EngineConfig
from sinkserve.engine.engine import Engine
from sinkserve.engine.perplexity import read_text
from sinkserve.engine.types import Event, SamplingParams, TokenEvent, TurnEnd
from sinkserve.procstat import rss_mb

TEXT = Path(".cache/kjv-psalms.txt")  # made by `make testdata`


def run_turn(
    engine: Engine, sid: str, prompt: str | list[int], params: SamplingParams, *, raw: bool = False
) -> tuple[float, TurnEnd]:
    """Submit a turn and wait for it; returns (time to first token, TurnEnd)."""
    first: list[float] = []
    end: list[TurnEnd] = []
    done = threading.Event()

    def on_events(events: list[Event]) -> None:
        for e in events:
            if isinstance(e, TokenEvent) and not first:
                first.append(time.perf_counter())
            if isinstance(e, TurnEnd):
                end.append(e)
                done.set()

    start = time.perf_counter()
    engine.submit(sid, prompt, params, on_events, raw=raw)
    done.wait()
    return (first[0] if first else time.perf_counter()) - start, end[0]


def stream_memory(engine: Engine, total: int, chunk: int) -> dict[str, object]:
    ids = engine.tokenizer.encode(read_text(TEXT))
    sid = engine.open_session()
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    rss: list[tuple[int, float]] = []
    pos, offset = 0, 0
    while pos < total:
        piece = ids[offset : offset + chunk]
        offset = (offset + chunk) % (len(ids) - chunk)
        _, end = run_turn(engine, sid, piece, params)
        pos = end.usage.position
        rss.append((pos, rss_mb()))
    at_2k = next(mb for p, mb in rss if p >= 2000)
    return {
        "tokens": pos,
        "rss_mb_after_2k": round(at_2k, 1),
        "rss_mb_end": round(rss[-1][1], 1),
        "rss_ratio_end_vs_2k": round(rss[-1][1] / at_2k, 4),
        "rss_mb_max": round(max(mb for _, mb in rss), 1),
        "evicted_tokens": engine.get_session(sid).evicted_tokens,
    }


def conversation(engine: Engine, turns: int, new_tokens: int) -> dict[str, object]:
    sid = engine.open_session()
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ttft, prefilled, positions = [], [], []
    for i in range(turns):
        message = f"Turn {i:02d}. Tell me one more short fact about the history of Paris."
        t, end = run_turn(engine, sid, message, params)
        ttft.append(t)
        prefilled.append(end.usage.prompt_tokens)
        positions.append(end.usage.position)
    return {
        "turns": turns,
        "ttft_s": [round(t, 4) for t in ttft],
        "prompt_tokens": prefilled,
        "positions": positions,
        "ttft_ratio_turn30_vs_turn2": round(ttft[-1] / ttft[1], 3),
    }


def plot(ttft: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(ttft) + 1), [t * 1000 for t in ttft], marker="o")
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("TTFT over a conversation (only the new turn is prefilled)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream-tokens", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=1000, help="tokens per streamed turn")
    ap.add_argument("--turns", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    config = EngineConfig(dtype=args.dtype, max_sessions=2, step_token_budget=256)
    engine = Engine.load(config)
    engine.start()
    try:
        result = {
            "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
            "config": {"sinks": config.sinks, "window": config.window, "dtype": config.dtype},
            "conversation": conversation(engine, args.turns, args.new_tokens),
            "stream": stream_memory(engine, args.stream_tokens, args.chunk),
        }
    finally:
        engine.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "streaming-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result["conversation"]["ttft_s"], args.out / "ttft-over-turns-cpu.png")  # type: ignore[index]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
