"""A real redis-server on a free loopback port, for tests and `sinkserve cluster`:
stoppable and restartable on the same port (to test what clients do through an outage)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from sinkserve.triton_server.launcher import free_port

INSTALL_HINT = "redis-server is not installed: run `apt-get install redis-server`"


class RedisServer:
    """One redis-server process on 127.0.0.1, without persistence (`--save ""`,
    `--appendonly no`): a restart starts empty, like a Redis that lost its data."""

    def __init__(self, directory: Path | None = None, port: int | None = None) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError(INSTALL_HINT)
        self.executable = executable
        self.directory = directory or Path(tempfile.mkdtemp(prefix="sinkserve-redis-"))
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis-server.log"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server (again, on the same port) and wait until it answers PING."""
        if self._process is not None:
            raise RuntimeError("redis-server is already running")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    self.executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.directory),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._process.poll() is not None:
                    self._process = None
                    raise RuntimeError(f"redis-server exited at start:\n{self._log_tail()}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server did not answer PING in {timeout_s} s:\n{self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL after 5 s."""
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
