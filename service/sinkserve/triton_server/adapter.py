"""Triton tensors <-> engine calls, without Triton: parsing inputs, turning events into
responses, watching for cancelled requests.

`model.py` supplies the Triton side: a getter for input arrays and a `send(outputs,
error, final)` function; everything here works on numpy arrays and plain callables.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import structlog
from jinja2 import TemplateError

from sinkserve.engine.types import (
    Event,
    FinishReason,
    InvalidRequest,
    TokenEvent,
    TurnEnd,
    Usage,
)

if TYPE_CHECKING:
    from sinkserve.engine.engine import Engine
    from sinkserve.triton_server.turn_ids import TurnIds

log = structlog.get_logger(__name__)
T = TypeVar("T")
Array = npt.NDArray[np.generic]  # a tensor of any dtype (BYTES tensors are object arrays)
Outputs = dict[str, Array]
GetInput = Callable[[str], "Array | None"]

USAGE_OUTPUTS = (
    "prompt_tokens",
    "generated_tokens",
    "cache_position",
    "cached_tokens",
    "evicted_tokens",
)
# A request runs a turn, or one of the session calls answered by a single `session_info`
# response (JSON). Sessions are opened, ended, got and listed only by these calls.
ACTIONS = ("turn", "open", "get", "end", "cancel", "list", "ping")
_NEEDS_SESSION = ("turn", "get", "end", "cancel")
MAX_TURN_ID = 128
# Optional inputs -> the engine's SamplingParams field they set.
_SAMPLING_INPUTS: tuple[tuple[str, str, type[int | float]], ...] = (
    ("max_tokens", "max_new_tokens", int),
    ("temperature", "temperature", float),
    ("top_k", "top_k", int),
    ("top_p", "top_p", float),
    ("repetition_penalty", "repetition_penalty", float),
    ("random_seed", "seed", int),
)


class Send(Protocol):
    """Deliver one response: outputs, or an in-band error message; `final` sets FINAL."""

    def __call__(self, outputs: Outputs | None, error: str | None, final: bool) -> None: ...


@dataclass(frozen=True)
class ModelRequest:
    """One Triton request, read and checked for shape; the engine validates the values.

    `owner` is the caller the gateway authenticated ("" when not given): the engine
    checks that a session belongs to it. `sampling` holds only the inputs that were set:
    for `open` the session's defaults, for `turn` overrides of them."""

    action: str
    session_id: str
    owner: str
    text: str
    system_prompt: str | None
    raw: bool
    stream: bool
    sampling: dict[str, Any]
    # A whole conversation ((role, content) pairs) the chat template renders as the
    # turn's prompt, instead of `text`: a new session's history sent in one request.
    messages: tuple[tuple[str, str], ...] | None = None
    # The caller's id of a turn (with `turn`), or of the turn to cancel (with `cancel`):
    # see `TurnIds`. "" = none (a cancel then applies to the session's running turn).
    turn_id: str = ""


def parse_request(get: GetInput) -> ModelRequest:
    """Read the inputs of the tensor interface; raise InvalidRequest naming the
    offending input."""
    action = _string(get, "request_type") or "turn"
    if action not in ACTIONS:
        raise InvalidRequest(f"request_type={action!r} must be one of {', '.join(ACTIONS)}")
    session_id = _string(get, "session_id") or ""
    if action in _NEEDS_SESSION and not session_id:
        raise InvalidRequest(f"session_id is required for {action} and must be non-empty")
    text = _string(get, "text_input") or ""
    messages = _messages(get) if get("messages") is not None else None
    if messages is not None and (action != "turn" or text):
        raise InvalidRequest("messages is only accepted with a turn, instead of text_input")
    if action == "turn" and not text and messages is None:
        raise InvalidRequest("text_input is required for a turn and must be non-empty")
    system = _string(get, "system_prompt")
    if system and action != "open":
        raise InvalidRequest("system_prompt is only accepted with request_type open")
    turn_id = _string(get, "turn_id") or ""
    if turn_id and action not in ("turn", "cancel"):
        raise InvalidRequest("turn_id is only accepted with request_type turn or cancel")
    if len(turn_id) > MAX_TURN_ID:
        raise InvalidRequest(f"turn_id is {len(turn_id)} characters; the limit is {MAX_TURN_ID}")
    sampling: dict[str, Any] = {}
    for name, key, kind in _SAMPLING_INPUTS:
        if get(name) is not None:
            sampling[key] = _scalar(get, name, kind, kind())
    if get("stop_words") is not None:
        sampling["stop"] = tuple(_strings(get, "stop_words"))
    return ModelRequest(
        action=action,
        session_id=session_id,
        owner=_string(get, "owner") or "",
        text=text,
        system_prompt=system or None,
        raw=_scalar(get, "raw_prompt", bool, False),
        stream=_scalar(get, "stream", bool, True),
        sampling=sampling,
        messages=messages,
        turn_id=turn_id,
    )


