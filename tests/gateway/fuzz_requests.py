"""Generated requests of every `sinkserve.v1` call, sent to a real gateway, and what a
correct answer to each one is.

Shared by tests/gateway/test_fuzz.py (a fixed number of derandomized cases in CI) and
bench/fuzz.py (as many as fit in a given time). A case is a frozen dataclass drawn by a
Hypothesis strategy; `GatewayFuzzer` sends it through a real gateway in front of a real
Triton and raises AssertionError naming every way the answer was wrong:

- the call ends with a status the case allows (decided from the request alone: the
  documented code for what it got wrong, OK otherwise), never INTERNAL or UNKNOWN, and
  with a non-empty message when it is not OK;
- it ends before its deadline. DEADLINE_EXCEEDED is allowed only where a turn may
  generate more than SMALL_MAX_TOKENS tokens (such cases get a short deadline); a case
  that outlives its deadline by HANG_MARGIN_S is a hang;
- a Chat stream keeps its grammar: one SessionOpened first, then per turn its deltas with
  contiguous indexes and one TurnEnd whose usage fits the turn's sampling;
- nothing leaks: after the case no turn of it runs on the model, the caller holds the
  sessions it held before, and the sessions no case may touch are as they were;
- a caller learns nothing about another caller's session: a call naming it answers
  exactly like the same call naming an unknown id (with the id replaced).

Strings are empty, huge (bounded so a case stays cheap), or hold NUL, control characters,
special-token text and other oddities. A client library cannot put a lone surrogate or
invalid UTF-8 into a protobuf string, so `WireCase` writes those into serialized bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, TypeAlias, TypeVar

import grpc
import tritonclient.grpc.aio as triton_grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from sinkserve.client import ChatClient, sampling
from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2_grpc
from sinkserve.gateway.backend import TritonBackend
from sinkserve.gateway.errors import GatewayError

T = TypeVar("T")
Code: TypeAlias = grpc.StatusCode
OK = Code.OK
IA = Code.INVALID_ARGUMENT
NF = Code.NOT_FOUND
FP = Code.FAILED_PRECONDITION
RE = Code.RESOURCE_EXHAUSTED
DE = Code.DEADLINE_EXCEEDED

# A turn that may generate more than this many tokens is "long": only a case with one may
# end with DEADLINE_EXCEEDED (it gets a short deadline). Every other turn is bounded by
# this, so a case costs a few engine steps.
SMALL_MAX_TOKENS = 4
# What a turn may generate when no sampling says (proto: "server default 256").
SERVER_DEFAULT_MAX_TOKENS = 256
# The default page of ListSessions (proto: "0 = the server default (100)").
DEFAULT_PAGE = 100
# Turns one stream may have waiting behind its running turn; one more is
# RESOURCE_EXHAUSTED.
QUEUED_TURNS = 8
# The deadline of every call that should not generate much: room for a dozen turns that
# each prefill up to a whole window on a slow CPU.
CALL_DEADLINE_S = 60.0
# A case still running this long after its deadline is a hang (the client library ends a
# call at its deadline, so this catches a hang on this side of the wire).
HANG_MARGIN_S = 20.0
# How long a session may still show a running turn after its stream ended: a cut turn ends
# on the model asynchronously (the model's cancel watcher polls every 0.25 s).
SETTLE_S = 15.0
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT64_MAX = 2**64 - 1
# The two callers of tests/gateway/conftest.py TOKENS the cases use.
TOKENS: Mapping[str, str] = MappingProxyType({"alice": "alice-token", "bob": "bob-token"})
# Owners no case may ever leave a session to (an unauthenticated call must not open one).
NOBODY = ("", "anonymous")
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
ID_PLACEHOLDER = "<session id>"
# Text that has broken text handling elsewhere: line and paragraph separators, BOM,
# zero-width and bidi controls, combining marks, astral characters, noncharacters, the
# replacement character, the model's control tokens written as text, format strings.
ODD_PIECES = (
    "\x00",
    "\u2028",
    "\u2029",
    "\ufeff",
    "\u200b",
    "\u202e",
    "e\u0301",
    "\U0001f600",
    "\U0010ffff",
    "\uffff",
    "\ufffd",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "\r\n",
    "%s%n{0}",
    "'\"\\",
)
CONTROL_CHARS = tuple(chr(c) for c in (*range(0x20), 0x7F, 0x85, 0x9F))
PROMPTS = ("Hi", "What is the capital of France?", "Count to three.", "Say yes.", "2+2?")
# Bytes that are not UTF-8: stray continuation and invalid lead bytes, an overlong NUL,
# lone surrogates (as WTF-8 writes them), a truncated sequence, a code point past U+10FFFF.
BAD_UTF8 = (
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xe2\x82",
    b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80",
)
UNARY_RPCS = ("CreateSession", "GetSession", "DeleteSession", "ListSessions")
REQUEST_TYPES: Mapping[str, type[Message]] = MappingProxyType(
    {
        "Chat": pb.ChatRequest,
        "CreateSession": pb.CreateSessionRequest,
        "GetSession": pb.GetSessionRequest,
        "DeleteSession": pb.DeleteSessionRequest,
        "ListSessions": pb.ListSessionsRequest,
    }
)
RESPONSE_TYPES: Mapping[str, type[Message]] = MappingProxyType(
    {
        "Chat": pb.ChatResponse,
        "CreateSession": pb.CreateSessionResponse,
        "GetSession": pb.GetSessionResponse,
        "DeleteSession": pb.DeleteSessionResponse,
        "ListSessions": pb.ListSessionsResponse,
    }
)
# Where each request holds a string: (rpc, field numbers down to the string).
STRING_PATHS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("CreateSession", (1,)),
    ("GetSession", (1,)),
    ("DeleteSession", (1,)),
    ("ListSessions", (2,)),
    ("Chat", (1, 1)),  # open.system_prompt
    ("Chat", (1, 2, 7)),  # open.sampling.stop
    ("Chat", (2, 1)),  # resume.session_id
    ("Chat", (2, 2, 7)),  # resume.sampling.stop
    ("Chat", (3, 1)),  # turn.text
    ("Chat", (3, 2, 7)),  # turn.sampling.stop
)
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


class Tri(Enum):
    """Whether the server must accept something, must refuse it, or may do either (where
    the documented contract leaves a bound open, or a count is close to a limit)."""

    VALID = "valid"
    INVALID = "invalid"
    EITHER = "either"


def worst(*verdicts: Tri) -> Tri:
    if Tri.INVALID in verdicts:
        return Tri.INVALID
    return Tri.EITHER if Tri.EITHER in verdicts else Tri.VALID


# -- the cases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Auth:
    """The `authorization` metadata (None: not sent) and the caller it names (None: nobody)."""

    header: str | None
    caller: str | None


def auth_of(caller: str) -> Auth:
    return Auth(f"Bearer {TOKENS[caller]}", caller)


@dataclass(frozen=True)
class Header:
    """The `x-session-id` metadata: none, the request's own id, an id of another session,
    or any `value`."""

    kind: str  # "none" | "same" | "other" | "value"
    value: str = ""


@dataclass(frozen=True)
class Ref:
    """A session id as a case names it, resolved when the case runs: a fresh session of
    the caller ("own"; for ListSessions `text` picks one of three), one just deleted
    ("gone"), the other caller's ("other"), a well-formed id nobody has ("unknown"), ""
    ("empty"), or any string ("odd")."""

    kind: str
    text: str = ""


@dataclass(frozen=True)
class Open:
    system_prompt: str
    sampling: Mapping[str, Any] | None


@dataclass(frozen=True)
class Resume:
    ref: Ref
    sampling: Mapping[str, Any] | None


@dataclass(frozen=True)
class Turn:
    text: str
    sampling: Mapping[str, Any] | None
    raw: bool


@dataclass(frozen=True)
class Cancel:
    """CancelTurn."""


@dataclass(frozen=True)
class End:
    """EndSession."""


@dataclass(frozen=True)
class Empty:
    """A ChatRequest with no action set."""


@dataclass(frozen=True)
class Garbage:
    """Bytes that do not parse as a ChatRequest (invalid UTF-8 in a string, or junk)."""

    payload: bytes


@dataclass(frozen=True)
class WaitEnd:
    """Write nothing more until every turn written so far has its TurnEnd."""


@dataclass(frozen=True)
class WaitDelta:
    """Write nothing more until a response arrives after the last turn written."""


@dataclass(frozen=True)
class Peek:
    """GetSession of the stream's session by its own caller, on the side."""


@dataclass(frozen=True)
class Delete:
    """DeleteSession of the stream's session by its own caller, on the side."""


@dataclass(frozen=True)
class Spy:
    """GetSession of the stream's session by the other caller: it must look unknown."""


Step = (
    Open
    | Resume
    | Turn
    | Cancel
    | End
    | Empty
    | Garbage
    | WaitEnd
    | WaitDelta
    | Peek
    | Delete
    | Spy
)
REQUESTS = (Open, Resume, Turn, Cancel, End, Empty, Garbage)  # the steps written on the stream


@dataclass(frozen=True)
class ChatCase:
    auth: Auth
    header: Header
    first: Step
    steps: tuple[Step, ...]
    finish: str  # "close" (half-close, then read to the end) | "drop" (cancel the call)
    deadline_s: float


