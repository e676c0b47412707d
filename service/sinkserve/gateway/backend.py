"""The gateway's only way to the model: Triton's gRPC API, one `stream_infer` per request.

A turn is one decoupled request whose responses stream its tokens; every session call
(open, get, end, cancel, list, ping) is one request answered by one `session_info`
response. One Triton stream per turn means that closing it cancels the turn on the model
too. The model's tensor interface is described in triton_model_repo/sinkserve/config.pbtxt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from sinkserve.gateway.errors import GatewayError, from_rpc_error, from_triton_message
from sinkserve.gateway.timeouts import within


@dataclass(frozen=True)
class TurnRequest:
    session_id: str
    owner: str
    text: str  # "" when `messages` is set
    # The sampling fields the request sets (the API's own message); an unset field is the
    # session's or the server's default, which the model fills in and validates.
    sampling: pb.SamplingParams
    raw: bool = False
    # A whole conversation ((role, content) pairs) the model's chat template renders as
    # this turn's prompt instead of `text`: only for a new session's first turn.
    messages: tuple[tuple[str, str], ...] | None = None
    # Names the turn to the model, so that a cancel reaches this turn and no other.
    turn_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Final:
    """The end of a turn, from the model's last response."""

    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    generated_tokens: int
    cache_position: int
    cached_tokens: int
    evicted_tokens: int


TurnEvent = Delta | Final


class TritonBackend:
    """A Triton server holding the model. Failures surface as GatewayError.

    `busy_wait_s`: how long a turn the model refuses because its session still has a turn
    running (FAILED_PRECONDITION, before anything was generated) is sent again. A turn
    the gateway cut (CancelTurn before the model had the turn, or a stream that went away)
    ends on the model only once its cancel watcher sees the cut stream: up to 0.25 s and
    one engine step later (seconds on a loaded CPU). A next turn sent meanwhile must wait
    for that, not fail; a turn that meets a turn of another stream of the session still
    gets FAILED_PRECONDITION, after this long."""

    def __init__(
        self, url: str, model: str, *, probe_timeout_s: float = 2.0, busy_wait_s: float = 5.0
    ) -> None:
        self.url = url
        self.model = model
        self._probe_timeout_s = probe_timeout_s
        self._busy_wait_s = busy_wait_s
        self._client = triton.InferenceServerClient(url)

    async def close(self) -> None:
        await self._client.close()

    async def ready(self) -> str | None:
        """None when Triton is up and the model itself answers a ping; else why not.
        (Triton reports a model ready even when its Python-backend process has died.)"""
        try:
            if not await self._client.is_server_ready(client_timeout=self._probe_timeout_s):
                return "Triton is not ready"
        except (InferenceServerException, grpc.RpcError, OSError) as exc:
            return f"Triton unreachable: {exc}"
        try:
            await within(self.call("ping"), self._probe_timeout_s)
        except GatewayError as err:
            return err.message
        except asyncio.TimeoutError:
            return f"the model did not answer a ping within {self._probe_timeout_s:g}s"
        return None

    async def reload(self) -> None:
        """Unload the model and load it again (a fresh instance); raises on failure."""
        await self._client.unload_model(self.model)
        await self._client.load_model(self.model)

    async def cache_shape(self) -> tuple[int, int] | None:
        """(sinks, window) from the model config's parameters, when it states them."""
        try:
            config = await self._client.get_model_config(
                self.model, as_json=True, client_timeout=self._probe_timeout_s
            )
            params = config["config"].get("parameters", {})
            return int(params["sinks"]["string_value"]), int(params["window"]["string_value"])
        except (InferenceServerException, grpc.RpcError, OSError, KeyError, ValueError):
            return None

    async def call(self, action: str, session_id: str = "", owner: str = "", **fields: Any) -> Any:
        """A session call (open, get, end, cancel, list, ping): the model's JSON answer.
        `fields` are more inputs: system_prompt (str), sampling (a pb.SamplingParams) and
        turn_id
        (str)."""
        inputs = [_string("request_type", action), _string("owner", owner)]
        if session_id:
            inputs.append(_string("session_id", session_id))
        if system := fields.get("system_prompt"):
            inputs.append(_string("system_prompt", system))
        if (sampling := fields.get("sampling")) is not None:
            inputs += _sampling_inputs(sampling)
        if turn_id := fields.get("turn_id"):
            inputs.append(_string("turn_id", turn_id))
        async with contextlib.aclosing(
            self._responses(inputs, 30.0, final="session_info")
        ) as results:
            async for result in results:
                out = result.as_numpy("session_info")
                if out is None:
                    raise GatewayError(
                        grpc.StatusCode.INTERNAL, f"no session_info in {action} answer"
                    )
                return json.loads(out.reshape(-1)[0])
        raise GatewayError(grpc.StatusCode.UNAVAILABLE, "Triton closed the stream unanswered")

    async def cancel_turn(self, req: TurnRequest) -> bool:
        """Cancel this turn on the model: True when it was running there (its own Final
        follows); False when it had not started (it never will) or had ended."""
        answer = await self.call("cancel", req.session_id, req.owner, turn_id=req.turn_id)
        return bool(answer.get("cancelled"))

    async def turn(
        self, req: TurnRequest, timeout_s: float | None = None
    ) -> AsyncGenerator[TurnEvent, None]:
        """Run one turn: Delta events, then exactly one Final; GatewayError on failure.

        Closing the iterator early (or cancelling the task consuming it) cancels the Triton
        stream, which cancels the request on the model. A refusal because the session is
        busy is retried for up to `busy_wait_s` (within `timeout_s`): the model refused the
        turn before running any of it, so sending it again repeats nothing.
        """
        if req.messages is None:
            prompt = _string("text_input", req.text)
        else:
            history = [{"role": role, "content": content} for role, content in req.messages]
            prompt = _string("messages", json.dumps(history))
        inputs = [
            prompt,
            _string("session_id", req.session_id),
            _string("owner", req.owner),
            _string("turn_id", req.turn_id),
            _tensor("stream", "BOOL", np.array([True])),
            *_sampling_inputs(req.sampling),
        ]
        if req.raw:
            inputs.append(_tensor("raw_prompt", "BOOL", np.array([True])))
        now = time.monotonic()
        deadline = None if timeout_s is None else now + timeout_s
        give_up = (
            now + self._busy_wait_s if deadline is None else min(now + self._busy_wait_s, deadline)
        )
        pause = 0.02
        while True:
            answered = False  # a response came: the model took the turn, no retry after that
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                # Closed on the way out (also when this generator is closed at a yield):
                # that is what cancels the Triton stream, at once rather than whenever
                # the abandoned generator is collected.
                async with contextlib.aclosing(
                    self._responses(inputs, left, final="finish_reason")
                ) as results:
                    async for result in results:
                        answered = True
                        delta, final = _read(result)
                        if delta is not None:
                            yield delta
                        if final is not None:
                            yield final
                            return
            except GatewayError as err:
                busy = err.code is grpc.StatusCode.FAILED_PRECONDITION and not answered
                if not busy or time.monotonic() + pause > give_up:
                    raise
            else:
                raise GatewayError(
                    grpc.StatusCode.UNAVAILABLE, "Triton closed the stream before the turn ended"
                )
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.25)

    async def _responses(
        self, inputs: list[InferInput], timeout_s: float | None, final: str
    ) -> AsyncGenerator[Any, None]:
        """The responses of one request, up to the one with output `final` (the model
        sets FINAL on it); in-band errors and failed calls as GatewayError.

        Leaving before that cancels the Triton stream, which cancels the request on the
        model. After it, the stream is only half-closed, never cancelled: tritonserver
        2.51 has crashed (SIGSEGV) under load on cancellations of requests it had
        already completed."""
        done = asyncio.Event()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": self.model, "inputs": inputs}
            # Keep the stream open until the final response; ending it half-closes.
            await done.wait()

        responses: Any = None
        finished = False
        try:
            responses = self._client.stream_infer(requests(), stream_timeout=timeout_s)
            async for result, error in responses:
                if error is not None:
                    finished = True  # an error response is the request's last
                    raise from_triton_message(str(error.message()))
                finished = result.as_numpy(final) is not None
                yield result
                if finished:
                    return
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        except grpc.aio.UsageError as err:  # the channel is closed: the gateway is stopping
            raise GatewayError(
                grpc.StatusCode.UNAVAILABLE, f"Triton channel closed: {err}"
            ) from None
        finally:
            done.set()
            if not finished and responses is not None:
                responses.cancel()


