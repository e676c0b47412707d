"""The CUDA runner's decode body (Triton kernels, here in Triton's interpreter on CPU, with
graphs off) feeds the engine logits equal to the plain StreamingLLM method's."""

from __future__ import annotations

import random
from functools import partial

import pytest

from sinkserve.engine.cuda_runner import CudaGraphRunner
from sinkserve.engine.tokenizer import Tokenizer
from tests.engine.helpers import RecordingEngine, TinyModel, tiny_model
from tests.engine.test_engine_matches_oracle import (
    Conversation,
    run_until_idle,
    tokens,
)

# sm_count 8 makes the kernel split the window over several programs, as on a GPU.
Runner = partial(CudaGraphRunner, graphs=False, sm_count=8)


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> TinyModel:
    return tiny_model(tokenizer.vocab_size)


def test_one_session_matches_the_oracle_through_three_window_turnovers(
    tokenizer: Tokenizer, model: TinyModel
) -> None:
    cfg, tensors = model
    sinks, window = 4, 20
    rec = RecordingEngine(
        tokenizer, tensors, cfg, Runner, sinks=sinks, window=window, step_token_budget=7
    )
    conv = Conversation(rec, rec.engine.open_session())
    rng = random.Random(1)
    for n_prompt in (30, 9, 1, 17):
        conv.submit(tokens(rng, n_prompt, cfg.vocab_size), max_new=19)
        run_until_idle(rec)
    assert rec.engine.get_session(conv.sid).position >= 3 * (sinks + window)
    assert conv.check(sinks, window, cfg, tensors) == 4 * 19


def test_batched_sessions_at_different_positions_match_the_oracle(
    tokenizer: Tokenizer, model: TinyModel
) -> None:
    cfg, tensors = model
    sinks, window = 2, 12
    rec = RecordingEngine(
        tokenizer, tensors, cfg, Runner, sinks=sinks, window=window, max_sessions=5,
        step_token_budget=24,
    )  # fmt: skip
    rng = random.Random(3)
    convs = [Conversation(rec, rec.engine.open_session()) for _ in range(5)]
    for i, conv in enumerate(convs[:4]):
        for _ in range(i % 3):
            conv.submit(tokens(rng, 5 + 3 * i, cfg.vocab_size), max_new=4 + i)
            run_until_idle(rec)
    for i, conv in enumerate(convs[:4]):
        conv.submit(tokens(rng, 1 + 4 * i, cfg.vocab_size), max_new=12 + 2 * i)
    for _ in range(4):
        rec.engine.step()
    convs[4].submit(tokens(rng, 30, cfg.vocab_size), max_new=15)  # prefills beside decodes
    run_until_idle(rec)
    for conv in convs:
        assert conv.check(sinks, window, cfg, tensors) > 0
