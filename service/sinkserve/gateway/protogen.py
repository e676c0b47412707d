"""Regenerate the committed Python code of the public API from `proto/` (a dev-time tool).

    python -m sinkserve.gateway.protogen

Needs the `dev` extras (grpcio-tools, mypy-protobuf). protoc emits absolute imports rooted at
the proto package (`from sinkserve.v1 import chat_pb2`); they are rewritten to point into
`sinkserve.gateway._proto` so the generated code lives inside our package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO_ROOT / "proto"
OUT_DIR = REPO_ROOT / "service" / "sinkserve" / "gateway" / "_proto"
PROTO_FILES = ("sinkserve/v1/chat.proto",)
PACKAGE_PREFIX = "sinkserve.gateway._proto."
REGEN_COMMAND = "python -m sinkserve.gateway.protogen"


def generate(out_dir: Path = OUT_DIR, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the generated modules (and their `__init__.py` files) under `out_dir`."""
    bin_dir = Path(sys.executable).parent
    plugin = shutil.which("protoc-gen-mypy", path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    plugin_grpc = shutil.which(
        "protoc-gen-mypy_grpc", path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    )
    if plugin is None or plugin_grpc is None:
        raise RuntimeError("protoc-gen-mypy not found: pip install mypy-protobuf")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"--plugin=protoc-gen-mypy={plugin}",
            f"--plugin=protoc-gen-mypy_grpc={plugin_grpc}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *(str(proto_root / p) for p in PROTO_FILES),
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        written: list[Path] = []
        for src in sorted(Path(tmp).rglob("*")):
            if src.suffix not in (".py", ".pyi"):
                continue
            rel = src.relative_to(tmp)
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(_fix_imports(src.read_text()))
            written.append(dst)
        for pkg in {out_dir, *(p.parent for p in written)}:
            while pkg != out_dir.parent:
                init = pkg / "__init__.py"
                if not init.exists():
                    init.write_text("")
                if init not in written:
                    written.append(init)
                pkg = pkg.parent
        return sorted(written)


def _fix_imports(text: str) -> str:
    top_levels = {p.split("/")[0] for p in PROTO_FILES}
    for top in top_levels:
        text = text.replace(f"from {top}.", f"from {PACKAGE_PREFIX}{top}.")
        text = text.replace(f"import {top}.", f"import {PACKAGE_PREFIX}{top}.")
    return text


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(REPO_ROOT))
