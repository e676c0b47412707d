from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt
import pytest

from sinkserve.engine.types import FinishReason, InvalidRequest, TokenEvent, TurnEnd, Usage
from sinkserve.triton_server.adapter import (
    CancelWatcher,
    GetInput,
    Outputs,
    SendQueue,
    StreamPacer,
    TurnResponder,
    parse_request,
)

USAGE = Usage(prompt_tokens=5, generated_tokens=2, position=40, cached_tokens=40, evicted_tokens=0)


def inputs(**values: object) -> GetInput:
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for name, value in values.items():
        if isinstance(value, str):
            arrays[name] = np.array([value.encode()], dtype=np.object_)
        elif isinstance(value, list):
            arrays[name] = np.array([v.encode() for v in value], dtype=np.object_)
        else:
            arrays[name] = np.array([value])
    return arrays.get


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[Outputs | None, str | None, bool]] = []

    def __call__(self, outputs: Outputs | None, error: str | None, final: bool) -> None:
        self.sent.append((outputs, error, final))


def text_of(outputs: Outputs | None) -> str:
    assert outputs is not None
    text: str = outputs["text_output"][0].decode()
    return text


def ids_of(outputs: Outputs | None) -> list[int]:
    assert outputs is not None
    ids: list[int] = outputs["output_ids"].tolist()
    return ids


def test_a_minimal_request_is_a_streamed_turn_with_no_sampling_overrides() -> None:
    req = parse_request(inputs(text_input="hi", session_id="s"))
    assert (req.action, req.session_id, req.text, req.stream, req.raw) == (
        "turn",
        "s",
        "hi",
        True,
        False,
    )
    assert req.sampling == {} and req.owner == ""


def test_sampling_and_session_inputs_are_read() -> None:
    req = parse_request(
        inputs(
            request_type="open",
            owner="alice",
            system_prompt="be brief",
            max_tokens=np.int32(7),
            temperature=np.float32(0.5),
            random_seed=np.uint64(3),
            stop_words=["a", "b"],
        )
    )
    assert (req.action, req.owner, req.system_prompt, req.session_id) == (
        "open",
        "alice",
        "be brief",
        "",
    )
    assert req.sampling == {"max_new_tokens": 7, "temperature": 0.5, "seed": 3, "stop": ("a", "b")}


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"session_id": "s"}, "text_input"),
        ({"text_input": "hi"}, "session_id"),
        ({"text_input": "hi", "session_id": ""}, "session_id"),
        ({"text_input": "", "session_id": "s"}, "text_input"),
        ({"text_input": "hi", "session_id": "s", "temperature": float("nan")}, "temperature"),
        ({"text_input": "hi", "session_id": "s", "system_prompt": "x"}, "system_prompt"),
        ({"request_type": "end"}, "session_id is required for end"),
        ({"request_type": "fly"}, "request_type='fly' must be one of"),
    ],
)
def test_bad_inputs_are_rejected_naming_the_input(values: dict[str, object], named: str) -> None:
    with pytest.raises(InvalidRequest, match=named):
        parse_request(inputs(**values))


def test_a_turn_may_send_its_whole_conversation_as_messages_instead_of_text() -> None:
    history = '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]'
    req = parse_request(inputs(messages=history, session_id="s"))
    assert req.messages == (("system", "Be brief."), ("user", "Hi")) and req.text == ""


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"messages": "not json"}, "messages is not JSON"),
        ({"messages": "[]"}, "non-empty JSON array"),
        ({"messages": '[{"role": "user"}]'}, r"messages\[0\] must be"),
        ({"messages": '[{"role": "user", "content": "x"}]', "text_input": "hi"}, "instead of"),
        (
            {"messages": '[{"role": "user", "content": "x"}]', "request_type": "open"},
            "only accepted with a turn",
        ),
    ],
)
def test_malformed_messages_are_rejected(values: dict[str, object], named: str) -> None:
    with pytest.raises(InvalidRequest, match=named):
        parse_request(inputs(session_id="s", **values))


