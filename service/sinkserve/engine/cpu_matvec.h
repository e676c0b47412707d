// Matrix-vector products for steps of a few rows (CPU, bfloat16 activations) that stream
// 4-bit and 8-bit weights at close to the memory's rate. See cpu_matvec.cpp for the
// layouts (quant.py packs them) and the arithmetic.
#pragma once

#include <torch/extension.h>

namespace sinkserve {

// Rows a call takes: from this many on, a step is bound by arithmetic, not by weights.
constexpr int64_t kMatvecRows = 8;

// Whether this build has the kernels (AVX-512 BF16); without, callers keep ATen's.
bool matvec_supported();

// x: bfloat16 [M, K], 1 <= M < kMatvecRows; packed: uint8 [N / 16, K / 32, 320] (codes,
// scales, zeros of quant.Int4Weight). Returns bfloat16 [M, N] = x @ w.T.
at::Tensor int4_matvec(const at::Tensor& x, const at::Tensor& packed);

// x: bfloat16 [M, K]; packed: uint8 [N / 16, K / 16, 256] (codes + 128 of
// quant.Int8Weight); scales: bfloat16 [N]. Returns bfloat16 [M, N] = x @ w.T.
at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales);

}  // namespace sinkserve
