"""Find and run a real `tritonserver` on sinkserve's model repository.

`TritonServer` is a context manager that starts the server on free loopback ports and
stops it (tests, `make serve`); `sinkserve.triton_server.cli` runs it as `sinkserve triton`.

The binary is the system one when present (NVIDIA's container puts it in PATH or
/opt/tritonserver/bin); otherwise the one inside the `nvidia-pytriton` wheel, which needs
a Python-backend stub for the running interpreter beside `libtriton_python.so`. That
backend directory is assembled from symlinks under a cache folder, so site-packages
never has to be writable.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import structlog

log = structlog.get_logger(__name__)

SYSTEM_TRITON = Path("/opt/tritonserver")
DEFAULT_MODEL = "sinkserve"
HANDOFF_ENV = "SINKSERVE_HANDOFF_DIR"  # where a model instance leaves its sessions on reload
STORE_ENV = "SINKSERVE_SESSION_STORE"  # the session store's URL (config.pbtxt may override)
REPLICA_ENV = "SINKSERVE_REPLICA"  # this replica's name in session records (default: host)


class TritonLaunchError(RuntimeError):
    """tritonserver could not be found, prepared or brought to readiness."""


def package_parent() -> Path:
    """The directory holding the `sinkserve` package (service/ in a checkout)."""
    return Path(__file__).resolve().parents[2]


def repo_root() -> Path:
    """The checkout's root: it holds service/, triton_model_repo/ and deploy/."""
    return package_parent().parent


def default_model_repository() -> Path:
    return repo_root() / "triton_model_repo"


@dataclass(frozen=True)
class Installation:
    """A runnable tritonserver: the binary, its backends and the environment it needs."""

    server: Path
    backend_dir: Path
    env: dict[str, str]  # added to (or replacing) os.environ for the child


def find_installation(server: Path | None = None, cache_dir: Path | None = None) -> Installation:
    """The system tritonserver if there is one, else the nvidia-pytriton wheel's."""
    if server is None:
        found = shutil.which("tritonserver")
        system = SYSTEM_TRITON / "bin" / "tritonserver"
        server = Path(found) if found else (system if system.exists() else None)
    if server is not None and not _is_wheel_binary(server):
        backends = server.resolve().parent.parent / "backends"
        return Installation(server, backends, _python_env())
    return _wheel_installation(cache_dir or _cache_dir())


def _wheel_root() -> Path:
    # Found, not imported: importing pytriton loads its client, which needs gevent, and
    # only the tritonserver directory inside the wheel is wanted.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise TritonLaunchError(
            "no tritonserver in PATH or /opt/tritonserver and nvidia-pytriton is not installed"
        )
    return Path(spec.origin).resolve().parent / "tritonserver"


def _is_wheel_binary(server: Path) -> bool:
    return "pytriton" in server.resolve().parts


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sinkserve"


def _wheel_installation(cache_dir: Path) -> Installation:
    root = _wheel_root()
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonLaunchError(f"nvidia-pytriton has no Python-backend stub for Python {pyver}")
    backends = cache_dir / f"triton-backends-py{pyver}"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    links = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root
        / "backends"
        / "python"
        / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    for name, target in links.items():
        _ensure_symlink(python_dir / name, target)
    env = _python_env()
    libs = [str(root.parent.parent / "nvidia_pytriton.libs"), _libpython_dir()]
    env["LD_LIBRARY_PATH"] = _prepend(libs, os.environ.get("LD_LIBRARY_PATH", ""))
    return Installation(root / "bin" / "tritonserver", backends, env)


def _ensure_symlink(link: Path, target: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    # Replace atomically: another process may be preparing the same directory.
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


def _libpython_dir() -> str:
    return str(sysconfig.get_config_var("LIBDIR") or Path(sys.base_prefix) / "lib")


def _python_env() -> dict[str, str]:
    """PATH with this interpreter's bin first (the stub takes python3 and numpy from it) and
    PYTHONPATH with the directory of the `sinkserve` package (model.py imports it)."""
    scripts = sysconfig.get_paths()["scripts"]
    return {
        "PATH": _prepend([scripts], os.environ.get("PATH", "")),
        "PYTHONPATH": _prepend([str(package_parent())], os.environ.get("PYTHONPATH", "")),
    }


def _prepend(first: Sequence[str], rest: str) -> str:
    parts = [*first, *(p for p in rest.split(os.pathsep) if p and p not in first)]
    return os.pathsep.join(parts)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just reported free (another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class TritonServer:
    """A tritonserver child process serving `models` in explicit control mode.

    Its gRPC and HTTP APIs listen on `host`, its metrics on `metrics_host`: both loopback
    by default. Keep the APIs there: they have no authentication and load and unload
    models; only the gateway beside them should reach them. Ports left at 0 are picked
    free. Use as a context manager, or call `start()`/`stop()`.
    `handoff_dir` (default: a fresh temporary directory) is where model instances hand
    their sessions to their successors on reload; it lives as long as this object.
    """

    model_repository: Path = field(default_factory=default_model_repository)
    models: Sequence[str] = (DEFAULT_MODEL,)
    host: str = "127.0.0.1"
    metrics_host: str = "127.0.0.1"  # read-only metrics: 0.0.0.0 for a Prometheus outside
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    ready_timeout_s: float = 300.0
    exit_timeout_s: int = 10
    log_verbose: int = 0
    log_path: Path | None = None  # None: inherit stdout/stderr
    handoff_dir: Path | None = None
    session_store: str | None = None  # the store's URL for the model; None: its default
    replica: str = ""  # this replica's name in session records; "": the host name
    server: Path | None = None  # None: find one
    extra_args: Sequence[str] = ()
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_host}:{self.metrics_port}/metrics"

    def command(self, install: Installation) -> list[str]:
        args = [
            str(install.server),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={install.backend_dir}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.metrics_host}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]
        return args

    def start(self) -> TritonServer:
        """Start the server and block until it (and every model) is ready, or raise."""
        install = find_installation(self.server)
        self.grpc_port = self.grpc_port or free_port(self.host)
        self.http_port = self.http_port or free_port(self.host)
        self.metrics_port = self.metrics_port or free_port(self.metrics_host)
        if self.handoff_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sinkserve-handoff-")
            self.handoff_dir = Path(self._tmp.name)
        env = {**os.environ, **install.env, HANDOFF_ENV: str(self.handoff_dir), **self.extra_env}
        if self.session_store is not None:
            env[STORE_ENV] = self.session_store
        if self.replica:
            env[REPLICA_ENV] = self.replica
        cmd = self.command(install)
        log.info("tritonserver starting", cmd=" ".join(cmd))
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None
            )
        finally:
            if out:
                out.close()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                rc = self.process.returncode
                raise TritonLaunchError(
                    f"tritonserver exited with {rc} before ready{self._log_hint()}"
                )
            if self.is_ready():
                return
            time.sleep(0.2)
        raise TritonLaunchError(
            f"tritonserver not ready after {self.ready_timeout_s}s{self._log_hint()}"
        )

    def _log_hint(self) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-30:]
        return "; log tail:\n" + "\n".join(tail)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, wait (exit timeout + a margin), then SIGKILL. Returns the exit code."""
        proc, self.process = self.process, None
        rc = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout_s if timeout_s is not None else self.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp, self.handoff_dir = None, None
        return rc

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
