// Matrix-vector products of 1 to 7 bfloat16 rows with 4-bit and 8-bit weights, on
// AVX-512 BF16. A decode step of a few sessions reads every weight once and does two
// multiply-adds with it per row: the rate at which weights stream in is the rate of the
// step, so the weights are laid out to be read front to back, 16 output rows at a time,
// and turned into bfloat16 with three integer instructions a 32-byte chunk.
//
// The trick: the bfloat16 with bits 0x4300 | c is exactly 128 + c for c < 16, so masking a
// nibble and or-ing 0x4300 makes a bfloat16 operand for VDPBF16PS, which multiplies 16
// lanes of pairs (one lane an output row, one pair two adjacent columns) with a pair of x
// broadcast to every lane, accumulating in float32 (bfloat16 products are exact there).
// The 128 a code carries is taken off with the sums of x:
// - int4 (quant.Int4Weight: w = (q - 8) * s + z per group of 32 columns):
//   sum_k w x = s * (acc - 128 X) + (z - 8 s) X = s * acc + (z - 136 s) X, X = sum_k x.
// - int8 (quant.Int8Weight: w = c * s, c in [-127, 127]): u = c + 128 = lo + 16 hi,
//   lo against x and hi against 16 x (exact in bfloat16), so
//   acc = sum u x + (128 + 16 * 128) X and sum_k w x = s * (acc - 2304 X).
// Results agree with ATen's int4/int8 kernels to float32 rounding before the bfloat16
// rounding of the output (tests/engine/test_cpu_matvec.py).
//
// Layouts, per block of 16 output rows (quant.pack_rows_int4 / pack_rows_int8 make them):
// - int4 [N/16, K/32, 320]: per group of 32 columns, 8 chunks of 32 bytes, then 16
//   bfloat16 scales and 16 bfloat16 zeros. Chunk c, byte j: output row j / 2, column
//   2c + j % 2 (low nibble) and 2(c + 8) + j % 2 (high nibble) of the group.
// - int8 [N/16, K/16, 256]: per 16 columns, 8 chunks of 32 bytes; chunk c, byte j: output
//   row j / 2, column 2c + j % 2, as c + 128.
#include "cpu_matvec.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace sinkserve {

#if defined(__AVX512BF16__)

namespace {

constexpr int64_t kInt4Group = 32;
constexpr int64_t kInt4GroupBytes = 320;
constexpr int64_t kInt8ChunkBytes = 256;  // 16 rows x 16 columns
constexpr int64_t kBlocksPerTask = 4;

// acc += w . (the pair at p, in every lane). Written out so that the broadcast rides in
// the instruction's memory operand ({1to16}): the compiler otherwise spends a separate
// broadcast on it, one of the few instructions a chunk has.
inline __m512 dot_pair(__m512 acc, __m512i w, const uint32_t* p) {
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*p));
  return acc;
}

inline __m512 load_bf16(const uint8_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store_bf16(c10::BFloat16* out, __m512 v) {
  const __m256bh h = _mm512_cvtneps_pbh(v);
  std::memcpy(out, &h, sizeof(h));
}

// The two bfloat16 operands (128 + nibble) of a 32-byte chunk: low nibbles, high nibbles.
struct Nibbles {
  __m512i lo, hi;
};

inline Nibbles nibbles(const uint8_t* chunk) {
  const __m512i low4 = _mm512_set1_epi16(0x000F);
  const __m512i bias = _mm512_set1_epi16(0x4300);
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk)));
  return {_mm512_ternarylogic_epi32(w, low4, bias, 0xEA),  // (w & low4) | bias
          _mm512_or_si512(_mm512_srli_epi16(w, 4), bias)};
}

// Independent sums a row keeps: VDPBF16PS takes several cycles before its result can be
// added to, so one chain of sums per row would leave the units idle.
template <int M>
constexpr int kChains = M <= 2 ? 4 : 2;

template <int M>
inline void zero(__m512 (&acc)[M][kChains<M>]) {
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < kChains<M>; ++a) acc[m][a] = _mm512_setzero_ps();
}

