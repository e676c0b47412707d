"""Small random-weight Llama models and an engine wired to record its logits."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Protocol

import tokenizers
import torch

from sinkserve.config import EngineConfig
from sinkserve.engine.engine import Engine
from sinkserve.engine.model import Llama
from sinkserve.engine.runner import TorchRunner, torch_dtype
from sinkserve.engine.sampler import SampleRow
from sinkserve.engine.store import SessionStore
from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.engine.weights import ModelConfig

TinyModel = tuple[ModelConfig, dict[str, torch.Tensor]]  # its config and weights


class MakeEngine(Protocol):
    """A fixture that builds started engines over a tiny model: `make(**EngineConfig)`."""

    def __call__(self, **config: object) -> Engine: ...


def tiny_model(
    vocab: int,
    *,
    seed: int = 0,
    qkv_bias: bool = True,
    hidden: int = 32,
    head_dim: int = 8,
    layers: int = 2,
) -> TinyModel:
    """A GQA Llama (4 query heads, 2 KV heads; 2 layers by default) with random weights.
    Weight scales shrink with sqrt(hidden) so activations keep the default model's size."""
    g = torch.Generator().manual_seed(seed)
    width = (32 / hidden) ** 0.5

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale * (width if len(shape) == 2 else 1)

    h, inter, hd, nh, nkv = hidden, 2 * hidden, head_dim, 4, 2
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=nh,
        num_kv_heads=nkv,
        head_dim=hd,
        rms_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position=64,
        tie_embeddings=False,
        qkv_bias=qkv_bias,
    )
    t = {"embed": rnd(vocab, h, scale=1.0), "norm": 1 + rnd(h, scale=0.1)}
    t["lm_head"] = rnd(vocab, h, scale=0.3)
    for i in range(layers):
        p = f"layers.{i}."
        t |= {
            p + "attn_norm": 1 + rnd(h, scale=0.1),
            p + "ffn_norm": 1 + rnd(h, scale=0.1),
            p + "wq": rnd(nh * hd, h, scale=0.4),
            p + "wk": rnd(nkv * hd, h, scale=0.4),
            p + "wv": rnd(nkv * hd, h, scale=0.3),
            p + "wo": rnd(h, nh * hd, scale=0.2),
            p + "w_gate": rnd(inter, h, scale=0.2),
            p + "w_up": rnd(inter, h, scale=0.2),
            p + "w_down": rnd(h, inter, scale=0.2),
        }
        if qkv_bias:
            t |= {p + "bq": rnd(nh * hd, scale=0.1), p + "bk": rnd(nkv * hd, scale=0.1)}
            t[p + "bv"] = rnd(nkv * hd, scale=0.1)
    return cfg, t


def synthetic_tokenizer(vocab: int) -> Tokenizer:
    """A word-level tokenizer of `vocab` ids ("t0 ", "t1 ", ...) with a minimal chat
    template: for machines without the default model's GGUF (the GPU bench)."""
    words = {f"t{i}": i for i in range(vocab)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="t0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    template = (
        "{% for m in messages %}t1 {{ m.content }} t2 {% endfor %}"
        "{% if add_generation_prompt %}t1 {% endif %}"
    )
    return Tokenizer(
        backend,
        token_bytes=[f"t{i} ".encode() for i in range(vocab)],
        bos_token=None,
        eos_token=None,
        chat_template=template,
    )


class RecordingEngine:
    """An engine over a tiny model whose sampled logits are kept per turn id."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        tensors: dict[str, torch.Tensor],
        cfg: ModelConfig,
        runner: Callable[[EngineConfig, Llama], TorchRunner] = TorchRunner,
        store: SessionStore | None = None,
        **config: object,
    ) -> None:
        # The oracle tests prefill prompts longer than their small windows, to check the
        # eviction inside one prefill: no prompt limit unless a test asks for one.
        config.setdefault("max_prompt_tokens", 1 << 20)
        # The tests compare the engine with an oracle and replies with each other: greedy.
        config.setdefault("sampling", "greedy")
        self.config = EngineConfig(**config)  # type: ignore[arg-type]
        c = self.config
        model = Llama(cfg, tensors, torch_dtype(c.dtype), torch.device(c.device), quant=c.quant)
        self.runner = runner(self.config, model)
        self.logits: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.runner.logits_hook = self._record
        self.engine = Engine(self.config, self.runner, tokenizer, store)

    def _record(self, rows: Sequence[SampleRow], logits: torch.Tensor) -> None:
        for row, values in zip(rows, logits, strict=True):
            self.logits[row.turn_id].append(values.clone())
