"""GPU decode benchmark and device correctness checks of the CUDA runner (one JSON object).

    python3 bench/gpu.py [--out DIR] [--smoke]

1. copy bandwidth: a large device-to-device copy, (bytes read + written) / time;
2. correctness: the CUDA engine (bfloat16, CUDA graphs) against the float32 plain
   StreamingLLM oracle (tests/oracle.py, on the CPU), for one session through several
   window turnovers and a batch of sessions at different positions; the eager bfloat16
   PyTorch runner's error on the same turns is reported beside it as the bfloat16 floor;
   and the runner stepping ahead against one that does not (equal ids and caches);
3. Llama-2-7B shape (random bf16 weights), cache 4+2044, batch 1: decode tok/s, bytes read
   per step (weights + KV read), roofline %, also without programmatic dependent launch
   and without stepping ahead; the StreamingLLM reference method
   (bench/streaming_reference.py, Hugging Face transformers) on the same weights and cache
   contents, with the logits of both compared after one step; and, as a check on the host,
   plain decode through transformers' own forward and DynamicCache (no re-rotation, eager
   and SDPA attention), the issue's orientation figure;
4. Llama-3-8B shape, 64 sessions of 4+2044: aggregate tok/s against its own batch 1.

`--smoke` shrinks every shape and runs on the CPU (Triton interpreter, graphs off, timings
meaningless): a check of the script itself before spending GPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

# The checkout (for `bench.*`) and service/ (for `sinkserve`): GPU hosts run these
# scripts from a copy of the repository, without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sinkserve.config import EngineConfig
from sinkserve.engine.model import Llama
from sinkserve.engine.runner import TorchRunner
from sinkserve.engine.sampler import SampleRow
from sinkserve.engine.scheduler import StepItem
from sinkserve.engine.types import SamplingParams
from sinkserve.engine.weights import ModelConfig

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM  # bench extra: only its type here

    from sinkserve.engine.cuda_runner import CudaGraphRunner
    from tests.engine.helpers import RecordingEngine
    from tests.engine.test_engine_matches_oracle import Conversation


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    theta: float

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            num_layers=self.layers,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.hidden // self.heads,
            rms_eps=1e-5,
            rope_theta=self.theta,
            rope_scaling=None,
            max_position=4096,
            tie_embeddings=False,
            qkv_bias=False,
        )


LLAMA2_7B = Shape("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, 10000.0)
LLAMA3_8B = Shape("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, 500000.0)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_time(fn: Callable[[], object], dev: torch.device, reps: int, warmup: int = 3) -> float:
    """Median seconds of fn() over reps calls (each synchronised; host work included)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_loop_time(
    fn: Callable[[], object], dev: torch.device, reps: int, block: int = 10, warmup: int = 3
) -> float:
    """Median seconds a call of fn() over blocks of `block` consecutive calls, the device
    synchronised once a block: a decode loop's rate, where each call returns its step's ids
    (so waits for them) and may leave the next step running (the runner's step ahead)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(max(1, reps // block)):
        t0 = time.perf_counter()
        for _ in range(block):
            fn()
        sync(dev)
        times.append((time.perf_counter() - t0) / block)
    return statistics.median(times)


def save_result(out_dir: str, prefix: str, device: str, result: dict[str, Any]) -> None:
    """Print `result` and write it to <out_dir>/<prefix>-<device slug>.json."""
    text = json.dumps(result, indent=2)
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"{prefix}-{slug}.json").write_text(text + "\n")
    print(text)


def copy_bandwidth(dev: torch.device, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy of nbytes."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), dev, reps=20)
    return 2 * nbytes / t


# ---- correctness ------------------------------------------------------------------------


def engine_vs_oracle(dev: torch.device) -> dict[str, Any]:
    """Relative logits error ||got - ref|| / ||ref|| per sampled row of the CUDA runner and
    of the eager bfloat16 runner against the float32 oracle. Each runner's greedy turns are
    replayed through the oracle (tests/oracle.py) on the CPU."""
    from sinkserve.engine.cuda_runner import CudaGraphRunner
    from tests.engine.helpers import RecordingEngine, synthetic_tokenizer, tiny_model
    from tests.engine.test_engine_matches_oracle import Conversation, run_until_idle, tokens

    vocab = 512
    tok = synthetic_tokenizer(vocab)
    cfg, tensors = tiny_model(vocab, hidden=256, head_dim=64, seed=5)
    dtype = "bfloat16" if dev.type == "cuda" else "float32"
    out: dict[str, Any] = {
        "model": "random Llama: 2 layers, hidden 256, 4 heads, 2 kv heads, hd 64"
    }
    runners = {"cuda_graph_runner": CudaGraphRunner, "eager_torch": TorchRunner}

    def one_session(rec: RecordingEngine) -> list[Conversation]:
        conv = Conversation(rec, rec.engine.open_session())
        rng = random.Random(1)
        for n_prompt in (70, 9, 1, 40):
            conv.submit(tokens(rng, n_prompt, vocab), max_new=40)
            run_until_idle(rec)
        return [conv]

    def batch(rec: RecordingEngine) -> list[Conversation]:
        rng = random.Random(3)
        convs = [Conversation(rec, rec.engine.open_session()) for _ in range(6)]
        for i, conv in enumerate(convs[:5]):  # different positions: earlier turns
            for _ in range(i % 3):
                conv.submit(tokens(rng, 5 + 13 * i, vocab), max_new=6 + 3 * i)
                run_until_idle(rec)
        for i, conv in enumerate(convs[:5]):
            conv.submit(tokens(rng, 1 + 9 * i, vocab), max_new=30 + 4 * i)
        for _ in range(5):
            rec.engine.step()
        convs[5].submit(tokens(rng, 50, vocab), max_new=25)  # prefills beside decodes
        run_until_idle(rec)
        return convs

    scenarios = {
        "one_session_window_turnovers": (4, 48, 1, one_session),
        "batch_of_sessions_at_different_positions": (4, 32, 6, batch),
    }
    for name, (sinks, window, sessions, drive) in scenarios.items():
        result: dict[str, Any] = {"sinks": sinks, "window": window}
        for label, runner in runners.items():
            rec = RecordingEngine(
                tok, tensors, cfg, runner, sinks=sinks, window=window, max_sessions=sessions,
                step_token_budget=32, device=str(dev), dtype=dtype,
            )  # fmt: skip
            convs = drive(rec)
            errs: list[float] = []
            agree: list[int] = []
            for conv in convs:
                for got, ref in _replay(conv, sinks, window, cfg, tensors):
                    errs.append(((got - ref).norm() / ref.norm()).item())
                    agree.append(int(got.argmax() == ref.argmax()))
            result[label] = {
                "rows": len(errs),
                "rel_err_max": max(errs),
                "rel_err_median": statistics.median(errs),
                "argmax_agreement": sum(agree) / len(agree),
                "final_positions": [rec.engine.get_session(c.sid).position for c in convs],
            }
        out[name] = result
    return out


def _replay(
    conv: Conversation,
    sinks: int,
    window: int,
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(runner logits, oracle logits) for every sampled row of a conversation."""
    from tests.oracle import PlainStreamingLLM

    oracle = PlainStreamingLLM(cfg, tensors, sinks, window)
    pairs = []
    for pending, generated, turn_id in conv.turns:
        rows = conv.rec.logits[turn_id]
        for t in pending:
            expected = oracle.step(t)
        for i, got in enumerate(rows):
            if i:
                expected = oracle.step(generated[i - 1])
            pairs.append((got.float().cpu(), expected))
    return pairs