def test_session_calls_need_no_text() -> None:
    assert parse_request(inputs(request_type="end", session_id="s")).action == "end"
    assert parse_request(inputs(request_type="list", owner="bob")).owner == "bob"


def test_streamed_tokens_arrive_one_response_per_step_and_the_last_is_merged_with_usage() -> None:
    rec = Recorder()
    responder = TurnResponder(rec, stream=True)
    responder.on_events([TokenEvent(1, "Hel", 0)])
    responder.on_events([TokenEvent(2, "lo", 1), TurnEnd(FinishReason.LENGTH, USAGE)])
    assert [final for _, _, final in rec.sent] == [False, True]
    first, last = rec.sent[0][0], rec.sent[1][0]
    assert first is not None and last is not None
    assert text_of(first) == "Hel" and first["output_ids"].tolist() == [1]
    assert text_of(last) == "lo" and last["output_ids"].tolist() == [2]
    assert last["finish_reason"][0] == b"length"
    assert last["prompt_tokens"].tolist() == [5] and last["cache_position"].tolist() == [40]
    assert responder.done.is_set()


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_with_a_response_budget_held_tokens_go_out_together_and_none_is_lost() -> None:
    clock = Clock()
    pacer = StreamPacer(10.0, clock)  # 10 responses/s over 2 turns: one per 0.2 s each
    a_sent, b_sent = Recorder(), Recorder()
    a = TurnResponder(a_sent, stream=True, pacer=pacer)
    b = TurnResponder(b_sent, stream=True, pacer=pacer)
    steps = [(0.0, "x"), (0.1, "y"), (0.15, "z"), (0.25, "w"), (0.3, "v")]
    for i, (t, text) in enumerate(steps):
        clock.t = t
        a.on_events([TokenEvent(i, text, i)])
    assert [(text_of(o), ids_of(o)) for o, _, _ in a_sent.sent] == [
        ("x", [0]),  # the first delta is never held
        ("yzw", [1, 2, 3]),  # 0.25 s after the first
    ]
    b.on_events([TokenEvent(7, "q", 0), TurnEnd(FinishReason.STOP, USAGE)])  # b leaves
    assert [final for _, _, final in b_sent.sent] == [True]
    clock.t = 0.4  # 0.15 s after a's last delta: enough for one turn alone (0.1 s)
    a.on_events([TokenEvent(5, "u", 5)])
    clock.t = 0.41
    a.on_events([TokenEvent(6, "!", 6), TurnEnd(FinishReason.LENGTH, USAGE)])
    texts = [(text_of(o), final) for o, _, final in a_sent.sent]
    assert texts[2:] == [("vu", False), ("!", True)]  # the FINAL is never held
    assert "".join(t for t, _ in texts) == "xyzwvu!"
    assert [i for o, _, _ in a_sent.sent for i in ids_of(o)] == list(range(7))
    assert pacer.interval_s() == 0.0  # both turns left


def test_a_zero_budget_sends_every_steps_tokens() -> None:
    clock, rec = Clock(), Recorder()
    responder = TurnResponder(rec, stream=True, pacer=StreamPacer(0.0, clock))
    for i in range(3):
        responder.on_events([TokenEvent(i, str(i), i)])  # the clock never moves
    assert [text_of(o) for o, _, _ in rec.sent] == ["0", "1", "2"]


def test_a_non_streamed_turn_is_one_final_response_with_the_whole_text() -> None:
    rec = Recorder()
    responder = TurnResponder(rec, stream=False)
    responder.on_events([TokenEvent(1, "Hel", 0)])
    responder.on_events([TokenEvent(2, "lo", 1)])
    responder.on_events([TurnEnd(FinishReason.STOP, USAGE, text="!")])
    assert len(rec.sent) == 1
    outputs, error, final = rec.sent[0]
    assert final and error is None
    assert text_of(outputs) == "Hello!" and ids_of(outputs) == [1, 2]


