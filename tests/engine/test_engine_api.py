"""The engine's public API: sessions, turns, limits, sampling and snapshots."""

from __future__ import annotations

import asyncio
import codecs
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from sinkserve.engine.engine import Engine, OnEvents, Sampling
from sinkserve.engine.runner import TorchRunner
from sinkserve.engine.sampler import SampleRow
from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.engine.types import (
    Event,
    FinishReason,
    InvalidRequest,
    ResourceExhausted,
    SamplingParams,
    SessionBusy,
    TokenEvent,
    TurnEnd,
    UnknownSession,
)
from tests.engine.helpers import MakeEngine, RecordingEngine, TinyModel, tiny_model
from tests.waits import wait_until


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> TinyModel:
    return tiny_model(tokenizer.vocab_size, seed=7)


@pytest.fixture
def make(tokenizer: Tokenizer, model: TinyModel) -> Iterator[MakeEngine]:
    engines: list[Engine] = []

    def build(**config: Any) -> Engine:
        rec = RecordingEngine(tokenizer, model[1], model[0], **config)
        rec.engine.start()
        engines.append(rec.engine)
        return rec.engine

    yield build
    for e in engines:
        e.shutdown()


def collect(engine: Engine, sid: str, prompt: str | Sequence[int], **params: Any) -> list[Event]:
    async def run() -> list[Event]:
        return [e async for e in engine.generate(sid, prompt, SamplingParams(**params))]

    return asyncio.run(run())


def last(events: Sequence[Event]) -> TurnEnd:
    """The TurnEnd that ends a turn's events."""
    end = events[-1]
    assert isinstance(end, TurnEnd), end
    return end


def ids(events: Sequence[Event]) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


def test_a_seed_makes_sampling_reproducible_and_another_seed_changes_it(make: MakeEngine) -> None:
    engine = make()
    runs = []
    for seed in (11, 11, 12):
        sid = engine.open_session()
        runs.append(
            ids(
                collect(
                    engine,
                    sid,
                    [5, 6, 7],
                    max_new_tokens=24,
                    temperature=1.5,
                    seed=seed,
                    ignore_eos=True,
                )
            )
        )
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_each_turn_of_a_seeded_session_draws_its_own_stream_and_a_replay_repeats_them(
    make: MakeEngine,
) -> None:
    engine = make()
    seeds: list[int] = []  # the random stream of each turn, in order

    def note_streams(rows: Sequence[SampleRow], logits: object) -> None:
        for row in rows:
            if row.rng is not None and (not seeds or seeds[-1] != row.rng.initial_seed()):
                seeds.append(row.rng.initial_seed())

    assert isinstance(engine.runner, TorchRunner)
    engine.runner.logits_hook = note_streams
    params: dict[str, Any] = {"max_new_tokens": 4, "temperature": 1.5, "seed": 7}
    params["ignore_eos"] = True
    replays = []
    for _ in range(2):
        sid = engine.open_session()
        replies = [ids(collect(engine, sid, [5, 6, 7], **params)) for _ in range(2)]
        replays.append(replies)
    # One stream for every turn would make a later turn repeat an earlier one's draws.
    assert len(seeds) == 4 and seeds[0] == 7 and seeds[1] != 7
    assert seeds[2:] == seeds[:2] and replays[1] == replays[0]  # a replay repeats them


def test_top_k_of_one_is_greedy(make: MakeEngine) -> None:
    engine = make()
    a, b = engine.open_session(), engine.open_session()
    greedy = ids(collect(engine, a, [9, 8, 7], max_new_tokens=12, ignore_eos=True))
    top1 = ids(
        collect(
            engine,
            b,
            [9, 8, 7],
            max_new_tokens=12,
            temperature=0.8,
            top_k=1,
            seed=3,
            ignore_eos=True,
        )
    )
    assert greedy == top1