# ---- decode speed -----------------------------------------------------------------------


def weights_bytes(model: Llama) -> int:
    """Bytes of weights one decode step reads: every layer, the final norm, the head and
    one embedding row per token (counted once)."""
    per_layer = sum(
        t.numel() * t.element_size()
        for layer in model.layers
        for t in vars(layer).values()
        if isinstance(t, torch.Tensor)
    )
    head = model.lm_head.numel() * model.lm_head.element_size()
    return per_layer + head + model.norm.numel() * model.norm.element_size()


def kv_bytes(runner: TorchRunner, rows: int) -> int:
    """Bytes of cache one decode step reads for `rows` full caches: K and V of every
    layer and head, and the positions row per layer."""
    kv = runner.kv
    k = kv.k[0][0]
    return len(kv.k) * rows * (2 * k.numel() * k.element_size() + kv.kpos[0].numel() * 8)


def fill_full_caches(runner: TorchRunner, t0s: list[int], seed: int) -> None:
    """Random K/V in slots 0..len(t0s)-1, each a full cache of a session at position t0."""
    kv = runner.kv
    g = torch.Generator(device=kv.kpos.device).manual_seed(seed)
    for k, v in zip(kv.k, kv.v, strict=True):
        k.normal_(generator=g)
        v.normal_(generator=g)
    s, w = kv.sinks, kv.window
    for slot, t0 in enumerate(t0s):
        pos = torch.cat([torch.arange(s), torch.arange(t0 - w, t0)]).to(kv.kpos.device)
        kv.kpos[slot, kv.cache_index(pos)] = pos


