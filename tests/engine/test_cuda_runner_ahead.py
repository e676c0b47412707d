"""The CUDA runner's step ahead: a runner that launches each greedy step's successor before
it is asked for returns the same ids and leaves the same cache as one that does not,
whatever the engine asks next (here on CPU: Triton's interpreter, graphs off; the GPU run
of `bench/gpu.py` repeats this with CUDA graphs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sinkserve.config import EngineConfig
from sinkserve.engine.cuda_runner import CudaGraphRunner, _Ahead, _Bucket
from sinkserve.engine.kv_cache import CacheEntries
from sinkserve.engine.model import Llama
from sinkserve.engine.sampler import SampleRow
from sinkserve.engine.scheduler import StepItem
from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.engine.types import SamplingParams
from tests.engine.helpers import tiny_model


class Twins:
    """The same calls to a runner stepping ahead and to one that does not."""

    def __init__(
        self,
        vocab: int,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        graphs: bool = False,
        **model_shape: int,
    ) -> None:
        cfg, tensors = tiny_model(vocab, seed=4, **model_shape)  # type: ignore[arg-type]
        config = EngineConfig(sinks=2, window=6, max_sessions=3, device=device)
        model = Llama(cfg, tensors, dtype, torch.device(device))
        # sm_count 8 splits the window over several programs, as on a GPU.
        self.ahead = CudaGraphRunner(config, model, graphs=graphs, sm_count=8, ahead=True)
        self.plain = CudaGraphRunner(config, model, graphs=graphs, sm_count=8, ahead=False)
        self.device, self.vocab = device, vocab
        self.position = [0, 0, 0]
        self.last = [0, 0, 0]  # the id each slot generated last
        self.launched = self.undone = 0
        launch, restore = self.ahead._launch_ahead, self.ahead.kv.restore

        def counting_launch(bucket: _Bucket, items: Sequence[StepItem]) -> _Ahead:
            self.launched += 1
            return launch(bucket, items)

        def counting_restore(saved: CacheEntries) -> None:
            self.undone += 1
            restore(saved)

        self.ahead._launch_ahead = counting_launch  # type: ignore[method-assign]
        self.ahead.kv.restore = counting_restore  # type: ignore[method-assign]

    def step(self, feeds: list[tuple[int, list[int]]], temperature: float = 0.0) -> list[int]:
        """Feed (slot, tokens) items; the ids both runners return (asserted equal)."""
        items = [StepItem(s, toks, self.position[s], True) for s, toks in feeds]
        got = []
        for runner in (self.ahead, self.plain):
            rows = [
                SampleRow(
                    i,
                    SamplingParams(temperature=temperature),
                    torch.Generator(self.device).manual_seed(i),
                )
                for i in range(len(items))
            ]
            got.append(runner.step(items, rows))
        assert got[0] == got[1]
        for (s, toks), token in zip(feeds, got[0], strict=True):
            self.position[s] += len(toks)
            self.last[s] = token
        return got[0]

    def decode(self, slots: list[int], steps: int) -> None:
        for _ in range(steps):
            self.step([(s, [self.last[s]]) for s in slots])

    def assert_same_cache(self) -> None:
        self.ahead.settle()
        a, p = self.ahead.kv, self.plain.kv
        assert torch.equal(a.kpos, p.kpos)
        assert torch.equal(a.k_all, p.k_all) and torch.equal(a.v_all, p.v_all)


def drive(t: Twins) -> None:
    """Steps that the step ahead matches and steps that undo it; asserts equal ids
    throughout and how many steps ran ahead and were undone."""
    for slot, prompt in ((0, [5, 6, 7, 8, 9]), (1, [10, 11, 12]), (2, [13] * 9)):
        t.step([(slot, prompt)])
    t.decode([0, 1, 2], 5)  # each step launches the next; 4 of 5 were asked for as run
    assert (t.launched, t.undone) == (5, 0)
    t.decode([0, 2], 3)  # a session left: the step ahead is undone
    t.step([(0, [(t.last[0] + 1) % t.vocab]), (2, [t.last[2]])])  # not the id it returned
    t.decode([2, 0], 2)  # the same rows in another order
    t.step([(0, [t.last[0]]), (2, [t.last[2]])], temperature=0.8)  # sampled: none ahead
    assert (t.launched, t.undone) == (11, 4)
    t.decode([1], 2)  # slot 1 past its window
    saved = t.ahead.save(1)  # swapped out with a step ahead in flight: undone first
    assert torch.equal(saved.kpos, t.plain.save(1).kpos)
    for runner in (t.ahead, t.plain):
        runner.clear(1)
        runner.load(1, saved)
    t.decode([1], 2)
    t.step([(1, [t.last[1]]), (0, [3, 4, 5])])  # a prefill chunk beside a decode
    t.decode([0, 1, 2], 4)
    assert (t.launched, t.undone) == (19, 6)
    assert min(t.position) > 2 * (2 + 6)  # every ring turned over
    t.assert_same_cache()


def test_stepping_ahead_changes_no_id_and_no_cache_entry(tokenizer: Tokenizer) -> None:
    drive(Twins(tokenizer.vocab_size))


def test_a_step_ahead_left_pending_is_undone_before_the_cache_is_read(tokenizer: Tokenizer) -> None:
    t = Twins(tokenizer.vocab_size)
    t.step([(0, [5, 6, 7])])
    t.decode([0], 3)
    assert t.ahead._ahead is not None
    # Logits of a prefill (as perplexity evaluation asks) see the cache without it.
    items = [StepItem(0, [9, 10], t.position[0], True, all_logits=True)]
    torch.testing.assert_close(t.ahead.logits(items), t.plain.logits(items), rtol=0, atol=0)
    t.position[0] += 2
    t.assert_same_cache()
