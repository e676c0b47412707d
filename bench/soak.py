"""Soak test of a real stack: `sinkserve serve` (Triton with the default model, and the
gateway) started here on free 127.0.0.1 ports, with tokens of its own and its session
store in a temp dir; `--sessions` sessions hold conversations through the gateway for
`--minutes`, then everything started here is stopped (also on Ctrl-C or SIGTERM).

Each session's client (its own channel, a seeded RNG) runs turns of random length with
random sampling, and at a few percent each: cancels mid-turn (CancelTurn), disconnects
mid-turn (the stream or the whole channel closed) and resumes the session on a new
stream, two turns written back to back (queued by the gateway), a clean reconnect
between turns, a GetSession check, and the session ended (EndSession or DeleteSession)
and replaced by a new one. Every turn is checked:

- a TurnEnd for every turn not deliberately cut; else it counts in `turns_lost`, and
  the status in `errors_by_code`, except a turn refused before it ran with
  RESOURCE_EXHAUSTED and a `retry-after-ms` hint (the server shedding load: every slot
  stayed busy past its slot wait), which counts in `turns_shed` and is followed by a
  wait of the hint;
- the cache position adds up: a turn feeds its prompt (with the token the previous turn
  owed) and all but the last of its generated tokens, so position = before +
  prompt_tokens + generated_tokens - 1; after a cancel or a cut the client takes the
  position from GetSession (it never goes backwards), and a resumed stream must report it
  (a turn cut before the model had it may still run there afterwards: the next turn may
  then exceed its own feed only by exactly one more turn on GetSession's count, see
  SessionClient; counted in `cut_turns_ran_late`);
- the text of a whole turn is valid UTF-8 and equal to the model tokenizer's decoding of
  the turn's token ids.

Every 10 s it samples the RSS and the open file descriptors of every process of the
stack, the model's slots and sessions (Triton's metrics) and the gateway's open streams.

The last line on stdout is one JSON object (the per-sample series only in the file);
it is written to bench/results/soak-cpu-<cores>core-<minutes>min.json with a PNG of
RSS and fds over time beside it. Exits 1 when a turn was lost, an unexpected status
came back or a check failed. The engine runs on one thread unless `--param threads=N`.

Run: PYTHONPATH=. .venv/bin/python bench/soak.py [--sessions 64 --minutes 60 --seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import structlog
from tqdm import tqdm

from sinkserve import cluster
from sinkserve.bench import percentiles
from sinkserve.client import ChatClient, sampling
from sinkserve.cluster import Replica, process_tree, running, serving
from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.engine.weights import default_model_path
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2_grpc
from sinkserve.logs import configure_logging

MAX_MINUTES = 24 * 60.0
# The engine on one thread: the gateway, tritonserver, this client (and, on a shared
# machine, other people's work) use the other core, and two OpenMP threads on two busy
# cores stall at every barrier (10x fewer turns in a trial beside another engine).
DEFAULT_PARAMETERS = {"threads": "1"}
SAMPLE_EVERY_S = 10.0
SESSIONS_PER_CALLER = 16  # the gateway allows 32 running turns and 64 streams a caller
TURN_TIMEOUT_S = 300.0  # a turn with no TurnEnd by then is lost (slots wait 30 s at most)
SETTLE_TIMEOUT_S = 30.0  # a cut turn must have left the model by then
ERROR_BACKOFF_S = 1.0
STOP_GRACE_S = 60.0  # after the deadline, running turns get this long to end
EXAMPLES_KEPT = 20
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
# /proc's command names are cut at 15 characters.
PROCESS_NAMES = {"triton_python_b": "triton_python_backend_stub"}
MAX_WORDS = 160  # a long turn stays well under the model's prompt limit (the window)
# What each session's client does next, by weight (mostly a plain turn).
ACTIONS = (
    ("turn", 0.81),
    ("cancel", 0.04),
    ("disconnect", 0.04),
    ("pipeline", 0.03),
    ("reconnect", 0.03),
    ("inspect", 0.03),
    ("replace", 0.02),
)
# User turns are made of these (some non-ASCII, so that replies may hold such text too).
WORD_LIST = (
    "the a of and to in is you that it river mountain story dragon cook bread music "
    "winter summer ocean light tell me about why how what when explain describe write "
    "short long poem letter recipe list three five friend city garden machine learning "
    "history number colour animal planet star moon train book question answer please "
    "café naïve über Straße déjà-vu 日本 你好 Ελλάδα привет 🙂 🚀 ½ €"
)
WORDS = tuple(WORD_LIST.split())
SYSTEM_PROMPTS = (
    "",
    "",
    "Be brief.",
    "You are a helpful assistant. Answer in one sentence.",
    "Réponds en français.",
    "用中文回答。",
)
LENGTH, STOP, CANCELLED = pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP, pb.FINISH_REASON_CANCELLED
# Keys every result has (among more).
RESULT_KEYS = (
    "minutes",
    "sessions",
    "turns",
    "turns_lost",
    "errors_by_code",
    "rss_mb_start",
    "rss_mb_end",
    "rss_slope_mb_per_h",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p99_ms",
    "fds_start",
    "fds_end",
    "machine",
    "command",
)


# ---- checks (pure) -------------------------------------------------------------------------


def expected_position(before: int, prompt_tokens: int, generated_tokens: int) -> int:
    """Where a session stands after a turn that fed everything it could: its prompt (the
    token owed by the previous turn and its own) and every generated token but the last,
    which is owed to the next turn (it was sampled, never fed)."""
    return before + prompt_tokens + max(generated_tokens - 1, 0)


def cache_problems(usage: pb.Usage, cache_len: int) -> list[str]:
    """The cache holds the sinks and the window's most recent tokens, the rest was evicted."""
    out = []
    if usage.cached_tokens + usage.evicted_tokens != usage.cache_position:
        out.append(
            f"cached {usage.cached_tokens} + evicted {usage.evicted_tokens} != "
            f"cache_position {usage.cache_position}"
        )
    if usage.cached_tokens != min(usage.cache_position, cache_len):
        out.append(
            f"cached_tokens {usage.cached_tokens} != min(position {usage.cache_position}, "
            f"sinks + window {cache_len})"
        )
    return out


