"""POST /v1/responses through the official SDK: conversations held on the server, through
`conversation` and through `previous_response_id`, prefilling only each turn's own tokens."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from tests.openai_api.conftest import MODEL

QUESTIONS = ("What is the capital of France?", "And of Italy?", "Thanks, bye.")
INSTRUCTIONS = "You are a helpful assistant. Answer every question in one word, no punctuation."


def stats(reply: Any) -> dict[str, Any]:
    """The extension field `sinkserve`: the session's cache after the turn."""
    extension: dict[str, Any] = reply.model_extra["sinkserve"]
    return extension


async def test_three_turns_through_a_conversation_prefill_only_their_own_tokens(
    client: AsyncOpenAI,
) -> None:
    conversation = await client.conversations.create()
    assert conversation.id.startswith("conv_") and conversation.object == "conversation"
    held = 0  # tokens the session holds: what a client would resend without it
    for question in QUESTIONS:
        response = await client.responses.create(
            model=MODEL, conversation=conversation.id, input=question, max_output_tokens=16
        )
        assert response.status in ("completed", "incomplete") and response.output_text
        assert response.conversation is not None and response.conversation.id == conversation.id
        assert response.usage is not None and response.usage.output_tokens >= 1
        if held:  # later turns: their own few tokens, never the history again
            assert response.usage.input_tokens < 20 < held
        assert stats(response)["cache_position"] > held
        held = stats(response)["cache_position"]
    again = await client.conversations.retrieve(conversation.id)
    assert again.model_extra["sinkserve"]["turns"] == 3  # type: ignore[index]
    assert again.model_extra["sinkserve"]["cache_position"] == held  # type: ignore[index]
    deleted = await client.conversations.delete(conversation.id)
    assert deleted.deleted and deleted.id == conversation.id
    with pytest.raises(openai.NotFoundError):
        await client.conversations.retrieve(conversation.id)


async def test_previous_response_ids_chain_turns_and_only_the_latest_continues(
    client: AsyncOpenAI,
) -> None:
    first = await client.responses.create(
        model=MODEL,
        input="Name a colour.",
        instructions=INSTRUCTIONS,
        max_output_tokens=8,
    )
    assert first.instructions == INSTRUCTIONS and first.usage is not None
    stream = await client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input="And another one?",
        max_output_tokens=8,
        stream=True,
    )
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds and "error" not in kinds
    assert [event.sequence_number for event in events] == list(range(len(events)))
    second = events[-1].response  # type: ignore[union-attr]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and second.output_text == deltas and second.id == events[0].response.id  # type: ignore[union-attr]
    assert second.previous_response_id == first.id and second.usage is not None
    assert second.usage.input_tokens < 20 < stats(first)["cache_position"]
    third = await client.responses.create(
        model=MODEL, previous_response_id=second.id, input="Thanks.", max_output_tokens=8
    )
    assert third.usage is not None and third.usage.input_tokens < 20
    assert stats(third)["cache_position"] > stats(second)["cache_position"]
    # the session moved on: an older response cannot be continued (it holds no branches)
    with pytest.raises(openai.ConflictError) as stale:
        await client.responses.create(
            model=MODEL, previous_response_id=first.id, input="Again?", max_output_tokens=4
        )
    assert stale.value.status_code == 409
    assert stale.value.body["param"] == "previous_response_id"  # type: ignore[index]
    await client.conversations.delete("conv_" + stats(third)["session_id"])


async def test_a_response_not_stored_leaves_nothing_to_continue(client: AsyncOpenAI) -> None:
    response = await client.responses.create(
        model=MODEL, input="Say hi.", max_output_tokens=4, store=False
    )
    # `store` is an extra field to the SDK's Response model.
    assert response.output_text and response.store is False  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(
            model=MODEL, previous_response_id=response.id, input="Again.", max_output_tokens=4
        )
