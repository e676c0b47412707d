"""The wire shapes alone (no servers): ids that carry their session, and requests parsed
strictly, naming the field that is wrong."""

from __future__ import annotations

import grpc
import pytest

from sinkserve.gateway import openai_wire as wire
from sinkserve.gateway.errors import GatewayError
from sinkserve.gateway.openai_http import api_error
from sinkserve.gateway.openai_wire import ApiError


def test_ids_name_their_session_and_turn_and_nothing_else_parses() -> None:
    session = "K3ON_Inb-Ukm_gS"
    assert wire.session_of_conversation(wire.conversation_id(session)) == session
    assert wire.parse_response_id(wire.response_id(session, 12)) == (session, 12)
    for bad in ("conv_", "conversation", "sess"):
        assert wire.session_of_conversation(bad) is None
    for bad in ("resp_", "resp_x_y", "resp_12", "resp_12_", "chatcmpl-1"):
        assert wire.parse_response_id(bad) is None


def test_a_chat_completion_reads_sampling_history_and_the_session_extension() -> None:
    req = wire.parse_chat_completion(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            "max_completion_tokens": 7,
            "max_tokens": 99,
            "temperature": 0.5,
            "stop": "\n",
            "seed": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        header_session="s1",
    )
    assert req.messages == (("system", "Be brief."), ("user", "Hi"))
    s = req.sampling
    assert (s.max_tokens, s.temperature, tuple(s.stop), s.seed) == (7, 0.5, ("\n",), 3)
    assert req.stream and req.include_usage and req.session_id == "s1"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": True}, "seed"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
            "logprobs",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
        (
            {"model": "m", "messages": [{"role": "assistant", "content": "x"}], "session_id": "s"},
            "messages",
        ),
    ],
)
def test_a_bad_chat_completion_is_400_naming_its_field(body: object, param: str) -> None:
    with pytest.raises(ApiError) as raised:
        wire.parse_chat_completion(body, header_session=None)
    assert (raised.value.status, raised.value.param) == (400, param)


def test_a_response_request_reads_items_and_refuses_what_it_cannot_do() -> None:
    req = wire.parse_response_request(
        {
            "model": "m",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
            "conversation": {"id": "conv_a"},
            "max_output_tokens": 5,
            "store": False,
        }
    )
    assert req.input == (("user", "Hi"),) and req.conversation == "conv_a"
    assert req.sampling.max_tokens == 5 and not req.store and not req.stream
    for body, param in [
        ({"model": "m", "input": ""}, "input"),
        ({"model": "m", "input": [{"type": "function_call_output"}]}, "input[0].type"),
        ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
        ({"model": "m", "input": "x", "background": True}, "background"),
    ]:
        with pytest.raises(ApiError) as raised:
            wire.parse_response_request(body)
        assert raised.value.param == param


def test_gateway_errors_map_to_http_statuses_with_the_clients_mistakes_never_500() -> None:
    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.FAILED_PRECONDITION: 409,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.INTERNAL: 500,
    }
    for code, status in expected.items():
        err = api_error(GatewayError(code, "why", retry_after_s=2.5))
        assert (err.status, err.message, err.retry_after_s) == (status, "why", 2.5)
        assert set(err.body()["error"]) == {"message", "type", "param", "code"}
