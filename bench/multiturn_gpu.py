"""Multi-turn chat on one GPU: sinkserve's engine against vLLM with prefix caching.

    python3 bench/multiturn_gpu.py run --engine vllm|sinkserve [--sessions 1,16,64,256]
    python3 bench/multiturn_gpu.py report A.json B.json [--out DIR]

N conversations run at once, closed loop: each of `--turns` turns is a `--user`-token
user message answered by exactly `--reply` generated tokens (greedy, EOS ignored), and a
conversation's next turn is sent the moment its reply ends. Both engines see the same
user tokens (seeded) on the same Llama shape with random bf16 weights:

- vLLM (`LLMEngine`, prefix caching and CUDA graphs on, `load_format="dummy"`, no
  tokenizer) gets what a chat client sends: the whole history (every earlier user turn
  and reply) plus the new turn, every turn. A conversation whose history no longer fits
  `max_model_len` is refused by vLLM: the turn and the error are recorded and that
  conversation stops.
- sinkserve's `Engine` with the CUDA runner keeps each session (4 sinks + 2044) and is
  sent only the new turn's tokens; it goes on forever.

The first size (N=1) runs `--long-turns` turns, to pass vLLM's `max_model_len`; its rates
count the first `--turns` turns only. Per N: aggregate generated tok/s and turns/s over
the run's wall time, TTFT (send to first token) p50/p99 by turn index, and GPU memory.
Each engine's result is one JSON file (written after every N, so a run cut short still
reports); `report` merges two into bench/results/multiturn-gpu-<device>.json, a PNG and
the ratios against the issue's targets.

`--smoke` runs the sinkserve side on a tiny shape on the CPU (Triton interpreter, graphs
off, timings meaningless): a check of the script before spending GPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The checkout (for `bench.*`) and service/ (for `sinkserve`): GPU hosts run these
# scripts from a copy of the repository, without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import LLAMA3_8B, Shape, random_llama

CACHE_SINKS, CACHE_WINDOW = 4, 2044
# A check of the script itself: on the CPU (--smoke), or on the GPU (--shape tiny).
TINY = Shape("tiny-llama-3", 2, 256, 4, 2, 512, 1000, 500000.0)
SHAPES = {s.name: s for s in (LLAMA3_8B, TINY)}
# vLLM's compilation settings: "decode-graphs" (no torch.compile, whole-model CUDA graphs
# for decode-only batches: starts in seconds) or vLLM's own default (torch.compile and
# piecewise graphs for every batch).
VLLM_COMPILATION: dict[str, dict[str, Any]] = {
    "decode-graphs": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"},
    "default": {},
}


@dataclass
class Workload:
    """What every conversation sends: the same for both engines."""

    sessions: int
    turns: int
    user: int
    reply: int
    vocab: int
    seed: int = 0

    def user_tokens(self, conv: int, turn: int) -> list[int]:
        rng = random.Random(self.seed * 1_000_003 + conv * 1009 + turn)
        return [rng.randrange(10, self.vocab - 10) for _ in range(self.user)]


@dataclass
class Conversation:
    """One conversation's progress and timings (times from time.perf_counter)."""

    index: int
    turn: int = 0
    history: list[int] = field(default_factory=list)  # what vLLM is resent
    sent_at: float = 0.0
    first_at: float | None = None
    replies: list[int] = field(default_factory=list)  # tokens generated, by turn
    ttft_s: list[float] = field(default_factory=list)  # by turn index
    ended_at: list[float] = field(default_factory=list)  # each turn's end
    refused: str = ""  # the engine's error when it refused a turn


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(convs: list[Conversation], load: Workload, started: float) -> dict[str, Any]:
    """Rates over the first `load.turns` turns of every conversation, TTFT by turn."""
    ends = [c.ended_at[min(load.turns, len(c.ended_at)) - 1] for c in convs if c.ended_at]
    turns = sum(min(load.turns, len(c.ended_at)) for c in convs)
    tokens = sum(sum(c.replies[: load.turns]) for c in convs)
    wall = max(ends) - started if ends else float("nan")
    by_turn = []
    for t in range(max(len(c.ttft_s) for c in convs)):
        values = [c.ttft_s[t] for c in convs if len(c.ttft_s) > t]
        by_turn.append(
            {"turn": t + 1, "n": len(values), "p50_ms": 1e3 * pct(values, 0.5)}
            | {"p99_ms": 1e3 * pct(values, 0.99)}
        )
    refused = [{"conversation": c.index, "turn": c.turn + 1, "error": c.refused} for c in convs]
    return {
        "sessions": load.sessions,
        "turns_measured": turns,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        "turns_per_s": turns / wall,
        "ttft_by_turn": by_turn,
        "turns_run": [len(c.ended_at) for c in convs],
        "refused": [r for r in refused if r["error"]],
        "short_replies": [
            {"conversation": c.index, "turn": t + 1, "tokens": n}
            for c in convs
            for t, n in enumerate(c.replies)
            if n < load.reply
        ],
    }