def ended_turn_problems(
    before: int, end: pb.TurnEnd, ids: Sequence[int], max_tokens: int, cache_len: int
) -> tuple[list[str], list[str]]:
    """(position problems, usage problems) of a turn that ended by itself (STOP, LENGTH)."""
    u = end.usage
    usage: list[str] = []
    if end.finish_reason == LENGTH:
        if not u.generated_tokens == len(ids) == max_tokens:
            usage.append(
                f"LENGTH with {u.generated_tokens} generated, {len(ids)} ids streamed, "
                f"max_tokens {max_tokens}"
            )
    elif end.finish_reason == STOP:
        # Only end-of-sequence stops these turns (no stop strings): it is not streamed.
        if not 1 <= u.generated_tokens <= max_tokens or len(ids) != u.generated_tokens - 1:
            usage.append(
                f"STOP with {u.generated_tokens} generated, {len(ids)} ids streamed, "
                f"max_tokens {max_tokens}"
            )
    else:
        usage.append(f"finish_reason {end.finish_reason} for a turn that was not cancelled")
    if u.prompt_tokens < 1:
        usage.append(f"prompt_tokens {u.prompt_tokens}")
    usage += cache_problems(u, cache_len)
    want = expected_position(before, u.prompt_tokens, u.generated_tokens)
    position = []
    if u.cache_position != want:
        position.append(
            f"cache_position {u.cache_position} != before {before} + prompt {u.prompt_tokens} "
            f"+ generated {u.generated_tokens} - 1 = {want}"
        )
    return position, usage


def cancelled_turn_problems(
    before: int, end: pb.TurnEnd, ids: Sequence[int], settled: int, cache_len: int
) -> tuple[list[str], list[str]]:
    """(position problems, usage problems) of a cancelled turn; `settled` is the session's
    position from GetSession once the turn had left the model (`SessionClient.settle`
    checks that it did not go back)."""
    u = end.usage
    position: list[str] = []
    usage: list[str] = []
    if u.prompt_tokens == 0:
        return position, usage  # the gateway's own TurnEnd: the model had not started it
    if u.cache_position != settled:
        position.append(f"cancelled TurnEnd at {u.cache_position}, GetSession then {settled}")
    most = expected_position(before, u.prompt_tokens, u.generated_tokens)
    if not before <= u.cache_position <= most:
        position.append(f"cancelled TurnEnd at {u.cache_position}, not in {before}..{most}")
    if not len(ids) <= u.generated_tokens <= len(ids) + 1:
        usage.append(f"cancelled with {u.generated_tokens} generated, {len(ids)} ids streamed")
    usage += cache_problems(u, cache_len)
    return position, usage


def text_problem(text: str, ids: Sequence[int], tokenizer: Tokenizer) -> tuple[str, str] | None:
    """None when a turn's streamed text is valid UTF-8 and equal to the decoding of its
    streamed token ids; else (kind, what differs). Kinds: not_utf8, ended_inside_a_character
    (the text lacks the U+FFFD that decoding gives the bytes of a character the turn's
    last tokens began), differs."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return "not_utf8", f"text is not valid UTF-8 ({exc.reason} at {exc.start})"
    want = tokenizer.decode(ids)
    if text == want:
        return None
    if want.rstrip("\ufffd") == text:
        return "ended_inside_a_character", (
            f"decode(ids) ends with {len(want) - len(text)} U+FFFD that the text lacks "
            f"(last ids {list(ids[-3:])}, text {text[-40:]!r})"
        )
    return "differs", f"text {text[-200:]!r} != decode(ids) {want[-200:]!r} (ids {list(ids)[:64]})"


def slope_per_hour(times_s: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of `values` over `times_s`, per hour (None under 2 points)."""
    n = len(times_s)
    if n < 2:
        return None
    mean_t, mean_v = sum(times_s) / n, sum(values) / n
    var = sum((t - mean_t) ** 2 for t in times_s)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (v - mean_v) for t, v in zip(times_s, values, strict=True))
    return cov / var * 3600.0


def steady_samples(samples: Sequence[dict[str, Any]], run_s: float) -> list[dict[str, Any]]:
    """The samples the RSS slope is fitted to: after the warm-up, and while the sessions
    still ran (the stack hands memory back once they stop: that is no trend)."""
    warm = warmup_s(run_s)
    return [s for s in samples if warm <= s["t_s"] <= run_s]


def warmup_s(run_s: float) -> float:
    """Samples before this are left out of the slope: the first 10% of the run or 2
    minutes, whichever is longer (caches fill up meanwhile), but never more than half."""
    return min(max(0.1 * run_s, 120.0), 0.5 * run_s)


# ---- the tally -----------------------------------------------------------------------------


@dataclass
class Tally:
    """What every session saw, summed (one event loop: no locks)."""

    log: Any
    turns: int = 0  # TurnEnds received
    turns_completed: int = 0  # ended by STOP or LENGTH
    turns_cancelled: int = 0
    turns_cut: int = 0  # the stream or channel closed mid-turn, deliberately
    turns_lost: int = 0
    # Refused before they ran with RESOURCE_EXHAUSTED and a retry-after-ms hint (every
    # slot busy past slot_wait_s): load shed as documented, retried after the hint.
    turns_shed: int = 0
    turns_pipelined: int = 0  # written while the one before still ran
    cancel_ends_without_usage: int = 0  # the gateway's own TurnEnd (it prefilled nothing)
    tokens: int = 0
    deltas: int = 0
    sessions_opened: int = 0
    sessions_ended: int = 0
    sessions_lost: int = 0
    resumes: int = 0
    channels_closed: int = 0
    inspections: int = 0
    # Turns cut before the model had them that still ran there after the client saw
    # the session idle (see SessionClient), and the tokens they fed.
    cut_turns_ran_late: int = 0
    late_fed_tokens: int = 0
    errors_by_code: Counter[str] = field(default_factory=Counter)
    problems: Counter[str] = field(default_factory=Counter)
    text_kinds: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)  # between a turn's deltas

    def problem(self, kind: str, session: int, detail: str, **context: Any) -> None:
        """A failed check (kinds: position, text, usage, protocol, session, settle);
        `context` (the session id, its client's last actions) goes with the example."""
        self.problems[kind] += 1
        self._example(kind=kind, session=session, detail=detail, **context)
        self.log.warning("check failed", kind=kind, session=session, detail=detail, **context)

    def shed(self, session: int, turns: int, retry_after_s: float, detail: str) -> None:
        self.turns_shed += turns
        # Logged, not kept as an example: the examples are for problems, and shed turns
        # (hundreds on a loaded machine) would crowd them out.
        self.log.info(
            "turn shed", session=session, turns=turns, retry_after_s=retry_after_s, detail=detail
        )

    def failed(self, code: str, session: int, lost: int, detail: str, **context: Any) -> None:
        """A call ended with an unexpected status; `lost` turns were in flight on it."""
        self.errors_by_code[code] += 1
        self.turns_lost += lost
        self._example(kind="error", session=session, code=code, lost=lost, detail=detail, **context)
        self.log.warning(
            "call failed", code=code, session=session, lost=lost, detail=detail, **context
        )

    def _example(self, **example: Any) -> None:
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(example)


