"""The repetition penalty through the engine's real runner: the runner's logits are
inference tensors, which the penalty updates in place (it once failed every engine step
that held a penalized row, and so every turn batched with it)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from sinkserve.engine.engine import Engine
from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.engine.types import Event, FinishReason, SamplingParams, TokenEvent, TurnEnd
from tests.engine.helpers import RecordingEngine, tiny_model


@pytest.fixture(scope="module")
def engine(tokenizer: Tokenizer) -> Iterator[Engine]:
    cfg, tensors = tiny_model(tokenizer.vocab_size, seed=3)
    rec = RecordingEngine(tokenizer, tensors, cfg, sinks=2, window=32)
    rec.runner.logits_hook = None  # the hook would only see the logits, never change them
    rec.engine.start()
    yield rec.engine
    rec.engine.shutdown()


def turn(engine: Engine, sid: str, **params: Any) -> list[Event]:
    async def run() -> list[Event]:
        return [e async for e in engine.generate(sid, [5, 6, 7, 5], SamplingParams(**params))]

    return asyncio.run(run())


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_penalized_turn_ends_by_length_beside_a_plain_one(
    engine: Engine, temperature: float
) -> None:
    async def both() -> tuple[list[Event], list[Event]]:
        a, b = engine.open_session(), engine.open_session()
        penalized = SamplingParams(
            max_new_tokens=6, repetition_penalty=1.3, temperature=temperature, ignore_eos=True
        )
        plain = SamplingParams(max_new_tokens=6, ignore_eos=True)

        async def collect(sid: str, params: SamplingParams) -> list[Event]:
            return [e async for e in engine.generate(sid, [5, 6, 7, 5], params)]

        return await asyncio.gather(collect(a, penalized), collect(b, plain))

    for events in asyncio.run(both()):
        end = events[-1]
        assert isinstance(end, TurnEnd) and end.finish_reason is FinishReason.LENGTH, end
        assert sum(isinstance(e, TokenEvent) for e in events) == 6


def test_a_strong_penalty_never_repeats_a_token(engine: Engine) -> None:
    strong = turn(
        engine, engine.open_session(), max_new_tokens=8, repetition_penalty=10.0, ignore_eos=True
    )
    ids = [e.token_id for e in strong if isinstance(e, TokenEvent)]
    assert len(set(ids)) == len(ids) == 8  # a strong penalty never repeats a token
