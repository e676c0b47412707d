"""The OpenAI API's wire shapes, as sinkserve speaks them (docs/openai.md).

Request bodies are parsed into typed requests (`ApiError` naming the offending field when a
body is malformed or asks for what sinkserve does not do); replies, stream chunks and
stream events are built as JSON-ready dicts. Ids carry what the gateway must not keep:
a conversation id is its session's id, a response id the session and the cache position
its turn ended at, so any gateway replica can continue either. No I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from sinkserve.gateway.backend import Final

Json = dict[str, Any]
# One message of a conversation as the chat template takes it: (role, content).
Message = tuple[str, str]

CONVERSATION_PREFIX = "conv_"
RESPONSE_PREFIX = "resp_"
_MAX_STOP = 4  # OpenAI's limit of stop sequences
# Roles the chat template renders; OpenAI's "developer" is the system role of newer models.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.retry_after_s = retry_after_s

    def body(self) -> Json:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 for the client's mistake."""
    return ApiError(400, message, param=param, code=code)


# -- requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatCompletionRequest:
    """POST /v1/chat/completions, parsed. `session_id` (an extension, from the body or the
    x-session-id header) continues a server-held session with the last user message."""

    model: str
    messages: tuple[Message, ...]
    sampling: pb.SamplingParams
    stream: bool
    include_usage: bool
    session_id: str | None


@dataclass(frozen=True)
class ResponseRequest:
    """POST /v1/responses, parsed. At most one of `conversation` (a conversation id) and
    `previous_response_id` is set."""

    model: str
    input: tuple[Message, ...]
    instructions: str | None
    conversation: str | None
    previous_response_id: str | None
    sampling: pb.SamplingParams
    stream: bool
    store: bool


def parse_chat_completion(body: object, header_session: str | None) -> ChatCompletionRequest:
    """The request of a chat completion body; ApiError(400) naming the field otherwise."""
    b = _Body(body)
    raw = b.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty array", "messages")
    messages = tuple(_chat_message(m, f"messages[{i}]") for i, m in enumerate(raw))
    n = b.integer("n", low=1)
    if n not in (None, 1):
        raise bad("only n=1 is supported", "n")
    for key in ("frequency_penalty", "presence_penalty"):
        if b.number(key) not in (None, 0.0):
            raise bad(f"{key} is not supported (only 0)", key)
    _unsupported(b, ("tools", "functions", "logit_bias", "audio", "prediction"))
    if b.get("logprobs") not in (None, False):
        raise bad("logprobs are not supported", "logprobs")
    _text_format(b.get("response_format"), "response_format")
    max_tokens = b.integer("max_completion_tokens", low=1)
    if max_tokens is None:
        max_tokens = b.integer("max_tokens", low=1)
    options = b.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    include_usage = _Body(options or {}, "stream_options.").boolean("include_usage") or False
    session = b.string("session_id")
    if session is not None and header_session is not None and session != header_session:
        raise bad("session_id and the x-session-id header name different sessions", "session_id")
    session = session or header_session
    if session is not None and messages[-1][0] != "user":
        raise bad("continuing a session needs a last message of role user", "messages")
    return ChatCompletionRequest(
        model=b.model(),
        messages=messages,
        sampling=_sampling(b, max_tokens, stop=_stop(b.get("stop"))),
        stream=b.boolean("stream") or False,
        include_usage=include_usage,
        session_id=session or None,
    )


def parse_response_request(body: object) -> ResponseRequest:
    """The request of a Responses body; ApiError(400) naming the field otherwise."""
    b = _Body(body)
    raw = b.get("input")
    if isinstance(raw, str) and raw:
        items: tuple[Message, ...] = (("user", raw),)
    elif isinstance(raw, list) and raw:
        items = tuple(_input_item(item, f"input[{i}]") for i, item in enumerate(raw))
    else:
        raise bad("input must be a non-empty string or array of message items", "input")
    conversation = b.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    if conversation is not None and (not isinstance(conversation, str) or not conversation):
        raise bad("conversation must be a conversation id or {id}", "conversation")
    previous = b.string("previous_response_id")
    if conversation is not None and previous is not None:
        raise bad(
            "conversation and previous_response_id cannot be used together",
            "previous_response_id",
        )
    _unsupported(b, ("tools", "prompt"))
    if b.get("background") not in (None, False):
        raise bad("background responses are not supported", "background")
    text = b.get("text")
    if text is not None:
        if not isinstance(text, dict):
            raise bad("text must be an object", "text")
        _text_format(text.get("format"), "text.format")
    store = b.boolean("store")
    return ResponseRequest(
        model=b.model(),
        input=items,
        instructions=b.string("instructions"),
        conversation=conversation,
        previous_response_id=previous,
        sampling=_sampling(b, b.integer("max_output_tokens", low=1), stop=()),
        stream=b.boolean("stream") or False,
        store=True if store is None else store,
    )


