"""Acceptance of the Triton model: a real tritonserver on loopback, the real engine."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conftest import MODEL, TEST_PARAMETERS, write_parameters

from sinkserve.triton_server.launcher import TritonServer
from tests.waits import wait_until

if TYPE_CHECKING:  # pytest imports the conftest as `conftest`; mypy knows it by its path
    from tests.triton.conftest import Client, Reply

QUESTIONS = ["What is the capital of France?", "And of Germany?", "And of Italy?"]
LONG = "Write a long story about a dragon who learns to cook."
ME = "turn-ids"  # an owner of its own: the per-owner session limit is small here


def metric(server: TritonServer, name: str) -> float | None:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    m = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, flags=re.M)
    return float(m.group(1)) if m else None


def wait_for_metric(server: TritonServer, name: str, ok: Callable[[float], bool]) -> float:
    """The metric's value once `ok` holds for it (the server exports it every 0.2 s or so)."""
    value = wait_until(
        f"metric {name}",
        lambda: metric(server, name),
        lambda v: v is not None and ok(v),
        poll_s=0.2,
    )
    assert value is not None
    return value


def log_count(server: TritonServer, text: str) -> int:
    """How often `text` is in tritonserver's log (the model's own log lines included)."""
    assert server.log_path is not None
    return server.log_path.read_text(errors="replace").count(text)


async def conversation(client: Client, sid: str, turns: list[str]) -> list[Reply]:
    replies = []
    await client.open(sid)
    for text in turns:
        reply = await client.turn(sid, text, max_tokens=24)
        assert not reply.error, reply.error
        replies.append(reply)
    return replies


async def test_a_three_turn_session_streams_and_prefills_only_each_turns_own_tokens(
    client: Client,
) -> None:
    replies = await conversation(client, "three", QUESTIONS)
    assert "Paris" in replies[0].text
    for reply in replies:
        assert reply.responses > 1  # streamed, not one blob
        assert reply.responses < len(reply.ids)  # ...in deltas of several tokens (the budget)
        assert reply.final["finish_reason"][0] in (b"stop", b"length")
        # Every streamed token is counted; a final stop token is counted, not streamed.
        assert len(reply.ids) in (
            reply.usage["generated_tokens"],
            reply.usage["generated_tokens"] - 1,
        )
    two, three = replies[1].usage, replies[2].usage
    # Turn 3 prefilled only its own few tokens, not the conversation so far...
    assert three["prompt_tokens"] < 20 < two["cache_position"]
    # ...and its cache position continues from turn 2 (the last sampled token of a turn
    # enters the cache with the next one).
    assert three["cache_position"] == (
        two["cache_position"] + three["prompt_tokens"] + three["generated_tokens"] - 1
    )
    assert three["cached_tokens"] <= 4 + 60 and three["evicted_tokens"] > 0


async def test_two_sessions_streamed_at_once_interleave(client: Client) -> None:
    arrivals: list[tuple[str, bool]] = []

    async def stream(sid: str) -> None:
        await client.open(sid)
        async for result, error in client.stream(session_id=sid, text_input=LONG, max_tokens=32):
            assert error is None, error
            final = result.as_numpy("finish_reason") is not None
            arrivals.append((sid, final))

    await asyncio.wait_for(asyncio.gather(stream("left"), stream("right")), 120)
    first_final = next(i for i, (_, final) in enumerate(arrivals) if final)
    assert {sid for sid, _ in arrivals[:first_final]} == {"left", "right"}