def turn_prompt(engine: Engine, req: ModelRequest) -> str | list[int]:
    """What a turn prefills: its text (the engine applies the chat template), or its
    `messages` rendered whole by the template (InvalidRequest when the template refuses
    them). Meant for a session's first turn: nothing of the previous reply is closed."""
    if req.messages is None:
        return req.text
    try:
        return engine.chat.conversation(req.messages)
    except (ValueError, TemplateError) as exc:
        raise InvalidRequest(f"messages: {exc}") from None


def _messages(get: GetInput) -> tuple[tuple[str, str], ...]:
    """The `messages` input: a JSON array of {"role": str, "content": str} objects."""
    raw = _string(get, "messages") or ""
    try:
        items = json.loads(raw)
    except ValueError:
        raise InvalidRequest("messages is not JSON") from None
    if not isinstance(items, list) or not items:
        raise InvalidRequest("messages must be a non-empty JSON array")
    out = []
    for n, item in enumerate(items):
        role = item.get("role") if isinstance(item, dict) else None
        content = item.get("content") if isinstance(item, dict) else None
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise InvalidRequest(f'messages[{n}] must be {{"role": str, "content": str}}')
        out.append((role, content))
    return tuple(out)


def run_control(engine: Engine, req: ModelRequest, turns: TurnIds) -> Outputs:
    """Answer a request that is not a turn: the outputs of its one FINAL response."""
    sid, owner = req.session_id, req.owner
    answer: Any
    if req.action == "open":
        sid = engine.open_session(
            sid or None, req.system_prompt, owner=owner, sampling=req.sampling
        )
        answer = asdict(engine.get_session(sid))
    elif req.action == "get":
        answer = asdict(engine.get_session(sid, owner))
    elif req.action == "end":
        answer = asdict(engine.get_session(sid, owner))
        engine.end_session(sid, owner)
    elif req.action == "cancel" and req.turn_id:
        engine.get_session(sid, owner)  # the caller's own session, else NOT_FOUND
        answer = {"cancelled": turns.cancel(sid, req.turn_id)}
    elif req.action == "cancel":
        answer = {"cancelled": engine.cancel_session(sid, owner)}
    elif req.action == "list":
        answer = [asdict(info) for info in engine.list_sessions(owner)]
    else:  # ping: the engine answers, so its process is alive; a few facts for probes
        stats = engine.stats()
        answer = {
            "sessions": stats.sessions,
            "turns_running": stats.turns_running,
            "store_healthy": stats.store_healthy,
        }
    return {"session_info": _str_tensor(json.dumps(answer))}


def _strings(get: GetInput, name: str) -> list[str]:
    arr = get(name)
    if arr is None:
        return []
    try:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidRequest(f"{name} is not valid UTF-8") from None


def _string(get: GetInput, name: str) -> str | None:
    if get(name) is None:
        return None
    values = _strings(get, name)
    if len(values) != 1:
        raise InvalidRequest(f"{name} must hold exactly one string, got {len(values)}")
    return values[0]


def _scalar(get: GetInput, name: str, kind: type[T], default: T) -> T:
    arr = get(name)
    if arr is None:
        return default
    if arr.size != 1:
        raise InvalidRequest(f"{name} must hold exactly one value, got {arr.size}")
    value = arr.reshape(-1)[0].item()
    if kind is float and not np.isfinite(value):
        raise InvalidRequest(f"{name}={value} is not finite")
    return kind(value)  # type: ignore[call-arg]


