"""Generated requests to the Triton model itself, tensor by tensor, and what a correct
answer to each is (tests/triton/test_fuzz_tensors.py and bench/fuzz.py share this).

Every input of the model's config is, per case, absent, well formed (any value, much of it
out of range: empty, huge, NUL and control characters, invalid UTF-8, NaN, infinities,
int32 and uint64 extremes), of a wrong datatype, or of a wrong shape (two values, a
nested or scalar shape, none at all); a case may add an input the model does not have, a
second copy of one it has, ask for outputs that do not exist or for only some, and cut
its stream after the first response. The inputs come from the live model config, so the
cases follow config.pbtxt.

A correct answer (`TensorFuzzer.run`):
- a request with a wrong datatype, shape, name or output is refused by Triton itself (one
  error response naming what was wrong), never reaching the model;
- anything else gets responses ending in exactly one FINAL one, then the stream ends: a
  normal answer (`session_info` JSON, or a turn's deltas and its finish reason), or one
  in-band error "CODE: message" with a documented code (never INTERNAL, UNKNOWN or a
  message without a code); a request the adapter must refuse (unknown request_type,
  invalid UTF-8, a non-finite float, a turn without session or text) is INVALID_ARGUMENT;
- within its deadline, and afterwards no turn runs on the model and every owner holds the
  sessions it held before (the case's own opens ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as triton_grpc
from hypothesis import strategies as st
from tritonclient.grpc import InferInput, InferRequestedOutput

from tests.gateway.fuzz_requests import (
    BAD_UTF8,
    INT32_MAX,
    INT32_MIN,
    PROMPTS,
    SETTLE_S,
    UINT64_MAX,
    Tally,
    clip,
    float32s,
    ids,
    int32s,
    texts,
    weighted,
)

MODEL = "sinkserve"
# Valid values of the `messages` input: conversations the chat template renders.
HISTORIES = tuple(
    json.dumps(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}][-n:]
    ).encode()
    for p in PROMPTS[:3]
    for n in (1, 2)
)
# The codes the model's in-band errors may carry (its EngineError codes a well-behaved
# model gives a bad request). PERMISSION_DENIED: the owner input names another owner; the
# gateway is the one that must make that look like NOT_FOUND.
MODEL_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
    }
)
# Triton's own refusals of a request that does not fit the model config (tritonserver 2.51).
TRITON_REFUSALS = (
    "unexpected shape for input",
    "data-type is",
    "unexpected inference input",
    "already exists in request",
    "unexpected inference output",
    "expected",  # e.g. "expected 1 inputs but got ...", "expecting TYPE_INT32"
)
DATATYPES = ("BOOL", "INT8", "INT32", "INT64", "UINT64", "FP16", "FP32", "FP64", "BYTES")
NUMPY: Mapping[str, type[np.generic]] = MappingProxyType(
    {
        "BOOL": np.bool_,
        "INT8": np.int8,
        "INT32": np.int32,
        "INT64": np.int64,
        "UINT64": np.uint64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
        "BYTES": np.object_,
    }
)
# Placeholders in a BYTES tensor, replaced when the case runs.
LIVE = b"\x00<live session>"  # the fuzzing owner's session
OTHERS = b"\x00<other session>"  # another owner's session
ME = b"\x00<fuzzing owner>"
HIGH_STREAM = 60.0  # the deadline of one request's stream
ACTIONS = ("turn", "open", "get", "end", "cancel", "list", "ping")


@dataclass(frozen=True)
class Spec:
    """One input of the model config."""

    name: str
    datatype: str  # as the client sends it: BYTES, INT32, ...
    dims: tuple[int, ...]  # -1: any length


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: tuple[Any, ...]  # the values, flattened; bytes for BYTES
    fits: bool  # datatype and shape are the config's

    def infer_input(self, live: str, others: str, owner: str) -> InferInput:
        def resolve(value: Any) -> Any:
            swap = {LIVE: live.encode(), OTHERS: others.encode(), ME: owner.encode()}
            return swap.get(value, value) if isinstance(value, bytes) else value

        values = [resolve(v) for v in self.data]
        with np.errstate(over="ignore"):  # a huge float in an FP16 or FP32 tensor: inf
            array = np.array(values, dtype=NUMPY[self.datatype]).reshape(self.shape)
        tensor = InferInput(self.name, list(self.shape), self.datatype)
        tensor.set_data_from_numpy(array)
        return tensor


@dataclass(frozen=True)
class TensorCase:
    tensors: tuple[Tensor, ...]
    outputs: tuple[str, ...] | None  # requested outputs; None: all
    cut: bool  # cancel the stream after its first response (a client going away mid-turn)


def specs_of(config: dict[str, Any]) -> tuple[Spec, ...]:
    """The inputs of a model config (tritonclient's JSON form)."""
    out = []
    for entry in config["input"]:
        datatype = entry["data_type"].removeprefix("TYPE_")
        out.append(
            Spec(
                entry["name"],
                "BYTES" if datatype == "STRING" else datatype,
                tuple(int(d) for d in entry["dims"]),
            )
        )
    return tuple(out)


def outputs_of(config: dict[str, Any]) -> tuple[str, ...]:
    return tuple(entry["name"] for entry in config["output"])


# -- strategies ------------------------------------------------------------------------------


def _utf8(text: str) -> bytes:
    return text.encode()


def strings(huge: int) -> st.SearchStrategy[bytes]:
    """BYTES values: text (any, as UTF-8) or bytes that are not UTF-8."""
    bad = st.builds(
        lambda a, b, c: a + b + c,
        st.binary(max_size=4),
        st.sampled_from(BAD_UTF8),
        st.binary(max_size=4),
    )
    return weighted((texts(huge=huge).map(_utf8), 6), (bad, 1))


def _values(spec: Spec, limits: TensorLimits) -> st.SearchStrategy[Any]:
    """One value for an input of its own datatype: valid ones mostly for the inputs that
    select what a request does, anything for the others."""
    small = st.integers(1, 4)
    by_name: dict[str, st.SearchStrategy[Any]] = {
        "session_id": weighted(
            (st.just(LIVE), 8),
            (st.just(OTHERS), 2),
            (ids().map(_utf8), 2),
            (st.just(b""), 1),
            (strings(2000), 1),
        ),
        "owner": weighted((st.just(ME), 10), (st.just(b"someone else"), 1), (strings(200), 1)),
        "text_input": weighted(
            (st.sampled_from([p.encode() for p in PROMPTS]), 6), (strings(4 * limits.window), 2)
        ),
        "system_prompt": strings(4 * limits.window),
        # A whole conversation instead of text_input: valid histories, or anything.
        "messages": weighted((st.sampled_from(HISTORIES), 3), (strings(200), 1)),
        "stop_words": strings(60),
        "max_tokens": weighted(
            (small, 6),
            (st.integers(5, limits.max_new_tokens), 1),
            (
                st.one_of(
                    st.integers(INT32_MIN, 0), st.integers(limits.max_new_tokens + 1, INT32_MAX)
                ),
                2,
            ),
        ),
        "top_k": int32s((0, 50)),
        "random_seed": st.integers(0, UINT64_MAX),
        "temperature": float32s((0.0, 1.5)),
        "top_p": float32s((0.0625, 1.0)),
        "repetition_penalty": float32s((0.75, 1.5)),
    }
    if spec.name in by_name:
        return by_name[spec.name]
    return any_value(spec.datatype)


def any_value(datatype: str) -> st.SearchStrategy[Any]:
    if datatype == "BYTES":
        return strings(100)
    if datatype == "BOOL":
        return st.booleans()
    floats = {"FP16": st.floats(width=16), "FP32": st.floats(width=32), "FP64": st.floats()}
    if datatype in floats:
        return floats[datatype]
    bits = {"INT8": 8, "INT32": 32, "INT64": 64}
    if datatype in bits:
        return st.integers(-(2 ** (bits[datatype] - 1)), 2 ** (bits[datatype] - 1) - 1)
    return st.integers(0, UINT64_MAX)  # UINT64


def _tensor(spec: Spec, limits: TensorLimits) -> st.SearchStrategy[Tensor]:
    """The input well formed: any value of its datatype, in a shape its dims allow."""

    def fitting(n: int) -> st.SearchStrategy[Tensor]:
        shape = tuple(n if d < 0 else d for d in spec.dims)
        count = math.prod(shape)
        return st.lists(_values(spec, limits), min_size=count, max_size=count).map(
            lambda data: Tensor(spec.name, spec.datatype, shape, tuple(data), fits=True)
        )

    return st.integers(0, 4).flatmap(fitting) if any(d < 0 for d in spec.dims) else fitting(1)


def _malformed(spec: Spec, limits: TensorLimits) -> st.SearchStrategy[Tensor]:
    """The input of another datatype, or of a shape its dims do not allow."""
    other_types = [t for t in DATATYPES if t != spec.datatype]
    wrong_type = st.sampled_from(other_types).flatmap(
        lambda t: any_value(t).map(lambda v: Tensor(spec.name, t, (1,), (v,), fits=False))
    )
    variable = any(d < 0 for d in spec.dims)
    shapes = [(1, 1), (), (2, 2)] if variable else [(2,), (1, 1), (0,), (), (3, 1)]

    def shaped(shape: tuple[int, ...]) -> st.SearchStrategy[Tensor]:
        count = math.prod(shape)
        return st.lists(_values(spec, limits), min_size=count, max_size=count).map(
            lambda data: Tensor(spec.name, spec.datatype, shape, tuple(data), fits=False)
        )

    return st.one_of(wrong_type, st.sampled_from(shapes).flatmap(shaped))


@dataclass(frozen=True)
class TensorLimits:
    window: int
    max_new_tokens: int


# The inputs each request_type needs (owner: to reach the caller's sessions). A case sends
# them nine times in ten; sampling inputs one time in three; the others one in six.
NEEDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "turn": ("session_id", "text_input", "owner"),
        "open": ("session_id", "owner"),
        "get": ("session_id", "owner"),
        "end": ("session_id", "owner"),
        "cancel": ("session_id", "owner"),
        "list": ("owner",),
        "ping": (),
    }
)
SAMPLING_INPUTS = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "random_seed",
    "stop_words",
)