def decode_rate(
    runner: CudaGraphRunner, t0s: list[int], steps: int, dev: torch.device
) -> dict[str, Any]:
    """Greedy decode of len(t0s) sessions through `runner.step` (host work included; a loop
    of steps, see `median_loop_time`), and the same step as a bare graph replay (device
    time only)."""
    greedy = SamplingParams()
    rows = [SampleRow(turn_id=i, params=greedy, rng=None) for i in range(len(t0s))]
    state = {"pos": list(t0s), "tok": [1 + i for i in range(len(t0s))]}

    def one() -> None:
        items = [
            StepItem(slot=i, tokens=[t], start=p, want_logits=True)
            for i, (t, p) in enumerate(zip(state["tok"], state["pos"], strict=True))
        ]
        state["tok"] = runner.step(items, rows)
        state["pos"] = [p + 1 for p in state["pos"]]

    step_s = median_loop_time(one, dev, reps=steps)
    out: dict[str, Any] = {"batch": len(t0s), "step_ms": step_s * 1e3, "tok_s": len(t0s) / step_s}
    bucket = runner._buckets.get(len(t0s)) if hasattr(runner, "_buckets") else None
    if bucket is not None and dev.type == "cuda":
        runner.settle()  # the step launched ahead, undone before replaying by hand
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        bucket.run()
        start.record()
        for _ in range(steps):
            bucket.run()
        end.record()
        torch.cuda.synchronize()
        replay_s = start.elapsed_time(end) / 1e3 / steps
        out |= {"graph_replay_ms": replay_s * 1e3, "graph_replay_tok_s": len(t0s) / replay_s}
    return out


def runner_for(
    model: Llama, sessions: int, window: int, dev: torch.device, **kw: bool
) -> CudaGraphRunner:
    from sinkserve.engine.cuda_runner import CudaGraphRunner

    config = EngineConfig(
        device=str(dev),
        dtype="bfloat16" if model.dtype == torch.bfloat16 else "float32",
        sinks=4,
        window=window,
        max_sessions=sessions,
    )
    return CudaGraphRunner(config, model, sm_count=None if dev.type == "cuda" else 8, **kw)


def hf_llama(shape: Shape, dtype: torch.dtype, dev: torch.device) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            hf = LlamaForCausalLM(hc)
    finally:
        torch.set_default_dtype(before)
    return hf.eval()


