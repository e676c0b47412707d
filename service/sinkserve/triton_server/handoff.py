"""Hand sessions from a finalized model instance to its successor, through a directory.

Triton 2.51 reloads a model by initializing the new instance first, routing new requests
to it, and finalizing the old instance only after its in-flight requests ended. So:

- every instance holds an exclusive `flock` on `<gen>.lock` for its whole life;
- on finalize (the engine is idle then: no request is in flight) it writes all its
  sessions to `<gen>.sessions` (atomically: temp file + rename) and only then unlocks;
- a new instance notes which older instances are alive when it starts; its importer
  waits until none is (bounded), then imports every `*.sessions` file and deletes it.

Exact KV travels only between engines with the same `fingerprint` (weights, dtype, cache
shape); otherwise snapshots lose their KV and the engine rebuilds them from their tokens.

Until that import is done, a request whose session the new engine does not know waits for
it, so a turn never runs on a stale copy of a session. Only one instance per model may
use a directory (instance_group count 1). Snapshot files are pickles: the directory must
be private to the server (mode 0700).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:  # only for its type: this module imports no torch
    from sinkserve.engine.engine import SessionSnapshot

log = structlog.get_logger(__name__)


class Handoff:
    """This instance's place in a handoff directory (one per model)."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.generation = f"{time.time_ns():020d}-{os.getpid()}"
        self._lock_path = directory / f"{self.generation}.lock"
        self._lock_fd: int | None = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._predecessors = [p for p in self._lock_files() if p != self._lock_path]

    def _lock_files(self) -> list[Path]:
        return sorted(self.directory.glob("*.lock"))

    def predecessors_alive(self) -> list[Path]:
        """Lock files of older instances that are still running; stale ones are removed."""
        alive = []
        for path in self._predecessors:
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                alive.append(path)
            else:
                path.unlink(missing_ok=True)  # its owner is gone: it left (or lost) its sessions
            finally:
                os.close(fd)
        self._predecessors = alive
        return alive

    def collect(
        self, fingerprint: str, timeout_s: float, poll_s: float = 0.05
    ) -> list[SessionSnapshot]:
        """Wait until every older instance has finalized, then take their sessions (without
        their KV where it came from an engine with another fingerprint).

        Raises TimeoutError if one is still alive after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.predecessors_alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"previous model instance still draining after {timeout_s}s")
            time.sleep(poll_s)
        snaps: list[SessionSnapshot] = []
        for path in sorted(self.directory.glob("*.sessions")):
            with path.open("rb") as f:
                theirs, sessions = pickle.load(f)
            path.unlink()
            exact = theirs == fingerprint
            if not exact:
                sessions = [dataclasses.replace(snap, kv=None) for snap in sessions]
            snaps.extend(sessions)
            log.info("sessions taken over", file=path.name, sessions=len(sessions), exact_kv=exact)
        return snaps

    def leave(self, fingerprint: str, snapshots: list[SessionSnapshot]) -> None:
        """Write this instance's sessions for the next one, then release the lock.
        Snapshots are dataclasses with a `kv` field (the engine's SessionSnapshot)."""
        if snapshots:
            final = self.directory / f"{self.generation}.sessions"
            tmp = final.with_suffix(".tmp")
            with tmp.open("wb") as f:
                pickle.dump((fingerprint, snapshots), f, protocol=pickle.HIGHEST_PROTOCOL)
            tmp.replace(final)
            log.info("sessions handed off", file=final.name, sessions=len(snapshots))
        self.release()

    def release(self) -> None:
        if self._lock_fd is not None:
            self._lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