@dataclass(frozen=True)
class UnaryCase:
    rpc: str  # one of UNARY_RPCS
    auth: Auth
    header: Header
    system_prompt: str = ""  # CreateSession
    ref: Ref = Ref("own")  # GetSession, DeleteSession
    page_size: int = 0  # ListSessions
    page_token: Ref = Ref("empty")  # ListSessions


@dataclass(frozen=True)
class WireCase:
    """Bytes that are not a valid request: a unary call's whole request, or a request of a
    Chat stream after the valid steps `before` (by alice)."""

    rpc: str  # one of UNARY_RPCS, or "Chat"
    payload: bytes
    before: tuple[Step, ...] = ()


@dataclass(frozen=True)
class CrossCase:
    """A call by `caller` naming the other caller's session, then the same call naming
    `unknown`; with `busy`, the other caller's session runs a turn meanwhile."""

    caller: str
    rpc: str  # GetSession | DeleteSession | Chat (resume, then a turn) | ListSessions (token)
    header: bool  # send the id as x-session-id as well
    unknown: str
    busy: bool
    sampling: Mapping[str, Any] | None = None  # of the resume


# -- limits and verdicts -------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The limits a correct answer depends on: the model's (config.pbtxt) and the gateway's."""

    sinks: int
    window: int
    prompt_limit: int  # tokens of one turn (with its template) or of a system prompt
    max_new_tokens: int
    max_turn_chars: int
    max_message_bytes: int


async def read_limits(triton_url: str, max_turn_chars: int, max_message_bytes: int) -> Limits:
    """The model's limits from its config (the engine's defaults where it does not say)."""
    client = triton_grpc.InferenceServerClient(triton_url)
    try:
        config = await client.get_model_config("sinkserve", as_json=True)
    finally:
        await client.close()
    params = config["config"].get("parameters", {})

    def param(key: str, default: int) -> int:
        return int(params.get(key, {}).get("string_value") or default)

    window = param("window", 1020)
    return Limits(
        sinks=param("sinks", 4),
        window=window,
        prompt_limit=param("max_prompt_tokens", 0) or window,
        max_new_tokens=param("max_new_tokens", 4096),
        max_turn_chars=max_turn_chars,
        max_message_bytes=max_message_bytes,
    )


def to_params(values: Mapping[str, Any] | None) -> pb.SamplingParams | None:
    """The SamplingParams of a case's dict (protobuf rounds floats to float32)."""
    return None if values is None else pb.SamplingParams(**values)


def merged(*layers: pb.SamplingParams | None) -> dict[str, Any]:
    """Field by field, the first layer that sets a field wins, and `stop` is the first
    non-empty list: a turn's sampling over its stream's defaults over its session's."""
    out: dict[str, Any] = {}
    for layer in layers:
        if layer is None:
            continue
        for name in SAMPLING_FIELDS:
            if name not in out and layer.HasField(name):  # type: ignore[arg-type]
                out[name] = getattr(layer, name)
        if layer.stop and "stop" not in out:
            out["stop"] = tuple(layer.stop)
    return out


def sampling_verdict(values: Mapping[str, Any], limits: Limits) -> Tri:
    """The documented ranges (proto comments, README: INVALID_ARGUMENT for bad sampling):
    max_tokens in 1..max_new_tokens, temperature >= 0, top_k >= 0, top_p in (0, 1],
    repetition_penalty > 0, stop strings non-empty, floats finite. Upper bounds the
    documents leave open (a huge temperature or penalty) may go either way."""
    floats = ("temperature", "top_p", "repetition_penalty")
    if not all(math.isfinite(values.get(name, 1.0)) for name in floats):
        return Tri.INVALID
    if not 1 <= values.get("max_tokens", 1) <= limits.max_new_tokens:
        return Tri.INVALID
    temperature = values.get("temperature", 0.0)
    penalty = values.get("repetition_penalty", 1.0)
    if temperature < 0 or values.get("top_k", 0) < 0 or penalty <= 0:
        return Tri.INVALID
    if not 0.0 < values.get("top_p", 1.0) <= 1.0:
        return Tri.INVALID
    if any(not s for s in values.get("stop", ())):
        return Tri.INVALID
    if temperature > 1000.0:  # tests/gateway/test_gateway_e2e.py: 1000 is refused
        return Tri.INVALID
    if temperature > 2.0 or not 1e-3 <= penalty <= 2.0:
        return Tri.EITHER
    return Tri.VALID


def max_tokens_of(values: Mapping[str, Any]) -> int:
    return int(values.get("max_tokens", SERVER_DEFAULT_MAX_TOKENS))


@dataclass(frozen=True)
class TokenCounter:
    """Bounds on the tokens texts take, from the model's own tokenizer. The chat template
    adds tokens around a turn (a default system prompt to a first turn) and may trim it, so
    only counts well clear of a limit decide a verdict."""

    tokenizer: Tokenizer
    template_slack: int = 64

    def count(self, text: str, *, special: bool = False) -> int:
        return len(self.tokenizer.encode(text, special=special)) if text else 0

    def system_verdict(self, limits: Limits, system_prompt: str) -> Tri:
        """A system prompt: refused past the prompt limit (tokens); one longer than the
        gateway's turn limit (characters) may be refused for that too."""
        verdict = self.verdict(limits.prompt_limit, system_prompt)
        if len(system_prompt) > limits.max_turn_chars:
            return worst(verdict, Tri.EITHER)
        return verdict

    def verdict(self, limit: int, *texts: str, raw: bool = False) -> Tri:
        if raw:
            low = sum(self.count(t, special=True) for t in texts)
            high = low + 2  # the previous turn's last token enters with this one
        else:
            low = sum(max(self.count(t.strip()) - 4, 0) for t in texts)
            high = sum(self.count(t) for t in texts) + self.template_slack
        if low > limit:
            return Tri.INVALID
        return Tri.VALID if high <= limit else Tri.EITHER


# -- strategies ----------------------------------------------------------------------------


