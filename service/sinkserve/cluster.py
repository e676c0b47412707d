"""A local cluster on loopback: Redis, three `sinkserve serve` replicas sharing it, and
HAProxy routing by `x-session-id` with deploy/haproxy/haproxy.cfg (`sinkserve cluster`,
the failover tests and bench/failover.py).

Every process is a real one started here on free 127.0.0.1 ports, and stopped by `stop()`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sinkserve.redis_server import RedisServer
from sinkserve.triton_server.launcher import default_model_repository, free_port, repo_root

HAPROXY_CONFIG = repo_root() / "deploy" / "haproxy" / "haproxy.cfg"
REPLICAS = 3  # the servers deploy/haproxy/haproxy.cfg names
SINKSERVE = str(Path(sys.executable).with_name("sinkserve"))
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Child:
    """One child process in a process group of its own, its output in `log`."""

    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        """Send `sig`, wait, then SIGKILL whatever of its process group is left."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc: int | None = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait() if rc is None else rc


@dataclass
class Replica:
    """`sinkserve serve` (tritonserver with the engine, and the gateway) on free ports."""

    name: str
    workdir: Path
    store: str
    model_repository: Path
    tokens_file: Path | None = None
    port: int = field(default_factory=free_port)
    triton_grpc: int = field(default_factory=free_port)
    triton_metrics: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)  # the gateway's, with /ready
    http_port: int = field(default_factory=free_port)  # the gateway's OpenAI HTTP API
    child: Child | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        auth = [f"--tokens-file={self.tokens_file}"] if self.tokens_file else ["--no-auth"]
        args = [
            SINKSERVE,
            "--log-json",
            "serve",
            f"--port={self.port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-port={self.http_port}",
            f"--model-repository={self.model_repository}",
            f"--triton-grpc-port={self.triton_grpc}",
            f"--triton-http-port={free_port()}",
            f"--triton-metrics-port={self.triton_metrics}",
            f"--session-store={self.store}",
            f"--replica={self.name}",
            *auth,
        ]
        self.child = Child(args, self.workdir / f"{self.name}.log")
        self.child.start()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.child is not None
        return self.child.stop(sig)


@dataclass
class Proxy:
    """HAProxy with the project's config, the replicas' addresses from the environment."""

    replicas: list[Replica]
    workdir: Path
    port: int = field(default_factory=free_port)
    child: Child | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {"SINKSERVE_PROXY_BIND": self.target}
        for i, r in enumerate(self.replicas):
            env[f"SINKSERVE_REPLICA_{i}"] = r.target
            env[f"SINKSERVE_REPLICA_{i}_READY_PORT"] = str(r.metrics_port)
        return env

    def start(self) -> None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(haproxy).exists():
            raise RuntimeError("haproxy is not installed: run `apt-get install haproxy`")
        args = [haproxy, "-db", "-f", str(HAPROXY_CONFIG)]
        self.child = Child(args, self.workdir / "haproxy.log", env=self.env())
        self.child.start()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


@dataclass
class Cluster:
    """Redis, `REPLICAS` replicas on it and the proxy in front, in `workdir`."""

    workdir: Path
    model_repository: Path = field(default_factory=default_model_repository)
    tokens_file: Path | None = None
    redis: RedisServer | None = None
    replicas: list[Replica] = field(default_factory=list)
    proxy: Proxy | None = None

    @property
    def target(self) -> str:
        assert self.proxy is not None
        return self.proxy.target

    def start(self, ready_timeout_s: float = 600) -> None:
        """Start everything and wait until every replica and the proxy serve."""
        self.redis = RedisServer(directory=self.workdir)
        self.redis.start()
        self.replicas = [
            Replica(
                f"replica-{i}",
                self.workdir,
                self.redis.url,
                self.model_repository,
                self.tokens_file,
            )
            for i in range(REPLICAS)
        ]
        for replica in self.replicas:
            replica.start()
        self.proxy = Proxy(self.replicas, self.workdir)
        self.proxy.start()
        targets = [r.target for r in self.replicas] + [self.proxy.target]
        asyncio.run(_all_serving(targets, ready_timeout_s))

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for replica in self.replicas:
            if replica.child is not None and replica.child.proc is not None:
                replica.stop()
        if self.redis is not None:
            self.redis.stop()


def process_tree(root: int) -> dict[int, str]:
    """pid -> command name of `root` and all its living descendants (from /proc)."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if state != "Z":  # a dead child its parent has not reaped (a killed stub)
            parents[int(entry.name)] = (int(ppid), name)
    tree = {root: parents.get(root, (0, "?"))[1]}
    grew = True
    while grew:
        grew = False
        for pid, (parent, command) in parents.items():
            if parent in tree and pid not in tree:
                tree[pid] = command
                grew = True
    return tree


def descendant(replica: Replica, name: str) -> int:
    """The pid of the one process under the replica whose command name starts so."""
    assert replica.child is not None and replica.child.proc is not None
    tree = process_tree(replica.child.proc.pid)
    found = [pid for pid, command in tree.items() if command.startswith(name)]
    assert len(found) == 1, (name, tree)
    return found[0]


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def model_repository(root: Path, **parameters: str) -> Path:
    """A copy of the model repository in `root` whose config.pbtxt has `parameters` set
    (each replacing the key's value, or added to the parameters block)."""
    repo = root / "model_repo"
    shutil.copytree(default_model_repository(), repo)
    config = repo / "sinkserve" / "config.pbtxt"
    text = config.read_text()
    for key, value in parameters.items():
        entry = f'{{ key: "{key}", value: {{ string_value: "{value}" }} }}'
        text, n = re.subn(
            rf'\{{ key: "{key}", value: \{{ string_value: "[^"]*" \}} \}}', entry, text
        )
        if n == 0:
            text, n = re.subn(r"^parameters \[\n", f"parameters [\n  {entry},\n", text, flags=re.M)
        assert n == 1, f"config.pbtxt has no parameters block for {key}"
    config.write_text(text)
    return repo


async def serving(target: str) -> bool:
    """Whether the gateway at `target` (or behind it) reports SERVING."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == SERVING)


async def _all_serving(targets: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for target in targets:
        while not await serving(target):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target} not serving after {timeout_s:g}s")
            await asyncio.sleep(0.2)


def add_cluster_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cluster", help="a local cluster: Redis, 3 replicas and HAProxy on 127.0.0.1"
    )
    p.add_argument("action", choices=("up",), help="up: start it; Ctrl-C stops it")
    p.add_argument("--replicas", type=int, default=REPLICAS, choices=(REPLICAS,))
    p.add_argument("--model-repository", type=Path, default=default_model_repository())
    p.add_argument(
        "--tokens-file", type=Path, help="file of 'caller:token' lines (default: no auth)"
    )
    p.add_argument("--workdir", type=Path, help="logs and Redis data (default: a temp dir)")
    p.set_defaults(func=main_cluster)
    return p


def main_cluster(args: argparse.Namespace) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sinkserve-cluster-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(workdir, args.model_repository, args.tokens_file)
    print(f"starting Redis, {REPLICAS} replicas and HAProxy (logs in {workdir})...", flush=True)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start()
        print(
            f"cluster up: proxy {cluster.target} (replicas "
            + ", ".join(r.target for r in cluster.replicas)
            + f"; Redis {cluster.redis.url if cluster.redis else ''})\n"
            f"chat with:  {SINKSERVE} chat --target {cluster.target}\nCtrl-C stops it.",
            flush=True,
        )
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0