def parse_conversation_create(body: object) -> None:
    """POST /v1/conversations takes no initial items (a session's history is what its
    turns prefilled); metadata is accepted and not kept."""
    b = _Body(body if body is not None else {})
    if b.get("items"):
        raise bad(
            "initial items are not supported: send them as the first response's input", "items"
        )


class _Body:
    """Typed reads of one JSON object's fields; ApiError(400) naming the field."""

    def __init__(self, body: object, prefix: str = "") -> None:
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        self._body: Mapping[str, Any] = body
        self._prefix = prefix

    def get(self, key: str) -> Any:
        return self._body.get(key)

    def model(self) -> str:
        value = self.string("model")
        if not value:
            raise bad("model is required", "model")
        return value

    def string(self, key: str) -> str | None:
        value = self._body.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise bad(f"{self._prefix}{key} must be a string", self._prefix + key)
        return value

    def boolean(self, key: str) -> bool | None:
        value = self._body.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise bad(f"{self._prefix}{key} must be a boolean", self._prefix + key)
        return value

    def integer(self, key: str, low: int | None = None) -> int | None:
        value = self._body.get(key)
        if value is None:
            return None
        # bool is an int to Python, not to JSON's readers
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(f"{self._prefix}{key} must be an integer", self._prefix + key)
        if low is not None and value < low:
            raise bad(f"{self._prefix}{key}={value} must be >= {low}", self._prefix + key)
        return value

    def number(self, key: str, low: float = -math.inf, high: float = math.inf) -> float | None:
        value = self._body.get(key)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise bad(f"{self._prefix}{key} must be a number", self._prefix + key)
        if not low <= value <= high:
            raise bad(f"{self._prefix}{key}={value} must be in [{low}, {high}]", self._prefix + key)
        return float(value)


def _sampling(b: _Body, max_tokens: int | None, stop: tuple[str, ...]) -> pb.SamplingParams:
    """The sampling a request sets; what it leaves out is the session's or the server's
    default (the model validates every value and its limits)."""
    top_p = b.number("top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise bad("top_p must be > 0", "top_p")
    return pb.SamplingParams(
        max_tokens=max_tokens,
        temperature=b.number("temperature", 0.0, 2.0),
        top_p=top_p,
        seed=b.integer("seed", low=0),
        stop=stop,
    )


def _set(
    sampling: pb.SamplingParams, field: Literal["temperature", "top_p", "max_tokens"]
) -> float | int | None:
    """A sampling field as the request set it; None when it left it to the defaults."""
    value: float | int | None = getattr(sampling, field) if sampling.HasField(field) else None
    return value


def _stop(value: object) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop must be a non-empty string or an array of them", "stop")
    if len(stops) > _MAX_STOP:
        raise bad(f"at most {_MAX_STOP} stop sequences", "stop")
    return tuple(stops)


def _unsupported(b: _Body, keys: tuple[str, ...]) -> None:
    for key in keys:
        if b.get(key):  # absent, null or empty is fine
            raise bad(f"{key!r} is not supported by this server", key)


def _text_format(value: object, param: str) -> None:
    """Only plain text output: {"type": "text"} or nothing."""
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    if kind != "text":
        raise bad(f"{param}: only type 'text' is supported", param)


def _role(value: object, param: str) -> str:
    if not isinstance(value, str) or value not in _ROLES:
        raise bad(
            f"{param}.role must be one of {', '.join(_ROLES)} (tools are not supported)",
            f"{param}.role",
        )
    return _ROLES[value]


def _chat_message(value: object, param: str) -> Message:
    if not isinstance(value, dict):
        raise bad(f"{param} must be an object", param)
    role = _role(value.get("role"), param)
    content = value.get("content")
    if isinstance(content, list):
        content = _text_parts(content, f"{param}.content", ("text",))
    if not isinstance(content, str):
        raise bad(f"{param}.content must be a string or an array of text parts", f"{param}.content")
    return role, content


def _input_item(value: object, param: str) -> Message:
    if not isinstance(value, dict):
        raise bad(f"{param} must be a message item", param)
    if value.get("type", "message") != "message":
        raise bad(f"{param}: only message items are supported", f"{param}.type")
    role = _role(value.get("role"), param)
    content = value.get("content")
    if isinstance(content, list):
        content = _text_parts(content, f"{param}.content", ("input_text", "output_text", "text"))
    if not isinstance(content, str):
        raise bad(f"{param}.content must be a string or an array of text parts", f"{param}.content")
    return role, content


def _text_parts(parts: list[Any], param: str, kinds: tuple[str, ...]) -> str:
    texts = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("text") if isinstance(part, dict) else None
        if kind not in kinds or not isinstance(text, str):
            raise bad(f"{param}[{i}]: only text parts are supported", f"{param}[{i}]")
        texts.append(text)
    return "".join(texts)


# -- ids --------------------------------------------------------------------------------


def conversation_id(session_id: str) -> str:
    return CONVERSATION_PREFIX + session_id


def session_of_conversation(conversation: str) -> str | None:
    """The session a conversation id names (None: not a conversation id)."""
    session = conversation.removeprefix(CONVERSATION_PREFIX)
    return session if session and session != conversation else None


def response_id(session_id: str, position: int) -> str:
    """A response names its session and the cache position its turn ended at: a session's
    position grows with every turn, so the response is its session's latest exactly
    while the session is still at that position."""
    return f"{RESPONSE_PREFIX}{position}_{session_id}"


def parse_response_id(response: str) -> tuple[str, int] | None:
    """(session id, position) of a response id; None when it is not one of ours."""
    if not response.startswith(RESPONSE_PREFIX):
        return None
    position, sep, session = response[len(RESPONSE_PREFIX) :].partition("_")
    if not sep or not session or not position.isdigit():
        return None
    return session, int(position)


# -- replies ----------------------------------------------------------------------------


def session_stats(session_id: str, final: Final) -> Json:
    """The extension field `sinkserve` of replies: what the session's cache holds now."""
    return {
        "session_id": session_id,
        "cache_position": final.cache_position,
        "cached_tokens": final.cached_tokens,
        "evicted_tokens": final.evicted_tokens,
    }


def chat_usage(final: Final) -> Json:
    """Usage of a chat completion: prompt_tokens are the tokens this turn prefilled."""
    return {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.generated_tokens,
        "total_tokens": final.prompt_tokens + final.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def chat_finish_reason(final: Final) -> str:
    return "length" if final.finish_reason == "length" else "stop"


def chat_completion(
    completion_id: str, created: int, model: str, text: str, final: Final, session_id: str
) -> Json:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": chat_finish_reason(final),
            }
        ],
        "usage": chat_usage(final),
        "system_fingerprint": None,
        "sinkserve": session_stats(session_id, final),
    }