def weighted(*choices: tuple[st.SearchStrategy[T], int]) -> st.SearchStrategy[T]:
    """One of `choices`, each drawn with its weight."""
    pool = [strategy for strategy, weight in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


def _repeat(chunk: str, length: int) -> str:
    return (chunk * (length // len(chunk) + 1))[:length]


def texts(*, huge: int) -> st.SearchStrategy[str]:
    """Strings: empty, short arbitrary text, control characters, odd pieces, or a chunk
    repeated to between 500 (or half of `huge`) and `huge` characters."""
    control = st.sampled_from(CONTROL_CHARS)
    return weighted(
        (st.just(""), 1),
        (st.text(max_size=24), 3),
        (st.text(st.one_of(control, st.sampled_from("ab ")), max_size=24), 2),
        (st.lists(st.one_of(st.sampled_from(ODD_PIECES), control), max_size=8).map("".join), 2),
        (
            st.builds(
                _repeat, st.text(min_size=1, max_size=8), st.integers(min(500, huge // 2), huge)
            ),
            1,
        ),
    )


def printable(max_size: int = 40) -> st.SearchStrategy[str]:
    """What gRPC metadata values may hold: printable ASCII."""
    return st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=max_size)


def ids() -> st.SearchStrategy[str]:
    """Well-formed ids nobody has, shaped like the server's own (token_urlsafe(16))."""
    return st.text(st.sampled_from(ID_ALPHABET), min_size=22, max_size=22)


def int32s(good: tuple[int, int]) -> st.SearchStrategy[int]:
    return weighted(
        (st.integers(*good), 4),
        (st.sampled_from([0, -1, INT32_MIN, INT32_MAX, INT32_MIN + 1]), 1),
        (st.integers(INT32_MIN, INT32_MAX), 1),
    )


def float32s(good: tuple[float, float]) -> st.SearchStrategy[float]:
    specials = [0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e-45, -1e-45]
    specials += [3.4028235e38, 1e39, 2.0, 10.0, 100.0, 100.00001, 1000.0, 1e-3]
    return weighted(
        (st.floats(*good, width=32), 4),
        (st.sampled_from(specials), 2),
        (st.floats(width=32), 1),
        (st.floats(), 1),  # protobuf rounds it to float32
    )


def bad_max_tokens(limits: Limits) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(INT32_MIN, 0), st.integers(limits.max_new_tokens + 1, INT32_MAX))


def small_max_tokens() -> st.SearchStrategy[int]:
    return st.integers(1, SMALL_MAX_TOKENS)


def sampling_dicts(
    max_tokens: st.SearchStrategy[int] | None, *, hostile: bool
) -> st.SearchStrategy[dict[str, Any]]:
    """Sampling fields, each set or not (max_tokens never, when None). Not hostile: values
    in their valid ranges; hostile: anything, much of it out of range."""
    fields: dict[str, st.SearchStrategy[Any]]
    if hostile:
        fields = {
            "temperature": float32s((0.0, 1.5)),
            "top_k": int32s((0, 50)),
            "top_p": float32s((0.0625, 1.0)),
            "repetition_penalty": float32s((0.75, 1.5)),
            "seed": st.integers(0, UINT64_MAX),
            "stop": st.lists(texts(huge=600), min_size=1, max_size=4),
        }
    else:
        fields = {
            "temperature": st.floats(0.0, 1.5, width=32),
            "top_k": st.integers(0, 100),
            "top_p": st.floats(0.0625, 1.0, width=32),
            "repetition_penalty": st.floats(0.75, 1.5, width=32),
            "seed": st.integers(0, UINT64_MAX),
            "stop": st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3),
        }
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    return st.fixed_dictionaries({}, optional=fields)


def _with_max_tokens(max_tokens: int, rest: dict[str, Any]) -> dict[str, Any]:
    return {**rest, "max_tokens": max_tokens}


def stream_defaults(limits: Limits, *, turns: bool) -> st.SearchStrategy[dict[str, Any] | None]:
    """Sampling of an open (the session's defaults) or a resume (the stream's). Where turns
    follow, max_tokens is always set, small or out of range: a turn that does not set it
    must not generate the server default of 256."""
    hostile = sampling_dicts(
        weighted((small_max_tokens(), 2), (bad_max_tokens(limits), 1)), hostile=True
    )
    if not turns:
        return weighted((st.none(), 1), (hostile, 3))
    bounded = weighted((small_max_tokens(), 5), (bad_max_tokens(limits), 1))
    rest = weighted(
        (sampling_dicts(None, hostile=False), 4), (sampling_dicts(None, hostile=True), 1)
    )
    return st.builds(_with_max_tokens, bounded, rest)


def auths() -> st.SearchStrategy[Auth]:
    alice = auth_of("alice")
    named = [
        alice,
        auth_of("bob"),
        Auth("bearer alice-token", "alice"),  # the scheme is case-insensitive
        Auth("Bearer  alice-token ", "alice"),  # the token is stripped
        Auth(None, None),
        Auth("", None),
        Auth("Bearer", None),
        Auth("Bearer ", None),
        Auth("Basic alice-token", None),
        Auth("alice-token", None),
        Auth("Bearer alice-token-x", None),
        Auth("Bearer ALICE-TOKEN", None),
    ]
    random = printable().map(lambda value: Auth(f"Bearer x{value}", None))
    return weighted((st.just(alice), 12), (st.sampled_from(named), 3), (random, 1))


def headers() -> st.SearchStrategy[Header]:
    return weighted(
        (st.just(Header("none")), 4),
        (st.just(Header("same")), 3),
        (st.just(Header("other")), 1),
        (printable().map(lambda v: Header("value", v)), 1),
    )


def odd_ids() -> st.SearchStrategy[Ref]:
    return texts(huge=3000).filter(bool).map(lambda t: Ref("odd", t))


def refs() -> st.SearchStrategy[Ref]:
    return weighted(
        (st.just(Ref("own")), 4),
        (st.just(Ref("gone")), 1),
        (st.just(Ref("other")), 2),
        (ids().map(lambda i: Ref("unknown", i)), 1),
        (st.just(Ref("empty")), 1),
        (odd_ids(), 1),
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def nested(path: Sequence[int], payload: bytes) -> bytes:
    """`payload` as the string at field path `path` (outermost first), serialized."""
    for number in reversed(path):
        payload = _varint(number << 3 | 2) + _varint(len(payload)) + payload
    return payload


def parses(rpc: str, payload: bytes) -> bool:
    try:
        REQUEST_TYPES[rpc].FromString(payload)
    except DecodeError:
        return False
    return True


def garbage(rpc: str) -> st.SearchStrategy[bytes]:
    """Bytes that do not parse as a request of `rpc`: invalid UTF-8 in one of its strings,
    or junk (a truncated field, a wrong wire type)."""
    paths = [path for name, path in STRING_PATHS if name == rpc]
    bad = st.builds(
        lambda a, b, c: a.encode() + b + c.encode(),
        st.text(max_size=8),
        st.sampled_from(BAD_UTF8),
        st.text(max_size=8),
    )
    in_string = st.builds(nested, st.sampled_from(paths), bad)
    junk = st.binary(min_size=1, max_size=48).filter(lambda b: not parses(rpc, b))
    return weighted((in_string, 4), (junk, 1))


def open_steps(limits: Limits, *, turns: bool) -> st.SearchStrategy[Open]:
    prompt = weighted((st.just(""), 3), (texts(huge=6000), 2))
    return st.builds(Open, prompt, stream_defaults(limits, turns=turns))


def resume_steps(limits: Limits, *, turns: bool) -> st.SearchStrategy[Resume]:
    return st.builds(Resume, refs(), stream_defaults(limits, turns=turns))


def turn_steps(limits: Limits) -> st.SearchStrategy[Turn]:
    """A turn that generates at most SMALL_MAX_TOKENS (or is refused)."""
    oversized = st.just("x" * (limits.max_message_bytes + 16))
    text = weighted(
        (st.sampled_from(PROMPTS), 20),
        (texts(huge=2 * limits.max_turn_chars), 6),
        (oversized, 1),
    )
    small = small_max_tokens()
    params = weighted(
        (st.none(), 4),
        (sampling_dicts(small, hostile=False), 4),
        (sampling_dicts(weighted((small, 1), (bad_max_tokens(limits), 1)), hostile=True), 1),
    )
    return st.builds(Turn, text, params, st.booleans())


def other_steps() -> st.SearchStrategy[Step]:
    """Steps that are not turns: controls, requests out of place, side calls."""
    return weighted(
        (st.just(Cancel()), 3),
        (st.just(End()), 1),
        (st.just(Empty()), 1),
        (garbage("Chat").map(Garbage), 1),
        (st.just(Peek()), 1),
        (st.just(Spy()), 1),
        (st.just(Delete()), 1),
    )


def chat_cases(limits: Limits, *, turns: bool) -> st.SearchStrategy[ChatCase]:
    """A Chat stream: its metadata, first request, later steps, and how the client ends it.

    Without `turns`: any first request (most refused: the refs, samplings and metadata are
    hostile) and a few controls after it. With `turns`: nearly always alice opening or
    resuming her own session, then one to a dozen steps, most of them turns of a few
    tokens; one case in thirty adds a long turn and gets a short deadline, so a deadline
    mid-turn is tried too. (The strategies are built once, here: building them per case
    costs more than running most cases.)"""
    misplaced: st.SearchStrategy[Step] = st.one_of(
        turn_steps(limits), st.sampled_from([Cancel(), End(), Empty()])
    )
    junk: st.SearchStrategy[Step] = garbage("Chat").map(Garbage)
    opens: st.SearchStrategy[Step] = open_steps(limits, turns=turns)
    resumes: st.SearchStrategy[Step] = resume_steps(limits, turns=turns)
    later: st.SearchStrategy[Step] = other_steps()
    auth_st, count = auths(), st.integers(0, 6)
    if turns:
        own = st.builds(Resume, st.just(Ref("own")), stream_defaults(limits, turns=True))
        first = weighted((opens, 14), (own, 5), (resumes, 1), (misplaced, 1), (junk, 1))
        again = st.one_of(opens, resumes)
        waits: st.SearchStrategy[Step] = st.sampled_from([WaitEnd(), WaitEnd(), WaitDelta()])
        later = weighted((turn_steps(limits), 8), (other_steps(), 5), (waits, 3), (again, 1))
        auth_st = weighted((st.just(auth_of("alice")), 20), (auths(), 1))
        count = st.integers(1, 12)
    else:
        first = weighted((st.one_of(opens, resumes), 12), (misplaced, 1), (junk, 1))
    long_turns = st.builds(
        lambda text, tokens: Turn(text, {"max_tokens": tokens}, False),
        st.sampled_from(PROMPTS),
        st.integers(24, SERVER_DEFAULT_MAX_TOKENS),
    )
    long_one = st.sampled_from([False] * 29 + [True]) if turns else st.just(False)
    finishes = weighted((st.just("close"), 6), (st.just("drop"), 1))
    header_st = headers()

    @st.composite
    def cases(draw: st.DrawFn) -> ChatCase:
        auth, header, head = draw(auth_st), draw(header_st), draw(first)
        tail = [draw(later) for _ in range(draw(count))]
        deadline = CALL_DEADLINE_S
        if draw(long_one):
            tail.insert(draw(st.integers(0, len(tail))), draw(long_turns))
            deadline = draw(st.sampled_from([1.0, 2.5]))
        return ChatCase(auth, header, head, tuple(tail), draw(finishes), deadline)

    return cases()


def unary_cases() -> st.SearchStrategy[UnaryCase]:
    page_tokens = weighted(
        (st.just(Ref("empty")), 3),
        (st.integers(0, 2).map(lambda i: Ref("own", str(i))), 3),
        (st.just(Ref("other")), 1),
        (st.just(Ref("gone")), 1),
        (odd_ids(), 1),
    )
    common = {"auth": auths(), "header": headers()}
    return st.one_of(
        st.builds(UnaryCase, st.just("CreateSession"), system_prompt=texts(huge=6000), **common),
        st.builds(UnaryCase, st.just("GetSession"), ref=refs(), **common),
        st.builds(UnaryCase, st.just("DeleteSession"), ref=refs(), **common),
        st.builds(
            UnaryCase,
            st.just("ListSessions"),
            page_size=int32s((0, 4)),
            page_token=page_tokens,
            **common,
        ),
    )


def wire_cases() -> st.SearchStrategy[WireCase]:
    unary = st.sampled_from(UNARY_RPCS).flatmap(
        lambda rpc: garbage(rpc).map(lambda b: WireCase(rpc, b))
    )
    opened = Open("", {"max_tokens": 2})
    before = st.sampled_from([(), (opened,), (opened, Turn("Hi", None, False))])
    chat = st.builds(lambda b, steps: WireCase("Chat", b, steps), garbage("Chat"), before)
    return weighted((unary, 1), (chat, 1))


def cross_cases() -> st.SearchStrategy[CrossCase]:
    return st.builds(
        CrossCase,
        caller=st.sampled_from(["alice", "bob"]),
        rpc=st.sampled_from(["GetSession", "DeleteSession", "Chat", "ListSessions"]),
        header=st.booleans(),
        unknown=ids(),
        busy=st.sampled_from([False] * 11 + [True]),  # a long turn on the victim: costly
        sampling=st.one_of(st.none(), sampling_dicts(small_max_tokens(), hostile=True)),
    )


# -- outcomes --------------------------------------------------------------------------------


@dataclass
class Tally:
    """Cases run, and the statuses their calls ended with, by family."""

    codes: Counter[str] = field(default_factory=Counter)
    cases: int = 0
    turns: int = 0  # TurnEnds received: turns the cases really ran

    def add(self, family: str, code: Code) -> None:
        self.codes[f"{family}:{code.name}"] += 1

    def by_code(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for key, n in self.codes.items():
            totals[key.split(":", 1)[1]] += n
        return dict(sorted(totals.items()))


@dataclass(frozen=True)
class Outcome:
    code: Code
    details: str

    def __str__(self) -> str:
        return f"{self.code.name}({self.details!r})"


@dataclass
class Sent:
    """A step of a Chat case as the client performed it."""

    step: Step
    index: int
    outstanding: int = 0  # a Turn: turns written and not yet answered, this one included
    result: Outcome | None = None  # a side call's answer
    reference: Outcome | None = None  # Spy: the same call naming an unknown id
    problem: str = ""  # a side call's answer that was wrong in itself


@dataclass
class ChatRun:
    sid: str | None  # the session the stream is about (resumed, or opened), when known
    header: str | None  # the x-session-id sent
    sent: list[Sent]
    responses: list[pb.ChatResponse]
    outcome: Outcome
    created: list[str]  # sessions the case made for itself beforehand
    # The stream ended before the client had written every step and half-closed it.
    cut_short: bool = False


def expect(outcome: Outcome, allowed: set[Code]) -> list[str]:
    """Problems with `outcome` when only `allowed` codes are right; a status other than OK
    needs a message."""
    problems = []
    if outcome.code not in allowed:
        names = ", ".join(sorted(c.name for c in allowed))
        problems.append(f"status {clip(str(outcome))}; allowed: {names}")
    if outcome.code is not OK and not outcome.details.strip():
        problems.append(f"status {outcome.code.name} with an empty message")
    return problems


def fail(
    problems: Sequence[str], case: object, outcome: Outcome, run: ChatRun | None = None
) -> None:
    """Raise AssertionError describing `problems`, if any, with the case and its answer."""
    if not problems:
        return
    lines = [f"{len(problems)} problem(s):", *(f"  - {p}" for p in problems)]
    lines += [f"case: {clip(repr(case))}", f"outcome: {clip(str(outcome))}"]
    if run is not None:
        lines.append("sent: " + ", ".join(f"{type(s.step).__name__}" for s in run.sent))
        lines.append(f"responses: {brief(run.responses)}")
    raise AssertionError("\n".join(lines))


def clip(text: str, keep: int = 600) -> str:
    """`text`, its middle cut out when long (huge generated strings)."""
    if len(text) <= 2 * keep:
        return text
    return f"{text[:keep]}...<{len(text) - 2 * keep} characters>...{text[-keep:]}"


def brief(responses: Sequence[pb.ChatResponse]) -> str:
    parts = []
    for r in responses:
        kind = r.WhichOneof("event")
        if kind == "delta":
            parts.append(f"delta({r.delta.index}+{len(r.delta.token_ids)})")
        elif kind == "turn_end":
            reason = pb.FinishReason.Name(r.turn_end.finish_reason).removeprefix("FINISH_REASON_")
            parts.append(f"end({reason},{r.turn_end.usage.generated_tokens})")
        else:
            parts.append(str(kind))
    return " ".join(parts)


def metadata(auth: Auth, session_header: str | None = None) -> tuple[tuple[str, str], ...]:
    md: list[tuple[str, str]] = []
    if auth.header is not None:
        md.append(("authorization", auth.header))
    if session_header is not None:
        md.append(("x-session-id", session_header))
    return tuple(md)


def sendable(value: str) -> bool:
    """Whether gRPC lets a client send `value` as metadata."""
    return all(0x20 <= ord(c) <= 0x7E for c in value)


def serialize(step: Step, sid: str | None) -> bytes:
    """The bytes of a request step (`sid`: the id a Resume names)."""
    if isinstance(step, Garbage):
        return step.payload
    if isinstance(step, Open):
        params = to_params(step.sampling)
        request = pb.ChatRequest(
            open=pb.OpenSession(system_prompt=step.system_prompt, sampling=params)
        )
    elif isinstance(step, Resume):
        params = to_params(step.sampling)
        request = pb.ChatRequest(resume=pb.ResumeSession(session_id=sid or "", sampling=params))
    elif isinstance(step, Turn):
        params = to_params(step.sampling)
        request = pb.ChatRequest(turn=pb.UserTurn(text=step.text, sampling=params, raw=step.raw))
    elif isinstance(step, Cancel):
        request = pb.ChatRequest(cancel=pb.CancelTurn())
    elif isinstance(step, End):
        request = pb.ChatRequest(end=pb.EndSession())
    else:
        request = pb.ChatRequest()
    return bytes(request.SerializeToString())


# -- running cases ---------------------------------------------------------------------------


class GatewayFuzzer:
    """Sends cases to the gateway at `target` (in front of the Triton at `triton_url`) and
    checks their answers.

    `start()` gives each caller one session of its own that no case may change (the
    "other" session of the other caller's cases) and records the sessions each caller
    holds; every case must leave them as they were. `check_batch()` checks that the
    servers are whole after a batch of cases."""

    def __init__(
        self,
        target: str,
        triton_url: str,
        limits: Limits,
        counter: TokenCounter,
        tally: Tally,
        *,
        model: str = "sinkserve",
    ) -> None:
        self.target = target
        self.limits = limits
        self.counter = counter
        self.tally = tally
        # Unlimited on this side: oversized requests must reach the gateway to be refused.
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        # Chat streams run on the synchronous API (see `_stream`), and their side calls.
        self._sync_channel = grpc.insecure_channel(target, options=options)
        self._sync_stub = chat_pb2_grpc.ChatServiceStub(self._sync_channel)
        self._sync_chat = self._sync_channel.stream_stream(
            "/sinkserve.v1.ChatService/Chat",
            request_serializer=None,
            response_deserializer=pb.ChatResponse.FromString,
        )
        # The model itself, past the gateway: what it holds is the truth about leaks.
        self._model = TritonBackend(triton_url, model)
        self.fixed: dict[str, str] = {}  # caller -> its session no case may change
        self._fixed_state: dict[str, tuple[int, int]] = {}  # caller -> (turns, position)
        self.baseline: dict[str, set[str]] = {}  # caller -> the sessions it holds

    async def start(self) -> None:
        for caller in TOKENS:
            self.fixed[caller] = await self._create(caller)
            self._fixed_state[caller] = (0, 0)
            self.baseline[caller] = await self._session_ids(caller)

    async def close(self) -> None:
        for caller, sid in self.fixed.items():
            await self._delete(caller, sid, strict=False)
        await self._model.close()
        await self._channel.close()
        self._sync_channel.close()

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def other(caller: str) -> str:
        return "bob" if caller == "alice" else "alice"

    async def _unary(
        self, rpc: str, request: Message, md: Sequence[tuple[str, str]], timeout: float = 30.0
    ) -> tuple[Outcome, Any]:
        try:
            reply = await getattr(self._stub, rpc)(request, metadata=tuple(md), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            return Outcome(err.code(), err.details() or ""), None
        return Outcome(OK, ""), reply

    async def _session_ids(self, owner: str) -> set[str]:
        """The owner's sessions, from the model itself."""
        return {s["session_id"] for s in await self._model.call("list", owner=owner)}

    async def _info(self, caller: str, sid: str) -> Any:
        """The model's view of one of the caller's sessions; None when it has none."""
        try:
            return await self._model.call("get", sid, caller)
        except GatewayError as err:
            if err.code in (NF, Code.PERMISSION_DENIED, IA):
                return None
            raise

    async def _create(self, caller: str) -> str:
        request = pb.CreateSessionRequest()
        reply = await self._stub.CreateSession(
            request, metadata=metadata(auth_of(caller)), timeout=30
        )
        return str(reply.session.session_id)

    async def _delete(self, caller: str, sid: str, *, strict: bool = True) -> None:
        request = pb.DeleteSessionRequest(session_id=sid)
        outcome, _ = await self._unary("DeleteSession", request, metadata(auth_of(caller)))
        assert not strict or outcome.code in (OK, NF), f"cleanup: deleting {sid!r}: {outcome}"

    async def _resolve(self, ref: Ref, caller: str, created: list[str]) -> str:
        if ref.kind == "own":
            sid = await self._create(caller)
            created.append(sid)
            return sid
        if ref.kind == "gone":
            sid = await self._create(caller)
            await self._delete(caller, sid)
            return sid
        if ref.kind == "other":
            return self.fixed[self.other(caller)]
        return ref.text  # unknown, empty, odd

    def _header(self, header: Header, sid: str) -> str | None:
        if header.kind == "same":
            return sid if sendable(sid) else None
        if header.kind == "other":
            return self.fixed["bob"] if sid == self.fixed["alice"] else self.fixed["alice"]
        if header.kind == "value":
            return header.value
        return None

    async def settle(self, caller: str, sids: Sequence[str], problems: list[str]) -> None:
        """Wait until none of the caller's `sids` runs a turn on the model, at most SETTLE_S."""
        deadline = time.monotonic() + SETTLE_S
        for sid in sids:
            while (info := await self._info(caller, sid)) is not None and info["turn_running"]:
                if time.monotonic() > deadline:
                    problems.append(f"session {sid!r} still runs a turn {SETTLE_S:g}s later")
                    return
                await asyncio.sleep(0.05)

    async def finish(
        self,
        caller: str,
        created: Sequence[str],
        problems: list[str],
        *,
        may_leave: bool = False,
        touched_fixed: bool = False,
    ) -> None:
        """After a case: its sessions settle and are deleted; the caller holds exactly what
        it held before (with `may_leave` a session the client could not learn the id of is
        removed without complaint); the sessions no case may change are as they were."""
        mine = [s for s in dict.fromkeys(created) if s not in self.baseline[caller]]
        await self.settle(caller, mine, problems)
        for sid in mine:
            await self._delete(caller, sid)
        now = await self._session_ids(caller)
        extra, missing = now - self.baseline[caller], self.baseline[caller] - now
        if extra:
            if not may_leave:
                problems.append(f"{caller} holds sessions it was never told of: {sorted(extra)}")
            await self.settle(caller, sorted(extra), problems)
            for sid in extra:
                await self._delete(caller, sid)
        if missing:
            problems.append(f"{caller} lost sessions: {sorted(missing)}")
            self.baseline[caller] -= missing
        if touched_fixed:
            for who, sid in self.fixed.items():
                info = await self._info(who, sid)
                if info is None:
                    problems.append(f"{who}'s session {sid!r}, which no case may change, is gone")
                elif (info["turns"], info["position"]) != self._fixed_state[who]:
                    problems.append(f"{who}'s session {sid!r}, which no case may change, is {info}")

    # -- unary cases --------------------------------------------------------------------

    async def unary(self, case: UnaryCase) -> None:
        self.tally.cases += 1
        caller = case.auth.caller
        who = caller or "alice"  # whose sessions the refs of an unauthenticated call name
        created: list[str] = []
        full: list[str] = []
        sid = ""
        request: Message
        if case.rpc == "CreateSession":
            request = pb.CreateSessionRequest(system_prompt=case.system_prompt)
        elif case.rpc == "ListSessions":
            own = [await self._create(who) for _ in range(3)]
            created += own
            token = ""
            if case.page_token.kind == "own":
                token = own[int(case.page_token.text)]
            elif case.page_token.kind != "empty":
                token = await self._resolve(case.page_token, who, created)
            full = [s["session_id"] for s in await self._model.call("list", owner=who)]
            request = pb.ListSessionsRequest(page_size=case.page_size, page_token=token)
        else:
            sid = await self._resolve(case.ref, who, created)
            kind = pb.GetSessionRequest if case.rpc == "GetSession" else pb.DeleteSessionRequest
            request = kind(session_id=sid)
        header = self._header(case.header, sid) if sid else self._header_value(case.header)
        outcome, reply = await self._unary(case.rpc, request, metadata(case.auth, header))
        self.tally.add("unary", outcome.code)
        problems = self._judge_unary(case, request, header, outcome, reply, full)
        if case.rpc == "CreateSession" and reply is not None:
            created.append(reply.session.session_id)
        deleted = case.rpc == "DeleteSession" and outcome.code is OK
        if deleted and await self._info(who, sid) is not None:
            problems.append(f"DeleteSession answered OK but {sid!r} is still there")
        await self.finish(who, created, problems, touched_fixed=case.ref.kind == "other")
        fail(problems, case, outcome)

    @staticmethod
    def _header_value(header: Header) -> str | None:
        return header.value if header.kind == "value" else None

    def _judge_unary(
        self,
        case: UnaryCase,
        request: Any,
        header: str | None,
        outcome: Outcome,
        reply: Any,
        full: Sequence[str],
    ) -> list[str]:
        caller = case.auth.caller
        if caller is None:
            return expect(outcome, {Code.UNAUTHENTICATED})
        if case.rpc == "CreateSession":
            verdict = self.counter.system_verdict(self.limits, case.system_prompt)
            problems = expect(
                outcome, {Tri.VALID: {OK}, Tri.INVALID: {IA}, Tri.EITHER: {OK, IA}}[verdict]
            )
            named = (str(self.limits.prompt_limit), str(self.limits.max_turn_chars))
            if outcome.code is IA and not any(n in outcome.details for n in named):
                problems.append(f"a system prompt too long, refused without its limit: {outcome}")
            if reply is not None:
                s = reply.session
                if s.owner != caller or not s.session_id or s.turns or s.cache_position:
                    problems.append(f"a new session that looks used: {s}")
            return problems
        if case.rpc == "ListSessions":
            return self._judge_list(caller, request, outcome, reply, full)
        sid = request.session_id
        if header is not None and header != sid:
            return expect(outcome, {IA})
        allowed = {"own": {OK}, "empty": {IA, NF}, "odd": {NF, IA}}.get(case.ref.kind, {NF})
        problems = expect(outcome, allowed)
        if case.rpc == "GetSession" and reply is not None:
            s = reply.session
            if (s.session_id, s.owner, s.sinks, s.window) != (
                sid,
                caller,
                self.limits.sinks,
                self.limits.window,
            ):
                problems.append(f"GetSession answered another session: {s}")
            if s.expire_time.ToNanoseconds() <= s.create_time.ToNanoseconds():
                problems.append(f"a session that expires before it was made: {s}")
        return problems

    @staticmethod
    def _judge_list(
        caller: str, request: Any, outcome: Outcome, reply: Any, full: Sequence[str]
    ) -> list[str]:
        """A page holds the caller's sessions (in the model's order) after the token's, at
        most page_size of them (0: DEFAULT_PAGE), with a next_page_token exactly when more
        follow. A negative page_size is refused or taken as 0; a token that is not one of
        the caller's session ids is refused."""
        token = request.page_token
        if token and token not in full:
            return expect(outcome, {IA})
        problems = expect(outcome, {OK, IA} if request.page_size < 0 else {OK})
        if reply is None:
            return problems
        size = request.page_size if request.page_size > 0 else DEFAULT_PAGE
        start = full.index(token) + 1 if token else 0
        expected = list(full[start : start + size])
        got = [s.session_id for s in reply.sessions]
        if got != expected:
            problems.append(
                f"page (size {request.page_size}, token {token!r}) {got}, not {expected}"
            )
        if bool(reply.next_page_token) != (start + size < len(full)):
            left = len(full) - start - len(got)
            problems.append(f"next_page_token {reply.next_page_token!r} with {left} sessions left")
        if any(s.owner != caller for s in reply.sessions):
            problems.append(f"ListSessions showed another caller's session: {reply}")
        return problems

    # -- wire cases ---------------------------------------------------------------------

    async def wire(self, case: WireCase) -> None:
        """Bytes that are not a request are INVALID_ARGUMENT (after the valid requests
        before them were answered), never UNKNOWN or INTERNAL or a stream left hanging."""
        self.tally.cases += 1
        problems: list[str] = []
        if case.rpc != "Chat":
            call = self._channel.unary_unary(
                f"/sinkserve.v1.ChatService/{case.rpc}",
                request_serializer=None,
                response_deserializer=RESPONSE_TYPES[case.rpc].FromString,
            )
            outcome = Outcome(OK, "")
            try:
                await call(case.payload, metadata=metadata(auth_of("alice")), timeout=10)
            except grpc.aio.AioRpcError as err:
                outcome = Outcome(err.code(), err.details() or "")
            self.tally.add("wire", outcome.code)
            problems += expect(outcome, {IA})
            await self.finish("alice", [], problems)
            fail(problems, case, outcome)
            return
        steps = (*case.before, Garbage(case.payload))
        chat = ChatCase(auth_of("alice"), Header("none"), steps[0], steps[1:], "close", 10.0)
        run = await self._run_chat(chat)
        self.tally.add("wire", run.outcome.code)
        problems += expect(run.outcome, {IA})
        opened = bool(run.responses) and run.responses[0].HasField("session_opened")
        if case.before and not opened:
            problems.append("the valid open before the bytes got no SessionOpened")
        await self.finish("alice", [*run.created, *([run.sid] if run.sid else [])], problems)
        fail(problems, case, run.outcome, run)

    # -- cross-caller cases -------------------------------------------------------------

    async def cross(self, case: CrossCase) -> None:
        """The other caller's session answers exactly like an unknown id, busy or idle, and
        is left as it was."""
        self.tally.cases += 1
        victim = self.other(case.caller)
        sid = self.fixed[victim]
        problems: list[str] = []
        busy: BusyTurn | None = None
        if case.busy:
            busy = BusyTurn(self._stub, metadata(auth_of(victim), sid), sid)
            await busy.start()
        try:
            named = await self._probe(case, sid)
            unknown = await self._probe(case, case.unknown)
        finally:
            if busy is not None:
                await busy.stop()
        self.tally.add("cross", named.code)
        self.tally.add("cross", unknown.code)
        if (named.code, named.details.replace(sid, ID_PLACEHOLDER)) != (
            unknown.code,
            unknown.details.replace(case.unknown, ID_PLACEHOLDER),
        ):
            problems.append(f"another caller's session answers {named}, an unknown id {unknown}")
        problems += expect(named, {NF, IA})
        if busy is not None:
            problems += busy.problems
            await self.settle(victim, [sid], problems)
            info = await self._info(victim, sid)
            if info is not None:  # the victim's own turn moved its session on
                self._fixed_state[victim] = (info["turns"], info["position"])
        await self.finish(case.caller, [], problems, touched_fixed=True)
        fail(problems, case, named)

    async def _probe(self, case: CrossCase, sid: str) -> Outcome:
        md = metadata(auth_of(case.caller), sid if case.header else None)
        if case.rpc == "GetSession":
            return (await self._unary("GetSession", pb.GetSessionRequest(session_id=sid), md))[0]
        if case.rpc == "DeleteSession":
            delete = pb.DeleteSessionRequest(session_id=sid)
            return (await self._unary("DeleteSession", delete, md))[0]
        if case.rpc == "ListSessions":
            page = pb.ListSessionsRequest(page_token=sid)
            return (await self._unary("ListSessions", page, md))[0]
        call = self._stub.Chat(metadata=md, timeout=CALL_DEADLINE_S)
        resume = pb.ResumeSession(session_id=sid, sampling=to_params(case.sampling))
        try:
            await call.write(pb.ChatRequest(resume=resume))
            # A turn only once the resume was answered: a write the server's end overtook
            # would turn its status into grpc.aio's local INTERNAL.
            if (await call.read()) is not grpc.aio.EOF:
                await call.write(pb.ChatRequest(turn=pb.UserTurn(text="Hi")))
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:
                    pass
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the status is read below
        return Outcome(await call.code(), await call.details() or "")

    # -- chat cases ---------------------------------------------------------------------

    async def chat(self, case: ChatCase) -> None:
        self.tally.cases += 1
        caller = case.auth.caller
        run = await self._run_chat(case)
        self.tally.add("chat", run.outcome.code)
        self.tally.turns += sum(r.HasField("turn_end") for r in run.responses)
        judge = ChatJudge(case, run, self.limits, self.counter)
        problems = judge.problems()
        who = caller or "alice"
        if caller is not None and run.sid is not None and judge.opened:
            info = await self._info(caller, run.sid)
            if judge.must_be_gone and info is not None:
                problems.append(f"the stream ended OK after EndSession, but {run.sid!r} is there")
            if judge.must_exist and info is None:
                problems.append(f"session {run.sid!r} is gone though nothing ended it")
        # A valid open whose SessionOpened never reached the client (the deadline cut the
        # stream, or a later request the transport refused, one over the message size
        # limit, killed it first) may leave a session the client could not learn the id of:
        # the model opened it. Not refusing a valid open is the point.
        may_leave = isinstance(case.first, Open) and not judge.opened and judge.open_valid
        touched = isinstance(case.first, Resume) and case.first.ref.kind == "other"
        touched |= any(isinstance(s.step, Spy) for s in run.sent)
        # Only the caller's own sessions: a resumed id may be another caller's, or nobody's.
        sids = [*run.created, *([run.sid] if isinstance(case.first, Open) and run.sid else [])]
        await self.finish(who, sids, problems, may_leave=may_leave, touched_fixed=touched)
        fail(problems, case, run.outcome, run)

    async def _run_chat(self, case: ChatCase) -> ChatRun:
        """Run the case's stream (its sessions resolved here, the stream in a thread)."""
        caller = case.auth.caller or "alice"
        created: list[str] = []
        sid: str | None = None
        header = self._header_value(case.header)
        if isinstance(case.first, Resume):
            sid = await self._resolve(case.first.ref, caller, created)
            header = self._header(case.header, sid)
        run = await asyncio.to_thread(self._stream, case, sid, header)
        run.created = created
        return run

    def _stream(self, case: ChatCase, sid: str | None, header: str | None) -> ChatRun:
        """Write the case's steps on one Chat stream while this thread reads its responses.

        The synchronous gRPC API, not grpc.aio: when the server ends a stream while the
        client still writes, grpc.aio replaces the server's status with a local INTERNAL
        ("Internal error from Core", a failed send), hiding the answer under test. Here
        grpc's own thread pulls the requests from a generator, which does the waits and
        the side calls between them, in order."""
        responses: list[pb.ChatResponse] = []
        changed = threading.Condition()  # guards `responses` and `ended`
        ended = threading.Event()
        ready = threading.Event()  # the call object exists (for a drop)
        # Set while the request generator is parked at a yield or done: grpc's thread may
        # still be in a side call when the stream ends, and `sent` must be complete.
        parked = threading.Event()
        parked.set()  # grpc may never ask for a request (a call refused at once)
        sent: list[Sent] = []
        calls: list[Any] = []
        state: dict[str, Any] = {"sid": sid, "finished": False}
        patience = case.deadline_s + HANG_MARGIN_S

        def turn_ends() -> int:
            return sum(r.HasField("turn_end") for r in responses)

        def until(predicate: Callable[[], bool]) -> None:
            with changed:
                changed.wait_for(lambda: ended.is_set() or predicate(), timeout=patience)

        def requests() -> Iterator[bytes]:
            parked.clear()
            try:
                yield from steps()
            finally:
                parked.set()

        def steps() -> Iterator[bytes]:
            turns_written = 0
            mark = 0  # responses there were when the last turn was written
            for index, step in enumerate((case.first, *case.steps)):
                if ended.is_set():
                    return
                record = Sent(step, index)
                if isinstance(step, REQUESTS):
                    if isinstance(step, Turn):
                        turns_written += 1
                        with changed:
                            record.outstanding = turns_written - turn_ends()
                            mark = len(responses)
                    sent.append(record)
                    # grpc asks for the next request only once this one was sent.
                    parked.set()
                    yield serialize(step, sid)
                    parked.clear()
                    if ended.is_set():
                        return
                    continue
                if isinstance(step, WaitEnd):
                    written = turns_written
                    until(lambda: turn_ends() >= written)  # noqa: B023 (called at once)
                elif isinstance(step, WaitDelta):
                    since = mark
                    until(lambda: len(responses) > since)  # noqa: B023 (called at once)
                else:  # a side call about the stream's session, which needs its id
                    if state["sid"] is None:
                        until(lambda: bool(responses))
                        with changed:
                            if responses and responses[0].HasField("session_opened"):
                                state["sid"] = responses[0].session_opened.session_id
                    if state["sid"] is None or case.auth.caller is None:
                        continue  # nothing to ask about: not performed
                    self._side(step, record, case.auth.caller, state["sid"])
                sent.append(record)
            state["finished"] = True
            if case.finish == "drop":
                # Not before the first response: a call cancelled while the gateway opens
                # its session leaves that session to appear on the model at some later
                # moment, and the leak check of the next case would take it for its own.
                until(lambda: bool(responses))
                ready.wait(patience)
                calls[0].cancel()
            # Returning half-closes the stream.

        call = self._sync_chat(
            requests(), metadata=metadata(case.auth, header), timeout=case.deadline_s
        )
        calls.append(call)
        ready.set()
        try:
            for response in call:
                with changed:
                    responses.append(response)
                    changed.notify_all()
        except grpc.RpcError:
            pass  # the status is read from the call
        finally:
            with changed:
                ended.set()
                changed.notify_all()
        parked.wait(patience)  # a side call in flight finishes and is recorded
        if sid is None and responses and responses[0].HasField("session_opened"):
            sid = responses[0].session_opened.session_id
        outcome = Outcome(call.code(), call.details() or "")
        return ChatRun(sid, header, sent, responses, outcome, [], not state["finished"])

    def _side(self, step: Step, record: Sent, caller: str, sid: str) -> None:
        """A unary call about the stream's session, made between two of its requests."""
        md = metadata(auth_of(caller))
        if isinstance(step, Peek):
            record.result, reply = self._sync_unary(
                "GetSession", pb.GetSessionRequest(session_id=sid), md
            )
            if reply is not None and (reply.session.owner, reply.session.session_id) != (
                caller,
                sid,
            ):
                record.problem = f"Peek answered another session: {reply.session}"
        elif isinstance(step, Delete):
            delete = pb.DeleteSessionRequest(session_id=sid)
            record.result, _ = self._sync_unary("DeleteSession", delete, md)
        elif isinstance(step, Spy):
            spy = metadata(auth_of(self.other(caller)))
            record.result, _ = self._sync_unary(
                "GetSession", pb.GetSessionRequest(session_id=sid), spy
            )
            unknown = "Spy" + sid[3:]  # shaped like the real id, held by nobody
            outcome, _ = self._sync_unary(
                "GetSession", pb.GetSessionRequest(session_id=unknown), spy
            )
            record.reference = Outcome(outcome.code, outcome.details.replace(unknown, sid))

    def _sync_unary(
        self, rpc: str, request: Message, md: Sequence[tuple[str, str]]
    ) -> tuple[Outcome, Any]:
        try:
            reply = getattr(self._sync_stub, rpc)(request, metadata=tuple(md), timeout=30)
        except grpc.RpcError as err:
            return Outcome(err.code(), err.details() or ""), None
        return Outcome(OK, ""), reply

    # -- after a batch ------------------------------------------------------------------

    async def check_batch(self) -> None:
        """The servers stay whole: health SERVING, no turn running on the model, each
        caller holds what it held (and nobody holds a session for an unauthenticated
        call), and a normal two-turn conversation works."""
        problems: list[str] = []
        async with grpc.aio.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "sinkserve.v1.ChatService"):
                request = health_pb2.HealthCheckRequest(service=service)
                reply = await health.Check(request, timeout=10)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    problems.append(f"health of {service!r} is {reply.status}")
        deadline = time.monotonic() + SETTLE_S
        while (ping := await self._model.call("ping"))["turns_running"]:
            if time.monotonic() > deadline:
                problems.append(f"the model still runs turns after the batch: {ping}")
                break
            await asyncio.sleep(0.05)
        for caller in TOKENS:
            listed = await self._model.call("list", owner=caller)
            now = {s["session_id"] for s in listed}
            if now != self.baseline[caller]:
                problems.append(
                    f"{caller} holds {sorted(now)}, not {sorted(self.baseline[caller])}"
                )
            if running := [s["session_id"] for s in listed if s["turn_running"]]:
                problems.append(f"{caller}'s sessions {running} still run turns")
        for owner in NOBODY:
            if stray := await self._session_ids(owner):
                problems.append(f"sessions of owner {owner!r}: {sorted(stray)}")
        async with ChatClient(self.target, TOKENS["alice"]) as alice:
            defaults = sampling(max_tokens=SMALL_MAX_TOKENS)
            chat = alice.conversation(defaults=defaults, timeout=CALL_DEADLINE_S)
            await chat.open()
            positions = []
            for question in ("What is the capital of France?", "And of Italy?"):
                _, end = await chat.turn(question)
                if end.usage.generated_tokens < 1:
                    problems.append(f"a normal turn generated nothing: {end}")
                positions.append(end.usage.cache_position)
            if not positions[0] < positions[1]:
                problems.append(f"a normal conversation did not advance: {positions}")
            await chat.end()
        assert not problems, "after the batch: " + "; ".join(problems)


class BusyTurn:
    """A long turn running on a session (on its owner's stream) while others probe it."""

    def __init__(
        self, stub: chat_pb2_grpc.ChatServiceStub, md: Sequence[tuple[str, str]], sid: str
    ) -> None:
        self._call = stub.Chat(metadata=tuple(md), timeout=CALL_DEADLINE_S)
        self._sid = sid
        self.problems: list[str] = []

    async def start(self) -> None:
        """Return once the turn streams (its first delta follows the SessionOpened)."""
        await self._call.write(pb.ChatRequest(resume=pb.ResumeSession(session_id=self._sid)))
        turn = pb.UserTurn(text="Tell me a long story.", sampling=sampling(max_tokens=64))
        await self._call.write(pb.ChatRequest(turn=turn))
        for _ in range(2):
            if await self._call.read() is grpc.aio.EOF:
                self.problems.append("the owner's turn ended before it streamed")
                return

    async def stop(self) -> None:
        try:
            await self._call.write(pb.ChatRequest(cancel=pb.CancelTurn()))
            await self._call.done_writing()
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the status is read below
        if (code := await self._call.code()) is not OK:
            self.problems.append(
                f"the owner's stream ended {code.name}: {await self._call.details()}"
            )


@dataclass(frozen=True)
class Planned:
    """A turn the gateway takes: it runs in its place in the stream's queue, unless the
    model refuses it when it starts (`refused`)."""

    sent: Sent
    params: dict[str, Any]  # its effective sampling
    refused: bool


class ChatJudge:
    """What a correct answer to a Chat case is, decided from the case and from what the
    client did (which steps it wrote, how many turns were unanswered at each write).

    The steps are walked in order. A request the gateway refuses as it arrives (a first
    request that is no open or resume, an empty or too long turn, a request out of place)
    ends the walk: the stream must end with one of its codes, unless a step before it
    that may be refused was. A step that may be refused adds its codes to those allowed.
    A turn the model refuses (its sampling, its length in tokens) is refused only when it
    starts, behind the turns queued before it, so what the requests after it do may end
    the stream first; then the stream must not end OK, unless an EndSession (which drops
    the queued turns) or a CancelTurn (which may end it CANCELLED first) follows it. Each
    turn taken gets its TurnEnd, in order, when the stream ends OK; turns queue behind a
    running one (at most QUEUED_TURNS of them); CancelTurn cancels only the running turn;
    EndSession ends the session after the running turn."""

    def __init__(self, case: ChatCase, run: ChatRun, limits: Limits, counter: TokenCounter) -> None:
        self.case, self.run, self.limits, self.counter = case, run, limits, counter
        self.opened = bool(run.responses) and run.responses[0].HasField("session_opened")
        self.must_be_gone = False  # set by problems(): the session must be gone after
        self.must_exist = False  # ... or must still be there
        self.open_valid = False  # the first request is an open the server may accept

    def _too_big(self, request: pb.ChatRequest) -> bool:
        return int(request.ByteSize()) > self.limits.max_message_bytes

    def problems(self) -> list[str]:
        case, run, limits = self.case, self.run, self.limits
        if case.auth.caller is None:
            dropped = {Code.CANCELLED} if case.finish == "drop" else set()
            refused = expect(run.outcome, {Code.UNAUTHENTICATED} | dropped)
            return refused + (["responses to an unauthenticated call"] if run.responses else [])
        allowed: set[Code] = set()  # codes a step that may be refused could end it with
        must: set[Code] | None = None  # codes the first step that must be refused ends it with
        accepted: list[Planned] = []
        deferred: set[Code] | None = None  # the codes of the first turn the model must refuse
        excused = False  # a step after that turn that may keep the stream from ending with it
        session_defaults: pb.SamplingParams | None = None
        stream_defaults: pb.SamplingParams | None = None
        system = ""
        ended = deleted = False
        sure_turns = 0  # turns accepted that the model must have run
        problems: list[str] = []
        for sent in run.sent:
            step = sent.step
            may: set[Code] = set()
            refuse: set[Code] | None = None
            if sent.index == 0:
                if isinstance(step, Open):
                    session_defaults, system = to_params(step.sampling), step.system_prompt
                    verdict = worst(
                        sampling_verdict(merged(session_defaults), limits),
                        self.counter.system_verdict(limits, system),
                    )
                    refuse, may = _split(verdict, IA)
                elif isinstance(step, Resume):
                    stream_defaults = to_params(step.sampling)
                    if run.header is not None and run.header != run.sid:
                        refuse = {IA}
                    elif step.ref.kind != "own":
                        refuse = {"empty": {IA, NF}, "odd": {NF, IA}}.get(step.ref.kind, {NF})
                    elif sampling_verdict(merged(stream_defaults), limits) is not Tri.VALID:
                        may = {IA}  # refused now, or by the first turn that uses them
                else:
                    refuse = {IA}
            elif isinstance(step, Turn):
                refuse, may, by_model = self._turn(
                    step, sent, not sure_turns, stream_defaults, session_defaults, system
                )
                if refuse is None and deleted:
                    refuse, by_model = {NF}, True
                params = merged(to_params(step.sampling), stream_defaults, session_defaults)
                if ended:  # after EndSession: refused, or never read (the stream closes)
                    may |= (refuse or set()) | {FP, IA}
                    refuse = None
                elif refuse is not None and by_model:
                    may |= refuse
                    deferred = deferred or refuse
                    refuse = None
                    accepted.append(Planned(sent, params, refused=True))
                elif refuse is None:
                    accepted.append(Planned(sent, params, refused=False))
                    sure_turns += deferred is None
            elif isinstance(step, Cancel):
                excused |= deferred is not None
            elif isinstance(step, (Open, Resume, Empty, Garbage)):
                refuse = {IA}
                if ended:
                    may, refuse = refuse, None
            elif isinstance(step, End):
                may = {NF} if deleted else set()
                ended = True
                excused |= deferred is not None
            elif isinstance(step, (Peek, Delete)) and sent.result is not None:
                side_ok = {OK} | ({NF} if deleted or ended else set())
                problems += [f"{type(step).__name__}: {p}" for p in expect(sent.result, side_ok)]
                problems += [sent.problem] if sent.problem else []
                deleted |= isinstance(step, Delete)
            elif isinstance(step, Spy) and sent.result != sent.reference:
                problems.append(
                    f"the other caller gets {sent.result} for this session, "
                    f"{sent.reference} for an unknown id"
                )
            allowed |= may
            if sent.index == 0:
                self.open_valid = isinstance(step, Open) and refuse is None
            if refuse is not None:
                must = refuse
                break
        if deleted:
            allowed |= {NF}
        # gRPC refuses a message over its size limit when it arrives, ending the call then,
        # maybe before the server answered the requests before it.
        if any(
            isinstance(s.step, REQUESTS)
            and len(serialize(s.step, run.sid)) > limits.max_message_bytes
            for s in run.sent
        ):
            allowed |= {RE}
        if case.finish == "drop":
            allowed |= {Code.CANCELLED}
        if any(max_tokens_of(p.params) > SMALL_MAX_TOKENS for p in accepted if not p.refused):
            allowed |= {DE}
        if must is not None:
            allowed |= must
        elif deferred is None or excused:
            allowed |= {OK}
        problems += expect(run.outcome, allowed)
        problems += self._grammar(accepted)
        ends = [r.turn_end for r in run.responses if r.HasField("turn_end")]
        clean = run.outcome.code is OK and case.finish == "close"
        if clean and not ended and not deleted and len(ends) != len(accepted):
            problems.append(f"{len(accepted)} turns accepted, {len(ends)} TurnEnds")
        if clean and ended and not deleted and accepted and not ends:
            problems.append("EndSession closed the stream without the running turn's TurnEnd")
        if run.outcome.code is OK and run.cut_short and not ended:
            problems.append("the stream ended OK before the client closed it or sent EndSession")
        self.must_be_gone = clean and ended and must is None and not deleted
        # A side DeleteSession runs whatever the stream did with the requests around it.
        deleted |= any(
            isinstance(s.step, Delete) and s.result is not None and s.result.code is OK
            for s in run.sent
        )
        self.must_exist = self.opened and not ended and not deleted
        return problems

    def _turn(
        self,
        step: Turn,
        sent: Sent,
        first_turn: bool,
        stream_defaults: pb.SamplingParams | None,
        session_defaults: pb.SamplingParams | None,
        system: str,
    ) -> tuple[set[Code] | None, set[Code], bool]:
        """(must refuse with, may refuse with, whether the model is the one to refuse it)
        for a turn. A session's first turn counts its system prompt too (a raw turn uses
        neither the template nor the system prompt)."""
        limits = self.limits
        request = pb.ChatRequest(
            turn=pb.UserTurn(text=step.text, sampling=to_params(step.sampling), raw=step.raw)
        )
        if self._too_big(request):
            return {RE}, set(), False  # gRPC's own limit on a message
        if not step.text or len(step.text) > limits.max_turn_chars:
            return {IA}, set(), False  # the gateway's own checks, as the request arrives
        params = merged(to_params(step.sampling), stream_defaults, session_defaults)
        counted = (system, step.text) if first_turn and system and not step.raw else (step.text,)
        verdict = worst(
            sampling_verdict(params, limits),
            self.counter.verdict(limits.prompt_limit, *counted, raw=step.raw),
        )
        refuse, may = _split(verdict, IA)
        if sent.outstanding > QUEUED_TURNS:
            # The queue may be full; the server may have answered more than the client saw.
            may |= {RE}
        return refuse, may, True

    def _grammar(self, accepted: list[Planned]) -> list[str]:
        """SessionOpened once, first; then per accepted turn contiguous deltas and one
        TurnEnd whose usage fits the turn; a turn cut short only by an error status."""
        run, limits = self.run, self.limits
        responses = run.responses
        if not responses:
            return []
        problems: list[str] = []
        opened = [i for i, r in enumerate(responses) if r.HasField("session_opened")]
        if opened != [0]:
            return [f"SessionOpened at {opened}, not once and first"]
        so = responses[0].session_opened
        resumed = isinstance(self.case.first, Resume)
        if so.resumed != resumed or (resumed and so.session_id != run.sid) or not so.session_id:
            problems.append(f"SessionOpened {so} for the first request {self.case.first}")
        if (so.sinks, so.window) != (limits.sinks, limits.window):
            problems.append(f"SessionOpened {so} does not match the model's cache")
        if so.cache_position:
            problems.append(f"SessionOpened {so} of a new session at a position")
        # A turn may end CANCELLED only if a CancelTurn (or DeleteSession) followed it.
        cancels_after = [
            sum(isinstance(s.step, (Cancel, Delete)) for s in run.sent if s.index > p.sent.index)
            for p in accepted
        ]
        turn = streamed = cancelled = 0
        position = so.cache_position
        for r in responses[1:]:
            if r.HasField("delta"):
                if r.delta.index != streamed:
                    problems.append(
                        f"turn {turn}: delta index {r.delta.index}, expected {streamed}"
                    )
                streamed += len(r.delta.token_ids)
                continue
            if turn >= len(accepted):
                problems.append(f"TurnEnd {turn} answers no turn that was accepted")
                break
            end, limit = r.turn_end, max_tokens_of(accepted[turn].params)
            if accepted[turn].refused and end.finish_reason != pb.FINISH_REASON_CANCELLED:
                problems.append(f"turn {turn}, which the model must refuse, ran: {end}")
            u = end.usage
            if end.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
                problems.append(f"turn {turn} ended without a reason: {end}")
            elif end.finish_reason == pb.FINISH_REASON_CANCELLED:
                cancelled += 1
                if not cancels_after[turn]:
                    problems.append(f"turn {turn} CANCELLED though no CancelTurn followed it")
                if u.generated_tokens and streamed > u.generated_tokens:
                    problems.append(
                        f"turn {turn}: {streamed} streamed, {u.generated_tokens} generated"
                    )
            else:
                if u.generated_tokens > limit:
                    problems.append(f"turn {turn}: {u.generated_tokens} tokens, max_tokens {limit}")
                if end.finish_reason == pb.FINISH_REASON_LENGTH and u.generated_tokens != limit:
                    problems.append(f"turn {turn}: LENGTH after {u.generated_tokens} of {limit}")
                if streamed not in (u.generated_tokens, u.generated_tokens - 1):
                    problems.append(
                        f"turn {turn}: {streamed} streamed, {u.generated_tokens} generated"
                    )
                if u.prompt_tokens < 1 or u.cache_position <= position:
                    problems.append(f"turn {turn}: usage {u} after position {position}")
                position = u.cache_position
            if u.cached_tokens > min(u.cache_position, limits.sinks + limits.window):
                problems.append(
                    f"turn {turn}: {u.cached_tokens} cached at position {u.cache_position}"
                )
            turn, streamed = turn + 1, 0
        if cancelled > sum(isinstance(s.step, (Cancel, Delete)) for s in run.sent):
            problems.append(f"{cancelled} turns CANCELLED by fewer CancelTurns")
        if responses[-1].HasField("delta") and run.outcome.code is OK:
            problems.append("the stream ended OK in the middle of a turn")
        return problems


def _split(verdict: Tri, code: Code) -> tuple[set[Code] | None, set[Code]]:
    """(must refuse with, may refuse with) for a verdict."""
    if verdict is Tri.INVALID:
        return {code}, set()
    return None, ({code} if verdict is Tri.EITHER else set())


# -- driving Hypothesis from a thread --------------------------------------------------------


def scaled(examples: int) -> int:
    """`examples` times SINKSERVE_FUZZ_SCALE (default 1; e.g. 0.05 for a quick look while
    changing a strategy), at least 1."""
    return max(1, round(examples * float(os.environ.get("SINKSERVE_FUZZ_SCALE", "1"))))


def shrink() -> bool:
    """Whether the tests shrink a failing case to a minimal one: only with
    SINKSERVE_FUZZ_SHRINK=1. A case that hangs the server costs its whole deadline at every
    shrinking step, and Hypothesis may shrink for minutes; CI prints the failing case as
    found (the same on every run: derandomized), and bench/fuzz.py shrinks."""
    return os.environ.get("SINKSERVE_FUZZ_SHRINK") == "1"


def drive(
    loop: asyncio.AbstractEventLoop,
    strategy: st.SearchStrategy[T],
    run_case: Callable[[T], Awaitable[None]],
    *,
    examples: int,
    timeout_s: Callable[[T], float],
    random_seed: int | None = None,
    shrink: bool = True,
) -> None:
    """Run `examples` Hypothesis cases of `strategy`, each as `run_case(case)` on `loop`.

    Call it from a thread other than the loop's (`fuzz` does): Hypothesis calls a test body
    synchronously, and the body waits for its coroutine on the loop, which stays free to
    run the gateway meanwhile. Derandomized (the same cases on every run) unless
    `random_seed` is given; no example database, so no run replays cases another saved."""

    def body(case: T) -> None:
        future: concurrent.futures.Future[None] = asyncio.run_coroutine_threadsafe(
            run_case(case),  # type: ignore[arg-type]
            loop,
        )
        try:
            future.result(timeout=timeout_s(case))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise AssertionError(f"case {case!r} did not finish in {timeout_s(case):g}s") from None

    phases = [Phase.explicit, Phase.generate, *([Phase.shrink] if shrink else [])]
    test = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=random_seed is None,
        phases=phases,
        report_multiple_bugs=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
        print_blob=False,
    )(given(strategy)(body))
    if random_seed is not None:
        test = seed(random_seed)(test)
    test()


async def fuzz(
    strategy: st.SearchStrategy[T],
    run_case: Callable[[T], Awaitable[None]],
    *,
    examples: int,
    timeout_s: Callable[[T], float],
    random_seed: int | None = None,
    shrink: bool = True,
) -> None:
    """`drive` from this event loop: Hypothesis in a worker thread, the cases here."""
    await asyncio.to_thread(
        drive,
        asyncio.get_running_loop(),
        strategy,
        run_case,
        examples=examples,
        timeout_s=timeout_s,
        random_seed=random_seed,
        shrink=shrink,
    )


def chat_timeout(case: ChatCase) -> float:
    """The most a Chat case may take: its call, a hang's margin, settling and cleanup."""
    return case.deadline_s + 2 * HANG_MARGIN_S + 2 * SETTLE_S


def unary_timeout(_case: object) -> float:
    return CALL_DEADLINE_S + 2 * HANG_MARGIN_S + 2 * SETTLE_S