def test_an_engine_error_ends_the_request_in_band_with_its_status_name() -> None:
    rec = Recorder()
    responder = TurnResponder(rec, stream=True)
    responder.on_events(
        [TurnEnd(FinishReason.ERROR, USAGE, error="no slot", error_code="RESOURCE_EXHAUSTED")]
    )
    assert rec.sent == [(None, "RESOURCE_EXHAUSTED: no slot", True)]


def test_nothing_is_sent_after_the_final_response() -> None:
    rec = Recorder()
    responder = TurnResponder(rec, stream=True)
    responder.fail("NOT_FOUND", "unknown session 'x'")
    responder.on_events([TokenEvent(1, "a", 0)])
    responder.reply({"session_info": np.array([b"{}"], dtype=np.object_)})
    assert rec.sent == [(None, "NOT_FOUND: unknown session 'x'", True)]


def test_the_watcher_cancels_a_cancelled_request_once_and_forgets_finished_ones() -> None:
    cancelled: list[int] = []
    watcher = CancelWatcher(cancelled.append, interval_s=3600)
    try:
        done, running = threading.Event(), threading.Event()
        done.set()
        flag = {"cancel": False}
        watcher.watch(1, lambda: True, done)
        watcher.watch(2, lambda: flag["cancel"], running)
        watcher.poll()
        assert cancelled == [] and watcher.watching() == 1
        flag["cancel"] = True
        watcher.poll()
        watcher.poll()
        assert cancelled == [2] and watcher.watching() == 0
    finally:
        watcher.close()
        # Its thread waits an hour between polls: it ended because close woke it (close
        # gives up joining after 5 s, and a thread left waiting would still be alive).
        assert not watcher._thread.is_alive()


def test_a_failing_send_never_raises_into_the_engine_thread_and_abandons_the_request() -> None:
    calls: list[bool] = []

    def broken(outputs: Outputs | None, error: str | None, final: bool) -> None:
        calls.append(final)
        raise RuntimeError("client went away")

    responder = TurnResponder(broken, stream=True)
    responder.on_events([TokenEvent(1, "a", 0)])
    assert responder.abandoned.is_set() and not responder.done.is_set()
    responder.on_events([TurnEnd(FinishReason.CANCELLED, USAGE)])
    assert responder.done.is_set() and calls == [False]


def test_queued_sends_leave_in_order_from_another_thread_without_blocking_the_caller() -> None:
    release = threading.Event()
    sent: list[tuple[str, bool]] = []
    threads: set[int] = set()

    def slow(outputs: Outputs | None, error: str | None, final: bool) -> None:
        release.wait(5)  # Triton's response IPC, stuck
        threads.add(threading.get_ident())
        sent.append((text_of(outputs), final))

    sends = SendQueue()
    responder = TurnResponder(slow, stream=True, sends=sends)
    responder.on_events([TokenEvent(1, "a", 0)])  # returns although the send is stuck
    responder.on_events([TokenEvent(2, "b", 1)])
    responder.on_events([TokenEvent(3, "c", 2), TurnEnd(FinishReason.STOP, USAGE)])
    assert sent == [] and responder.done.is_set()
    release.set()
    sends.close()
    assert sent == [("a", False), ("b", False), ("c", True)]
    assert threads and threading.get_ident() not in threads


def test_a_failing_queued_send_abandons_its_request_and_drops_its_later_responses() -> None:
    calls: list[bool] = []

    def broken(outputs: Outputs | None, error: str | None, final: bool) -> None:
        calls.append(final)
        raise RuntimeError("client went away")

    rec, sends = Recorder(), SendQueue()
    failing = TurnResponder(broken, stream=True, sends=sends)
    healthy = TurnResponder(rec, stream=True, sends=sends)
    failing.on_events([TokenEvent(1, "a", 0)])
    healthy.on_events([TokenEvent(1, "x", 0)])
    failing.on_events([TokenEvent(2, "b", 1), TurnEnd(FinishReason.STOP, USAGE)])
    healthy.on_events([TurnEnd(FinishReason.STOP, USAGE)])
    sends.close()
    assert calls == [False] and failing.abandoned.is_set()
    assert [final for _, _, final in rec.sent] == [False, True] and not healthy.abandoned.is_set()