def chat_chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: Json | None,
    finish_reason: str | None = None,
    usage: Json | None = None,
    with_usage: bool = False,
) -> Json:
    """One chunk of a streamed completion; `delta` None is the usage chunk (no choices)."""
    chunk: Json = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:  # asked for with stream_options.include_usage: null until the last
        chunk["usage"] = usage
    return chunk


def response_usage(final: Final) -> Json:
    """Usage of a response: input_tokens are only this turn's prefilled tokens (the
    session's earlier tokens are in its cache, not sent again)."""
    return {
        "input_tokens": final.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": final.generated_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": final.prompt_tokens + final.generated_tokens,
    }


def output_message(message_id: str, text: str, status: str) -> Json:
    return {
        "type": "message",
        "id": message_id,
        "status": status,
        "role": "assistant",
        "content": [] if status == "in_progress" else [output_text(text)],
    }


def output_text(text: str) -> Json:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass(frozen=True)
class ResponseShape:
    """What every state of one response shares."""

    request: ResponseRequest
    created_at: int
    message_id: str
    conversation: str | None  # the conversation id the response belongs to

    def render(
        self,
        response: str,
        status: str,
        output: list[Json],
        final: Final | None = None,
        session_id: str = "",
        error: Json | None = None,
        completed_at: int | None = None,
    ) -> Json:
        """The response object in `status` (in_progress, completed, incomplete, failed)."""
        req = self.request
        incomplete = status == "incomplete"
        return {
            "id": response,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": completed_at,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions,
            "model": req.model,
            "output": output,
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "temperature": _set(req.sampling, "temperature"),
            "top_p": _set(req.sampling, "top_p"),
            "max_output_tokens": _set(req.sampling, "max_tokens"),
            "previous_response_id": req.previous_response_id,
            "conversation": {"id": self.conversation} if self.conversation else None,
            "store": req.store,
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "metadata": {},
            "usage": None if final is None else response_usage(final),
            "sinkserve": None if final is None else session_stats(session_id, final),
        }


def response_status(final: Final) -> str:
    return "incomplete" if final.finish_reason == "length" else "completed"


def conversation_object(conversation: str, info: Mapping[str, Any]) -> Json:
    """A conversation as GET /v1/conversations/{id} answers, with its session's cache."""
    return {
        "id": conversation,
        "object": "conversation",
        "created_at": int(info["created_at"]),
        "metadata": {},
        "sinkserve": {
            "session_id": info["session_id"],
            "turns": info["turns"],
            "cache_position": info["position"],
            "cached_tokens": info["cached_tokens"],
            "evicted_tokens": info["evicted_tokens"],
        },
    }
