from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from gguf.quants import dequantize
from safetensors.torch import save_file

from sinkserve.engine.gguf_file import open_gguf
from sinkserve.engine.rope import RopeScaling
from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.engine.weights import (
    ModelConfig,
    Weights,
    default_model_path,
    gguf_sampling,
    hf_sampling,
    load_checkpoint,
    unpermute_gguf_qk,
)

TINY: dict[str, Any] = {  # a config.json: ints, and two floats
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 5000.0,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
HEAD_DIM = 8


def hf_tensors(*, qkv_bias: bool, tied: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors named as in a Hugging Face Llama/Qwen2 checkpoint."""
    g = torch.Generator().manual_seed(seed)
    h, ff, v = TINY["hidden_size"], TINY["intermediate_size"], TINY["vocab_size"]
    q, kv = TINY["num_attention_heads"] * HEAD_DIM, TINY["num_key_value_heads"] * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
    }
    if not tied:
        shapes["lm_head.weight"] = (v, h)
    for i in range(TINY["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (ff, h),
            p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
        }
        if qkv_bias:
            shapes |= {
                p + f"self_attn.{x}_proj.bias": (n,) for x, n in (("q", q), ("k", kv), ("v", kv))
            }
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


# The sampling both test checkpoints recommend (GGUF metadata, generation_config.json).
RECOMMENDED: dict[str, Any] = {"temperature": 0.6, "top_k": 20}  # generation_config.json


def write_hf_dir(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, object]) -> Path:
    """A sharded HF checkpoint: two safetensors files and their index."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"do_sample": True, **RECOMMENDED}))
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, shard in shards.items():
        save_file({n: tensors[n].to(torch.bfloat16).float() for n in shard}, path / file)
    weight_map = {n: file for file, shard in shards.items() for n in shard}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def converter_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf does to Q/K rows: rotate-half -> interleaved pairs."""
    rest = w.shape[1:]
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], arch: str) -> Path:
    """The GGUF file llama.cpp's converter would make of `tensors` (F32, Q/K permuted for llama)."""
    w = GGUFWriter(path, arch)
    w.add_block_count(TINY["num_hidden_layers"])
    w.add_context_length(TINY["max_position_embeddings"])
    w.add_embedding_length(TINY["hidden_size"])
    w.add_feed_forward_length(TINY["intermediate_size"])
    w.add_head_count(TINY["num_attention_heads"])
    w.add_head_count_kv(TINY["num_key_value_heads"])
    w.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    w.add_rope_freq_base(TINY["rope_theta"])
    w.add_bos_token_id(TINY["bos_token_id"])
    w.add_eos_token_id(TINY["eos_token_id"])
    w.add_sampling_temp(RECOMMENDED["temperature"])
    w.add_sampling_top_k(RECOMMENDED["top_k"])
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
    }
    layer |= {f"self_attn.{x}_proj.{k}": f"attn_{x}.{k}" for x in "qkv" for k in ("weight", "bias")}
    for name, tensor in tensors.items():
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{i}.{layer[rest]}"
        else:
            gguf_name = names[name]
        t = tensor.to(torch.bfloat16).float()
        if arch == "llama" and ".q_proj." in name:
            t = converter_permute(t, TINY["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            t = converter_permute(t, TINY["num_key_value_heads"])
        w.add_tensor(gguf_name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    ("model_type", "qkv_bias", "tied"), [("llama", False, False), ("qwen2", True, True)]
)
def test_hf_dir_and_gguf_of_the_same_weights_load_to_the_same_tensors(
    tmp_path: Path, model_type: str, qkv_bias: bool, tied: bool
) -> None:
    tensors = hf_tensors(qkv_bias=qkv_bias, tied=tied)
    config = TINY | {"model_type": model_type, "tie_word_embeddings": tied}
    hf_config, hf = load_checkpoint(write_hf_dir(tmp_path / "hf", tensors, config))
    gguf_config, gg = load_checkpoint(write_gguf(tmp_path / "m.gguf", tensors, model_type))

    assert hf_config == gguf_config
    assert hf_config.sampling == tuple(RECOMMENDED.items())  # read with the weights
    assert hf_config.qkv_bias is qkv_bias and hf_config.tie_embeddings is tied
    assert hf_config.head_dim == HEAD_DIM
    assert hf.keys() == gg.keys() == hf_config.expected_shapes().keys()
    for name in hf:
        assert torch.equal(hf[name], gg[name]), name
    assert torch.equal(
        hf["layers.1.wq"], tensors["model.layers.1.self_attn.q_proj.weight"].bfloat16().float()
    )


def test_hf_config_reads_llama3_rope_scaling_and_head_dim(tmp_path: Path) -> None:
    config = TINY | {
        "model_type": "llama",
        "head_dim": HEAD_DIM,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    }
    path = write_hf_dir(tmp_path / "hf", hf_tensors(qkv_bias=False, tied=True), config)
    loaded, _ = load_checkpoint(path)
    assert loaded.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 128)
    assert loaded.tie_embeddings


def test_a_checkpoint_missing_a_tensor_is_rejected_by_name(tmp_path: Path) -> None:
    tensors = hf_tensors(qkv_bias=False, tied=False)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    path = write_hf_dir(tmp_path / "hf", tensors, TINY | {"model_type": "llama"})
    with pytest.raises(ValueError, match=r"layers\.1\.w_up"):
        load_checkpoint(path)


def test_an_unknown_tensor_name_is_rejected(tmp_path: Path) -> None:
    tensors = hf_tensors(qkv_bias=False, tied=False)
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(TINY["hidden_size"])
    path = write_hf_dir(tmp_path / "hf", tensors, TINY | {"model_type": "llama"})
    with pytest.raises(ValueError, match=r"o_proj\.bias"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def smollm2() -> tuple[ModelConfig, Weights]:
    return load_checkpoint(default_model_path())


def test_the_default_smollm2_gguf_loads_with_its_known_config(
    smollm2: tuple[ModelConfig, Weights],
) -> None:
    config, weights = smollm2
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.rope_theta == 100000.0 and config.rope_scaling is None
    assert config.max_position == 8192 and config.vocab_size == 49152
    assert config.tie_embeddings and "lm_head" not in weights and not config.qkv_bias
    assert config.sampling == ()  # it recommends no sampling: the chat default applies
    tokenizer = Tokenizer.load(default_model_path())  # the one reader of BOS and EOS ids
    assert tokenizer.bos_id == 1 and 2 in tokenizer.eos_ids
    assert weights["layers.29.wk"].shape == (192, 576)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float, *, interleaved: bool) -> torch.Tensor:
    """Rotates [T, n, hd] by position: pairs (2j, 2j+1) if interleaved else (j, j+hd/2)."""
    hd = x.shape[-1]
    freq = theta ** (-torch.arange(0, hd // 2, dtype=torch.float64) * 2 / hd)
    angle = pos.double()[:, None, None] * freq  # [T, 1, hd/2]
    cos, sin = angle.cos(), angle.sin()
    if interleaved:
        a, b = x[..., 0::2].double(), x[..., 1::2].double()
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    a, b = x[..., : hd // 2].double(), x[..., hd // 2 :].double()
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def scores(
    wq: torch.Tensor, wk: torch.Tensor, x: torch.Tensor, *, interleaved: bool
) -> torch.Tensor:
    """q·k of every head (GQA-mapped) for hidden states `x` at positions 0, 37, 74, ..."""
    n_head, n_kv, hd = 9, 3, 64
    pos = torch.arange(x.shape[0]) * 37
    q = rope((x @ wq.T).view(-1, n_head, hd), pos, 100000.0, interleaved=interleaved)
    k = rope((x @ wk.T).view(-1, n_kv, hd), pos, 100000.0, interleaved=interleaved)
    k = k.repeat_interleave(n_head // n_kv, dim=1)
    return torch.einsum("thd,shd->hts", q, k)


def test_unpermuted_weights_with_rotate_half_rope_score_like_raw_gguf_with_interleaved_rope(
    smollm2: tuple[ModelConfig, Weights],
) -> None:
    _, weights = smollm2
    tensors = {t.name: t for t in open_gguf(default_model_path()).tensors}

    def raw(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(dequantize(tensors[name].data, tensors[name].tensor_type)))

    x = torch.randn(12, 576, generator=torch.Generator().manual_seed(0))
    for layer in (0, 17):
        raw_scores = scores(
            raw(f"blk.{layer}.attn_q.weight"),
            raw(f"blk.{layer}.attn_k.weight"),
            x,
            interleaved=True,
        )
        hf_scores = scores(
            weights[f"layers.{layer}.wq"], weights[f"layers.{layer}.wk"], x, interleaved=False
        )
        torch.testing.assert_close(hf_scores, raw_scores, rtol=1e-9, atol=1e-6)
        # the same weights under the other RoPE convention score differently
        wrong = scores(
            weights[f"layers.{layer}.wq"], weights[f"layers.{layer}.wk"], x, interleaved=True
        )
        assert not torch.allclose(wrong, raw_scores, rtol=1e-3, atol=1e-3)


def test_unpermuting_puts_rows_of_equal_rope_frequency_half_a_head_apart(
    smollm2: tuple[ModelConfig, Weights],
) -> None:
    """Evidence from the trained weights themselves that the file was permuted: rows that
    share a RoPE frequency have correlated norms. After unpermuting they sit at j and j+32
    (rotate-half); undoing a permutation that was never applied would not pair them."""
    _, weights = smollm2

    def half_pair_corr(w: torch.Tensor, n_head: int) -> float:
        norms = w.view(n_head, 64, -1).norm(dim=-1)
        return torch.corrcoef(torch.stack([norms[:, :32].flatten(), norms[:, 32:].flatten()]))[
            0, 1
        ].item()

    unpermuted = [half_pair_corr(weights[f"layers.{i}.wq"], 9) for i in range(30)]
    as_stored = [
        half_pair_corr(converter_permute(weights[f"layers.{i}.wq"], 9), 9) for i in range(30)
    ]
    assert np.mean(unpermuted) > 0.5
    assert np.mean(unpermuted) > np.mean(as_stored) + 0.3


def test_unpermute_inverts_the_converter_permutation_for_weights_and_biases() -> None:
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).view(32, 3)
    assert torch.equal(unpermute_gguf_qk(converter_permute(w, 4), 4), w)
    b = torch.arange(32, dtype=torch.float32)
    assert torch.equal(unpermute_gguf_qk(converter_permute(b, 2), 2), b)
    # head 0 of the stored layout starts with the pair (row 0, row hd/2) of HF layout
    assert converter_permute(b, 2)[:4].tolist() == [0.0, 8.0, 1.0, 9.0]


def test_a_gguf_recommends_the_sampling_its_metadata_sets_and_no_more(tmp_path: Path) -> None:
    w = GGUFWriter(tmp_path / "m.gguf", "llama")
    w.add_sampling_temp(0.6)
    w.add_sampling_top_k(20)
    w.add_sampling_penalty_repeat(1.1)
    w.add_sampling_min_p(0.05)  # not a field of ours: left out
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # float32 metadata comes back as the decimal it was written as, not 0.6000000238.
    assert gguf_sampling(open_gguf(tmp_path / "m.gguf")) == {
        "temperature": 0.6,
        "top_k": 20,
        "repetition_penalty": 1.1,
    }


def test_an_hf_dir_without_sampling_recommends_nothing(tmp_path: Path) -> None:
    path = tmp_path / "hf"
    path.mkdir()
    assert hf_sampling(path) == {}
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert hf_sampling(path) == {}


def test_generation_config_recommends_its_sampling_and_do_sample_false_means_greedy(
    tmp_path: Path,
) -> None:
    path = tmp_path / "hf"
    path.mkdir()
    sampled = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    generation = {"do_sample": True, "eos_token_id": [2, 5], "max_new_tokens": 512, **sampled}
    (path / "generation_config.json").write_text(json.dumps(generation))
    assert hf_sampling(path) == sampled
    (path / "generation_config.json").write_text(json.dumps(generation | {"do_sample": False}))
    assert hf_sampling(path) == sampled | {"temperature": 0.0}
    # transformers' greedy applies no penalty the file does not ask for.
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert hf_sampling(path) == {"temperature": 0.0, "repetition_penalty": 1.0}