# ---- gRPC ----------------------------------------------------------------------------------


class Interrupted(Exception):
    """Ctrl-C or SIGTERM before the stack was ready: there is nothing to report."""


class CallFailed(Exception):
    """A call of the soak ended with a status it did not ask for."""

    def __init__(self, code: str, details: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details
        self.retry_after_s = retry_after_s  # the status's retry-after-ms, if any


def _failed(err: grpc.aio.AioRpcError) -> CallFailed:
    hint = dict(err.trailing_metadata() or ()).get("retry-after-ms")
    retry_after_s = int(hint) / 1000 if isinstance(hint, str) and hint.isdigit() else None
    return CallFailed(err.code().name, err.details() or "", retry_after_s)


class Stream:
    """One Chat call of one session's client."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def write(self, request: pb.ChatRequest) -> None:
        try:
            await self._call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # The server ended the call first: report its status, not the local failure.
            raise CallFailed(
                (await self._call.code()).name, await self._call.details() or ""
            ) from None

    async def read(self) -> pb.ChatResponse:
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise _failed(err) from None
        if response is grpc.aio.EOF:
            raise CallFailed("EOF", "the stream ended without an error mid-conversation")
        assert isinstance(response, pb.ChatResponse)
        return response

    async def close(self) -> None:
        """Half-close and read to the end: the call must end OK with no more responses."""
        try:
            await self._call.done_writing()
            extra = await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise _failed(err) from None
        if extra is not grpc.aio.EOF:
            raise CallFailed("EXTRA_RESPONSE", f"a response after the conversation: {extra}")

    def cancel(self) -> None:
        self._call.cancel()


@dataclass
class Connection:
    """One client channel: ChatClient's unary calls and Chat streams on the same channel."""

    target: str
    token: str
    channel: Any = None
    client: ChatClient | None = None
    stub: Any = None

    def open(self) -> None:
        # A connection of its own: channels to one target share their connections by
        # default, and closing a channel would then disconnect nothing.
        self.channel = grpc.aio.insecure_channel(self.target, options=OWN_CONNECTION)
        self.client = ChatClient(self.target, self.token, channel=self.channel)
        self.stub = chat_pb2_grpc.ChatServiceStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        self.channel = self.client = self.stub = None

    def chat(self, first: pb.ChatRequest) -> Stream:
        metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {self.token}"),)
        if first.HasField("resume"):  # a proxy would route by it; the gateway checks it
            metadata += (("x-session-id", first.resume.session_id),)
        return Stream(self.stub.Chat(metadata=metadata))

    async def unary(self, call: Callable[[ChatClient], Awaitable[Any]]) -> Any:
        assert self.client is not None
        try:
            return await call(self.client)
        except grpc.aio.AioRpcError as err:
            raise _failed(err) from None


# ---- one session's client ------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """A turn about to be written."""

    text: str
    params: pb.SamplingParams
    max_tokens: int


@dataclass
class Soak:
    """What every session's client shares."""

    target: str
    tokenizer: Tokenizer
    tally: Tally
    seed: int
    max_tokens: int
    deadline: float  # monotonic
    stop: asyncio.Event

    def over(self) -> bool:
        return self.stop.is_set() or time.monotonic() >= self.deadline


class SessionClient:
    """One session at a time, on its own channel, driven by its own seeded RNG.

    Invariants: `position` is the session's exact cache position whenever `stale` is
    false; a cut or cancelled turn makes it stale until GetSession reports the session
    idle again. `in_flight` counts the turns written and not yet ended or cut on purpose,
    which an unexpected failure loses.

    A turn cut before the model had it (its stream closed right after it was written, or
    the gateway's own TurnEnd for a cancel) may still reach the model after GetSession
    saw the session idle, and feed tokens until the gateway's cancel lands. So after such
    a cut (`cut_unsure`) the settle keeps the session's turn count (`late_base`), the
    next action is a lone turn, and that turn's position may exceed what it fed only if
    GetSession then counts exactly one turn more than this client ran since: the cut
    one (counted in `cut_turns_ran_late`); anything else is a position error."""

    def __init__(self, soak: Soak, index: int, caller: str, token: str) -> None:
        self.soak, self.index, self.caller = soak, index, caller
        self.rng = random.Random(f"{soak.seed}:{index}")
        self.conn = Connection(soak.target, token)
        self.session_id: str | None = None
        self.position = 0
        self.stale = False
        self.cache_len = 0
        self.stream: Stream | None = None
        self.in_flight = 0
        self.turn_deltas = 0  # deltas of the turn being read
        self.cut_unsure = False
        self.late_base: int | None = None
        self.trail: deque[str] = deque(maxlen=8)  # the last actions, for problem reports
        self.crash: str | None = None  # a bug of this client, which then stopped

    def problem(self, kind: str, detail: str) -> None:
        self.tally.problem(
            kind, self.index, detail, session_id=self.session_id, trail=list(self.trail)
        )

    @property
    def tally(self) -> Tally:
        return self.soak.tally

    async def run(self) -> None:
        """Act until the soak is over, then close the stream and the channel."""
        self.conn.open()
        names, weights = zip(*ACTIONS, strict=True)
        actions: dict[str, Callable[[], Awaitable[object]]] = {
            "turn": lambda: self.converse(1),
            "pipeline": lambda: self.converse(2),
            "cancel": lambda: self.converse(1, cancel_after=self.rng.randint(0, 3)),
            "disconnect": self.disconnect,
            "reconnect": self.close_stream,
            "inspect": self.inspect,
            "replace": self.replace,
        }
        try:
            while not self.soak.over():
                try:
                    if self.stream is None:
                        await asyncio.wait_for(self.open_stream(), TURN_TIMEOUT_S)
                    name = self.rng.choices(names, weights)[0]
                    if self.late_base is not None:
                        name = "turn"  # a lone turn after a cut (see the class docstring)
                    self.trail.append(name)
                    await asyncio.wait_for(actions[name](), 2 * TURN_TIMEOUT_S)
                except (CallFailed, asyncio.TimeoutError) as exc:
                    await self.recover(exc)
            if self.stream is not None:
                try:
                    await asyncio.wait_for(self.close_stream(), 30)
                except (CallFailed, asyncio.TimeoutError) as exc:
                    code = exc.code if isinstance(exc, CallFailed) else "CLIENT_TIMEOUT"
                    self.tally.failed(code, self.index, 0, "closing the stream at the end")
        except Exception as exc:  # a bug here: report it, and let the other sessions go on
            self.crash = repr(exc)
            self.tally.log.exception("session client crashed", session=self.index)
        finally:
            if self.stream is not None:
                self.stream.cancel()
            await self.conn.close()

    async def recover(self, exc: CallFailed | asyncio.TimeoutError) -> None:
        code, details = (
            (exc.code, exc.details) if isinstance(exc, CallFailed) else ("CLIENT_TIMEOUT", "")
        )
        trail = list(self.trail)
        retry_after_s = exc.retry_after_s if isinstance(exc, CallFailed) else None
        shed = code == "RESOURCE_EXHAUSTED" and retry_after_s is not None and not self.turn_deltas
        if shed:
            self.tally.shed(self.index, self.in_flight, retry_after_s or 0.0, details)
        else:
            self.tally.failed(
                code, self.index, self.in_flight, details, session_id=self.session_id, trail=trail
            )
        self.cut_unsure |= self.in_flight > 0
        self.in_flight = 0
        self.drop_stream()
        if code == "NOT_FOUND" and self.session_id is not None:
            self.tally.sessions_lost += 1
            self.problem("session", f"session {self.session_id} was lost")
            self.session_id, self.cut_unsure, self.late_base = None, False, None
        await asyncio.sleep(retry_after_s if shed and retry_after_s else ERROR_BACKOFF_S)

    def drop_stream(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None
            self.stale = self.session_id is not None

    # -- streams ---------------------------------------------------------------------------

    async def open_stream(self) -> None:
        """A stream on a new session, or resuming this client's session (which must
        report the position this client knows)."""
        defaults = self.random_sampling() if self.rng.random() < 0.3 else None
        if self.session_id is None:
            system = self.rng.choice(SYSTEM_PROMPTS)
            first = pb.ChatRequest(open=pb.OpenSession(system_prompt=system, sampling=defaults))
        else:
            if self.stale:
                await self.settle()
            resume = pb.ResumeSession(session_id=self.session_id, sampling=defaults)
            first = pb.ChatRequest(resume=resume)
        stream = self.conn.chat(first)
        self.stream = stream
        await stream.write(first)
        response = await stream.read()
        if response.WhichOneof("event") != "session_opened":
            self.problem("protocol", f"first response {response}")
            raise CallFailed("PROTOCOL", "no SessionOpened first")
        opened = response.session_opened
        self.cache_len = opened.sinks + opened.window
        if self.session_id is None:
            if opened.resumed or opened.cache_position != 0 or not opened.session_id:
                self.problem("protocol", f"a new session opened as {opened}")
            self.session_id, self.position, self.stale = opened.session_id, 0, False
            self.tally.sessions_opened += 1
            return
        self.tally.resumes += 1
        if not opened.resumed or opened.session_id != self.session_id:
            self.problem("protocol", f"resumed {self.session_id} as {opened}")
        # (A turn cut unawares may have run since the settle: the next TurnEnd tells.)
        late = self.late_base is not None and opened.cache_position > self.position
        if opened.cache_position != self.position and not late:
            self.problem(
                "position",
                f"resumed at {opened.cache_position}, the session was at {self.position}",
            )

    async def close_stream(self) -> None:
        """Close the stream cleanly between turns (the next action resumes the session)."""
        stream, self.stream = self.stream, None
        if stream is not None:
            await stream.close()

    async def settle(self) -> pb.Session:
        """Wait until the session has no turn running on the model and take its position."""
        assert self.session_id is not None
        sid = self.session_id
        started = time.monotonic()
        while True:
            session: pb.Session = await self.conn.unary(lambda c: c.get_session(sid))
            if not session.turn_running:
                break
            if time.monotonic() - started > SETTLE_TIMEOUT_S:
                self.problem("settle", f"a turn still runs {SETTLE_TIMEOUT_S:g}s after a cut")
                break
            await asyncio.sleep(0.1)
        if session.cache_position < self.position:
            self.problem(
                "position",
                f"GetSession at {session.cache_position}, the session was at {self.position}",
            )
        self.position, self.stale = session.cache_position, False
        if self.cut_unsure:
            self.late_base, self.cut_unsure = session.turns, False
        return session

    # -- actions ---------------------------------------------------------------------------

    async def converse(
        self, count: int, *, cancel_after: int | None = None, drop_after: int | None = None
    ) -> bool:
        """Write `count` turns back to back and check each; False when a turn was cut on
        purpose after `drop_after` deltas (the stream is then gone)."""
        stream = self.stream
        assert stream is not None
        turns = [self.plan() for _ in range(count)]
        started = time.perf_counter()
        for turn in turns:
            request = pb.UserTurn(text=turn.text, sampling=turn.params)
            await stream.write(pb.ChatRequest(turn=request))
            self.in_flight += 1
        self.tally.turns_pipelined += count - 1
        for turn in turns:
            ended = await self.read_turn(stream, turn, started, cancel_after, drop_after)
            if not ended:
                return False
            started = time.perf_counter()  # the next queued turn starts now
        return True

    async def read_turn(
        self,
        stream: Stream,
        turn: Planned,
        started: float,
        cancel_after: int | None,
        drop_after: int | None,
    ) -> bool:
        """Read one turn to its TurnEnd and check it (False: cut after `drop_after`)."""
        ids: list[int] = []
        texts: list[str] = []
        gaps: list[float] = []
        first: float | None = None
        last = started
        deltas = 0
        bad_index = None
        self.turn_deltas = 0
        while True:
            if drop_after is not None and deltas >= drop_after:
                self.cut(ids, texts, first, started, gaps)
                return False
            if cancel_after is not None and deltas >= cancel_after:
                await stream.write(pb.ChatRequest(cancel=pb.CancelTurn()))
                cancel_after = None
            response = await stream.read()
            kind = response.WhichOneof("event")
            if kind == "delta":
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                delta = response.delta
                if delta.index != len(ids) and bad_index is None:
                    bad_index = (delta.index, len(ids))
                ids.extend(delta.token_ids)
                texts.append(delta.text)
                deltas += 1
                self.turn_deltas = deltas
            elif kind == "turn_end":
                break
            else:
                self.problem("protocol", f"{kind} in the middle of a turn")
        self.in_flight -= 1
        self.record(first, started, gaps, deltas, len(ids))
        if bad_index is not None:
            got, want = bad_index
            self.problem("protocol", f"delta index {got}, expected {want}")
        await self.check(response.turn_end, turn, ids, "".join(texts))
        return True

    def cut(
        self,
        ids: list[int],
        texts: list[str],
        first: float | None,
        started: float,
        gaps: list[float],
    ) -> None:
        """Close the stream mid-turn, deliberately: what the turn fed stays; the client
        learns the position from GetSession before the next turn."""
        self.in_flight -= 1
        self.cut_unsure = True
        self.tally.turns_cut += 1
        self.record(first, started, gaps, len(texts), len(ids))
        self.drop_stream()

    def record(
        self, first: float | None, started: float, gaps: list[float], deltas: int, tokens: int
    ) -> None:
        if first is not None:
            self.tally.ttft_s.append(first - started)
        self.tally.gaps_s.extend(gaps)
        self.tally.deltas += deltas
        self.tally.tokens += tokens

    async def check(self, end: pb.TurnEnd, turn: Planned, ids: list[int], text: str) -> None:
        tally = self.tally
        tally.turns += 1
        before = self.position
        if end.finish_reason == CANCELLED:
            tally.turns_cancelled += 1
            if end.usage.prompt_tokens == 0:
                tally.cancel_ends_without_usage += 1
                self.cut_unsure = True  # the gateway's own end: the model may get it yet
            self.stale = True
            settled = await self.settle()
            position, usage = cancelled_turn_problems(
                before, end, ids, settled.cache_position, self.cache_len
            )
        else:
            tally.turns_completed += 1
            before += await self.fed_late(end, before)
            position, usage = ended_turn_problems(before, end, ids, turn.max_tokens, self.cache_len)
            self.position = end.usage.cache_position
        for detail in position:
            self.problem("position", detail)
        for detail in usage:
            self.problem("usage", detail)
        if (why := text_problem(text, ids, self.soak.tokenizer)) is not None:
            tally.text_kinds[why[0]] += 1
            self.problem("text", f"{why[0]}: {why[1]}")

    async def fed_late(self, end: pb.TurnEnd, before: int) -> int:
        """For the lone turn after a cut: the tokens a cut turn fed after the settle (0
        when it did not run late, or when GetSession does not count it as the one turn
        more, which leaves the position check to fail)."""
        base, self.late_base = self.late_base, None
        u = end.usage
        late = u.cache_position - expected_position(before, u.prompt_tokens, u.generated_tokens)
        if base is None or late <= 0:
            return 0
        assert self.session_id is not None
        sid = self.session_id
        session: pb.Session = await self.conn.unary(lambda c: c.get_session(sid))
        if session.turns != base + 2 or session.turn_running:
            return 0
        self.tally.cut_turns_ran_late += 1
        self.tally.late_fed_tokens += late
        return late

    async def disconnect(self) -> None:
        """A turn cut after a few deltas by closing its stream, or the whole channel."""
        if await self.converse(1, drop_after=self.rng.randint(0, 3)):
            return  # it ended before the cut
        if self.rng.random() < 0.5:
            await self.conn.close()
            self.conn.open()
            self.tally.channels_closed += 1

    async def inspect(self) -> None:
        """GetSession between turns: it must tell what this client knows."""
        assert self.session_id is not None
        sid = self.session_id
        s: pb.Session = await self.conn.unary(lambda c: c.get_session(sid))
        self.tally.inspections += 1
        if s.cache_position != self.position:
            self.problem("position", f"GetSession at {s.cache_position}, not {self.position}")
        if s.turn_running or s.owner != self.caller:
            self.problem("session", f"GetSession between turns: {s}")

    async def replace(self) -> None:
        """End the session (EndSession on its stream, or DeleteSession) and check it is
        gone; the next action opens a new one."""
        assert self.session_id is not None and self.stream is not None
        sid = self.session_id
        if self.rng.random() < 0.5:
            stream, self.stream = self.stream, None
            await stream.write(pb.ChatRequest(end=pb.EndSession()))
            await stream.close()
        else:
            await self.close_stream()
            await self.conn.unary(lambda c: c.delete_session(sid))
        self.session_id, self.stale, self.cut_unsure, self.late_base = None, False, False, None
        self.tally.sessions_ended += 1
        try:
            await self.conn.unary(lambda c: c.get_session(sid))
        except CallFailed as err:
            if err.code != "NOT_FOUND":
                raise
        else:
            self.problem("session", f"ended session {sid} still found")

    # -- the workload ----------------------------------------------------------------------

    def plan(self) -> Planned:
        rng = self.rng
        words = min(MAX_WORDS, 1 + int(rng.expovariate(1 / 12)))
        text = " ".join(rng.choice(WORDS) for _ in range(words)) + rng.choice("?.!")
        max_tokens = rng.randint(1, self.soak.max_tokens)
        params = self.random_sampling()
        params.max_tokens = max_tokens
        return Planned(text, params, max_tokens)

    def random_sampling(self) -> pb.SamplingParams:
        """Random sampling settings, each field set or left to the defaults."""
        rng = self.rng

        def maybe(value: Callable[[], float | int]) -> float | int | None:
            return value() if rng.random() < 0.5 else None

        temperature = 0.0 if rng.random() < 0.25 else rng.uniform(0.0, 1.2)
        return sampling(
            temperature=temperature if rng.random() < 0.8 else None,
            top_p=maybe(lambda: rng.uniform(0.3, 1.0)),
            top_k=maybe(lambda: rng.randint(0, 100)),
            repetition_penalty=maybe(lambda: rng.uniform(1.0, 1.3)),
            seed=maybe(lambda: rng.randrange(2**64)),
        )


# ---- the stack and its samples -------------------------------------------------------------


def model_parameters(repository: Path) -> dict[str, str]:
    """The engine parameters of the repository's config.pbtxt."""
    text = (repository / "sinkserve" / "config.pbtxt").read_text()
    pattern = r'\{ key: "(\w+)", value: \{ string_value: "([^"]*)" \} \}'
    return dict(re.findall(pattern, text))


@dataclass
class Stack:
    """`sinkserve serve` on free loopback ports in `root`, with one token per caller and
    a SQLite session store there."""

    root: Path
    repository: Path
    callers: dict[str, str]  # caller -> token
    replica: Replica | None = None

    def start(self) -> None:
        tokens = self.root / "tokens"
        tokens.write_text("".join(f"{c}:{t}\n" for c, t in self.callers.items()))
        tokens.chmod(0o600)
        store = f"sqlite://{self.root / 'sessions.sqlite3'}"
        self.replica = Replica("soak", self.root, store, self.repository, tokens)
        self.replica.start()

    @property
    def pid(self) -> int:
        assert self.replica is not None and self.replica.child is not None
        assert self.replica.child.proc is not None
        return self.replica.child.proc.pid

    async def wait_ready(self, timeout_s: float) -> None:
        assert self.replica is not None
        started = time.monotonic()
        while not await serving(self.replica.target):
            if not running(self.pid):
                raise RuntimeError(f"sinkserve serve exited; see {self.root / 'soak.log'}")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"not serving after {timeout_s:g}s; see {self.root}")
            await asyncio.sleep(0.25)

    def stop(self) -> list[str]:
        """Stop everything; returns the processes of the stack still alive after it."""
        if self.replica is None or self.replica.child is None or self.replica.child.proc is None:
            return []
        tree = process_tree(self.pid)
        self.replica.stop()
        return [f"{pid} {name}" for pid, name in tree.items() if running(pid)]


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def _metrics(url: str) -> dict[str, float]:
    """name -> value of a Prometheus text endpoint (the first series of each name)."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for m in re.finditer(r"^([a-z_]+)(?:\{[^}]*\})? (\S+)$", text, flags=re.M):
        out.setdefault(m.group(1), float(m.group(2)))
    return out


MODEL_GAUGES = (
    "sinkserve_slots_free",
    "sinkserve_sessions_active",
    "sinkserve_sessions_in_slots",
    "sinkserve_sessions_swapped",
    "sinkserve_turns_running",
    "sinkserve_turns_waiting",
)


def take_sample(stack: Stack, t_s: float) -> dict[str, Any]:
    """RSS and fds of every process of the stack (by command name), the model's slots and
    sessions, the gateway's open streams, and this client process's own RSS and fds."""
    assert stack.replica is not None
    rss: dict[str, float] = {}
    fds: Counter[str] = Counter()
    for pid, comm in process_tree(stack.pid).items():
        name = PROCESS_NAMES.get(comm, comm)
        try:
            rss[name] = rss.get(name, 0.0) + _status_kb(pid, "VmRSS:") / 1024
            fds[name] += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:  # it just exited
            continue
    model = _metrics(f"http://127.0.0.1:{stack.replica.triton_metrics}/metrics")
    gateway = _metrics(f"http://127.0.0.1:{stack.replica.metrics_port}/metrics")
    sample: dict[str, Any] = {
        "t_s": round(t_s, 1),
        "rss_mb": round(sum(rss.values()), 1),
        "fds": sum(fds.values()),
        "processes": len(rss),
        "rss_mb_by_process": {k: round(v, 1) for k, v in sorted(rss.items())},
        "fds_by_process": dict(sorted(fds.items())),
        "open_streams": gateway.get("sinkserve_gateway_open_streams"),
        "client_rss_mb": round(_status_kb(os.getpid(), "VmRSS:") / 1024, 1),
        "client_fds": len(os.listdir("/proc/self/fd")),
    }
    for name in MODEL_GAUGES:
        sample[name.removeprefix("sinkserve_")] = model.get(name)
    return sample


def columns(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The samples as one list per field (per process for the nested ones)."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        if isinstance(samples[0][key], dict):
            names = sorted({n for s in samples for n in s[key]})
            out[key] = {n: [s[key].get(n) for s in samples] for n in names}
        else:
            out[key] = [s[key] for s in samples]
    return out


def plot(series: dict[str, Any], path: Path, title: str, run_s: float) -> None:
    """RSS (top) and open descriptors (bottom) of the stack and each of its processes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [t / 60 for t in series["t_s"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot(minutes, series["rss_mb"], label="stack total", linewidth=2)
    for name, values in series["rss_mb_by_process"].items():
        top.plot(minutes, values, label=name, alpha=0.8)
    top.set_ylabel("RSS (MiB)")
    top.set_ylim(bottom=0)
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    bottom.plot(minutes, series["fds"], label="stack total", linewidth=2)
    for name, values in series["fds_by_process"].items():
        bottom.plot(minutes, values, label=name, alpha=0.8)
    bottom.set_ylabel("open file descriptors")
    bottom.set_xlabel("minutes")
    bottom.set_ylim(bottom=0)
    bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.axvline(run_s / 60, color="grey", linestyle="--", linewidth=1)  # sessions stop
    top.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


# ---- the run -------------------------------------------------------------------------------


async def soak(stack: Stack, args: argparse.Namespace, tokenizer: Tokenizer) -> dict[str, Any]:
    """Wait for the stack, run the sessions until the deadline (or a first Ctrl-C /
    SIGTERM; a second one cancels this), and gather the figures."""
    log = structlog.get_logger("sinkserve.soak")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    this = asyncio.current_task()
    assert this is not None

    def on_signal() -> None:
        if stop.is_set():
            this.cancel()
        stop.set()
        log.info("stopping: the sessions end their turns (again: at once)")

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    try:
        return await _soak(stack, args, tokenizer, stop, log)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _soak(
    stack: Stack, args: argparse.Namespace, tokenizer: Tokenizer, stop: asyncio.Event, log: Any
) -> dict[str, Any]:
    assert stack.replica is not None
    launched = time.monotonic()
    ready = asyncio.create_task(stack.wait_ready(args.ready_timeout_s))
    interrupted = asyncio.create_task(stop.wait())
    await asyncio.wait((ready, interrupted), return_when=asyncio.FIRST_COMPLETED)
    interrupted.cancel()
    if not ready.done():
        ready.cancel()
        raise Interrupted
    ready.result()
    ready_s = time.monotonic() - launched
    log.info("stack serving", seconds=round(ready_s, 1), target=stack.replica.target)
    warmup_turn_s = await warm_up(stack)

    run_s = args.minutes * 60
    started = time.monotonic()
    samples = [await asyncio.to_thread(take_sample, stack, 0.0)]
    tally = Tally(log)
    shared = Soak(
        stack.replica.target, tokenizer, tally, args.seed, args.max_tokens, started + run_s, stop
    )
    callers = list(stack.callers.items())
    clients = [
        SessionClient(shared, i, *callers[i // SESSIONS_PER_CALLER]) for i in range(args.sessions)
    ]
    tasks = [asyncio.create_task(c.run()) for c in clients]

    async def sampler() -> None:
        k = 1
        while True:
            await asyncio.sleep(max(0.0, started + k * SAMPLE_EVERY_S - time.monotonic()))
            samples.append(await asyncio.to_thread(take_sample, stack, time.monotonic() - started))
            k += 1

    async def progress() -> None:
        bar_format = "{l_bar}{bar}| {n:.1f}/{total:g} min [{elapsed}<{remaining}{postfix}]"
        with tqdm(total=args.minutes, unit="min", bar_format=bar_format, disable=None) as bar:
            while True:
                elapsed = min(args.minutes, (time.monotonic() - started) / 60)
                bar.update(elapsed - bar.n)
                problems = sum(tally.problems.values())
                bar.set_postfix(turns=tally.turns, lost=tally.turns_lost, problems=problems)
                await asyncio.sleep(1.0)

    watchers = [asyncio.create_task(sampler()), asyncio.create_task(progress())]
    try:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), run_s)
        # The clients start nothing new now; the turns still running get a grace period.
        await asyncio.wait(tasks, timeout=STOP_GRACE_S)
    finally:
        for task in (*tasks, *watchers):
            task.cancel()
        await asyncio.gather(*tasks, *watchers, return_exceptions=True)
    for client in clients:  # cancelled in a turn that outlasted the grace period
        if client.in_flight:
            tally.failed("NO_TURN_END_BY_STOP", client.index, client.in_flight, "")
    ended_s = time.monotonic() - started
    leaks = await sessions_left(stack, clients)
    await asyncio.sleep(2.0)  # the servers close the connections of the channels just closed
    samples.append(await asyncio.to_thread(take_sample, stack, time.monotonic() - started))
    result = summarize(args, tally, clients, samples, ended_s, ready_s, stop.is_set(), leaks)
    result["warmup_turn_s"] = round(warmup_turn_s, 1)
    return result


async def warm_up(stack: Stack) -> float:
    """One short turn before the clock starts (the model compiles its decode step on the
    first), on a session then deleted; its seconds."""
    assert stack.replica is not None
    started = time.monotonic()
    token = next(iter(stack.callers.values()))
    async with ChatClient(stack.replica.target, token) as client:
        async with client.conversation(defaults=sampling(max_tokens=4)) as chat:
            await chat.turn("Hello!")
        await client.delete_session(chat.session_id)
    return time.monotonic() - started


async def sessions_left(stack: Stack, clients: Sequence[SessionClient]) -> dict[str, int | None]:
    """Sessions each caller still has on the model, against those its clients hold: one
    listed that no client holds was leaked (ended but kept, or opened unawares)."""
    assert stack.replica is not None
    held = {c.session_id for c in clients if c.session_id is not None}
    listed: set[str] = set()
    try:
        for token in stack.callers.values():
            async with ChatClient(stack.replica.target, token) as client:
                listed |= {s.session_id for s in await client.list_sessions()}
    except grpc.aio.AioRpcError as err:
        clients[0].tally.failed(err.code().name, -1, 0, "ListSessions after the run")
        return {"sessions_leaked": None, "sessions_missing": None}
    return {"sessions_leaked": len(listed - held), "sessions_missing": len(held - listed)}


def summarize(
    args: argparse.Namespace,
    tally: Tally,
    clients: Sequence[SessionClient],
    samples: list[dict[str, Any]],
    run_s: float,
    ready_s: float,
    interrupted: bool,
    leaks: dict[str, int | None],
) -> dict[str, Any]:
    planned = args.minutes * 60
    steady = steady_samples(samples, planned)
    warm = warmup_s(planned)
    slope = slope_per_hour([s["t_s"] for s in steady], [s["rss_mb"] for s in steady])
    ttft, gaps = percentiles(tally.ttft_s), percentiles(tally.gaps_s)
    # (The model's gauges read 0 until its first metrics update: sample 0 is left out.)
    slots = [s["slots_free"] for s in samples[1:] if s["slots_free"] is not None]
    crashes = [f"session {c.index}: {c.crash}" for c in clients if c.crash]
    return {
        "what": "soak: sessions converse through the gateway of a real `sinkserve serve` "
        "(Triton, the default model) with cancels, cuts, resumes and replaced sessions",
        "minutes": args.minutes,
        "sessions": args.sessions,
        "turns": tally.turns,
        "turns_lost": tally.turns_lost,
        "turns_shed": tally.turns_shed,
        "errors_by_code": dict(sorted(tally.errors_by_code.items())),
        "rss_mb_start": samples[0]["rss_mb"],
        "rss_mb_end": samples[-1]["rss_mb"],
        "rss_slope_mb_per_h": None if slope is None else round(slope, 1),
        "ttft_p50_ms": ttft.get("p50_ms"),
        "ttft_p99_ms": ttft.get("p99_ms"),
        "itl_p99_ms": gaps.get("p99_ms"),
        "fds_start": samples[0]["fds"],
        "fds_end": samples[-1]["fds"],
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": args.seed,
        "engine": model_parameters(args.repository),
        "callers": len({c.caller for c in clients}),
        "max_tokens": f"1..{args.max_tokens}",
        "actions": dict(ACTIONS),
        "run_s": round(run_s, 1),
        "stack_ready_s": round(ready_s, 1),
        "interrupted": interrupted,
        "turns_completed": tally.turns_completed,
        "turns_cancelled": tally.turns_cancelled,
        "turns_cut": tally.turns_cut,
        "turns_pipelined": tally.turns_pipelined,
        "cancel_ends_without_usage": tally.cancel_ends_without_usage,
        "cut_turns_ran_late": tally.cut_turns_ran_late,
        "late_fed_tokens": tally.late_fed_tokens,
        "position_errors": tally.problems["position"],
        "text_errors": tally.problems["text"],
        "text_errors_by_kind": dict(sorted(tally.text_kinds.items())),
        "problems": dict(sorted(tally.problems.items())),
        "problem_examples": tally.examples,
        "client_crashes": crashes,
        "sessions_opened": tally.sessions_opened,
        "sessions_ended": tally.sessions_ended,
        "sessions_lost": tally.sessions_lost,
        **leaks,
        "resumes": tally.resumes,
        "channels_closed": tally.channels_closed,
        "inspections": tally.inspections,
        "tokens": tally.tokens,
        "tokens_per_s": round(tally.tokens / run_s, 1) if run_s else None,
        "turns_per_min": round(tally.turns / run_s * 60, 1) if run_s else None,
        "tokens_per_delta": round(tally.tokens / tally.deltas, 2) if tally.deltas else None,
        "ttft_p90_ms": ttft.get("p90_ms"),
        "itl_p50_ms": gaps.get("p50_ms"),
        "itl_is": "client-side gap between consecutive deltas of a turn (a delta may hold "
        "several tokens when the model paces its responses)",
        "rss_slope_over": f"{len(steady)} samples from t={warm:.0f}s to {planned:.0f}s (the "
        "warm-up and the samples after the sessions stopped left out)",
        "rss_mb_end_of_run": steady[-1]["rss_mb"] if steady else None,
        "rss_mb_by_process_start": samples[0]["rss_mb_by_process"],
        "rss_mb_by_process_end": samples[-1]["rss_mb_by_process"],
        "rss_mb_max": max(s["rss_mb"] for s in samples),
        "fds_max": max(s["fds"] for s in samples),
        "slots_free_min": min(slots) if slots else None,
        "client_rss_mb_start": samples[0]["client_rss_mb"],
        "client_rss_mb_end": samples[-1]["client_rss_mb"],
        "client_fds_start": samples[0]["client_fds"],
        "client_fds_end": samples[-1]["client_fds"],
        "samples": columns(samples),
    }


def failed(result: dict[str, Any]) -> bool:
    """Whether the soak found a problem (the exit status says so too)."""
    return bool(
        result["turns_lost"]
        or result["errors_by_code"]
        or result["problems"]
        or result["client_crashes"]
        or result["sessions_leaked"]
        or result["sessions_missing"]
        or result["stack_left_running"]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=64, help="concurrent sessions (1..1024)")
    p.add_argument(
        "--minutes", type=float, default=60.0, help=f"run time (at most {MAX_MINUTES:g})"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds every session's RNG")
    p.add_argument("--max-tokens", type=int, default=48, help="max_tokens of a turn: 1..this")
    p.add_argument("--out", type=Path, help="result JSON (default: bench/results/soak-...json)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config.pbtxt parameter of the model (repeatable; default threads=1: on a "
        "few shared cores two OpenMP threads stall whenever anything else holds a core)",
    )
    p.add_argument("--ready-timeout-s", type=float, default=600.0)
    p.add_argument("--keep-workdir", action="store_true", help="keep logs and the store")
    args = p.parse_args(argv)
    if not 1 <= args.sessions <= 1024:
        p.error("--sessions must be in 1..1024")
    if not 0 < args.minutes <= MAX_MINUTES:
        p.error(f"--minutes must be in (0, {MAX_MINUTES:g}]")
    if not 1 <= args.max_tokens <= 256:
        p.error("--max-tokens must be in 1..256")
    if any("=" not in kv for kv in args.param):
        p.error("--param takes KEY=VALUE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    log = structlog.get_logger("sinkserve.soak")
    root = Path(tempfile.mkdtemp(prefix="sinkserve-soak-"))
    # A copy of the default model repository (the default model and settings) with
    # DEFAULT_PARAMETERS and the --param overrides.
    params = DEFAULT_PARAMETERS | dict(kv.split("=", 1) for kv in args.param)
    args.repository = cluster.model_repository(root, **params)
    model = model_parameters(args.repository).get("model") or str(default_model_path())
    tokenizer = Tokenizer.load(model)
    callers = math.ceil(args.sessions / SESSIONS_PER_CALLER)
    stack = Stack(
        root, args.repository, {f"soak-{i}": secrets.token_urlsafe(24) for i in range(callers)}
    )

    # Until the event loop takes signals over, SIGTERM unwinds like Ctrl-C, so the stack
    # (in a process group of its own, which no terminal signal reaches) is always stopped.
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    started = time.monotonic()
    try:
        stack.start()
        log.info("starting sinkserve serve", workdir=str(root), sessions=args.sessions)
        result = asyncio.run(soak(stack, args, tokenizer))
    except (KeyboardInterrupt, asyncio.CancelledError, Interrupted):
        log.warning("interrupted before any result", workdir=str(root))
        return 130
    finally:
        # Bounded (SIGTERM, then SIGKILL of its process group after 60 s), and not to be
        # cut short by another signal: that would leave the stack running.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        left = stack.stop()
    result["stack_left_running"] = left
    result["wall_s"] = round(time.monotonic() - started, 1)
    out = args.out or (
        Path(__file__).parent
        / "results"
        / f"soak-cpu-{os.cpu_count()}core-{args.minutes:g}min.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    try:
        title = f"soak: {args.sessions} sessions, {args.minutes:g} min (dashed: they stop)"
        plot(result["samples"], png, title, args.minutes * 60)
        result["plot"] = png.name
    except ImportError:
        result["plot"] = None
        result["plot_skipped"] = "matplotlib is not installed in this venv"
    bad = failed(result)
    result["workdir"] = str(root) if bad or args.keep_workdir else None
    if result["workdir"] is None:
        shutil.rmtree(root, ignore_errors=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