def gpu_memory() -> dict[str, float]:
    """Device-wide memory in use (all processes: vLLM's engine core runs in its own)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"device_used_GiB": (total - free) / 2**30, "device_total_GiB": total / 2**30}


# ---- sinkserve ---------------------------------------------------------------------------


class SinkserveDriver:
    """sinkserve's engine stepped on this thread; each turn sends only its own tokens."""

    def __init__(self, shape: Shape, max_sessions: int, args: argparse.Namespace) -> None:
        import torch

        from sinkserve.config import EngineConfig
        from sinkserve.engine.cuda_runner import CudaGraphRunner
        from sinkserve.engine.engine import Engine
        from tests.engine.helpers import synthetic_tokenizer

        cuda = not args.smoke
        dev = torch.device("cuda" if cuda else "cpu")
        model = random_llama(shape, torch.bfloat16 if cuda else torch.float32, dev)
        window = CACHE_WINDOW if cuda else 60
        self.config = EngineConfig(
            device=str(dev),
            dtype="bfloat16" if cuda else "float32",
            sinks=CACHE_SINKS,
            window=window,
            max_sessions=max_sessions,
            max_sessions_per_owner=max_sessions,
            step_token_budget=args.step_token_budget,
            max_new_tokens=args.reply,
        )
        self.runner = CudaGraphRunner(self.config, model, sm_count=None if cuda else 8)
        self.runner.capture_all()  # as vLLM captures at start: not inside the timings
        self.engine = Engine(self.config, self.runner, synthetic_tokenizer(shape.vocab))

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "sinkserve",
            "cache": f"{self.config.sinks}+{self.config.window}",
            "step_token_budget": self.config.step_token_budget,
            "kv_bytes_per_session": self.runner.bytes_per_slot,
        }

    def run(self, load: Workload) -> tuple[list[Conversation], float]:
        from sinkserve.engine.types import SamplingParams, TokenEvent, TurnEnd

        params = SamplingParams(max_new_tokens=load.reply, ignore_eos=True)
        convs = [Conversation(i) for i in range(load.sessions)]
        sids = [self.engine.open_session(owner="bench") for _ in convs]
        ready: list[Conversation] = []  # turns to send before the next step

        def on_events(conv: Conversation) -> Callable[[list[Any]], None]:
            def deliver(events: list[Any]) -> None:
                now = time.perf_counter()
                for ev in events:
                    if isinstance(ev, TokenEvent) and conv.first_at is None:
                        conv.first_at = now
                    elif isinstance(ev, TurnEnd):
                        finish(conv, now, ev.usage.generated_tokens)
                        if conv.turn < load.turns:
                            ready.append(conv)

            return deliver

        def send(conv: Conversation) -> None:
            conv.sent_at, conv.first_at = time.perf_counter(), None
            prompt = load.user_tokens(conv.index, conv.turn)
            self.engine.submit(sids[conv.index], prompt, params, on_events(conv), raw=True)

        started = time.perf_counter()
        ready.extend(convs)
        while ready or self.engine.stats().turns_running:
            while ready:
                send(ready.pop())
            self.engine.step()
        for sid in sids:
            self.engine.end_session(sid)
        return convs, started


def finish(conv: Conversation, now: float, generated: int) -> None:
    """Record a turn's end (its TTFT too) and move the conversation to its next turn."""
    conv.replies.append(generated)
    conv.ttft_s.append((conv.first_at or now) - conv.sent_at)
    conv.ended_at.append(now)
    conv.turn += 1


# ---- vLLM ----------------------------------------------------------------------------------


