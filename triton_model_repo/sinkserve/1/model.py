"""sinkserve as a decoupled Triton Python-backend model: a thin adapter over the engine.

`execute()` only validates and enqueues; the engine's own thread steps all sessions and
calls back with events, which `TurnResponder` turns into streamed responses. Conversion
and validation live in `service.triton` (testable without Triton); this file holds only
what touches `pb_utils`.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import structlog
import triton_python_backend_utils as pb_utils

from service.engine.engine import Engine
from service.engine.types import EngineError, Usage
from service.triton.adapter import (
    CancelWatcher,
    Outputs,
    SendQueue,
    StreamPacer,
    TurnRequest,
    TurnResponder,
    parse_request,
)
from service.triton.handoff import Handoff
from service.triton.metrics import EngineMetrics
from service.triton.settings import kv_fingerprint, parse_parameters

log = structlog.get_logger("sinkserve.triton")
NO_USAGE = Usage(prompt_tokens=0, generated_tokens=0, position=0, cached_tokens=0, evicted_tokens=0)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        name = args["model_name"]
        self.settings = parse_parameters(config.get("parameters", {}), name)
        self.fingerprint = kv_fingerprint(self.settings.engine)
        self.engine = Engine.load(self.settings.engine)
        self.engine.start()
        self.handoff = Handoff(self.settings.handoff_dir)
        self.imported = threading.Event()
        self.import_error = ""
        threading.Thread(target=self._take_over, name="sinkserve-handoff", daemon=True).start()
        self.watcher = CancelWatcher(self.engine.cancel)
        self.sends = SendQueue()  # responses leave from their own thread, not the engine's
        self.pacer = StreamPacer(self.settings.stream_responses_per_s)
        labels = {"model": name, "version": args["model_version"]}
        self.metrics = EngineMetrics(
            pb_utils,
            labels,
            self.engine.stats,
            self.engine.take_step_seconds,
            self.settings.metrics_interval_s,
        )
        log.info(
            "model ready",
            model=name,
            version=args["model_version"],
            generation=self.handoff.generation,
        )

    def _take_over(self) -> None:
        """Import the sessions of the instance this one replaces, once it has drained."""
        try:
            snapshots = self.handoff.collect(self.fingerprint, self.settings.handoff_timeout_s)
            if snapshots:
                self.engine.import_sessions(snapshots)
        except Exception as exc:  # reported to every request that needed the import
            self.import_error = f"{type(exc).__name__}: {exc}"
            log.error("session takeover failed", error=self.import_error)
        finally:
            self.imported.set()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._accept(request)

    def _accept(self, request: Any) -> None:
        sender = request.get_response_sender()

        def send(outputs: Outputs | None, error: str | None, final: bool) -> None:
            if error is not None:
                response = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
            else:
                assert outputs is not None
                tensors = [pb_utils.Tensor(k, v) for k, v in outputs.items()]
                response = pb_utils.InferenceResponse(output_tensors=tensors)
            sender.send(
                response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
            )

        def get(name: str) -> np.ndarray | None:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        try:
            turn = parse_request(get, self.settings.engine.max_new_tokens)
        except EngineError as exc:
            TurnResponder(send, stream=False).fail(exc.code, str(exc))
            return
        except Exception as exc:  # a bug here must not leave the request without FINAL
            log.exception("request parsing failed")
            TurnResponder(send, stream=False).fail("INTERNAL", f"{type(exc).__name__}: {exc}")
            return
        responder = TurnResponder(
            send, turn.stream, before_final=self._ender(turn), sends=self.sends, pacer=self.pacer
        )
        if self.imported.is_set() or self.engine.has_session(turn.session_id):
            self._run(request, turn, responder)
        else:  # the session may still be coming from the previous instance
            threading.Thread(
                target=self._run_after_import, args=(request, turn, responder), daemon=True
            ).start()

    def _run_after_import(self, request: Any, turn: TurnRequest, responder: TurnResponder) -> None:
        self.imported.wait(self.settings.handoff_timeout_s + 5)
        if self.import_error and not self.engine.has_session(turn.session_id):
            responder.fail(
                "UNAVAILABLE",
                f"sessions of the previous instance not available: {self.import_error}",
            )
            return
        self._run(request, turn, responder)

    def _ender(self, turn: TurnRequest) -> Any:
        if not turn.end_session:
            return None
        return lambda end: self.engine.end_session(turn.session_id)

    def _run(self, request: Any, turn: TurnRequest, responder: TurnResponder) -> None:
        try:
            if turn.start_session:
                self.engine.open_session(session_id=turn.session_id, system=turn.system_prompt)
            if not turn.text:
                if not self.engine.has_session(turn.session_id):
                    responder.fail("NOT_FOUND", f"unknown session {turn.session_id!r}")
                    return
                if turn.end_session:
                    self.engine.end_session(turn.session_id)
                responder.finish("stop", NO_USAGE)
                return
            turn_id = self.engine.submit(
                turn.session_id, turn.text, turn.sampling, responder.on_events, raw=turn.raw
            )
        except EngineError as exc:
            responder.fail(exc.code, str(exc))
            return
        except Exception as exc:
            log.exception("starting the turn failed")
            responder.fail("INTERNAL", f"{type(exc).__name__}: {exc}")
            return
        gone = responder.abandoned
        self.watcher.watch(turn_id, lambda: gone.is_set() or request.is_cancelled(), responder.done)

    def finalize(self) -> None:
        """Triton calls this once no request is in flight (or its exit timeout passed): stop
        the engine (a turn still running is cancelled and gets its FINAL), then hand the
        sessions on to the next instance."""
        self.watcher.close()
        self.metrics.close()
        self.imported.wait(self.settings.handoff_timeout_s)
        self.engine.shutdown(10.0)
        self.sends.close()  # the FINALs of turns the shutdown cancelled go out first
        snapshots = self.engine.export_sessions()
        self.handoff.leave(self.fingerprint, snapshots)
        log.info("model finalized", sessions=len(snapshots), generation=self.handoff.generation)
