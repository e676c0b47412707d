"""Where a turn's unset sampling fields come from: the model's recommendation over a chat
default, or greedy where the configuration asks for it."""

from __future__ import annotations

from sinkserve.config import EngineConfig
from sinkserve.engine.sampling_defaults import default_sampling
from sinkserve.engine.types import SamplingParams

CHAT = EngineConfig()  # sampling="model"


def test_a_model_that_recommends_nothing_gets_the_chat_default() -> None:
    params = default_sampling(CHAT, {})
    assert (params.temperature, params.top_p, params.repetition_penalty) == (0.8, 0.95, 1.1)
    assert (params.top_k, params.max_new_tokens, params.seed) == (40, 256, None)


def test_the_models_recommendation_replaces_only_the_fields_it_sets() -> None:
    params = default_sampling(CHAT, {"temperature": 0.3, "top_k": 20})
    assert (params.temperature, params.top_k, params.top_p) == (0.3, 20, 0.95)
    assert params.repetition_penalty == 1.1


def test_greedy_is_the_old_default_whatever_the_model_recommends() -> None:
    greedy = EngineConfig(sampling="greedy", max_new_tokens=64)
    params = default_sampling(greedy, {"temperature": 0.3})
    assert params == SamplingParams(max_new_tokens=64)
    assert (params.temperature, params.repetition_penalty) == (0.0, 1.0)


def test_a_recommendation_the_engine_would_refuse_is_ignored_not_fatal() -> None:
    chat = default_sampling(CHAT, {})
    assert default_sampling(CHAT, {"top_p": 0.0}) == chat
    assert default_sampling(CHAT, {"temperature": "hot"}) == chat
