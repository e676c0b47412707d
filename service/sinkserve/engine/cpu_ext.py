"""The engine's C++ extension for the CPU: the fused decode step (`cpu_decode.cpp`) and the
few-row int4/int8 kernels (`cpu_matvec.cpp`), one module.

It is compiled on first use with the machine's C++ compiler (about 30 s on 2 cores; cached
under torch's extension directory, `TORCH_EXTENSIONS_DIR`), for this CPU (-march=native).
Where it cannot be built, `available()` logs why once and says no: callers keep ATen's
kernels and the eager path.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sysconfig
from pathlib import Path
from types import ModuleType

import structlog
import torch

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_decode.cpp", HERE / "cpu_matvec.cpp")
HEADERS = (HERE / "cpu_matvec.h",)


@functools.cache
def extension() -> ModuleType:
    """The compiled extension (built once per CPU kind and source, then loaded)."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the `ninja` wheel's binary, in this environment
        os.environ["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), os.environ["PATH"]])
    # Built for this CPU (-march=native): a cache directory shared with a CPU lacking some
    # instruction (a volume moved between nodes) must not hand it this build. The header
    # is in the name too: ninja would not see it change.
    features = ",".join(sorted(k for k, on in torch.cpu.get_capabilities().items() if on))
    key = features.encode() + b"".join(h.read_bytes() for h in HEADERS)
    module: ModuleType = cpp_extension.load(
        name=f"sinkserve_cpu_{hashlib.sha1(key).hexdigest()[:10]}",
        sources=[str(s) for s in SOURCES],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_include_paths=[str(HERE)],
    )
    return module


@functools.cache
def available() -> bool:
    """Whether the extension builds and loads here (logged once where it does not)."""
    try:
        extension()
    except Exception as e:  # no compiler, no headers: the eager path still works
        structlog.get_logger().warning("cpu_extension_unavailable", error=str(e))
        return False
    return True


def matvec_supported() -> bool:
    """Whether the few-row int4/int8 kernels run here (AVX-512 BF16)."""
    return available() and bool(extension().matvec_supported())