template <int M>
inline __m512 total(const __m512 (&acc)[M][kChains<M>], int m) {
  __m512 t = acc[m][0];
  for (int a = 1; a < kChains<M>; ++a) t = _mm512_add_ps(t, acc[m][a]);
  return t;
}

// The 8 chunks from `p` against M rows of pairs: chunk c's low nibbles with pair lo(c),
// its high nibbles with pair hi(c), of row m at `xp + m * half_k`.
template <int M, typename Lo, typename Hi>
inline void chunks8(__m512 (&acc)[M][kChains<M>], const uint8_t* p, const uint32_t* xlo,
                    const uint32_t* xhi, int64_t half_k, Lo lo, Hi hi) {
  for (int c = 0; c < 8; ++c) {
    const Nibbles w = nibbles(p + 32 * c);
    const int a = (2 * c) % kChains<M>;
    for (int m = 0; m < M; ++m) {
      acc[m][a] = dot_pair(acc[m][a], w.lo, xlo + m * half_k + lo(c));
      acc[m][a + 1] = dot_pair(acc[m][a + 1], w.hi, xhi + m * half_k + hi(c));
    }
  }
}

// 16 output rows of M x rows: `blk` the block's groups, `xp` x as bfloat16 pairs [M][K/2],
// `xsum` [M][groups] the groups' sums of x; writes y[m * n + 0..15].
template <int M>
void int4_block(const uint8_t* blk, int64_t groups, const uint32_t* xp, int64_t half_k,
                const float* xsum, c10::BFloat16* y, int64_t n) {
  __m512 out[M];
  for (int m = 0; m < M; ++m) out[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = blk + g * kInt4GroupBytes;
    const uint32_t* xg = xp + g * (kInt4Group / 2);
    __m512 acc[M][kChains<M>];
    zero<M>(acc);
    chunks8<M>(acc, p, xg, xg, half_k, [](int c) { return c; }, [](int c) { return c + 8; });
    const __m512 s = load_bf16(p + 256);
    const __m512 z = _mm512_fnmadd_ps(_mm512_set1_ps(136.f), s, load_bf16(p + 288));
    for (int m = 0; m < M; ++m) {
      out[m] = _mm512_fmadd_ps(total<M>(acc, m), s, out[m]);
      out[m] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[m * groups + g]), z, out[m]);
    }
  }
  for (int m = 0; m < M; ++m) store_bf16(y + m * n, out[m]);
}

// As int4_block for int8: `xp16` holds 16 x as pairs, `xsum` [M] the rows' sums of x,
// `scale` the block's 16 row scales (bfloat16).
template <int M>
void int8_block(const uint8_t* blk, int64_t chunks, const uint32_t* xp, const uint32_t* xp16,
                int64_t half_k, const float* xsum, const uint8_t* scale, c10::BFloat16* y,
                int64_t n) {
  __m512 acc[M][kChains<M>];
  zero<M>(acc);
  for (int64_t k = 0; k < chunks; ++k)
    chunks8<M>(acc, blk + k * kInt8ChunkBytes, xp + k * 8, xp16 + k * 8, half_k,
               [](int c) { return c; }, [](int c) { return c; });
  const __m512 s = load_bf16(scale);
  for (int m = 0; m < M; ++m) {
    const __m512 v = _mm512_sub_ps(total<M>(acc, m), _mm512_set1_ps(2304.f * xsum[m]));
    store_bf16(y + m * n, _mm512_mul_ps(v, s));
  }
}

// One call's operands: x as bfloat16 pairs [M][K/2] (and 16 x for int8), the sums of x
// (int4: [M][K/32] by group; int8: [M] by row), the packed weight, the output.
struct Operands {
  const uint32_t* xp;
  const uint32_t* xp16;
  const float* sums;
  const uint8_t* w;
  const uint8_t* scales;  // int8: bfloat16 [N]
  c10::BFloat16* y;
  int64_t blocks, k;
};

template <int M>
void int4_all(const Operands& o) {
  const int64_t groups = o.k / kInt4Group, n = o.blocks * 16;
  at::parallel_for(0, o.blocks, kBlocksPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      int4_block<M>(o.w + b * groups * kInt4GroupBytes, groups, o.xp, o.k / 2, o.sums,
                    o.y + b * 16, n);
  });
}

