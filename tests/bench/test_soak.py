"""bench/soak.py: its checks on made-up turns, then a 3-minute soak of a real stack
(`sinkserve serve` with the default model) with 16 sessions: no turn lost, no status
but those of deliberate cuts, every cache position and text adding up, no descriptor
leaked, nothing left running.

Slow (about four minutes on 2 cores): one model load, then three minutes of turns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak import (
    CANCELLED,
    LENGTH,
    RESULT_KEYS,
    STOP,
    cancelled_turn_problems,
    ended_turn_problems,
    expected_position,
    slope_per_hour,
    steady_samples,
    text_problem,
    warmup_s,
)
from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
CACHE = 4 + 1020  # sinks + window of the default model config
MINUTES, SESSIONS = 3, 16
TURNS_FLOOR = 40  # 258 in a run here (2 cores, another engine busy beside it)
FDS_SLACK = 8  # descriptors the stack may hold more at the end than at the start


def end(reason: int, prompt: int, generated: int, position: int) -> pb.TurnEnd:
    cached = min(position, CACHE)
    usage = pb.Usage(
        prompt_tokens=prompt,
        generated_tokens=generated,
        cache_position=position,
        cached_tokens=cached,
        evicted_tokens=position - cached,
    )
    return pb.TurnEnd(finish_reason=reason, usage=usage)  # type: ignore[arg-type]


def test_a_turn_feeds_its_prompt_and_all_but_its_last_token() -> None:
    # as the engine test: 20 prompt tokens, 5 generated -> position 24, one token owed
    assert expected_position(0, 20, 5) == 24
    assert expected_position(24, 3, 1) == 27
    assert ended_turn_problems(24, end(LENGTH, 3, 1, 27), [9], 1, CACHE) == ([], [])


def test_a_position_off_by_one_or_a_token_unaccounted_is_caught() -> None:
    position, usage = ended_turn_problems(100, end(LENGTH, 10, 4, 114), [1, 2, 3, 4], 4, CACHE)
    assert position and "113" in position[0] and usage == []
    # STOP by end-of-sequence: generated counts it, the stream does not carry it
    assert ended_turn_problems(0, end(STOP, 10, 3, 12), [1, 2], 8, CACHE) == ([], [])
    assert ended_turn_problems(0, end(STOP, 10, 3, 12), [1, 2, 3], 8, CACHE)[1]
    assert ended_turn_problems(0, end(LENGTH, 10, 4, 13), [1, 2, 3], 4, CACHE)[1]


def test_the_cache_must_hold_the_sinks_and_the_window_and_count_the_rest_evicted() -> None:
    turn = end(LENGTH, 10, 1, 2000)
    turn.usage.cached_tokens = 1000
    assert ended_turn_problems(1990, turn, [7], 1, CACHE)[1]


def test_a_cancelled_turn_ends_where_getsession_then_says_within_what_it_could_feed() -> None:
    assert cancelled_turn_problems(50, end(CANCELLED, 10, 2, 61), [1, 2], 61, CACHE) == ([], [])
    assert cancelled_turn_problems(50, end(CANCELLED, 10, 2, 61), [1, 2], 62, CACHE)[0]
    assert cancelled_turn_problems(50, end(CANCELLED, 10, 2, 70), [1, 2], 70, CACHE)[0]
    # the gateway's own TurnEnd (the model had not started the turn) carries no position
    assert cancelled_turn_problems(50, end(CANCELLED, 0, 0, 0), [], 50, CACHE) == ([], [])


def test_text_must_be_the_decoding_of_the_turns_ids(tokenizer: Tokenizer) -> None:
    def kind(text: str, ids: list[int]) -> str | None:
        problem = text_problem(text, ids, tokenizer)
        return None if problem is None else problem[0]

    ids = tokenizer.encode("Hello, café 日本")
    assert kind("Hello, café 日本", ids) is None
    assert kind("Hello, cafe 日本", ids) == "differs"
    assert kind("\ud800", []) == "not_utf8"
    # ids that end inside a character decode to U+FFFD there; text without it is wrong
    cut = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd"))
    text = tokenizer.decode(ids[:cut]).rstrip("\ufffd")
    assert kind(text, ids[:cut]) == "ended_inside_a_character"


def test_the_rss_slope_is_a_least_squares_fit_per_hour_after_the_warm_up() -> None:
    assert slope_per_hour([0, 1800, 3600], [100, 110, 120]) == pytest.approx(20.0)
    assert slope_per_hour([0, 10, 20], [5, 9, 4]) == pytest.approx(-0.05 * 3600)
    assert slope_per_hour([10], [1]) is None
    assert warmup_s(3600) == 360 and warmup_s(300) == 120 and warmup_s(180) == 90
    # the sample taken after the sessions stopped (memory handed back) is no trend
    samples = [{"t_s": t, "rss_mb": 100.0} for t in range(0, 301, 10)] + [{"t_s": 304, "rss_mb": 1}]
    assert [s["t_s"] for s in steady_samples(samples, 300)] == list(range(120, 301, 10))


@pytest.mark.timeout(600)  # a cold model load and three minutes of turns on 2 cores
def test_a_three_minute_soak_loses_no_turn_and_leaks_no_descriptor(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    args = ["--minutes", str(MINUTES), "--sessions", str(SESSIONS), "--seed", "1"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), *args, "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "service")])},
        capture_output=True,
        text=True,
        timeout=540,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no result (rc {proc.returncode}): {proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert set(RESULT_KEYS) <= set(result)
    assert result["minutes"] == MINUTES and result["sessions"] == SESSIONS
    examples = json.dumps(result["problem_examples"], indent=1, ensure_ascii=False)
    assert result["turns_lost"] == 0, examples
    # Deliberate cuts end on this side (the client cancels its own call): no status of
    # theirs may come back from the server, nor any other.
    assert result["errors_by_code"] == {}, examples
    assert result["problems"] == {}, examples  # positions, texts, usage, sessions
    assert result["position_errors"] == result["text_errors"] == 0
    assert result["client_crashes"] == [] and result["stack_left_running"] == []
    assert result["sessions_leaked"] == result["sessions_missing"] == 0
    assert result["turns"] >= TURNS_FLOOR, result["turns"]
    # every kind of action happened
    assert result["turns_cancelled"] and result["turns_cut"] and result["resumes"]
    assert result["sessions_ended"] and result["turns_pipelined"]
    assert result["fds_end"] <= result["fds_start"] + FDS_SLACK, (
        result["fds_start"],
        result["fds_end"],
    )
    assert result["rss_mb_start"] > 0 and result["rss_slope_mb_per_h"] is not None
    assert result["ttft_p50_ms"] is not None and result["itl_p99_ms"] is not None
    assert proc.returncode == 0
    assert json.loads(out.read_text())["turns"] == result["turns"]
    assert (tmp_path / "soak.png").stat().st_size > 0
