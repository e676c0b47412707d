"""`sinkserve triton` and the strict model settings, on a real tritonserver."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import MODEL, TEST_PARAMETERS, write_parameters

from sinkserve.triton_server.launcher import (
    TritonLaunchError,
    TritonServer,
    default_model_repository,
    free_port,
)

RUN_SUBCOMMAND = """
import argparse, sys
from sinkserve.triton_server.cli import add_triton_parser
parser = argparse.ArgumentParser(prog="sinkserve")
add_triton_parser(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def model_repo(tmp_path: Path, **parameters: str) -> Path:
    shutil.copytree(default_model_repository() / MODEL, tmp_path / MODEL)
    write_parameters(tmp_path / MODEL / "config.pbtxt", {**TEST_PARAMETERS, **parameters})
    return tmp_path


def test_sinkserve_triton_prints_where_it_listens_and_stops_cleanly_on_sigint(
    tmp_path: Path,
) -> None:
    ports = [str(free_port()) for _ in range(3)]
    repo = model_repo(tmp_path)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RUN_SUBCOMMAND,
            "triton",
            "--model-repository",
            str(repo),
            "--grpc-port",
            ports[0],
            "--http-port",
            ports[1],
            "--metrics-port",
            ports[2],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # tritonserver logs to stderr: its stop is checked below
        text=True,
    )
    try:
        assert proc.stdout is not None
        # tritonserver's own log shares stdout; the launcher exits if never ready (EOF).
        line = next((x for x in proc.stdout if x.startswith("tritonserver ready")), "")
        assert f"gRPC 127.0.0.1:{ports[0]}" in line and f"127.0.0.1:{ports[1]}" in line
        stdout = proc.stdout
        rest: list[str] = []  # what tritonserver and the model log while they stop
        reader = threading.Thread(target=lambda: rest.append(stdout.read()), daemon=True)
        reader.start()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0  # the timeout only guards against a hang
        reader.join(timeout=60)
        assert rest, "stdout never closed"
        log = rest[0]
        # A clean stop, as the servers report it: the model finalized (every turn had its
        # FINAL, the sessions were handed on), Triton unloaded it and found no live model
        # left before its exit timeout (past it, Triton says so and exits 1).
        assert "model finalized" in log, log[-3000:]
        assert "successfully unloaded 'sinkserve'" in log, log[-3000:]
        assert "Found 0 live models" in log and "Exit timeout expired" not in log, log[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"windw": "60"}, "windw"),
        ({"window": "sixty"}, "window"),
        ({"sinks": "${SINKS}"}, "sinks"),
        ({"dtype": "float16"}, "dtype"),
    ],
)
def test_a_bad_setting_fails_the_load_with_a_message_naming_it(
    tmp_path: Path, parameters: dict[str, str], named: str
) -> None:
    server = TritonServer(
        model_repository=model_repo(tmp_path, **parameters),
        log_path=tmp_path / "triton.log",
        ready_timeout_s=120,
    )
    with pytest.raises(
        TritonLaunchError, match=rf"ConfigError: {named}\b|ConfigError: unknown setting '{named}'"
    ):
        server.start()