template <int M>
void int8_all(const Operands& o) {
  const int64_t chunks = o.k / 16, n = o.blocks * 16;
  at::parallel_for(0, o.blocks, kBlocksPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      int8_block<M>(o.w + b * chunks * kInt8ChunkBytes, chunks, o.xp, o.xp16, o.k / 2, o.sums,
                    o.scales + b * 32, o.y + b * 16, n);
  });
}

using Kernel = void (*)(const Operands&);
// Indexed by the row count (register blocking needs it at compile time).
constexpr Kernel kInt4Kernels[kMatvecRows] = {nullptr,     int4_all<1>, int4_all<2>, int4_all<3>,
                                              int4_all<4>, int4_all<5>, int4_all<6>, int4_all<7>};
constexpr Kernel kInt8Kernels[kMatvecRows] = {nullptr,     int8_all<1>, int8_all<2>, int8_all<3>,
                                              int8_all<4>, int8_all<5>, int8_all<6>, int8_all<7>};

// Sums of x (float32) over consecutive runs of `width` columns: [M][K / width].
std::vector<float> run_sums(const c10::BFloat16* x, int64_t rows, int64_t k, int64_t width) {
  std::vector<float> sums(rows * (k / width), 0.f);
  for (int64_t i = 0; i < rows * k; ++i) sums[i / width] += static_cast<float>(x[i]);
  return sums;
}

void check_x(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x: contiguous bfloat16 [M, K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) < kMatvecRows, "matvec takes 1 to ",
              kMatvecRows - 1, " rows, not ", x.size(0));
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed: contiguous uint8 [N / 16, ., .]");
}

}  // namespace

bool matvec_supported() { return true; }

at::Tensor int4_matvec(const at::Tensor& x, const at::Tensor& packed) {
  check_x(x, packed);
  const int64_t rows = x.size(0), k = x.size(1), blocks = packed.size(0);
  TORCH_CHECK(k % kInt4Group == 0 && packed.size(1) == k / kInt4Group &&
                  packed.size(2) == kInt4GroupBytes,
              "packed int4 weight does not match x's K");
  at::Tensor y = at::empty({rows, blocks * 16}, x.options());
  const auto* xb = x.data_ptr<c10::BFloat16>();
  const std::vector<float> sums = run_sums(xb, rows, k, kInt4Group);
  kInt4Kernels[rows]({reinterpret_cast<const uint32_t*>(xb), nullptr, sums.data(),
                      packed.data_ptr<uint8_t>(), nullptr, y.data_ptr<c10::BFloat16>(), blocks,
                      k});
  return y;
}

at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  check_x(x, packed);
  const int64_t rows = x.size(0), k = x.size(1), blocks = packed.size(0);
  TORCH_CHECK(k % 16 == 0 && packed.size(1) == k / 16 && packed.size(2) == kInt8ChunkBytes,
              "packed int8 weight does not match x's K");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.numel() == blocks * 16 &&
                  scales.is_contiguous(),
              "scales: bfloat16 [N]");
  at::Tensor y = at::empty({rows, blocks * 16}, x.options());
  const auto* xb = x.data_ptr<c10::BFloat16>();
  const std::vector<float> sums = run_sums(xb, rows, k, k);
  std::vector<c10::BFloat16> x16(rows * k);  // 16 x: exact in bfloat16
  for (int64_t i = 0; i < rows * k; ++i) x16[i] = c10::BFloat16(16.f * static_cast<float>(xb[i]));
  kInt8Kernels[rows]({reinterpret_cast<const uint32_t*>(xb),
                      reinterpret_cast<const uint32_t*>(x16.data()), sums.data(),
                      packed.data_ptr<uint8_t>(), static_cast<const uint8_t*>(scales.data_ptr()),
                      y.data_ptr<c10::BFloat16>(), blocks, k});
  return y;
}

#else  // no AVX-512 BF16: the callers keep ATen's kernels

bool matvec_supported() { return false; }

at::Tensor int4_matvec(const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "built without AVX-512 BF16");
}

at::Tensor int8_matvec(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "built without AVX-512 BF16");
}

#endif

}  // namespace sinkserve