def llama_config_json(shape: Shape, max_position: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": max_position,
        "rope_theta": shape.theta,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


class VllmDriver:
    """vLLM's `LLMEngine` on random weights; every turn resends the whole history."""

    def __init__(self, shape: Shape, max_sessions: int, args: argparse.Namespace) -> None:
        import vllm
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        self.model_dir = tempfile.mkdtemp(prefix="vllm-dummy-")
        config = llama_config_json(shape, args.max_model_len)
        Path(self.model_dir, "config.json").write_text(json.dumps(config))
        self.args = EngineArgs(
            model=self.model_dir,
            load_format="dummy",
            dtype="bfloat16",
            skip_tokenizer_init=True,
            enable_prefix_caching=True,
            max_model_len=args.max_model_len,
            max_num_seqs=max_sessions,
            gpu_memory_utilization=args.gpu_memory_utilization,
            seed=0,
            disable_log_stats=True,
            enforce_eager=args.eager,
            compilation_config=VLLM_COMPILATION[args.vllm_compilation],
        )
        self.compilation = args.vllm_compilation
        self.engine = LLMEngine.from_engine_args(self.args)
        self.version = vllm.__version__

    def describe(self) -> dict[str, Any]:
        cache = self.engine.vllm_config.cache_config
        sched = self.engine.vllm_config.scheduler_config
        return {
            "engine": "vllm",
            "version": self.version,
            "max_model_len": self.args.max_model_len,
            "prefix_caching": True,
            "cuda_graphs": not self.engine.vllm_config.model_config.enforce_eager,
            "compilation": self.compilation,
            "gpu_memory_utilization": self.args.gpu_memory_utilization,
            "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
            "max_num_batched_tokens": sched.max_num_batched_tokens,
        }

    def run(self, load: Workload) -> tuple[list[Conversation], float]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=load.reply,  # no min_tokens: past max_model_len it never finishes
            ignore_eos=True,
            temperature=0.0,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        convs = [Conversation(i) for i in range(load.sessions)]
        replies: dict[int, list[int]] = {}

        def send(conv: Conversation) -> None:
            conv.history += load.user_tokens(conv.index, conv.turn)
            conv.sent_at, conv.first_at = time.perf_counter(), None
            replies[conv.index] = []
            try:
                self.engine.add_request(
                    f"c{conv.index}t{conv.turn}", {"prompt_token_ids": conv.history}, params
                )
            except ValueError as err:  # the history outgrew max_model_len
                conv.refused = f"{type(err).__name__}: {err}"

        started = time.perf_counter()
        for conv in convs:
            send(conv)
        while self.engine.has_unfinished_requests():
            outputs = self.engine.step()
            now = time.perf_counter()
            for out in outputs:
                conv = convs[int(out.request_id[1:].split("t")[0])]
                ids = out.outputs[0].token_ids
                if ids and conv.first_at is None:
                    conv.first_at = now
                replies[conv.index] += ids
                if out.finished:
                    conv.history += replies[conv.index]
                    finish(conv, now, len(replies[conv.index]))
                    if conv.turn < load.turns:
                        send(conv)
        return convs, started


# ---- run and report ------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    shape = TINY if args.smoke else SHAPES[args.shape]
    sizes = [int(n) for n in args.sessions.split(",")]
    driver_cls = VllmDriver if args.engine == "vllm" else SinkserveDriver
    t0 = time.perf_counter()
    driver: Any = driver_cls(shape, max(sizes), args)
    result: dict[str, Any] = {
        "command": "python3 bench/multiturn_gpu.py " + " ".join(sys.argv[1:]),
        "device": device_name(args.smoke),
        "shape": shape.name,
        "workload": {"turns": args.turns, "user_tokens": args.user, "reply_tokens": args.reply}
        | {"long_turns_at_n1": args.long_turns, "closed_loop": True, "greedy": True},
        "setup_s": time.perf_counter() - t0,
        "runs": [],
    } | driver.describe()
    for n in sizes:
        turns = args.long_turns if n == 1 else args.turns
        load = Workload(n, turns, args.user, args.reply, shape.vocab)
        convs, started = driver.run(load)
        load.turns = args.turns  # rates over the common turns only
        entry = summarize(convs, load, started) | gpu_memory()
        result["runs"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "ttft_by_turn"}), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def device_name(smoke: bool) -> str:
    if smoke:
        return "cpu-smoke"
    import torch

    return torch.cuda.get_device_name()


def ttft_at(run: dict[str, Any], turn: int, key: str) -> float:
    rows = [r for r in run["ttft_by_turn"] if r["turn"] == turn]
    return rows[0][key] if rows else float("nan")


