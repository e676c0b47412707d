"""Bad requests and refusals get OpenAI's error shape and the right HTTP status: the
client's mistakes are 4xx (never 500, never a traceback), limits 429 with a retry hint,
a model that cannot be reached 503."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from sinkserve.gateway.server import Gateway
from tests.gateway.conftest import GatewayFactory, served
from tests.openai_api.conftest import MODEL, base_url, sdk

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


async def status_of(call: Awaitable[Any]) -> tuple[int, dict[str, Any]]:
    with pytest.raises(openai.APIStatusError) as raised:
        await call
    body = raised.value.body
    assert isinstance(body, dict) and set(body) >= {"message", "type", "param", "code"}
    assert "Traceback" not in body["message"]
    return raised.value.status_code, body


Case = Callable[[AsyncOpenAI], Awaitable[Any]]
CASES: list[tuple[str, Case, int, str | None]] = [
    (
        "n above 1",
        lambda c: c.chat.completions.create(model=MODEL, messages=USER, n=2),
        400,
        "n",
    ),
    ("no messages", lambda c: c.chat.completions.create(model=MODEL, messages=[]), 400, "messages"),
    (
        "a temperature out of range",
        lambda c: c.chat.completions.create(model=MODEL, messages=USER, temperature=5),
        400,
        "temperature",
    ),
    (
        "max_tokens of zero",
        lambda c: c.chat.completions.create(model=MODEL, messages=USER, max_tokens=0),
        400,
        "max_tokens",
    ),
    (
        "a tool role",
        lambda c: c.chat.completions.create(
            model=MODEL, messages=[{"role": "tool", "content": "x", "tool_call_id": "t"}]
        ),
        400,
        "messages[0].role",
    ),
    (
        "a prompt longer than the window (the model refuses it)",
        lambda c: c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 3000}]
        ),
        400,
        None,
    ),
    (
        "an unknown model",
        lambda c: c.chat.completions.create(model="gpt-4o", messages=USER),
        404,
        "model",
    ),
    (
        "an unknown conversation",
        lambda c: c.responses.create(model=MODEL, input="Hi", conversation="conv_nope"),
        404,
        None,
    ),
    (
        "an unknown previous response",
        lambda c: c.responses.create(model=MODEL, input="Hi", previous_response_id="resp_x"),
        404,
        "previous_response_id",
    ),
    (
        "both a conversation and a previous response",
        lambda c: c.responses.create(
            model=MODEL, input="Hi", conversation="conv_a", previous_response_id="resp_1_a"
        ),
        400,
        "previous_response_id",
    ),
    (
        "tools",
        lambda c: c.responses.create(
            model=MODEL, input="Hi", tools=[{"type": "web_search_preview"}]
        ),
        400,
        "tools",
    ),
    ("an unknown conversation id", lambda c: c.conversations.retrieve("conv_nope"), 404, None),
]


async def test_bad_requests_get_the_right_status_and_name_the_field(client: AsyncOpenAI) -> None:
    for what, call, status, param in CASES:
        got, body = await status_of(call(client))
        assert (got, body["param"]) == (status, param), what


async def test_a_wrong_token_is_401_and_another_callers_conversation_404(api: Gateway) -> None:
    async with sdk(api, "not-a-token") as stranger:
        got, body = await status_of(stranger.models.list())
        assert (got, body["code"]) == (401, "invalid_api_key")
    async with sdk(api, "alice-token") as alice, sdk(api, "bob-token") as bob:
        conversation = await alice.conversations.create()
        got, _ = await status_of(bob.conversations.retrieve(conversation.id))
        assert got == 404  # in the words an unknown id gets: nothing tells it exists
        await alice.conversations.delete(conversation.id)


async def test_malformed_bodies_and_unknown_routes_are_4xx_in_the_error_shape(
    api: Gateway,
) -> None:
    auth = {"Authorization": "Bearer alice-token"}
    async with aiohttp.ClientSession(headers=auth) as http:
        for method, path, data, status in [
            ("POST", "/chat/completions", b"{not json", 400),
            ("POST", "/chat/completions", b"[1, 2]", 400),
            ("POST", "/responses", b'{"model": "sinkserve", "input": 7}', 400),
            ("GET", "/nowhere", None, 404),
            ("DELETE", "/models", None, 405),
        ]:
            async with http.request(method, base_url(api) + path, data=data) as reply:
                body = await reply.json()
                assert reply.status == status, (method, path, body)
                assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_past_the_callers_token_quota_requests_are_429_with_a_retry_hint(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url, http_port=0, tokens_per_minute_per_caller=1)
    async with sdk(gw, "bob-token") as bob:
        await bob.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
        with pytest.raises(openai.RateLimitError) as limited:
            await bob.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert float(limited.value.response.headers["retry-after-ms"]) > 0


async def test_without_a_reachable_model_requests_are_503(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(http_port=0)  # its Triton address has nothing listening
    async with sdk(gw) as client:
        got, body = await status_of(
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
        )
    assert (got, body["code"]) == (503, "unavailable")