async def test_the_http_generate_stream_endpoint_streams_server_sent_events(
    client: Client, triton: TritonServer
) -> None:
    def read(body: dict[str, object]) -> list[dict[str, Any]]:
        request = urllib.request.Request(
            f"{triton.http_url}/v2/models/sinkserve/generate_stream",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            lines = resp.read().decode().splitlines()
        return [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]

    opened = await asyncio.to_thread(read, {"request_type": "open", "session_id": "http"})
    assert json.loads(opened[0]["session_info"])["session_id"] == "http"
    body = {"text_input": QUESTIONS[0], "session_id": "http", "max_tokens": 16}
    events = await asyncio.to_thread(read, body)
    assert len(events) > 1
    assert "Paris" in "".join(e["text_output"] for e in events)
    assert events[-1]["finish_reason"] in ("stop", "length")
    assert all("finish_reason" not in e for e in events[:-1])


async def test_each_bad_input_gets_a_clear_error_and_the_server_stays_ready(
    client: Client, triton: TritonServer
) -> None:
    await client.open("bad")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"session_id": "nobody", "text": "Hi"}, "NOT_FOUND: no session 'nobody'"),
        ({"session_id": "bad", "text": ""}, "INVALID_ARGUMENT: text_input is required"),
        ({"session_id": "", "text": "Hi"}, "INVALID_ARGUMENT: session_id"),
        (
            {"session_id": "bad", "text": "Hi", "max_tokens": 100000},
            "INVALID_ARGUMENT: max_new_tokens",
        ),
        ({"session_id": "bad", "text": "Hi", "max_tokens": 0}, "INVALID_ARGUMENT: max_new_tokens"),
        ({"session_id": "bad", "text": "Hi", "top_p": 2.0}, "INVALID_ARGUMENT: top_p"),
        ({"session_id": "bad", "text": "Hi", "owner": "mallory"}, "NOT_FOUND"),
        ({"session_id": "bad", "text": "Hi", "request_type": "fly"}, "INVALID_ARGUMENT: request"),
    ]
    for inputs, expected in cases:
        reply = await client.turn(inputs.pop("session_id"), inputs.pop("text"), **inputs)
        assert expected in reply.error, (inputs, reply.error)
        assert reply.responses == 1
    assert "already exists" in await client.call("open", "bad")
    # Too many sessions of one owner: max_sessions_per_owner.
    opened = []
    for i in range(40):
        answer = await client.call("open", f"many-{i}", owner="many")
        if isinstance(answer, str):
            assert answer.startswith("RESOURCE_EXHAUSTED: owner 'many' already has"), answer
            break
        opened.append(f"many-{i}")
    else:
        raise AssertionError("the session limit was never reached")
    listed = await client.call("list", owner="many")
    assert [s["session_id"] for s in listed] == opened
    for sid in opened:
        assert (await client.call("end", sid, owner="many"))["session_id"] == sid
    assert await client.call("list", owner="many") == []
    assert triton.is_ready()
    assert "Paris" in (await client.turn("bad", QUESTIONS[0], max_tokens=16)).text


async def test_sinkserve_metrics_appear_on_the_metrics_port(
    client: Client, triton: TritonServer
) -> None:
    await conversation(client, "metrics", QUESTIONS[:1])
    assert wait_for_metric(triton, "sinkserve_generated_tokens_total", lambda v: v > 0)
    assert wait_for_metric(triton, "sinkserve_step_duration_seconds_count", lambda v: v > 0)
    for name in (
        "sinkserve_sessions_active",
        "sinkserve_sessions_in_slots",
        "sinkserve_sessions_swapped",
        "sinkserve_slots_free",
        "sinkserve_prefill_tokens_total",
        "sinkserve_evicted_tokens_total",
    ):
        assert metric(triton, name) is not None, name
    assert metric(triton, "nv_inference_count") is not None


async def test_a_cancelled_stream_ends_its_turn_and_a_reload_right_after_finalizes_the_old_model(
    client: Client, triton: TritonServer
) -> None:
    await client.open("cancel")
    stream = client.stream(session_id="cancel", text_input=LONG, max_tokens=64)
    received = 0
    async for _, error in stream:
        assert error is None
        received += 1
        if received == 3:
            break
    stream.cancel()
    # The engine notices within a step: no turn runs any more.
    assert wait_for_metric(triton, "sinkserve_turns_running", lambda v: v == 0) == 0
    finalized = log_count(triton, "model finalized")
    await client.reload()
    # Triton finalizes the old instance only once every request it served had its FINAL
    # response: a cancelled stream left without one would keep it (and its sessions).
    await asyncio.to_thread(
        wait_until,
        "the old instance to log 'model finalized'",
        lambda: log_count(triton, "model finalized"),
        lambda n: n > finalized,
    )
    # It handed the session over: the new instance continues it.
    reply = await client.turn("cancel", QUESTIONS[0], max_tokens=16)
    assert not reply.error and "Paris" in reply.text


