"""sinkserve as a decoupled Triton Python-backend model: a thin adapter over the engine.

`execute()` only reads and dispatches requests; the engine's own thread steps all
sessions and calls back with events, which `TurnResponder` turns into streamed
responses. A request that may wait (on the session store, or for the sessions of the
instance this one replaces) runs on a thread pool, never in `execute()`.
Conversion and validation live in `sinkserve.triton_server` (testable without Triton); this
file holds only what touches `pb_utils`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import triton_python_backend_utils as pb_utils

# The stub's embedded interpreter ignores PYTHONPATH (it sees only its own site-packages):
# take it from the environment, where the launcher names the directory of the sinkserve
# package, so that a checkout that is not installed (or a --target directory) works too.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]

import structlog  # noqa: E402

from sinkserve.engine.engine import Engine  # noqa: E402
from sinkserve.engine.store import GuardedStore, open_store  # noqa: E402
from sinkserve.engine.types import EngineError  # noqa: E402
from sinkserve.triton_server.adapter import (  # noqa: E402
    Array,
    CancelWatcher,
    ModelRequest,
    Outputs,
    SendQueue,
    StreamPacer,
    TurnResponder,
    parse_request,
    run_control,
    turn_prompt,
)
from sinkserve.triton_server.handoff import Handoff  # noqa: E402
from sinkserve.triton_server.metrics import EngineMetrics  # noqa: E402
from sinkserve.triton_server.settings import kv_fingerprint, parse_parameters  # noqa: E402
from sinkserve.triton_server.turn_ids import TurnIds  # noqa: E402

log = structlog.get_logger("sinkserve.triton")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        _utf8_stdio()
        config = json.loads(args["model_config"])
        name = args["model_name"]
        self.settings = parse_parameters(config.get("parameters", {}), name)
        self.fingerprint = kv_fingerprint(self.settings.engine)
        # Once tritonserver is gone, a successor continues the sessions from the store:
        # this instance, orphaned, must not write over them, and must not linger.
        parent = os.getppid()
        store = GuardedStore(
            open_store(self.settings.session_store), lambda: os.getppid() == parent
        )
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
        self.engine = Engine.load(self.settings.engine, store, replica=self.settings.replica)
        self.engine.start()
        self.handoff = Handoff(self.settings.handoff_dir)
        self.imported = threading.Event()
        self.import_error = ""
        threading.Thread(target=self._take_over, name="sinkserve-handoff", daemon=True).start()
        self.watcher = CancelWatcher(self.engine.cancel)
        self.turns = TurnIds(self.engine.cancel)
        self.sends = SendQueue()  # responses leave from their own thread, not the engine's
        self.pacer = StreamPacer(self.settings.stream_responses_per_s)
        # Starting a turn reads and writes the store (its claim), and may wait out the lease
        # of a replica that died: enough threads that such waits do not queue the others.
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="sinkserve-request")
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
            store=self.settings.session_store,
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

        def get(name: str) -> Array | None:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        try:
            req = parse_request(get)
        except EngineError as exc:
            TurnResponder(send, stream=False).fail(exc.code, str(exc))
            return
        except Exception as exc:  # a bug here must not leave the request without FINAL
            log.exception("request parsing failed")
            TurnResponder(send, stream=False).fail("INTERNAL", f"{type(exc).__name__}: {exc}")
            return
        stream = req.stream and req.action == "turn"
        responder = TurnResponder(send, stream, sends=self.sends, pacer=self.pacer)
        hot = req.action == "ping" or (
            req.action == "cancel" and self.engine.has_session(req.session_id)
        )
        if hot:  # nothing to wait for
            self._run(request, req, responder)
        else:
            self.pool.submit(self._run_when_ready, request, req, responder)

    def _run_when_ready(self, request: Any, req: ModelRequest, responder: TurnResponder) -> None:
        """Run once the previous instance's sessions are here: a session must never be
        rebuilt from the store while the instance it is leaving may still advance it."""
        self.imported.wait(self.settings.handoff_timeout_s + 5)
        if self.import_error and not self.engine.has_session(req.session_id):
            responder.fail(
                "UNAVAILABLE",
                f"sessions of the previous instance not available: {self.import_error}",
            )
            return
        self._run(request, req, responder)

    def _run(self, request: Any, req: ModelRequest, responder: TurnResponder) -> None:
        try:
            if req.action != "turn":
                responder.reply(run_control(self.engine, req, self.turns))
                return
            # A turn cut while it waited here must not start: its client has moved on.
            turn_id = None if request.is_cancelled() else self._submit(req, responder)
        except EngineError as exc:
            responder.fail(exc.code, str(exc))
            return
        except Exception as exc:
            log.exception("request failed", action=req.action, session_id=req.session_id)
            responder.fail("INTERNAL", f"{type(exc).__name__}: {exc}")
            return
        if turn_id is None:
            responder.fail("CANCELLED", "the turn was cancelled before it started")
            return
        gone = responder.abandoned
        self.watcher.watch(turn_id, lambda: gone.is_set() or request.is_cancelled(), responder.done)

    def _submit(self, req: ModelRequest, responder: TurnResponder) -> int | None:
        """The engine's id of the turn, or None when a cancel by its turn_id came first."""
        submit = partial(
            self.engine.submit,
            req.session_id,
            turn_prompt(self.engine, req),
            req.sampling,
            responder.on_events,
            raw=req.raw,
            owner=req.owner,
        )
        if not req.turn_id:
            return submit()
        return self.turns.start(req.session_id, req.turn_id, submit)

    def finalize(self) -> None:
        """Triton calls this once no request is in flight (or its exit timeout passed): stop
        the engine (a turn still running is cancelled and gets its FINAL; every record is
        written), then hand the sessions on to the next instance."""
        self.watcher.close()
        self.metrics.close()
        self.pool.shutdown(wait=True, cancel_futures=False)
        self.imported.wait(self.settings.handoff_timeout_s)
        self.engine.shutdown(10.0)
        self.sends.close()  # the FINALs of turns the shutdown cancelled go out first
        snapshots = self.engine.export_sessions()
        self.handoff.leave(self.fingerprint, snapshots)
        log.info("model finalized", sessions=len(snapshots), generation=self.handoff.generation)


def _utf8_stdio() -> None:
    """Log lines may hold any text (rich tracebacks draw boxes, messages quote user input),
    but the Python-backend stub's interpreter writes stdout and stderr as ASCII. A log call
    must never raise: `log.exception` in the engine's step loop raising UnicodeEncodeError
    killed the loop thread, and every turn then hung while the model still answered pings."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(encoding="utf-8", errors="backslashreplace")


def _exit_when_orphaned(parent: int) -> None:
    """The Python-backend stub outlives a killed tritonserver (holding the whole engine):
    end this process once its parent is gone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    log.warning("tritonserver is gone; exiting")
    os._exit(1)
