from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sinkserve.triton_server.launcher import find_installation, package_parent


def test_a_tritonserver_in_path_is_preferred_with_its_own_backends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp_path / "tritonserver" / "bin" / "tritonserver"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ['PATH']}")
    install = find_installation(cache_dir=tmp_path / "cache")
    assert install.server == binary
    assert install.backend_dir == tmp_path / "tritonserver" / "backends"
    assert "LD_LIBRARY_PATH" not in install.env


def test_the_wheels_server_gets_a_private_backend_dir_with_this_pythons_stub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    install = find_installation(cache_dir=tmp_path)
    python = install.backend_dir / "python"
    stub = (python / "triton_python_backend_stub").resolve()
    assert stub.parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert (python / "libtriton_python.so").resolve().is_file()
    assert "nvidia_pytriton.libs" in install.env["LD_LIBRARY_PATH"]
    assert install.env["PATH"].startswith(str(Path(sys.executable).parent))
    assert install.env["PYTHONPATH"].split(os.pathsep)[0] == str(package_parent())
    # Preparing it again is a no-op.
    assert find_installation(cache_dir=tmp_path).backend_dir == install.backend_dir


def test_the_wheels_server_is_found_without_importing_pytriton() -> None:
    # Importing pytriton loads its client, which needs gevent: a GPU host carrying only
    # the wheel's files (no gevent) must still find the server.
    code = (
        "import sys; from sinkserve.triton_server.launcher import _wheel_root; "
        "root = _wheel_root(); assert (root / 'bin' / 'tritonserver').is_file(), root; "
        "assert 'pytriton' not in sys.modules; print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": str(package_parent())}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