def test_a_turn_given_overrides_samples_with_the_engines_chat_defaults(make: MakeEngine) -> None:
    engine = make(sampling="model")
    overrides: dict[str, Any] = {"max_new_tokens": 24, "seed": 4, "ignore_eos": True}
    chat = SamplingParams(
        temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1, **overrides
    )

    async def run(params: Sampling) -> list[int]:
        return ids([e async for e in engine.generate(engine.open_session(), [5, 6, 7], params)])

    assert asyncio.run(run(overrides)) == asyncio.run(run(chat))


def test_a_sessions_info_holds_the_sampling_its_turns_start_from(make: MakeEngine) -> None:
    chat, greedy = make(sampling="model"), make(sampling="greedy")
    mine = chat.get_session(chat.open_session(sampling={"temperature": 0.2, "top_k": 5}))
    assert mine.sampling["temperature"] == 0.2 and mine.sampling["top_k"] == 5
    assert (mine.sampling["top_p"], mine.sampling["repetition_penalty"]) == (0.95, 1.1)
    plain = greedy.get_session(greedy.open_session()).sampling
    assert (plain["temperature"], plain["repetition_penalty"]) == (0.0, 1.0)


def test_max_new_tokens_ends_with_length_and_usage_counts_the_turn(make: MakeEngine) -> None:
    engine = make(sinks=2, window=8)
    sid = engine.open_session()
    events = collect(engine, sid, [4] * 20, max_new_tokens=5, ignore_eos=True)
    end = events[-1]
    assert isinstance(end, TurnEnd) and end.finish_reason is FinishReason.LENGTH
    assert len(ids(events)) == 5
    # 20 prompt tokens + 4 generated ones fed (the last is owed to the next turn)
    assert (end.usage.prompt_tokens, end.usage.position, end.usage.cached_tokens) == (20, 24, 10)
    assert end.usage.evicted_tokens == 14
    events = collect(engine, sid, [4, 4], max_new_tokens=1, ignore_eos=True)
    assert last(events).usage.prompt_tokens == 3  # the owed token + its own two


def test_a_stop_token_id_ends_the_turn_and_is_not_streamed(make: MakeEngine) -> None:
    engine = make()
    sid = engine.open_session()
    first = ids(collect(engine, sid, [5, 6, 7], max_new_tokens=8, ignore_eos=True))
    sid2 = engine.open_session()
    events = collect(
        engine, sid2, [5, 6, 7], max_new_tokens=8, stop_token_ids=(first[3],), ignore_eos=True
    )
    cut = first.index(first[3])
    assert ids(events) == first[:cut]
    assert last(events).finish_reason is FinishReason.STOP


def test_bad_requests_raise_clear_errors(make: MakeEngine) -> None:
    engine = make(max_sessions=1, max_host_sessions=0)
    with pytest.raises(UnknownSession):
        engine.submit("nope", [1], SamplingParams(), lambda e: None)
    sid = engine.open_session()
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        engine.submit(sid, [1], SamplingParams(max_new_tokens=0), lambda e: None)
    with pytest.raises(InvalidRequest, match="empty"):
        engine.submit(sid, "", SamplingParams(), lambda e: None)
    with pytest.raises(InvalidRequest, match="already exists"):
        engine.open_session(sid)
    with pytest.raises(ResourceExhausted):
        engine.open_session()


def test_a_turn_or_system_prompt_longer_than_the_window_is_refused_before_any_work(
    make: MakeEngine,
) -> None:
    engine = make(sinks=2, window=8, max_prompt_tokens=0)  # 0: the window
    sid = engine.open_session()
    with pytest.raises(InvalidRequest, match=r"9 tokens .* the limit is 8 tokens"):
        engine.submit(sid, [4] * 9, SamplingParams(), lambda e: None)
    assert engine.get_session(sid).turns == 0 and engine.stats().turns_running == 0
    assert ids(collect(engine, sid, [4] * 8, max_new_tokens=2, ignore_eos=True))
    with pytest.raises(InvalidRequest, match=r"system prompt is .* the limit is 8"):
        engine.open_session(system="a long system prompt " * 8)


