"""A conversation streamed far past the model's training context (SmolLM2: 8,192 tokens)
through the Responses API, with no error: the session keeps its sinks and a rolling
window, each turn prefills only its own tokens, and the model still answers after it."""

from __future__ import annotations

from openai import AsyncOpenAI

from tests.openai_api.conftest import MODEL

TRAINING_CONTEXT = 8192
# About 840 tokens: each turn stays under the default window (1,020) it must fit in.
PASSAGE = "The river runs past the old mill and the children count the boats. " * 60


async def test_a_conversation_streams_past_the_models_context_without_an_error(
    client: AsyncOpenAI,
) -> None:
    conversation = await client.conversations.create()
    position = turns = 0
    while position <= TRAINING_CONTEXT + 500:
        stream = await client.responses.create(
            model=MODEL,
            conversation=conversation.id,
            input=PASSAGE,
            max_output_tokens=2,
            stream=True,
        )
        events = [event async for event in stream]
        last = events[-1]
        assert last.type in ("response.completed", "response.incomplete"), last
        assert last.response.usage is not None
        assert last.response.usage.input_tokens < 1024
        assert last.response.model_extra is not None  # the sinkserve extension is extra
        extension = last.response.model_extra["sinkserve"]
        assert extension["cache_position"] > position
        position, turns = extension["cache_position"], turns + 1
    assert extension["evicted_tokens"] > TRAINING_CONTEXT - 1024
    assert extension["cached_tokens"] <= 1024  # sinks + window: memory stays bounded
    answer = await client.responses.create(
        model=MODEL,
        conversation=conversation.id,
        input="What did the children count?",
        max_output_tokens=16,
    )
    assert answer.status in ("completed", "incomplete") and answer.usage is not None
    assert answer.usage.output_tokens >= 1 and answer.usage.input_tokens < 30
    await client.conversations.delete(conversation.id)