def _str_tensor(text: str) -> npt.NDArray[np.object_]:
    return np.array([text.encode()], dtype=np.object_)


def usage_outputs(reason: str, usage: Usage) -> Outputs:
    """The outputs only the last response carries."""
    values = (
        usage.prompt_tokens,
        usage.generated_tokens,
        usage.position,
        usage.cached_tokens,
        usage.evicted_tokens,
    )
    out: Outputs = {"finish_reason": _str_tensor(reason)}
    out.update(
        {k: np.array([v], dtype=np.int64) for k, v in zip(USAGE_OUTPUTS, values, strict=True)}
    )
    return out


def error_message(code: str, message: str) -> str:
    """In-band error text: the status name first, e.g. 'NOT_FOUND: unknown session'."""
    return f"{code}: {message}"


class StreamPacer:
    """Shares a budget of streamed responses per second among the turns that stream.

    With `n` turns streaming and a budget of `responses_per_s`, a turn sends its next
    delta once `n / responses_per_s` seconds have passed since its previous one; the
    tokens made in between go out together in that delta. A turn's first delta and its
    FINAL response are never held. 0 = no budget: every engine step's tokens go out at once.

    Why: each response costs about 0.3 ms of CPU on its way through tritonserver, the
    gateway and the client, and where those share the engine's cores every wake-up stalls
    the engine's compute threads as well, so with many sessions per-token responses cost
    far more engine time than their own CPU (docs/performance.md, "CPU end to end", has the
    figures). A budget bounds that cost whatever the load; with few sessions every token
    still goes out alone.
    """

    def __init__(self, responses_per_s: float, clock: Callable[[], float] = time.monotonic):
        if responses_per_s < 0:
            raise ValueError(f"responses_per_s={responses_per_s} must be >= 0")
        self._rate = responses_per_s
        self._clock = clock
        self._turns = 0
        self._lock = threading.Lock()

    def join(self) -> None:
        with self._lock:
            self._turns += 1

    def leave(self) -> None:
        with self._lock:
            self._turns -= 1

    def now(self) -> float:
        return self._clock()

    def interval_s(self) -> float:
        """Least time between two deltas of one turn now."""
        return self._turns / self._rate if self._rate else 0.0


class TurnResponder:
    """Turns one turn's engine events into Triton responses.

    Streaming: a response per engine call with that step's text delta and token ids, or,
    with a `pacer`, per engine call once the pacer's interval has passed (the held tokens
    go out with it); the call that holds the TurnEnd yields a single FINAL response that
    also carries the tokens not yet sent and the usage. Not streaming: one FINAL response
    with the whole text.
    Invariant: exactly one FINAL response is sent, after which nothing is sent.
    With `sends`, responses go out from its thread (see `SendQueue`). Nothing here raises
    into the caller (the engine thread): a failing send or hook is logged; after a failed
    send the request is `abandoned` (the cancel watcher cancels its turn) and nothing more
    is sent.
    """

    def __init__(
        self,
        send: Send,
        stream: bool,
        sends: SendQueue | None = None,
        pacer: StreamPacer | None = None,
    ):
        self.abandoned = threading.Event()
        self._send = send if sends is None else sends.wrap(send, self.abandoned)
        self._stream = stream
        self._pacer = pacer if stream else None
        self._sent_at: float | None = None  # when the last delta went out (with a pacer)
        if self._pacer is not None:
            self._pacer.join()  # left when the FINAL response is delivered
        self._text: list[str] = []
        self._ids: list[int] = []
        self._lock = threading.Lock()
        self.done = threading.Event()

    def on_events(self, events: Sequence[Event]) -> None:
        with self._lock:
            if self.done.is_set():
                return
            end: TurnEnd | None = None
            for ev in events:
                if isinstance(ev, TokenEvent):
                    self._text.append(ev.text)
                    self._ids.append(ev.token_id)
                else:
                    end = ev
                    self._text.append(ev.text)
            if end is None:
                if self._stream and self._ids and self._due():
                    self._deliver(self._take(), None, False)
                return
            if end.finish_reason is FinishReason.ERROR:
                self._deliver(None, error_message(end.error_code or "INTERNAL", end.error), True)
            else:
                out = self._take()
                out.update(usage_outputs(end.finish_reason.value, end.usage))
                self._deliver(out, None, True)

    def fail(self, code: str, message: str) -> None:
        """End the request with an in-band error (FINAL), unless it already ended."""
        with self._lock:
            if not self.done.is_set():
                self._deliver(None, error_message(code, message), True)

    def reply(self, outputs: Outputs) -> None:
        """End a request that ran no turn (a session call) with its one response."""
        with self._lock:
            if not self.done.is_set():
                self._deliver(outputs, None, True)

    def _due(self) -> bool:
        if self._pacer is None:
            return True
        now = self._pacer.now()
        if self._sent_at is not None and now - self._sent_at < self._pacer.interval_s():
            return False
        self._sent_at = now
        return True

    def _deliver(self, outputs: Outputs | None, error: str | None, final: bool) -> None:
        if final:
            self.done.set()
            if self._pacer is not None:
                self._pacer.leave()
        if self.abandoned.is_set():
            return
        try:
            self._send(outputs, error, final)
        except Exception:
            self.abandoned.set()
            log.exception("sending a response failed; the request is abandoned")

    def _take(self) -> Outputs:
        text, ids = "".join(self._text), self._ids
        self._text, self._ids = [], []
        return {"text_output": _str_tensor(text), "output_ids": np.array(ids, dtype=np.int32)}


