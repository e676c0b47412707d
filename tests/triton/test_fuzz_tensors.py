"""Fuzzing the Triton model's tensor interface directly: generated requests (inputs
missing, extra, of a wrong datatype or shape, empty, or well formed with hostile values)
sent with tritonclient to a real tritonserver running the real model
(tests/triton/fuzz_tensors.py has the strategies and what a correct answer is).

The cases are derandomized, without an example database, so every run sends the same
ones; the count is printed and recorded as the junit property `fuzz_cases`. After them the
model must be whole: ready, no turn running, every owner holding its sessions, a normal
two-turn conversation.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import pytest

from sinkserve.triton_server.launcher import TritonServer
from tests.gateway.fuzz_requests import SETTLE_S, Tally, fuzz, scaled, shrink
from tests.triton.fuzz_tensors import HIGH_STREAM, TensorFuzzer, tensor_cases

# Cases; SINKSERVE_FUZZ_SCALE (default 1) multiplies them (see tests/gateway/test_fuzz.py).
EXAMPLES = 500


@pytest.fixture
async def tensor_fuzzer(triton: TritonServer) -> AsyncIterator[TensorFuzzer]:
    fuzzer = TensorFuzzer(triton.grpc_url, Tally())
    await fuzzer.start()
    yield fuzzer
    await fuzzer.close()


async def test_generated_tensors_get_one_documented_answer_and_leave_the_model_whole(
    tensor_fuzzer: TensorFuzzer, record_property: Callable[[str, object], None]
) -> None:
    fuzzer = tensor_fuzzer
    cases = tensor_cases(fuzzer.specs, fuzzer.outputs, fuzzer.limits)
    start = time.monotonic()
    try:
        await fuzz(
            cases,
            fuzzer.run,
            examples=scaled(EXAMPLES),
            timeout_s=lambda _: HIGH_STREAM + 3 * SETTLE_S,
            shrink=shrink(),
        )
    finally:
        record_property("fuzz_cases", fuzzer.tally.cases)
        print(
            f"fuzz tensors: {fuzzer.tally.cases} cases ({fuzzer.tally.turns} turns ran) in "
            f"{time.monotonic() - start:.1f}s; statuses {fuzzer.tally.by_code()}"
        )
    await fuzzer.check_batch()