async def test_a_reload_during_a_conversation_continues_it_with_the_same_greedy_tokens(
    client: Client,
) -> None:
    baseline = await conversation(client, "no-reload", QUESTIONS)
    before = await conversation(client, "reloaded", QUESTIONS[:2])
    await client.open("in-flight")
    # A turn in flight while the model reloads finishes on the old instance.
    started = asyncio.Event()
    in_flight = asyncio.create_task(client.turn("in-flight", LONG, max_tokens=64, started=started))
    await asyncio.wait_for(started.wait(), 120)  # its first tokens came: it runs
    await client.reload()
    first = await in_flight
    assert not first.error and first.final
    after = await client.turn("reloaded", QUESTIONS[2], max_tokens=24)
    assert not after.error, after.error
    assert after.ids == baseline[2].ids
    assert after.usage == baseline[2].usage
    assert before[1].usage["cache_position"] < after.usage["cache_position"]
    # The session whose turn straddled the reload continues too.
    nxt = await client.turn("in-flight", "Thanks!", max_tokens=8)
    assert not nxt.error, nxt.error
    assert nxt.usage["cache_position"] > first.usage["cache_position"]


async def test_unload_drains_and_a_load_with_other_weights_rebuilds_sessions_from_tokens(
    client: Client, triton: TritonServer
) -> None:
    first = (await conversation(client, "rebuilt", QUESTIONS[:2]))[-1]
    await client.grpc.unload_model(MODEL)
    config = Path(triton.model_repository) / MODEL / "config.pbtxt"
    write_parameters(config, {**TEST_PARAMETERS, "dtype": "bfloat16"})
    try:
        await client.grpc.load_model(MODEL)
        reply = await client.turn("rebuilt", QUESTIONS[2], max_tokens=24)
        assert not reply.error, reply.error
        assert "Rome" in reply.text
        assert reply.usage["cache_position"] > first.usage["cache_position"]
    finally:
        write_parameters(config, TEST_PARAMETERS)
        await client.grpc.load_model(MODEL)


async def test_a_turn_with_stream_false_is_one_final_response_with_the_whole_reply(
    client: Client,
) -> None:
    await client.open("whole")
    reply = await client.turn("whole", QUESTIONS[0], max_tokens=16, stream=False)
    assert not reply.error and reply.responses == 1
    assert "Paris" in reply.text and reply.final["finish_reason"][0] == b"stop"


async def test_a_cancel_by_turn_id_that_comes_first_keeps_the_turn_from_ever_feeding(
    client: Client,
) -> None:
    """A cut client's cancel may overtake its turn: the turn is refused when it arrives, and
    its prompt never reaches the session."""
    await client.open("tomb", owner=ME)
    before = await client.call("get", "tomb", owner=ME)
    assert await client.call("cancel", "tomb", owner=ME, turn_id="cut-1") == {"cancelled": False}
    refused = await client.turn("tomb", QUESTIONS[0], owner=ME, max_tokens=8, turn_id="cut-1")
    assert refused.error.startswith("CANCELLED"), refused.error
    assert (await client.call("get", "tomb", owner=ME))["position"] == before["position"]
    reply = await client.turn("tomb", QUESTIONS[0], owner=ME, max_tokens=8, turn_id="next-1")
    assert not reply.error and "Paris" in reply.text
    assert reply.usage["cache_position"] == (
        before["position"] + reply.usage["prompt_tokens"] + reply.usage["generated_tokens"] - 1
    )
    await client.call("end", "tomb", owner=ME)


async def test_a_late_cancel_of_an_old_turn_leaves_the_running_turn_alone(client: Client) -> None:
    await client.open("late", owner=ME)
    first = await client.turn("late", QUESTIONS[0], owner=ME, max_tokens=4, turn_id="old")
    assert not first.error
    stream = client.stream(
        session_id="late", text_input=LONG, owner=ME, max_tokens=48, turn_id="new"
    )
    responses = aiter(stream)
    _, error = await anext(responses)  # "new" runs
    assert error is None
    assert await client.call("cancel", "late", owner=ME, turn_id="old") == {"cancelled": False}
    assert await client.call("cancel", "late", owner=ME, turn_id="new") == {"cancelled": True}
    final = None
    async for result, error in responses:
        assert error is None
        if result.as_numpy("finish_reason") is not None:
            final = result.as_numpy("finish_reason")[0]
    assert final == b"cancelled"
    await client.call("end", "late", owner=ME)