def hf_tensors(hf: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The HF model's weights under sinkserve's names (shared, not copied)."""
    m = hf.model
    t = {"embed": m.embed_tokens.weight, "norm": m.norm.weight, "lm_head": hf.lm_head.weight}
    for i, layer in enumerate(m.layers):
        a, f, p = layer.self_attn, layer.mlp, f"layers.{i}."
        t |= {
            p + "attn_norm": layer.input_layernorm.weight,
            p + "ffn_norm": layer.post_attention_layernorm.weight,
            p + "wq": a.q_proj.weight,
            p + "wk": a.k_proj.weight,
            p + "wv": a.v_proj.weight,
            p + "wo": a.o_proj.weight,
            p + "w_gate": f.gate_proj.weight,
            p + "w_up": f.up_proj.weight,
            p + "w_down": f.down_proj.weight,
        }
    return {k: v.detach() for k, v in t.items()}


def llama2_batch1(
    shape: Shape, window: int, steps: int, copy_bw: float, dev: torch.device
) -> dict[str, Any]:
    """Our CUDA runner and the HF StreamingLLM reference, same weights and cache contents
    (the reference's pre-RoPE keys, rotated at their absolute positions for ours)."""
    from bench.streaming_reference import HFStreamingReference, PlainDecode
    from sinkserve.engine.rope import cos_sin
    from tests.engine.test_triton_kernels import rotate

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    hf = hf_llama(shape, dtype, dev)
    model = Llama(shape.model_config(), hf_tensors(hf), dtype, dev)
    runner = runner_for(model, 1, window, dev)
    kv, s, w = runner.kv, 4, window
    t0 = 100_000
    ref = HFStreamingReference(hf, s, w)
    g = torch.Generator(device=dev).manual_seed(1)
    nkv, hd = shape.kv_heads, shape.hidden // shape.heads
    pos = torch.cat([torch.arange(s), torch.arange(t0 - w, t0)]).to(dev)
    index = kv.cache_index(pos)
    cos, sin = cos_sin(pos, model.inv_freq, torch.float32)
    keys, values = [], []
    for layer in range(shape.layers):
        k_pre = torch.randn(1, nkv, s + w, hd, generator=g, device=dev)
        v = torch.randn(1, nkv, s + w, hd, generator=g, device=dev).to(dtype)
        keys.append(k_pre.to(dtype))
        values.append(v)
        rotated = rotate(k_pre[0].transpose(0, 1), cos, sin).transpose(0, 1)
        kv.k[layer][0][:, index] = rotated.to(dtype)
        kv.v[layer][0][:, index] = v[0]
    kv.kpos[0, index] = pos
    ref.set_cache(keys, values)

    # The orientation figure first (before the reference patches the attention):
    # plain decode through transformers' own forward and cache, no re-rotation.
    plain = PlainDecode(hf, keys, values, token=17)
    reps = max(5, steps // 3)
    plain_tok_s = {}
    for attn in ("eager", "sdpa"):
        hf.set_attn_implementation(attn)  # once, outside the timed steps
        plain_tok_s[attn] = 1 / median_time(plain.step, dev, reps=reps, warmup=2)
    del plain

    # One step from the same state: the two methods' logits.
    seen: list[torch.Tensor] = []
    runner.logits_hook = lambda _rows, lg: seen.append(lg[0].float().clone())
    greedy = [SampleRow(turn_id=0, params=SamplingParams(), rng=None)]
    runner.step([StepItem(slot=0, tokens=[17], start=t0, want_logits=True)], greedy)
    runner.logits_hook = None
    lean = HFStreamingReference(hf, s, w)
    lean.set_cache(keys, values)
    want, want_lean = ref.step(17), lean.lean_step(17)
    agreement = {
        "rel_err_vs_reference": ((seen[0] - want).norm() / want.norm()).item(),
        "same_argmax": bool(seen[0].argmax() == want.argmax()),
        "rel_err_lean_vs_reference": ((want_lean - want).norm() / want.norm()).item(),
    }

    ours = decode_rate(runner, [t0 + 1], steps, dev)
    # The same step without programmatic dependent launch, same cache contents.
    no_pdl = runner_for(model, 1, window, dev, pdl=False)
    caches = [*kv.k, *kv.v, kv.kpos]
    for dst, src in zip([*no_pdl.kv.k, *no_pdl.kv.v, no_pdl.kv.kpos], caches, strict=True):
        dst.copy_(src)
    ours["pdl"] = runner.pdl
    ours["without_pdl"] = decode_rate(no_pdl, [t0 + 1], steps, dev)
    del no_pdl
    # And without stepping ahead (the host's turnaround between steps then idles the GPU).
    behind = runner_for(model, 1, window, dev, ahead=False)
    for dst, src in zip([*behind.kv.k, *behind.kv.v, behind.kv.kpos], caches, strict=True):
        dst.copy_(src)
    ours["ahead"] = runner.ahead
    ours["without_ahead"] = decode_rate(behind, [t0 + 1], steps, dev)
    del behind
    state = {"tok": 17}

    def ref_step() -> None:
        state["tok"] = int(ref.step(state["tok"]).argmax())

    def lean_step() -> None:
        state["tok"] = int(lean.lean_step(state["tok"]).argmax())

    ref_s = median_time(ref_step, dev, reps=reps, warmup=2)
    lean_s = median_time(lean_step, dev, reps=reps, warmup=2)
    nbytes = weights_bytes(model) + kv_bytes(runner, 1)
    roof_s = nbytes / copy_bw
    del runner, model, hf, keys, values
    return {
        "shape": shape.name,
        "cache": f"4+{window}",
        "batch": 1,
        **ours,
        "bytes_per_step": nbytes,
        "roofline_step_ms": roof_s * 1e3,
        "roofline_tok_s": 1 / roof_s,
        "roofline_pct": 100 * roof_s / (ours["step_ms"] / 1e3),
        "roofline_pct_graph_replay": 100 * roof_s / (ours.get("graph_replay_ms", 1e9) / 1e3),
        "reference_hf_streamingllm_tok_s": 1 / ref_s,
        "speedup_vs_reference": ours["tok_s"] * ref_s,
        "reference_lean_loop_tok_s": 1 / lean_s,
        "speedup_vs_reference_lean_loop": ours["tok_s"] * lean_s,
        "one_step_vs_reference": agreement,
        "hf_plain_decode_no_rerotation_tok_s": plain_tok_s,
    }


def random_llama(shape: Shape, dtype: torch.dtype, dev: torch.device, seed: int = 2) -> Llama:
    """The shape with random weights (norms 1, the rest N(0, 0.02)), built on `dev`."""
    g = torch.Generator(device=dev).manual_seed(seed)
    cfg = shape.model_config()
    tensors = {
        name: (
            torch.ones(shp, dtype=dtype, device=dev)
            if len(shp) == 1
            else (torch.randn(shp, generator=g, device=dev, dtype=dtype) * 0.02)
        )
        for name, shp in cfg.expected_shapes().items()
    }
    return Llama(cfg, tensors, dtype, dev)


def llama3_batched(
    shape: Shape, window: int, sessions: int, steps: int, copy_bw: float, dev: torch.device
) -> dict[str, Any]:
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = random_llama(shape, dtype, dev)
    runner = runner_for(model, sessions, window, dev)
    t0s = [100_000 + 37 * i for i in range(sessions)]
    fill_full_caches(runner, t0s, seed=3)
    one = decode_rate(runner, t0s[:1], steps, dev)
    many = decode_rate(runner, t0s, steps, dev)
    wb = weights_bytes(model)
    result: dict[str, Any] = {
        "shape": shape.name,
        "cache": f"4+{window}",
        "batch_1": one,
        "batched": many,
    }
    for key, rows in (("batch_1", 1), ("batched", sessions)):
        nbytes = wb + kv_bytes(runner, rows)
        result[key] |= {
            "bytes_per_step": nbytes,
            "roofline_pct": 100 * nbytes / copy_bw / (result[key]["step_ms"] / 1e3),
        }
    result["aggregate_over_batch_1"] = many["tok_s"] / one["tok_s"]
    del runner, model
    return result


def step_ahead(dev: torch.device) -> dict[str, Any]:
    """The CUDA runner stepping ahead against one that does not, CUDA graphs on: the
    script of tests/engine/test_cuda_runner_ahead.py (equal ids and caches asserted)."""
    from tests.engine.test_cuda_runner_ahead import Twins, drive

    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    t = Twins(512, device=str(dev), dtype=dtype, graphs=cuda, hidden=256, head_dim=64)
    drive(t)
    return {"same_ids_and_cache": True, "launched_ahead": t.launched, "undone": t.undone}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--skip", default="", help="comma list: correctness,ahead,llama2,llama3")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        dev = torch.device("cpu")
        l2 = Shape("smoke-llama-2", 2, 128, 4, 4, 256, 1000, 10000.0)
        l3 = Shape("smoke-llama-3", 2, 128, 4, 2, 256, 1000, 500000.0)
        window, sessions, steps, copy_n = 60, 4, 3, 1 << 20
        name = "cpu-smoke"
    else:
        dev = torch.device("cuda")
        l2, l3, window, sessions, steps, copy_n = LLAMA2_7B, LLAMA3_8B, 2044, 64, 100, 1 << 32
        name = torch.cuda.get_device_name(dev)
    result: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "command": "python3 bench/gpu.py"
        + (" --smoke" if args.smoke else "")
        + (f" --skip {args.skip}" if args.skip else ""),
    }
    try:
        import triton

        result["triton"] = triton.__version__
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        pass
    bw = copy_bandwidth(dev, copy_n)
    result["copy_bandwidth_GBps"] = bw / 1e9
    sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("correctness", lambda: engine_vs_oracle(dev)),
        ("ahead_vs_plain", lambda: step_ahead(dev)),
        ("llama2_7b_batch1", lambda: llama2_batch1(l2, window, steps, bw, dev)),
        ("llama3_8b_batched", lambda: llama3_batched(l3, window, sessions, steps, bw, dev)),
    ]
    for key, run in sections:
        if key.split("_")[0] in skip:
            continue
        t = time.perf_counter()
        try:
            result[key] = run()
        except Exception as exc:  # report and go on: one device call must bring back all
            result[key] = {"error": f"{type(exc).__name__}: {exc}"}
            import traceback

            traceback.print_exc()
        result[key]["section_s"] = round(time.perf_counter() - t, 1)
        if dev.type == "cuda":
            result[key]["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(json.dumps({key: result[key]}), flush=True)
    save_result(args.out, "gpu", name, result)


if __name__ == "__main__":
    main()
