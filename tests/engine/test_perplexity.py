"""Streaming perplexity on real English text (KJV Psalms from Debian's bible-kjv, made by
`make testdata`) through the serving cache code, with the default SmolLM2 model.

These are the quality acceptance checks: attention sinks stay close to dense attention,
plain window attention does not, and past the model's 8K training context the sinks keep
their positions right (inside the context, wrong sink positions would still look fine).
The rebuild tests (a cache recomputed from its token ids) run on a small random model.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sinkserve.config import EngineConfig
from sinkserve.engine.loader import load_model
from sinkserve.engine.model import Llama
from sinkserve.engine.perplexity import PplResult, cache_shape, read_text, streaming_nll
from sinkserve.engine.runner import TorchRunner
from sinkserve.engine.types import Event, SamplingParams, TurnEnd
from tests.engine.helpers import RecordingEngine, TinyModel, synthetic_tokenizer, tiny_model

TEXT = Path(__file__).resolve().parents[2] / ".cache" / "kjv-psalms.txt"
CHUNK = 256  # tokens per step; per-token logits equal token-by-token feeding (tested below)


@pytest.fixture(scope="module")
def model_and_tokens() -> tuple[Llama, list[int]]:
    assert TEXT.exists(), f"{TEXT} is missing: run `make testdata`"
    model, tokenizer = load_model(EngineConfig(max_sessions=1))
    return model, tokenizer.encode(read_text(TEXT))


def evaluate(model: Llama, tokens: list[int], mode: str, n: int, chunk: int = CHUNK) -> PplResult:
    sinks, window = cache_shape(mode, 4, 1020, n)
    runner = TorchRunner(EngineConfig(sinks=sinks, window=window, max_sessions=1), model)
    return streaming_nll(runner, tokens[: n + 1], chunk=chunk)


def test_chunked_evaluation_scores_every_token_as_token_by_token_feeding(
    model_and_tokens: tuple[Llama, list[int]],
) -> None:
    model, tokens = model_and_tokens
    runner = TorchRunner(EngineConfig(sinks=4, window=40, max_sessions=1), model)
    one = streaming_nll(runner, tokens[:161], chunk=1).nll
    chunked = streaming_nll(runner, tokens[:161], chunk=37).nll
    assert torch.allclose(one, chunked, atol=2e-4), (one - chunked).abs().max()


@pytest.fixture(scope="module")
def sinks_20k(model_and_tokens: tuple[Llama, list[int]]) -> PplResult:
    """One 20,000-token sinks run; its first 8,000 scores are those of an 8,000-token run."""
    model, tokens = model_and_tokens
    return evaluate(model, tokens, "sinks", 20_000)


@pytest.mark.timeout(1800)
def test_sinks_stay_close_to_dense_and_window_attention_does_not(
    model_and_tokens: tuple[Llama, list[int]], sinks_20k: PplResult
) -> None:
    model, tokens = model_and_tokens
    dense = evaluate(model, tokens, "dense", 8000).ppl()
    sinks = sinks_20k.ppl(0, 8000)
    window = evaluate(model, tokens, "window", 8000).ppl()
    print(f"8,000 tokens: dense {dense:.3f}, sinks 4+1020 {sinks:.3f}, window 0+1024 {window:.3f}")
    assert sinks <= 1.15 * dense
    assert window > sinks


@pytest.mark.timeout(1800)
def test_past_the_training_context_sinks_keep_perplexity_flat_with_flat_memory(
    sinks_20k: PplResult,
) -> None:
    result = sinks_20k
    inside, past = result.ppl(1024, 8192), result.ppl(8192)
    print(f"sinks ppl tokens 1,024-8,192: {inside:.3f}; after 8,192: {past:.3f}")
    assert past <= 1.15 * inside
    assert max(result.rss_mb[1:]) <= 1.05 * result.rss_mb[1]  # after 2,000 tokens


# ---- rebuilds: a small random model and cache, so that evictions come early -------------

VOCAB, SINKS, WINDOW = 64, 4, 40


@pytest.fixture(scope="module")
def tiny() -> TinyModel:
    return tiny_model(VOCAB, seed=3)


def tiny_runner(tiny: TinyModel) -> TorchRunner:
    cfg, tensors = tiny
    model = Llama(cfg, tensors, torch.float32, torch.device("cpu"))
    return TorchRunner(EngineConfig(sinks=SINKS, window=WINDOW, max_sessions=1), model)


def random_ids(n: int) -> list[int]:
    return torch.randint(VOCAB, (n,), generator=torch.Generator().manual_seed(5)).tolist()


def engine_scores_after_rebuild(
    tiny: TinyModel, ids: list[int], at: int, lengths: tuple[int, ...]
) -> dict[int, float]:
    """-log p(ids[at + k]) for each k in `lengths`, from the engine: a session that was
    sent ids[:at], exported without its KV and imported back (so rebuilt from its ids),
    then sent ids[at : at + k]. Prefill runs 8 tokens a step, as the scored runs do."""
    cfg, tensors = tiny
    rec = RecordingEngine(
        synthetic_tokenizer(VOCAB),
        tensors,
        cfg,
        sinks=SINKS,
        window=WINDOW,
        max_sessions=1,
        step_token_budget=8,
    )
    engine = rec.engine
    engine.start()

    def turn(sid: str, prompt: list[int]) -> int:
        done = threading.Event()

        def on_events(events: list[Event]) -> None:
            if any(isinstance(e, TurnEnd) for e in events):
                done.set()

        turn_id = engine.submit(sid, prompt, SamplingParams(max_new_tokens=1), on_events)
        assert done.wait(60)
        return turn_id

    try:
        sid = engine.open_session()
        turn(sid, ids[:at])
        # The token that turn sampled is owed to the next one; it is not part of the text.
        (snap,) = [replace(s, owed=[]) for s in engine.export_sessions(with_kv=False)]
        scores = {}
        for k in lengths:
            engine.end_session(sid)
            engine.import_sessions([snap])
            logits = rec.logits[turn(sid, ids[at : at + k])][0]  # after its last prompt id
            scores[k] = -torch.log_softmax(logits.double(), dim=-1)[ids[at + k]].item()
        return scores
    finally:
        engine.shutdown()


def test_a_rebuild_before_anything_was_evicted_leaves_every_score_unchanged(
    tiny: TinyModel,
) -> None:
    runner = tiny_runner(tiny)
    ids = random_ids(SINKS + WINDOW + 1)  # the last score sees a full cache; none evicted
    plain = streaming_nll(runner, ids, chunk=8).nll
    rebuilt = streaming_nll(runner, ids, chunk=8, rebuild_every=16).nll  # at 16 and 32
    torch.testing.assert_close(rebuilt, plain, rtol=0, atol=1e-5)


def test_after_evictions_a_rebuild_changes_scores_only_from_its_point_as_the_engine_does(
    tiny: TinyModel,
) -> None:
    at = 96  # 52 ids were evicted by then; the window rolls past the rebuilt keys by 136
    ids = random_ids(161)
    runner = tiny_runner(tiny)
    plain = streaming_nll(runner, ids, chunk=8).nll
    rebuilt = streaming_nll(runner, ids, chunk=8, rebuild_every=at).nll
    assert torch.equal(rebuilt[:at], plain[:at])
    assert (rebuilt[at:] - plain[at:]).abs().max() > 1e-3  # the lost context shows
    # The rebuilt cache is the one the engine rebuilds from a snapshot's ids: a rebuild
    # with a key at a wrong position, or computed from other ids, scores differently.
    lengths = (1, 8, 30)
    engine = engine_scores_after_rebuild(tiny, ids, at, lengths)
    got = torch.tensor([rebuilt[at + k - 1].item() for k in lengths], dtype=torch.float64)
    want = torch.tensor([engine[k] for k in lengths], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
