"""Streaming perplexity through the serving cache code (`sinkserve eval-ppl`).

The text is fed to one KV slot exactly as a session's turns are: `chunk` tokens per step
(1 = one token at a time, as in decode). A chunk's per-token logits equal those of feeding
its tokens one by one (each query sees its own sinks + window; tests prove it), so larger
chunks only make long evaluations affordable on a CPU.

`rebuild_every` measures what a session rebuilt from its token ids (a new process, no KV:
`Engine.import_sessions`) loses: the cache is recomputed from the ids it holds, so once
tokens were evicted the window's keys see less context than they first had.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sinkserve.engine.runner import TorchRunner
from sinkserve.engine.scheduler import StepItem
from sinkserve.procstat import rss_mb

MODES = ("sinks", "window", "dense")


def cache_shape(mode: str, sinks: int, window: int, tokens: int) -> tuple[int, int]:
    """(sinks, window) a mode uses: `window` is S=0 with the same total cache, `dense`
    keeps every token."""
    if mode == "sinks":
        return sinks, window
    if mode == "window":
        return 0, sinks + window
    if mode == "dense":
        return 0, tokens
    raise ValueError(f"mode must be one of {', '.join(MODES)}")


def read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


@dataclass
class PplResult:
    nll: torch.Tensor  # float64 [N]: -log p(token[i + 1] | tokens[: i + 1])
    rss_mb: list[float]  # resident memory after each 1,000 tokens

    def ppl(self, start: int = 0, end: int | None = None) -> float:
        return math.exp(self.nll[start:end].mean().item())

    def ppl_by_1k(self) -> list[float]:
        return [self.ppl(i, i + 1000) for i in range(0, len(self.nll), 1000)]


def streaming_nll(
    runner: TorchRunner,
    tokens: list[int],
    *,
    chunk: int = 1,
    rebuild_every: int = 0,
    on_progress: Callable[[int], object] = lambda n: None,
) -> PplResult:
    """Feed tokens[:-1] through slot 0 and score each next token.

    `rebuild_every` > 0: after every that many tokens fed, slot 0 is refilled from the ids
    it holds (`rebuild`), as a session imported without its KV is; 0 = never."""
    runner.clear(0)
    inputs = torch.tensor(tokens, dtype=torch.long, device=runner.model.device)
    n = len(tokens) - 1
    nll = torch.empty(n, dtype=torch.float64)
    rss: list[float] = []
    start = 0
    while start < n:
        end = min(start + chunk, n)
        if rebuild_every:  # a piece never crosses a rebuild point
            end = min(end, (start // rebuild_every + 1) * rebuild_every)
        piece = tokens[start:end]
        logits = runner.logits([StepItem(0, piece, start, True, all_logits=True)])
        logp = torch.log_softmax(logits.double(), dim=-1)  # on the model's device
        nll[start:end] = -logp.gather(1, inputs[start + 1 : end + 1, None]).squeeze(1).cpu()
        if end // 1000 > len(rss):
            rss.append(rss_mb())
        on_progress(len(piece))
        if rebuild_every and end % rebuild_every == 0 and end < n:
            rebuild(runner, tokens[:end], chunk)
        start = end
    return PplResult(nll=nll, rss_mb=rss)


def rebuild(runner: TorchRunner, fed: list[int], chunk: int) -> None:
    """Clear slot 0 and prefill, `chunk` tokens a step, the ids its cache holds after
    `fed`: the sinks at positions 0.., then the window (the last `window` ids after the
    sinks) at its absolute start, as the scheduler feeds `Session.rebuild`. Every key gets
    back its position; what changes is that window keys are recomputed attending only the
    sinks and the window ids before them, not the evicted ids they saw the first time."""
    sinks, window = runner.kv.sinks, runner.kv.window
    start = max(sinks, len(fed) - window)
    runner.clear(0)
    for first, ids in ((0, fed[:sinks]), (start, fed[start:])):
        for i in range(0, len(ids), chunk):
            runner.logits([StepItem(0, ids[i : i + chunk], first + i, False)])


def plot_running_ppl(curves: dict[str, list[float]], path: Path, title: str) -> None:
    """One line per mode: perplexity of each successive 1,000-token block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, values in curves.items():
        ax.plot([1000 * (i + 1) for i in range(len(values))], values, marker=".", label=label)
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("perplexity of the last 1,000 tokens")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
