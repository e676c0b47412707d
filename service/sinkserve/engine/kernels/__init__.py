"""Triton-language GPU kernels of the CUDA runner (the kernel language, not the Triton
Inference Server, whose adapter is `sinkserve.triton_server`)."""