def report(args: argparse.Namespace) -> None:
    """Merge one sinkserve and one vLLM result; ratios per N; a PNG."""
    loaded = [json.loads(Path(p).read_text()) for p in args.results]
    by_engine = {r["engine"]: r for r in loaded}
    ours, peer = by_engine["sinkserve"], by_engine["vllm"]
    turns = ours["workload"]["turns"]
    peer_runs = {r["sessions"]: r for r in peer["runs"]}
    ratios = []
    for mine in ours["runs"]:
        theirs = peer_runs.get(mine["sessions"])
        if theirs is None:
            continue
        ratios.append(
            {
                "sessions": mine["sessions"],
                "throughput_x": mine["aggregate_tok_s"] / theirs["aggregate_tok_s"],
                f"ttft_p50_turn{turns}_x": ttft_at(mine, turns, "p50_ms")
                / ttft_at(theirs, turns, "p50_ms"),
                f"ttft_p99_turn{turns}_x": ttft_at(mine, turns, "p99_ms")
                / ttft_at(theirs, turns, "p99_ms"),
            }
        )
    merged = {"device": ours["device"], "sinkserve": ours, "vllm": peer, "ratios": ratios}
    slug = "".join(c if c.isalnum() else "-" for c in ours["device"].lower()).strip("-")
    out = Path(args.out) / f"multiturn-gpu-{slug}.json"
    out.write_text(json.dumps(merged, indent=2) + "\n")
    plot(merged, out.with_suffix(".png"))
    print(json.dumps(ratios, indent=2))


def plot(merged: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {e: {r["sessions"]: r for r in merged[e]["runs"]} for e in ("sinkserve", "vllm")}
    sizes = sorted(runs["sinkserve"])
    fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(4 * (len(sizes) + 1), 3.6))
    for ax, n in zip(axes[1:], sizes, strict=True):
        for engine, style, color in (("sinkserve", "-", "C0"), ("vllm", "--", "C1")):
            r = runs[engine].get(n)
            if r is None:
                continue
            t = [row["turn"] for row in r["ttft_by_turn"]]
            p50 = [row["p50_ms"] for row in r["ttft_by_turn"]]
            ax.plot(t, p50, style, color=color, label=f"{engine} p50")
            p99 = [row["p99_ms"] for row in r["ttft_by_turn"]]
            ax.plot(t, p99, style, color=color, alpha=0.35)
        ax.set_title(f"TTFT, {n} conversation{'s' if n > 1 else ''}")
        ax.set_xlabel("turn")
        ax.set_ylabel("ms (p50; faint: p99)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    width = 0.38
    for k, (engine, color) in enumerate((("sinkserve", "C0"), ("vllm", "C1"))):
        xs = [i + (k - 0.5) * width for i in range(len(sizes))]
        ys = [runs[engine][n]["aggregate_tok_s"] if n in runs[engine] else 0 for n in sizes]
        axes[0].bar(xs, ys, width, label=engine, color=color)
    axes[0].set_xticks(range(len(sizes)), [str(n) for n in sizes])
    axes[0].set_xlabel("conversations")
    axes[0].set_ylabel("generated tok/s (aggregate)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Multi-turn chat, {merged['sinkserve']['shape']}, {merged['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one engine, every N; one JSON")
    r.add_argument("--engine", choices=("sinkserve", "vllm"), required=True)
    r.add_argument("--sessions", default="1,16,64,256")
    r.add_argument("--turns", type=int, default=30)
    r.add_argument("--long-turns", type=int, default=48, help="turns at N=1")
    r.add_argument("--user", type=int, default=64)
    r.add_argument("--reply", type=int, default=128)
    r.add_argument("--max-model-len", type=int, default=8192, help="vLLM (Llama-3's context)")
    r.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM")
    r.add_argument("--step-token-budget", type=int, default=2048, help="sinkserve")
    r.add_argument("--shape", choices=sorted(SHAPES), default=LLAMA3_8B.name)
    r.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs (checks)")
    r.add_argument("--vllm-compilation", choices=sorted(VLLM_COMPILATION), default="decode-graphs")
    r.add_argument("--smoke", action="store_true", help="sinkserve on a tiny shape, CPU")
    r.add_argument("--out", required=True, help="result JSON")
    rep = sub.add_parser("report", help="merge a sinkserve and a vLLM result")
    rep.add_argument("results", nargs=2)
    rep.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.cmd == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
