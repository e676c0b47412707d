"""Build a runner and tokenizer from an `EngineConfig` (the model checkpoint it names)."""

from __future__ import annotations

from pathlib import Path

import torch

from sinkserve.config import EngineConfig
from sinkserve.engine.model import Llama
from sinkserve.engine.runner import TorchRunner, torch_dtype
from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.engine.weights import default_model_path, load_checkpoint


def model_path(config: EngineConfig) -> Path:
    return Path(config.model) if config.model else default_model_path()


def load_model(config: EngineConfig) -> tuple[Llama, Tokenizer]:
    """Weights (dequantized, with a progress bar) and tokenizer of the configured model.
    Runs on the calling thread's intra-op threads (see `Engine.load`)."""
    path = model_path(config)
    model_config, tensors = load_checkpoint(path)
    model = Llama(
        model_config,
        tensors,
        torch_dtype(config.dtype),
        torch.device(config.device),
        quant=config.quant,
    )
    return model, Tokenizer.load(path)


def build_runner(config: EngineConfig) -> tuple[TorchRunner, Tokenizer]:
    """CUDA devices get the CUDA-graph runner (Triton kernels, imported only then)."""
    model, tokenizer = load_model(config)
    if config.device.startswith("cuda"):
        from sinkserve.engine.cuda_runner import CudaGraphRunner

        return CudaGraphRunner(config, model), tokenizer
    return TorchRunner(config, model), tokenizer
