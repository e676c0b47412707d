"""Running perplexity of the three cache modes over one long text, as a plot and JSON.

Runs `sinkserve eval-ppl` logic for sinks (4+1020), window (0+1024) and dense (keep all)
over the same tokens and draws perplexity per 1,000 tokens. Dense stops at the model's
training context (8,192 tokens): past it, it is not meaningful, and its cost is quadratic.
Writes bench/results/ppl-modes.{json,png}.
Run: .venv/bin/python bench/ppl_modes.py [--tokens 20000] [--text .cache/kjv-psalms.txt]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from sinkserve.config import EngineConfig
from sinkserve.engine.loader import load_model
from sinkserve.engine.perplexity import (
    MODES,
    cache_shape,
    plot_running_ppl,
    read_text,
    streaming_nll,
)
from sinkserve.engine.runner import TorchRunner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, default=Path(".cache/kjv-psalms.txt"))
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    model, tokenizer = load_model(EngineConfig(max_sessions=1))
    tokens = tokenizer.encode(read_text(args.text))[: args.tokens + 1]
    results = {}
    for mode in MODES:
        n = min(args.tokens, model.cfg.max_position) if mode == "dense" else args.tokens
        sinks, window = cache_shape(mode, 4, 1020, n)
        runner = TorchRunner(EngineConfig(sinks=sinks, window=window, max_sessions=1), model)
        start = time.perf_counter()
        with tqdm(total=n, desc=mode, unit="tok") as bar:
            r = streaming_nll(runner, tokens[: n + 1], chunk=args.chunk, on_progress=bar.update)
        results[mode] = {
            "tokens": n,
            "sinks": sinks,
            "window": window,
            "ppl": round(r.ppl(), 3),
            "ppl_0_8192": round(r.ppl(0, 8192), 3),
            "ppl_1024_8192": round(r.ppl(1024, 8192), 3),
            "ppl_after_8192": round(r.ppl(8192), 3) if n > 8192 else None,
            "ppl_by_1k": [round(v, 3) for v in r.ppl_by_1k()],
            "seconds": round(time.perf_counter() - start, 1),
        }
        del runner
    summary = {"text": str(args.text), "tokens": args.tokens, "model": "SmolLM2-135M-Instruct"}
    summary["modes"] = results
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ppl-modes.json").write_text(json.dumps(summary, indent=1) + "\n")
    curves = {f"{m} {v['sinks']}+{v['window']}": v["ppl_by_1k"] for m, v in results.items()}
    title = f"SmolLM2-135M (8K context) on {args.text.name}: perplexity per 1,000 tokens"
    plot_running_ppl(curves, args.out / "ppl-modes.png", title)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
