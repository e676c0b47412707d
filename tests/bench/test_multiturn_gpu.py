"""bench/multiturn_gpu.py: its arithmetic on made-up conversations, its report, and its
sinkserve driver on a tiny model on the CPU (the vLLM side runs only on the GPU machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import multiturn_gpu as mt


def conversation(
    index: int, start: float, turn_s: float, ttft_s: float, turns: int
) -> mt.Conversation:
    conv = mt.Conversation(index)
    for t in range(turns):
        conv.sent_at, conv.first_at = start + t * turn_s, start + t * turn_s + ttft_s
        mt.finish(conv, start + (t + 1) * turn_s, generated=8)
    return conv


def test_rates_count_the_common_turns_only_and_ttft_is_kept_by_turn() -> None:
    load = mt.Workload(sessions=2, turns=3, user=4, reply=8, vocab=100)
    convs = [conversation(0, 0.0, 1.0, 0.1, turns=5), conversation(1, 0.0, 0.5, 0.2, turns=3)]
    got = mt.summarize(convs, load, started=0.0)
    # The first 3 turns of each: 6 turns of 8 tokens, the last of them ending at t=3 s.
    assert got["turns_measured"] == 6 and got["wall_s"] == pytest.approx(3.0)
    assert got["aggregate_tok_s"] == pytest.approx(48 / 3.0)
    assert [row["n"] for row in got["ttft_by_turn"]] == [2, 2, 2, 1, 1]
    assert got["ttft_by_turn"][0]["p50_ms"] == pytest.approx(200.0)  # upper median of two
    assert got["refused"] == [] and got["short_replies"] == []


def test_the_same_user_tokens_for_both_engines() -> None:
    a = mt.Workload(sessions=1, turns=1, user=16, reply=1, vocab=1000)
    b = mt.Workload(sessions=1, turns=1, user=16, reply=1, vocab=1000)
    assert a.user_tokens(3, 7) == b.user_tokens(3, 7) != a.user_tokens(3, 8)
    assert all(10 <= t < 990 for t in a.user_tokens(0, 0))


def test_report_merges_both_engines_into_ratios_and_a_plot(tmp_path: Path) -> None:
    sizes = {"sinkserve": (100.0, 50.0), "vllm": (200.0, 25.0)}  # tok/s, TTFT ms
    paths: list[Path] = []
    for engine, (rate, ttft) in sizes.items():
        rows = [{"turn": t, "n": 1, "p50_ms": ttft, "p99_ms": 2 * ttft} for t in (1, 2)]
        run = {"sessions": 4, "aggregate_tok_s": rate, "ttft_by_turn": rows}
        result: dict[str, object] = {
            "engine": engine,
            "device": "Test GPU",
            "shape": "s",
            "runs": [run],
        }
        result["workload"] = {"turns": 2}
        paths.append(tmp_path / f"{engine}.json")
        paths[-1].write_text(json.dumps(result))
    mt.report(mt.parse_args(["report", *map(str, paths), "--out", str(tmp_path)]))
    merged = json.loads((tmp_path / "multiturn-gpu-test-gpu.json").read_text())
    assert merged["ratios"] == [
        {"sessions": 4, "throughput_x": 0.5, "ttft_p50_turn2_x": 2.0, "ttft_p99_turn2_x": 2.0}
    ]
    assert (tmp_path / "multiturn-gpu-test-gpu.png").stat().st_size > 0


def test_the_sinkserve_driver_runs_every_turn_of_every_conversation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the CUDA runner's kernels, on the CPU
    out = tmp_path / "s.json"
    argv = ["run", "--engine", "sinkserve", "--smoke", "--sessions", "1,3", "--turns", "2"]
    argv += ["--long-turns", "3", "--user", "5", "--reply", "4", "--out", str(out)]
    mt.run(mt.parse_args(argv))
    result = json.loads(out.read_text())
    one, three = result["runs"]
    assert one["turns_run"] == [3] and three["turns_run"] == [2, 2, 2]
    assert three["turns_measured"] == 6 and three["short_replies"] == []
    assert result["cache"] == "4+60" and result["engine"] == "sinkserve"
