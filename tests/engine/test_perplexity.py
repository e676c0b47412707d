"""Streaming perplexity on real English text (KJV Psalms from Debian's bible-kjv, made by
`make testdata`) through the serving cache code, with the default SmolLM2 model.

These are the quality acceptance checks: attention sinks stay close to dense attention,
plain window attention does not, and past the model's 8K training context the sinks keep
their positions right (inside the context, wrong sink positions would still look fine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.config import EngineConfig
from service.engine.loader import load_model
from service.engine.model import Llama
from service.engine.perplexity import PplResult, cache_shape, read_text, streaming_nll
from service.engine.runner import TorchRunner

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


def test_chunked_evaluation_scores_every_token_as_token_by_token_feeding(model_and_tokens):
    model, tokens = model_and_tokens
    runner = TorchRunner(EngineConfig(sinks=4, window=40, max_sessions=1), model)
    one = streaming_nll(runner, tokens[:161], chunk=1).nll
    chunked = streaming_nll(runner, tokens[:161], chunk=37).nll
    assert torch.allclose(one, chunked, atol=2e-4), (one - chunked).abs().max()


@pytest.fixture(scope="module")
def sinks_20k(model_and_tokens) -> PplResult:
    """One 20,000-token sinks run; its first 8,000 scores are those of an 8,000-token run."""
    model, tokens = model_and_tokens
    return evaluate(model, tokens, "sinks", 20_000)


@pytest.mark.timeout(1800)
def test_sinks_stay_close_to_dense_and_window_attention_does_not(model_and_tokens, sinks_20k):
    model, tokens = model_and_tokens
    dense = evaluate(model, tokens, "dense", 8000).ppl()
    sinks = sinks_20k.ppl(0, 8000)
    window = evaluate(model, tokens, "window", 8000).ppl()
    print(f"8,000 tokens: dense {dense:.3f}, sinks 4+1020 {sinks:.3f}, window 0+1024 {window:.3f}")
    assert sinks <= 1.15 * dense
    assert window > sinks


@pytest.mark.timeout(1800)
def test_past_the_training_context_sinks_keep_perplexity_flat_with_flat_memory(sinks_20k):
    result = sinks_20k
    inside, past = result.ppl(1024, 8192), result.ppl(8192)
    print(f"sinks ppl tokens 1,024-8,192: {inside:.3f}; after 8,192: {past:.3f}")
    assert past <= 1.15 * inside
    assert max(result.rss_mb[1:]) <= 1.05 * result.rss_mb[1]  # after 2,000 tokens