def tensor_cases(
    specs: Sequence[Spec], outputs: Sequence[str], limits: TensorLimits
) -> st.SearchStrategy[TensorCase]:
    """Cases: what the request does first (request_type, or none: a turn), then each input
    present or not; in one case of three, one defect as well (an input malformed, one the
    model does not have, one sent twice, or outputs that do not exist), which Triton itself
    must refuse."""
    by_name = {spec.name: _tensor(spec, limits) for spec in specs}
    malformed = st.sampled_from(list(specs)).flatmap(lambda spec: _malformed(spec, limits))
    actions = weighted(
        (st.just("turn"), 8),
        (st.sampled_from(["open", "get", "end", "cancel", "list", "ping"]), 6),
        (st.none(), 1),  # no request_type: a turn
        (strings(20).map(lambda b: b.decode("utf-8", "replace")), 1),
    )
    needed = st.sampled_from([True] * 9 + [False])
    sampling = st.sampled_from([True, False, False])
    other = st.sampled_from([True] + [False] * 5)
    unknown_names = st.sampled_from(["bogus", "TEXT_INPUT", "text_input ", "", "session id"])
    extra = st.builds(
        lambda name, value: Tensor(name, "BYTES", (1,), (value,), fits=False),
        unknown_names,
        strings(20),
    )
    subsets = st.lists(st.sampled_from(list(outputs)), min_size=1, max_size=3, unique=True)
    requested = weighted((st.none(), 10), (subsets.map(tuple), 1))
    defects = st.sampled_from(["none"] * 6 + ["malformed", "extra", "twice", "output"])

    @st.composite
    def cases(draw: st.DrawFn) -> TensorCase:
        action = draw(actions)
        needs = NEEDS.get(action or "turn", ())
        tensors: list[Tensor] = []
        if action is not None and "request_type" in by_name:
            tensors.append(Tensor("request_type", "BYTES", (1,), (action.encode(),), fits=True))
        for name, strategy in by_name.items():
            if name == "request_type":
                continue
            chance = needed if name in needs else sampling if name in SAMPLING_INPUTS else other
            if draw(chance):
                tensors.append(draw(strategy))
        outputs_wanted = draw(requested)
        defect = draw(defects)
        if defect == "malformed":
            bad = draw(malformed)
            tensors = [t for t in tensors if t.name != bad.name] + [bad]
        elif defect == "extra":
            tensors.append(draw(extra))
        elif defect == "twice" and tensors:
            twin = draw(st.sampled_from(tensors))
            tensors.append(Tensor(twin.name, twin.datatype, twin.shape, twin.data, fits=False))
        elif defect == "output":
            outputs_wanted = (*(outputs_wanted or ()), "no_such_output")
        cut = draw(st.sampled_from([False] * 9 + [True]))
        return TensorCase(tuple(tensors), outputs_wanted, cut)

    return cases()