_SendArgs = tuple[Outputs | None, str | None, bool]  # the arguments of one `Send` call


class SendQueue:
    """Sends responses from one thread of its own, in the order they were queued.

    `wrap(send, abandoned)` gives a `Send` that only queues, so the engine thread never
    waits on Triton's response IPC (a round trip per token and session). A send that
    fails sets `abandoned` (the cancel watcher then cancels the turn) and drops that
    request's later responses. `close()` sends everything queued, then stops.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Send, threading.Event, _SendArgs] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="sinkserve-send", daemon=True)
        self._thread.start()

    def wrap(self, send: Send, abandoned: threading.Event) -> Send:
        def queued(outputs: Outputs | None, error: str | None, final: bool) -> None:
            self._queue.put((send, abandoned, (outputs, error, final)))

        return queued

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            send, abandoned, args = item
            if abandoned.is_set():
                continue
            try:
                send(*args)
            except Exception:
                abandoned.set()  # first: the log call below may fail too
                log.exception("sending a response failed; the request is abandoned")


class CancelWatcher:
    """Polls `is_cancelled` of running requests and cancels their turns.

    One light thread for all requests, so neither `execute()` nor the engine thread
    blocks on Triton's cancellation query. A turn is watched until its `done` event is
    set (its FINAL response went out) or it was cancelled.

    Each query is an IPC round trip through tritonserver: every 50 ms for 32 running turns
    that was most of tritonserver's own CPU in the end-to-end benchmark (25 against 8-10
    centiseconds per 5 s at 0.25 s). The client sees a cancel at once either way (the
    gateway answers it); the interval only bounds the tokens computed for nothing, and a
    next turn on the session waits for it (the gateway retries a busy session).
    """

    def __init__(self, cancel: Callable[[int], object], interval_s: float = 0.25):
        self._cancel = cancel
        self._interval_s = interval_s
        self._watched: dict[int, tuple[Callable[[], bool], threading.Event]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sinkserve-cancel", daemon=True)
        self._thread.start()

    def watch(self, turn_id: int, is_cancelled: Callable[[], bool], done: threading.Event) -> None:
        with self._lock:
            self._watched[turn_id] = (is_cancelled, done)

    def watching(self) -> int:
        with self._lock:
            return len(self._watched)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.poll()

    def poll(self) -> None:
        """One pass: forget finished turns, cancel those whose request was cancelled."""
        with self._lock:
            watched = list(self._watched.items())
        for turn_id, (is_cancelled, done) in watched:
            if done.is_set() or is_cancelled():
                with self._lock:
                    self._watched.pop(turn_id, None)
                if not done.is_set():
                    self._cancel(turn_id)
