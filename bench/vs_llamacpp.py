"""sinkserve's engine against llama.cpp on the same GGUF, side by side in one run.

llama.cpp runs in a worker process (bench/llamacpp_worker.py, in the venv of the `bench`
extra, e.g. /tmp/venv-llama with llama-cpp-python) doing batched multi-sequence greedy
decode through the low-level API; sinkserve's Engine runs in this process with the same
token-id prompt, the same number of new tokens and the same thread count. For every
repeat and every concurrency N the two are run back to back (order alternating between
repeats), so machine noise hits both; medians and their ratio are reported.

Run: PYTHONPATH=. /tmp/venv/bin/python bench/vs_llamacpp.py --threads 2 \\
         --dtype bfloat16 --quant int4 [--sessions 1,8,32] [--repeats 3]
Writes bench/results/vs-llamacpp-<machine>-<model>-<dtype>[-quant]-t<threads>.json + .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from sinkserve.bench import (
    engine_driver,
    engine_roofline,
    machine_name,
    model_name,
    plot,
    steady_decode_rate,
)
from sinkserve.config import EngineConfig
from sinkserve.engine.engine import Engine
from sinkserve.engine.loader import model_path
from sinkserve.logs import configure_logging

WORKER = Path(__file__).with_name("llamacpp_worker.py")


class LlamaWorker:
    def __init__(self, python: str, gguf: Path, threads: int) -> None:
        self.proc = subprocess.Popen(
            [python, str(WORKER), str(gguf), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp worker exited with {self.proc.wait()}")
        return dict(json.loads(line))

    def decode(self, n: int, prompt_tokens: int, new_tokens: int) -> float:
        assert self.proc.stdin is not None
        req = {"sequences": n, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return float(self._read()["decode_tok_s"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--llama-python", default="/tmp/venv-llama/bin/python")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    configure_logging(json=False, level="warning")
    config = EngineConfig(
        dtype=args.dtype,
        quant=args.quant,
        threads=args.threads,
        max_sessions=max(args.sessions),
    )
    llama = LlamaWorker(args.llama_python, model_path(config), args.threads)
    engine = Engine.load(config)
    machine = engine_roofline(engine, args.threads)  # before either decodes
    engine.start()
    drive = engine_driver(engine)
    prompt = [1000 + (i * 7) % 5000 for i in range(args.prompt_tokens)]  # as the worker's

    def ours(n: int) -> float:
        return steady_decode_rate(asyncio.run(drive(n, prompt, args.new_tokens)))

    runs: dict[str, dict[str, list[float]]] = {
        str(n): {"llama.cpp": [], "sinkserve": []} for n in args.sessions
    }
    started = time.time()
    try:
        ours(1), llama.decode(1, args.prompt_tokens, 4)  # warm-up both
        for rep in range(args.repeats):
            for n in args.sessions:
                pair = [
                    ("llama.cpp", partial(llama.decode, n, args.prompt_tokens, args.new_tokens)),
                    ("sinkserve", partial(ours, n)),
                ]
                for name, fn in pair if rep % 2 == 0 else pair[::-1]:
                    runs[str(n)][name].append(fn())
                print(f"repeat {rep} n={n}: {runs[str(n)]}", file=sys.stderr, flush=True)
    finally:
        engine.shutdown()
        llama.close()
    med = {n: {k: round(statistics.median(v), 2) for k, v in r.items()} for n, r in runs.items()}
    quant = "" if config.quant == "none" else f"-{config.quant}"
    stem = (
        f"vs-llamacpp-{machine_name(config)}-{model_name(config)}-{config.dtype}{quant}"
        f"-t{args.threads}"
    )
    result = {
        "machine": f"{machine_name(config)} {platform.node()}",
        "llama_cpp": {"system_info": llama.info.get("system_info", ""), "threads": args.threads},
        "sinkserve": {"dtype": config.dtype, "quant": config.quant, "threads": args.threads},
        "workload": {
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "note": "decode tok/s summed over sequences; medians of interleaved runs",
        },
        "decode_tok_s": med,
        "ratio_sinkserve_vs_llamacpp": {
            n: round(m["sinkserve"] / m["llama.cpp"], 3) for n, m in med.items()
        },
        "roofline": machine,
        "share_of_roofline_1_session": (
            round(med["1"]["sinkserve"] / machine["roofline_tok_s"], 3)
            if machine and "1" in med
            else None
        ),
        "runs": runs,
        "wall_s": round(time.time() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    series = {name: {n: m[name] for n, m in med.items()} for name in ("llama.cpp", "sinkserve")}
    plot(series, args.out / f"{stem}.png", f"decode, {args.threads} threads: {stem}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
