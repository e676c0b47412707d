"""POST /v1/chat/completions through the official SDK: stateless (a session of its own,
ended after the reply), streamed in the official chunk format, and continuing a
server-held session with only its new message."""

from __future__ import annotations

import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.openai_api.conftest import MODEL

HISTORY: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


async def test_a_completion_renders_the_whole_history_and_leaves_no_session_behind(
    client: AsyncOpenAI,
) -> None:
    completion = await client.chat.completions.create(
        model=MODEL, messages=HISTORY, max_tokens=12, temperature=0, seed=1
    )
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.completion_tokens >= 1
    # the whole history was prefilled: more than its last message alone
    assert usage.prompt_tokens > 30
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    stats = completion.model_extra["sinkserve"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        await client.conversations.retrieve("conv_" + stats["session_id"])


async def test_a_streamed_completion_sends_chunks_then_its_usage(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 5."}],
        max_completion_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        stop=["\n\n"],
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text and finished[-1] in ("stop", "length") and not any(finished[:-1])
    # include_usage: a last chunk without choices carries it; the others have it null
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])


async def test_a_session_id_continues_a_server_held_session_with_its_last_message(
    client: AsyncOpenAI,
) -> None:
    conversation = await client.conversations.create()
    prompts = []
    for how in ("body", "header"):
        # One of the two ways to name the session (the SDK leaves out what is None).
        body = {"session_id": conversation.id} if how == "body" else None
        header = conversation.id.removeprefix("conv_")
        headers = {"x-session-id": header} if how == "header" else None
        completion = await client.chat.completions.create(
            model=MODEL,
            # the history a stateless client sends: only the last message is prefilled
            messages=[*HISTORY, {"role": "user", "content": "Thanks!"}],
            max_tokens=4,
            extra_body=body,
            extra_headers=headers,
        )
        assert completion.usage is not None
        prompts.append(completion.usage.prompt_tokens)
    held = await client.conversations.retrieve(conversation.id)
    assert held.model_extra["sinkserve"]["turns"] == 2  # type: ignore[index]
    # the second turn prefilled its one message; the history alone is over 30 tokens
    assert prompts[1] < 20
    await client.conversations.delete(conversation.id)