def _tensor(name: str, datatype: str, values: npt.NDArray[np.generic]) -> InferInput:
    tensor = InferInput(name, list(values.shape), datatype)
    tensor.set_data_from_numpy(values)
    return tensor


def _string(name: str, *values: str) -> InferInput:
    return _tensor(name, "BYTES", np.array([v.encode() for v in values], dtype=np.object_))


# The tensor of each SamplingParams field the model takes (the rest are left out).
SamplingField = Literal["max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"]
_SAMPLING_TENSORS: tuple[tuple[SamplingField, str, str, type[np.generic]], ...] = (
    ("max_tokens", "max_tokens", "INT32", np.int32),
    ("temperature", "temperature", "FP32", np.float32),
    ("top_k", "top_k", "INT32", np.int32),
    ("top_p", "top_p", "FP32", np.float32),
    ("repetition_penalty", "repetition_penalty", "FP32", np.float32),
    ("seed", "random_seed", "UINT64", np.uint64),
)


def _sampling_inputs(s: pb.SamplingParams) -> list[InferInput]:
    inputs = [
        _tensor(tensor, datatype, np.array([getattr(s, field)], dtype=dtype))
        for field, tensor, datatype, dtype in _SAMPLING_TENSORS
        if s.HasField(field)
    ]
    if s.stop:
        inputs.append(_string("stop_words", *s.stop))
    return inputs


def _read(result: Any) -> tuple[Delta | None, Final | None]:
    """The delta and (on the last response) the final of one Triton response."""
    text_out = result.as_numpy("text_output")
    ids_out = result.as_numpy("output_ids")
    text = b"".join(text_out.reshape(-1)).decode("utf-8", "replace") if text_out is not None else ""
    ids = tuple(int(i) for i in ids_out.reshape(-1)) if ids_out is not None else ()
    delta = Delta(text, ids) if text or ids else None
    reason = result.as_numpy("finish_reason")
    if reason is None:
        return delta, None

    def count(name: str) -> int:
        out = result.as_numpy(name)
        return int(out.reshape(-1)[0]) if out is not None and out.size else 0

    final = Final(
        finish_reason=reason.reshape(-1)[0].decode(),
        prompt_tokens=count("prompt_tokens"),
        generated_tokens=count("generated_tokens"),
        cache_position=count("cache_position"),
        cached_tokens=count("cached_tokens"),
        evicted_tokens=count("evicted_tokens"),
    )
    return delta, final