def test_a_second_turn_while_one_runs_is_refused_and_cancel_ends_the_first(
    make: MakeEngine,
) -> None:
    engine = make()
    sid = engine.open_session()
    ends: list[TurnEnd] = []
    ended = threading.Event()

    def on_events(events: Sequence[Event]) -> None:
        ends.extend(e for e in events if isinstance(e, TurnEnd))
        if ends:
            ended.set()

    turn = engine.submit(
        sid, [3, 4], SamplingParams(max_new_tokens=4000, ignore_eos=True), on_events
    )
    with pytest.raises(SessionBusy):
        engine.submit(sid, [5], SamplingParams(), lambda e: None)
    engine.cancel(turn)
    assert ended.wait(60), "the cancelled turn never got its TurnEnd"
    assert ends[0].finish_reason is FinishReason.CANCELLED
    assert engine.stats().turns_running == 0


def test_a_new_turn_after_a_cancel_waits_for_the_cancelled_turn_instead_of_being_refused(
    tokenizer: Tokenizer, model: TinyModel
) -> None:
    # Stepped by hand: the cancelled turn is still running when the next turn arrives.
    engine = RecordingEngine(tokenizer, model[1], model[0]).engine
    sid = engine.open_session()
    ends: list[TurnEnd] = []

    def on_events(events: Sequence[Event]) -> None:
        ends.extend(e for e in events if isinstance(e, TurnEnd))

    first = engine.submit(
        sid, [3, 4], SamplingParams(max_new_tokens=4000, ignore_eos=True), on_events
    )
    engine.step()
    engine.cancel(first)
    submitted: list[object] = []
    # Set when the submit starts waiting on the engine's condition (or came back without).
    waiting = threading.Event()
    engine._ended = SignallingCondition(engine._lock, waiting)

    def submit() -> None:
        submitted.append(
            _submit_or_error(engine, sid, [5], SamplingParams(max_new_tokens=3), on_events)
        )
        waiting.set()

    thread = threading.Thread(target=submit)
    thread.start()
    # The submit must be waiting before the step that ends the cancelled turn runs.
    assert waiting.wait(60) and not submitted, submitted
    engine.step()
    thread.join(timeout=10)
    assert isinstance(submitted[0], int), submitted  # a turn id, not SessionBusy
    while len(ends) < 2:
        engine.step()
    assert [e.finish_reason for e in ends] == [FinishReason.CANCELLED, FinishReason.LENGTH]
    assert ends[1].usage.prompt_tokens == 1 + 1  # its own token and the one owed


class SignallingCondition(threading.Condition):
    """A Condition that sets `waiting` whenever a thread starts to wait on it. It is set
    with the lock held, and `wait` registers the waiter before it releases the lock, so a
    notify by whoever takes the lock next reaches that waiter."""

    def __init__(self, lock: threading.Lock, waiting: threading.Event) -> None:
        super().__init__(lock)
        self._waiting = waiting

    def wait(self, timeout: float | None = None) -> bool:
        self._waiting.set()
        return super().wait(timeout)


def _submit_or_error(
    engine: Engine,
    sid: str,
    prompt: Sequence[int],
    params: SamplingParams,
    on_events: OnEvents,
) -> int | Exception:
    try:
        return engine.submit(sid, prompt, params, on_events)
    except Exception as exc:  # the test asserts on what came back
        return exc


def test_a_turn_waiting_for_a_busy_slot_fails_with_resource_exhausted_and_a_retry_hint(
    make: MakeEngine,
) -> None:
    engine = make(max_sessions=1, slot_wait_s=0.2)
    a, b = engine.open_session(), engine.open_session()
    running = engine.submit(
        a, [3], SamplingParams(max_new_tokens=4000, ignore_eos=True), lambda e: None
    )
    events = collect(engine, b, [3, 3, 3], max_new_tokens=2)
    end = last(events)
    assert end.finish_reason is FinishReason.ERROR and end.error_code == "RESOURCE_EXHAUSTED"
    assert end.error.endswith("(retry after 1 s)")
    engine.cancel(running)
    # The refused turn never ran: its prompt is not owed to the next turn.
    again = last(collect(engine, b, [4, 5], max_new_tokens=2))
    assert again.finish_reason is FinishReason.LENGTH
    assert again.usage.prompt_tokens == 2


