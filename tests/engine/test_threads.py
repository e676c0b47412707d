"""Engine.load builds on one intra-op thread and the step thread runs with
`config.threads`: a thread that ran parallel torch ops keeps an OpenMP team, and two
teams on a 2-core machine made every decode step 2.5x slower (see `Engine.load`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest
import torch

import sinkserve.engine.loader as loader
from sinkserve.config import EngineConfig
from sinkserve.engine.engine import Engine
from sinkserve.engine.runner import TorchRunner
from sinkserve.engine.sampler import SampleRow
from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.engine.types import Event, SamplingParams


def test_loading_runs_single_threaded_and_steps_take_the_configured_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, object] = {}
    build = loader.build_runner

    def spy(config: EngineConfig) -> tuple[TorchRunner, Tokenizer]:
        seen["loading"] = torch.get_num_threads()
        return build(config)

    monkeypatch.setattr(loader, "build_runner", spy)
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2  # unlike the caller's, so the step thread must set it
    engine = Engine.load(EngineConfig(threads=want, max_sessions=1, max_new_tokens=4))
    assert seen["loading"] == 1
    assert torch.get_num_threads() == before, "the caller's setting is restored"

    def hook(rows: Sequence[SampleRow], logits: torch.Tensor) -> None:
        seen.setdefault("step", (threading.current_thread().name, torch.get_num_threads()))

    engine.runner.logits_hook = hook  # type: ignore[attr-defined]
    engine.start()
    try:
        sid = engine.open_session()

        async def turn() -> list[Event]:
            params = SamplingParams(max_new_tokens=2, ignore_eos=True)
            return [e async for e in engine.generate(sid, "Hello", params)]

        assert asyncio.run(turn())
    finally:
        engine.shutdown()
    assert seen["step"] == ("sinkserve-engine", want)