# -- running cases ---------------------------------------------------------------------------


@dataclass
class Answer:
    """What came back for one request."""

    responses: list[dict[str, npt.NDArray[np.generic]]]  # outputs of each response
    finals: int
    error: str | None
    status: str  # how the stream ended: "ok", or the gRPC code of a failed stream
    after_final: int  # responses after the FINAL one


class TensorFuzzer:
    """Sends tensor cases to the model at `url` as `owner`, checking each answer.

    `start()` opens `owner`'s session (its turns generate at most three tokens unless a
    case says otherwise) and another owner's; no case may remove them. `check_batch()`
    checks the model is whole after a batch: ready, no turn running, every owner with its
    sessions, a normal two-turn conversation."""

    def __init__(self, url: str, tally: Tally, *, owner: str = "fuzz-owner") -> None:
        self.url = url
        self.tally = tally
        self.owner = owner
        self.other_owner = f"{owner}-other"
        self._client = triton_grpc.InferenceServerClient(url)
        self.specs: tuple[Spec, ...] = ()
        self.outputs: tuple[str, ...] = ()
        self.limits = TensorLimits(window=60, max_new_tokens=64)
        self.live = ""
        self.others = ""
        self._baseline: dict[str, set[str]] = {}

    async def start(self) -> None:
        config = (await self._client.get_model_config(MODEL, as_json=True))["config"]
        self.specs, self.outputs = specs_of(config), outputs_of(config)
        params = config.get("parameters", {})

        def param(key: str, default: int) -> int:
            return int(params.get(key, {}).get("string_value") or default)

        self.limits = TensorLimits(param("window", 1020), param("max_new_tokens", 4096))
        suffix = str(time.monotonic_ns())
        self.live, self.others = f"fz-live-{suffix}", f"fz-others-{suffix}"
        await self.call("open", self.live, owner=self.owner, max_tokens=3)
        await self.call("open", self.others, owner=self.other_owner, max_tokens=3)
        for owner in self._owners():
            self._baseline[owner] = await self.sessions(owner)

    async def close(self) -> None:
        for sid, owner in ((self.live, self.owner), (self.others, self.other_owner)):
            with contextlib.suppress(AssertionError):  # check_batch reports a missing one
                await self.call("end", sid, owner=owner)
        await self._client.close()

    def _owners(self) -> list[str]:
        return [self.owner, self.other_owner, ""]

    # -- plain requests ---------------------------------------------------------------

    async def request(
        self, inputs: list[InferInput], outputs: Sequence[str] | None = None, *, cut: bool = False
    ) -> Answer:
        """One request on its own stream; its responses until the stream ends."""
        body: dict[str, Any] = {"model_name": MODEL, "inputs": inputs}
        if outputs is not None:
            body["outputs"] = [InferRequestedOutput(name) for name in outputs]

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield body  # then half-close: the stream ends after the FINAL response

        answer = Answer([], 0, None, "ok", 0)
        stream = self._client.stream_infer(requests(), stream_timeout=HIGH_STREAM)
        try:
            async for result, error in stream:
                if answer.finals:
                    answer.after_final += 1
                if error is not None:
                    answer.error = str(error.message())
                    answer.finals += 1  # an error response is the request's last
                    continue
                response = result.get_response()
                answer.responses.append({o.name: result.as_numpy(o.name) for o in response.outputs})
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    answer.finals += 1
                elif cut:
                    stream.cancel()  # the client goes away mid-turn
                    answer.status = "cut"
                    break
        except grpc.RpcError as err:
            answer.status = err.code().name if isinstance(err, grpc.aio.AioRpcError) else str(err)
        return answer

    async def call(
        self, action: str, session_id: str = "", *, owner: str, max_tokens: int | None = None
    ) -> Any:
        """A session call that must succeed: its `session_info` answer."""
        inputs = [_bytes("request_type", action), _bytes("owner", owner)]
        if session_id:
            inputs.append(_bytes("session_id", session_id))
        if max_tokens is not None:
            inputs.append(_ints("max_tokens", max_tokens))
        answer = await self.request(inputs)
        assert answer.error is None and answer.responses, f"{action} {session_id!r}: {answer}"
        return json.loads(answer.responses[-1]["session_info"].reshape(-1)[0])

    async def sessions(self, owner: str) -> set[str]:
        return {s["session_id"] for s in await self.call("list", owner=owner)}

    async def settle(self, problems: list[str]) -> None:
        """Wait (at most SETTLE_S) until the model runs no turn."""
        deadline = time.monotonic() + SETTLE_S
        while (ping := await self.call("ping", owner=""))["turns_running"]:
            if time.monotonic() > deadline:
                problems.append(f"the model still runs a turn {SETTLE_S:g}s after the case: {ping}")
                return
            await asyncio.sleep(0.05)

    # -- a case -----------------------------------------------------------------------

    async def run(self, case: TensorCase) -> None:
        self.tally.cases += 1
        owner = self._owner_of(case)
        inputs = [t.infer_input(self.live, self.others, self.owner) for t in case.tensors]
        answer = await self.request(inputs, case.outputs, cut=case.cut)
        self.tally.add("tensors", _code_of(answer))
        ran = self._action(case) == "turn" and answer.error is None and answer.responses
        self.tally.turns += bool(ran)
        problems = self._judge(case, answer)
        await self.settle(problems)
        await self._clean(case, answer, owner, problems)
        if problems:
            lines = [f"{len(problems)} problem(s):", *(f"  - {p}" for p in problems)]
            lines += [f"case: {clip(repr(case))}", f"answer: {clip(repr(answer))}"]
            raise AssertionError("\n".join(lines))

    def _owner_of(self, case: TensorCase) -> str | None:
        """The owner the case names (None: not valid UTF-8, or not one value)."""
        for t in case.tensors:
            if t.name == "owner" and t.fits:
                value = t.data[0]
                if value == ME:
                    return self.owner
                try:
                    return str(value.decode())
                except UnicodeDecodeError:
                    return None
        return ""

    def _judge(self, case: TensorCase, answer: Answer) -> list[str]:
        problems: list[str] = []
        if answer.status not in ("ok", "cut"):
            problems.append(f"the stream failed: {answer.status}")
            return problems
        if answer.after_final:
            problems.append(f"{answer.after_final} responses after the FINAL one")
        if answer.status == "ok" and answer.finals != 1:
            problems.append(f"{answer.finals} FINAL responses")
        structural = any(not t.fits for t in case.tensors) or (
            case.outputs is not None and any(o not in self.outputs for o in case.outputs)
        )
        if structural:
            if answer.error is None or not any(r in answer.error for r in TRITON_REFUSALS):
                problems.append(
                    f"a request that does not fit the config, not refused: {answer.error!r}"
                )
            return problems
        if answer.error is not None:
            code, sep, message = answer.error.partition(":")
            if not sep or code not in MODEL_CODES or not message.strip():
                problems.append(f"error {answer.error!r} has no documented code and message")
            expected = self._must_refuse(case)
            if expected and code != "INVALID_ARGUMENT":
                problems.append(f"{expected}: {code}, not INVALID_ARGUMENT")
            return problems
        expected = self._must_refuse(case)
        if expected:
            problems.append(f"{expected}, yet it was answered")
        action = self._action(case)
        final = answer.responses[-1] if answer.responses else {}
        wanted = case.outputs
        if (
            action == "turn"
            and answer.status == "ok"
            and (wanted is None or "finish_reason" in wanted)
        ):
            reason = final.get("finish_reason")
            if reason is None or reason.reshape(-1)[0] not in (b"stop", b"length", b"cancelled"):
                problems.append(f"a turn's last response has finish_reason {reason!r}")
        if (
            action != "turn"
            and answer.status == "ok"
            and (wanted is None or "session_info" in wanted)
        ):
            info = final.get("session_info")
            try:
                json.loads(info.reshape(-1)[0]) if info is not None else None
            except ValueError:
                problems.append(f"session_info is no JSON: {info!r}")
            if info is None:
                problems.append(f"a {action} answered without session_info")
        return problems

    def _value(self, case: TensorCase, name: str) -> Any:
        """The values of the input `name` (None: absent, or not of the config's form)."""
        for t in case.tensors:
            if t.name == name and t.fits:
                return t.data
        return None

    def _named(self, case: TensorCase) -> str | None:
        """The session id the case sends (None: absent, or not UTF-8)."""
        data = self._value(case, "session_id")
        if data is None:
            return None
        swap = {LIVE: self.live.encode(), OTHERS: self.others.encode(), ME: self.owner.encode()}
        try:
            return str(swap.get(data[0], data[0]).decode())
        except UnicodeDecodeError:
            return None

    def _action(self, case: TensorCase) -> str:
        data = self._value(case, "request_type")
        if data is None:
            return "turn"
        try:
            return str(data[0].decode()) or "turn"
        except UnicodeDecodeError:
            return "?"  # refused as not UTF-8

    def _must_refuse(self, case: TensorCase) -> str:
        """Why the adapter must refuse the case with INVALID_ARGUMENT ("" if not sure)."""
        for t in case.tensors:
            if t.datatype == "BYTES":
                for value in t.data:
                    if value in (LIVE, OTHERS, ME):
                        continue
                    try:
                        value.decode()
                    except UnicodeDecodeError:
                        return f"{t.name} is not UTF-8"
            with np.errstate(over="ignore"):  # as sent: a huge float becomes inf
                values = [float(np.float32(v)) for v in t.data] if t.datatype == "FP32" else []
            if not all(math.isfinite(v) for v in values):
                return f"{t.name} is not finite"
        action = self._action(case)
        if action not in ACTIONS:
            return f"request_type {action!r}"
        sid = self._value(case, "session_id")
        if action in ("turn", "get", "end", "cancel") and (sid is None or sid == (b"",)):
            return f"{action} without a session_id"
        text = self._value(case, "text_input")
        has_text = text is not None and text != (b"",)
        messages = self._value(case, "messages")
        if messages is not None and (action != "turn" or has_text):
            return "messages outside a turn, or with text_input"
        if action == "turn" and not has_text and (messages is None or messages[0] not in HISTORIES):
            return "a turn without text_input or valid messages"
        return ""

    async def _clean(
        self, case: TensorCase, answer: Answer, owner: str | None, problems: list[str]
    ) -> None:
        """End what the case opened; every owner then holds what it held."""
        owners = [
            *self._owners(),
            *([owner] if owner is not None and owner not in self._owners() else []),
        ]
        for who in owners:
            now = await self.sessions(who)
            before = self._baseline.get(who, set())
            extra, missing = now - before, before - now
            opened = self._action(case) == "open" and answer.error is None and answer.status == "ok"
            if extra and not opened:
                problems.append(
                    f"owner {who!r} holds sessions the case never opened: {sorted(extra)}"
                )
            for sid in extra:
                await self.call("end", sid, owner=who)
            ended = self._action(case) == "end" and answer.error is None and answer.status == "ok"
            for sid in sorted(missing):
                if ended and self._named(case) == sid:  # the case ended it: open it again
                    await self.call("open", sid, owner=who, max_tokens=3)
                else:
                    problems.append(f"owner {who!r} lost session {sid!r}")
                    self._baseline[who].discard(sid)

    async def check_batch(self) -> None:
        problems: list[str] = []
        if not await self._client.is_server_ready():
            problems.append("Triton is not ready")
        await self.settle(problems)
        for owner, sessions in self._baseline.items():
            if (now := await self.sessions(owner)) != sessions:
                problems.append(f"owner {owner!r} holds {sorted(now)}, not {sorted(sessions)}")
        sid = f"fz-check-{time.monotonic_ns()}"
        await self.call("open", sid, owner=self.owner, max_tokens=4)
        positions = []
        for text in ("What is the capital of France?", "And of Italy?"):
            inputs = [
                _bytes("session_id", sid),
                _bytes("owner", self.owner),
                _bytes("text_input", text),
            ]
            answer = await self.request(inputs)
            if answer.error is not None or not answer.responses:
                problems.append(f"a normal turn failed: {answer.error}")
                break
            positions.append(int(answer.responses[-1]["cache_position"].reshape(-1)[0]))
        if len(positions) == 2 and not positions[0] < positions[1]:
            problems.append(f"a normal conversation did not advance: {positions}")
        await self.call("end", sid, owner=self.owner)
        assert not problems, "after the batch: " + "; ".join(problems)


def _code_of(answer: Answer) -> Any:
    """The status a case ended with, for the tally: the in-band code, or OK. Triton's own
    refusals carry no code: they count as INVALID_ARGUMENT (Triton's INVALID_ARG)."""
    if answer.status not in ("ok", "cut"):
        return grpc.StatusCode.__members__.get(answer.status, grpc.StatusCode.UNKNOWN)
    if answer.error is None:
        return grpc.StatusCode.OK
    code = answer.error.partition(":")[0]
    return grpc.StatusCode.__members__.get(code, grpc.StatusCode.INVALID_ARGUMENT)


def _bytes(name: str, value: str) -> InferInput:
    tensor = InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
    return tensor


def _ints(name: str, value: int) -> InferInput:
    tensor = InferInput(name, [1], "INT32")
    tensor.set_data_from_numpy(np.array([value], dtype=np.int32))
    return tensor