def test_ending_a_session_frees_its_slot_and_idle_sessions_expire(make: MakeEngine) -> None:
    engine = make(max_sessions=2, session_ttl_s=0.3)
    sid = engine.open_session()
    collect(engine, sid, [3, 4], max_new_tokens=2)
    assert engine.stats().slots_free == 1
    engine.end_session(sid)
    assert engine.stats().slots_free == 2 and not engine.has_session(sid)
    sid = engine.open_session()
    collect(engine, sid, [3, 4], max_new_tokens=2)
    wait_until(f"idle session {sid} to expire", lambda: engine.has_session(sid), lambda x: not x)
    assert engine.stats().slots_free == 2


def test_leaving_the_async_stream_early_cancels_the_turn(make: MakeEngine) -> None:
    engine = make()
    sid = engine.open_session()

    async def run() -> None:
        async for e in engine.generate(
            sid, [3], SamplingParams(max_new_tokens=4000, ignore_eos=True)
        ):
            if isinstance(e, TokenEvent) and e.index == 3:
                break

    asyncio.run(run())
    wait_until("the left turn to end", lambda: engine.stats().turns_running, lambda n: n == 0)
    assert last(collect(engine, sid, [5], max_new_tokens=1)).finish_reason is not FinishReason.ERROR


def test_a_session_moved_to_another_engine_with_its_kv_continues_exactly(make: MakeEngine) -> None:
    a, b, ref = make(), make(), make()
    sa, sr = a.open_session(), ref.open_session()
    for engine, sid in ((a, sa), (ref, sr)):
        collect(engine, sid, [5, 9, 13, 2], max_new_tokens=30, ignore_eos=True)
    b.import_sessions(a.export_sessions())
    moved = ids(collect(b, sa, [7, 7], max_new_tokens=20, ignore_eos=True))
    stayed = ids(collect(ref, sr, [7, 7], max_new_tokens=20, ignore_eos=True))
    assert moved == stayed


def test_a_session_rebuilt_from_its_tokens_keeps_its_position(make: MakeEngine) -> None:
    a, b = make(sinks=2, window=16), make(sinks=2, window=16)
    sid = a.open_session()
    collect(a, sid, list(range(3, 40)), max_new_tokens=10, ignore_eos=True)
    snap = a.export_sessions(with_kv=False)
    b.import_sessions(snap)
    end = last(collect(b, sid, [7, 7], max_new_tokens=3, ignore_eos=True))
    assert end.finish_reason is FinishReason.LENGTH
    assert end.usage.position == snap[0].position + 3 + 2
    assert end.usage.cached_tokens == 18


def test_a_turn_that_ends_inside_a_character_ends_with_its_replacement_character(
    tokenizer: Tokenizer, model: TinyModel
) -> None:
    # A token that is the first bytes of a multi-byte character: alone it decodes to "".
    partial = next(
        i
        for i, b in enumerate(tokenizer.token_bytes)
        if b and codecs.getincrementaldecoder("utf-8")(errors="replace").decode(b) == ""
    )
    rec = RecordingEngine(tokenizer, model[1], model[0])

    def only_partial(
        rows: Sequence[SampleRow], logits: torch.Tensor
    ) -> None:  # the model can say nothing else
        with torch.inference_mode():  # the runner's logits are inference tensors
            logits.fill_(-1e4)
            logits[:, partial] = 0.0

    rec.runner.logits_hook = only_partial
    rec.engine.start()
    try:
        sid = rec.engine.open_session()
        events = collect(rec.engine, sid, [5, 6, 7], max_new_tokens=1, ignore_eos=True)
    finally:
        rec.engine.shutdown()
    assert ids(events) == [partial]
    streamed = "".join(e.text for e in events if isinstance(e, TokenEvent)) + events[-1].text
    assert streamed == tokenizer.decode([partial]) == "\ufffd"
