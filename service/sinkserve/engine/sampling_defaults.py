"""The engine's base sampling: where a turn's unset sampling fields come from.

A turn starts from these, then its session's defaults, then its own fields
(`Engine.submit`). Under `EngineConfig.sampling == "model"` they are a chat default
updated by the checkpoint's own recommendation; under "greedy", temperature 0 and no
penalty (reproducible replies).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from sinkserve.config import EngineConfig
from sinkserve.engine.types import InvalidRequest, SamplingParams

# What a chat user expects of a model that recommends nothing: greedy decoding sent the
# 135M default model into a loop to max_new_tokens on a newcomer's first chat
# (tests/gateway/test_chat_defaults.py). The penalty covers every token of the session's
# cache (sinks + window, chat template included), as transformers' covers the whole
# sequence. On that chat (two 256-token replies, seeds 0-4) temperature 0.7 / top-p 0.9
# looped with a penalty of 1.05 (a phrase 11 times) and of 1.1 (7 times); these settings
# repeated no 4-word phrase more than twice. A stronger penalty (1.2) also held, but it
# penalises the words of the user's own message, which an answer often has to repeat.
CHAT_SAMPLING: Mapping[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "repetition_penalty": 1.1,
}


def default_sampling(config: EngineConfig, recommended: Mapping[str, Any]) -> SamplingParams:
    """The base sampling under `config.sampling`; `recommended` is the checkpoint's
    (`ModelConfig.sampling`). A recommendation the engine would refuse is logged
    and ignored: a bad metadata value must fail neither the load nor every turn."""
    greedy = SamplingParams(
        max_new_tokens=min(SamplingParams.max_new_tokens, config.max_new_tokens)
    )
    if config.sampling == "greedy":
        return greedy  # the class defaults are greedy, with no penalty
    chat = greedy.updated(CHAT_SAMPLING)
    try:
        ours = chat.updated(recommended)
        ours.validate(config.max_new_tokens)
    except InvalidRequest as err:
        structlog.get_logger(__name__).warning(
            "the model's recommended sampling is ignored",
            error=str(err),
            recommended=dict(recommended),
        )
        return chat
    return ours
