"""Failover on a local cluster, timed: Redis, 3 replicas (`sinkserve serve`) and HAProxy
on loopback (service/sinkserve/cluster.py); `--sessions` sessions hold `--turns`-turn conversations
in step, one replica is SIGKILLed after turn 3 and another SIGTERMed after turn 6
(service/sinkserve/failover.py). Clients retry a cut turn once on a new stream; the proxy routes it
to a live replica, which rebuilds the session from Redis.

Prints one JSON object as its last line and writes it to
bench/results/failover-cpu-<cores>core.json: turns completed of expected, sessions lost,
turn latency p50 (all turns) and of the retried turns (the failover, rebuild included).
Run: PYTHONPATH=. .venv/bin/python bench/failover.py [--sessions 24 --turns 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from sinkserve.cluster import REPLICAS, Cluster, model_repository
from sinkserve.failover import answered_once, converse

# The CPU default engine and its window (no 10-turn conversation fills it), on one
# thread a replica: three engines of two OpenMP threads on two cores would oversubscribe
# them (each parallel region then pays a futex wake-up). One replica holds all sessions
# at the end, 8 slots for 24: turns wait for slots longer than the default 30 s.
PARAMETERS = {
    "window": "1020",
    "max_sessions": "8",
    "max_sessions_per_owner": "256",
    "threads": "1",
    "slot_wait_s": "300",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=24)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sinkserve-failover-"))
    cluster = Cluster(root, model_repository(root, **PARAMETERS))
    started = time.monotonic()
    cluster.start(ready_timeout_s=900)
    ready_s = time.monotonic() - started
    faults = {
        3: lambda: cluster.replicas[0].stop(signal.SIGKILL),
        6: lambda: cluster.replicas[1].stop(signal.SIGTERM),
    }
    errors: dict[int, str] = {}
    try:
        with tqdm(total=args.sessions * args.turns, desc="failover turns", unit="turn") as bar:
            results = asyncio.run(
                converse(
                    cluster.target,
                    None,
                    sessions=args.sessions,
                    turns=args.turns,
                    max_tokens=args.max_tokens,
                    faults=faults,
                    on_turn=lambda: bar.update(1),
                    errors=errors,
                )
            )
    finally:
        cluster.stop()
    turns = [t for session in results for t in session]
    retried = [t.seconds * 1000 for t in turns if t.retried]
    result = {
        "what": "failover on a loopback cluster: 3 replicas behind HAProxy sharing Redis; "
        "replica 0 SIGKILLed after turn 3, replica 1 SIGTERMed after turn 6",
        "machine": _cpu_model(),
        "cores": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "engine": "SmolLM2-135M-Instruct, float32, sinks 4 + window 1020, 8 slots and "
        "1 thread a replica",
        "replicas": REPLICAS,
        "sessions": args.sessions,
        "turns_expected": args.sessions * args.turns,
        "turns_completed": len(turns),
        "sessions_lost": sum(len(s) < args.turns for s in results),
        "turns_answered_twice": sum(not answered_once(s) for s in results),
        "retried_turns": len(retried),
        "turn_p50_ms": round(statistics.median(t.seconds * 1000 for t in turns), 1),
        "failover_turn_p50_ms": round(statistics.median(retried), 1) if retried else None,
        "failover_turn_max_ms": round(max(retried), 1) if retried else None,
        "cluster_ready_s": round(ready_s, 1),
        "errors": errors,
    }
    out = args.out or Path(__file__).parent / "results" / f"failover-cpu-{os.cpu_count()}core.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if not errors else 1


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
