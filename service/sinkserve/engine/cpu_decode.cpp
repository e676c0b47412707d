// A decode step of single-token rows through every layer in one call (CPU): the
// arithmetic between the matmuls runs as plain loops on rows of a few hundred values
// (attention split over rows and KV heads on torch's threads), instead of ~250 small ATen
// calls a layer from Python. The matmuls are the ones `quant.linear` picks for the
// layers' weights: int4 (or, from `dense_rows` rows, the dense copy prepacked for oneDNN),
// prepacked bfloat16, or plain tensors. See cpu_decode.py for when the engine takes this
// path and what it returns.
//
// Numerics follow model.py's eager path: float32 residual stream and norms; activations
// into the matmuls in the model's dtype T (bfloat16 or float32, rounded where the eager
// path rounds); attention in float32 over the float32 cache. RoPE runs in float32 here
// (in T there), so with bfloat16 the two paths agree to bfloat16 rounding, not bit for bit.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "cpu_matvec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using BF16 = c10::BFloat16;

float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// F.rms_norm(x, w).to(T) for one row.
template <typename T>
void rms_norm(const float* x, const float* w, T* out, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = T(x[i] * inv * w[i]);
}

// RoPE in the rotate-half layout: x * cos + swap_halves(x) * sin, with sin signed as
// rope.rope_tables lays it out ([-sin, sin]).
template <typename T>
void rope(const T* x, const float* cos, const float* sin, float* out, int64_t hd) {
  const int64_t h = hd / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    out[i] = a * cos[i] + b * sin[i];
    out[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

// How a model's projection weights multiply (quant.Weight).
enum class Kind { kInt4, kPacked, kPlain };

struct Layer {
  at::Tensor attn_norm, ffn_norm;  // float32 [H]
  at::Tensor qkv_bias;             // [(nH + 2 nKV) hd] in T, or undefined
  at::Tensor w[4];                 // qkv, o, gate_up, down: int4 codes, packed, or plain
  at::Tensor scales_zeros[4];      // kInt4: quant.Int4Weight.scales_zeros
  at::Tensor dense[4];             // kInt4: the dense copies, prepacked for oneDNN
  at::Tensor rowpack[4];           // kInt4: the codes in cpu_matvec's layout, or undefined
  at::Tensor k, v;                 // the layer's float32 cache [slots, nKV, S + W, hd]
};

class FusedDecode {
 public:
  // Per layer: norms (attention, FFN), biases (one or none), weights (4), and for int4
  // weights scales_zeros (4), dense copies (4) and cpu_matvec's packs (4, or none at all);
  // caches (K, V).
  FusedDecode(std::vector<at::Tensor> norms, std::vector<at::Tensor> biases,
              std::vector<at::Tensor> weights, std::vector<at::Tensor> scales_zeros,
              std::vector<at::Tensor> dense, std::vector<at::Tensor> rowpacks,
              std::vector<at::Tensor> caches, at::Tensor kpos,
              int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t sinks,
              int64_t window, int64_t group, int64_t dense_rows, double eps)
      : kpos_(kpos), nh_(num_heads), nkv_(num_kv_heads), hd_(head_dim), sinks_(sinks),
        window_(window), group_(group), dense_rows_(dense_rows), eps_(static_cast<float>(eps)),
        linear_pointwise_(c10::Dispatcher::singleton().findSchemaOrThrow(
            "mkldnn::_linear_pointwise", "")) {
    const size_t n = norms.size() / 2;
    const bool int4 = !scales_zeros.empty();
    kind_ = int4 ? Kind::kInt4 : weights.at(0).is_mkldnn() ? Kind::kPacked : Kind::kPlain;
    TORCH_CHECK(biases.size() == n || biases.empty(), "one qkv bias a layer, or none");
    TORCH_CHECK(weights.size() == 4 * n && caches.size() == 2 * n, "per-layer tensor counts");
    TORCH_CHECK(!int4 || (scales_zeros.size() == 4 * n && dense.size() == 4 * n),
                "int4 weights come with scales and dense copies");
    TORCH_CHECK(rowpacks.empty() || rowpacks.size() == 4 * n, "a rowpack for every weight");
    for (size_t i = 0; i < n; ++i) {
      Layer l;
      l.attn_norm = norms[2 * i];
      l.ffn_norm = norms[2 * i + 1];
      if (!biases.empty()) l.qkv_bias = biases[i];
      for (int j = 0; j < 4; ++j) {
        l.w[j] = weights[4 * i + j];
        if (int4) {
          l.scales_zeros[j] = scales_zeros[4 * i + j];
          l.dense[j] = dense[4 * i + j];
          if (!rowpacks.empty()) l.rowpack[j] = rowpacks[4 * i + j];
        }
      }
      l.k = caches[2 * i];
      l.v = caches[2 * i + 1];
      TORCH_CHECK(l.k.is_contiguous() && l.k.scalar_type() == at::kFloat, "float32 cache");
      layers_.push_back(std::move(l));
    }
    cache_len_ = sinks + window;
  }

  // x: float32 [B, H] embeddings of the rows' tokens, advanced in place to the last
  // layer's residual stream (returned). slots, positions: int64 [B], distinct slots.
  // cos, sin: float32 [2, B, hd] (row 0: absolute positions, row 1: cache positions).
  // bfloat16: the model's activation dtype T (else float32). Writes each row's keys and
  // values into its slot and its position into kpos.
  at::Tensor step(at::Tensor x, at::Tensor slots, at::Tensor positions, at::Tensor cos,
                  at::Tensor sin, bool bfloat16) {
    TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat, "x: float32 [B, H]");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "contiguous cos/sin");
    if (bfloat16)
      run<BF16>(x, slots.data_ptr<int64_t>(), positions.data_ptr<int64_t>(), cos, sin);
    else
      run<float>(x, slots.data_ptr<int64_t>(), positions.data_ptr<int64_t>(), cos, sin);
    return x;
  }

 private:
  template <typename T>
  void run(at::Tensor& x, const int64_t* slot, const int64_t* pos, const at::Tensor& cos,
           const at::Tensor& sin) {
    const int64_t rows = x.size(0), hidden = x.size(1);
    const auto act = x.options().dtype(c10::CppTypeToScalarType<T>::value);
    at::Tensor h = at::empty({rows, hidden}, act);
    at::Tensor attn = at::empty({rows, nh_ * hd_}, act);
    float* xs = x.data_ptr<float>();
    for (const Layer& l : layers_) {
      norm_rows(xs, l.attn_norm, h.data_ptr<T>(), rows, hidden);
      at::Tensor qkv = matmul(h, l, 0);
      at::parallel_for(0, rows * nkv_, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          attend<T>(l, qkv, attn, i / nkv_, i % nkv_, slot, pos, cos, sin);
      });
      add_rows(xs, matmul(attn, l, 1).data_ptr<T>(), rows * hidden);
      norm_rows(xs, l.ffn_norm, h.data_ptr<T>(), rows, hidden);
      const at::Tensor gate_up = matmul(h, l, 2);  // as model.py: silu(gate) * up
      const int64_t inter = gate_up.size(1) / 2;
      const at::Tensor act_in =
          at::silu(gate_up.narrow(1, 0, inter)) * gate_up.narrow(1, inter, inter);
      add_rows(xs, matmul(act_in, l, 3).data_ptr<T>(), rows * hidden);
    }
    int64_t* kp = kpos_.data_ptr<int64_t>();
    for (int64_t b = 0; b < rows; ++b) kp[slot[b] * cache_len_ + cache_index(pos[b])] = pos[b];
  }

  int64_t cache_index(int64_t p) const {
    return p < sinks_ ? p : sinks_ + (p - sinks_) % window_;
  }

  // `in` [rows, K] times projection j (plus the qkv bias), in `in`'s dtype, as
  // quant.linear computes it.
  at::Tensor matmul(const at::Tensor& in, const Layer& l, int j) const {
    const at::Tensor& bias = j == 0 ? l.qkv_bias : at::Tensor();
    if (kind_ == Kind::kPlain) return at::linear(in, l.w[j], bias);
    at::Tensor y;
    const int64_t rows = in.size(0);
    if (kind_ == Kind::kInt4 && l.rowpack[j].defined() && rows < sinkserve::kMatvecRows &&
        rows < dense_rows_ && in.scalar_type() == at::kBFloat16) {
      y = sinkserve::int4_matvec(in.contiguous(), l.rowpack[j]);
    } else if (kind_ == Kind::kInt4 && rows < dense_rows_) {
      y = at::_weight_int4pack_mm_for_cpu(in, l.w[j], group_, l.scales_zeros[j]);
    } else {
      const at::Tensor& w = kind_ == Kind::kInt4 ? l.dense[j] : l.w[j];
      torch::jit::Stack stack{in.to(w.scalar_type()), w, c10::IValue(), std::string("none"),
                              c10::List<std::optional<at::Scalar>>(), std::string("")};
      linear_pointwise_.callBoxed(&stack);
      y = stack[0].toTensor().to(in.scalar_type());
    }
    return bias.defined() ? y + bias : y;
  }

  template <typename T>
  void norm_rows(const float* xs, const at::Tensor& w, T* out, int64_t rows,
                 int64_t hidden) const {
    for (int64_t b = 0; b < rows; ++b)
      rms_norm(xs + b * hidden, w.data_ptr<float>(), out + b * hidden, hidden, eps_);
  }

  template <typename T>
  static void add_rows(float* xs, const T* delta, int64_t n) {
    for (int64_t i = 0; i < n; ++i) xs[i] += static_cast<float>(delta[i]);
  }

  // One row's g query heads of KV head kh: attend to the slot's visible keys (sinks scored
  // with the query at its cache position, the window at its absolute one) and the row's
  // own key; write the output (in T), then the row's key and value into the slot.
  template <typename T>
  void attend(const Layer& l, const at::Tensor& qkv, at::Tensor& attn, int64_t b, int64_t kh,
              const int64_t* slot, const int64_t* pos, const at::Tensor& cos,
              const at::Tensor& sin) const {
    const int64_t hd = hd_, g = nh_ / nkv_, rows = qkv.size(0), t = pos[b];
    const T* row = qkv.data_ptr<T>() + b * qkv.size(1);
    const float* cos_abs = cos.data_ptr<float>() + b * hd;
    const float* sin_abs = sin.data_ptr<float>() + b * hd;
    const float* cos_cache = cos_abs + rows * hd;
    const float* sin_cache = sin_abs + rows * hd;
    std::vector<float> buf(2 * g * hd + 2 * hd);
    float* q_abs = buf.data();  // [g, hd]
    float* q_sink = q_abs + g * hd;
    float* k_new = q_sink + g * hd;
    float* v_new = k_new + hd;
    for (int64_t j = 0; j < g; ++j) {
      const T* q = row + (kh * g + j) * hd;
      rope(q, cos_abs, sin_abs, q_abs + j * hd, hd);
      rope(q, cos_cache, sin_cache, q_sink + j * hd, hd);
    }
    rope(row + (nh_ + kh) * hd, cos_abs, sin_abs, k_new, hd);
    const T* v_raw = row + (nh_ + nkv_ + kh) * hd;
    for (int64_t i = 0; i < hd; ++i) v_new[i] = v_raw[i];

    // A session at position t holds keys at cache entries [0, min(t, S + W)).
    const int64_t len = std::min(t, cache_len_), s = slot[b];
    const int64_t base = (s * nkv_ + kh) * cache_len_ * hd;
    float* kc = l.k.data_ptr<float>() + base;
    float* vc = l.v.data_ptr<float>() + base;
    const int64_t* kp = kpos_.data_ptr<int64_t>() + s * cache_len_;
    std::vector<float> p(g * (len + 1));  // scores, then weights; column len: own key
    for (int64_t c = 0; c < len; ++c) {
      const int64_t a = kp[c];
      const bool visible = a >= 0 && a < t && (a < sinks_ || a >= t - window_);
      const float* q = c < sinks_ ? q_sink : q_abs;
      for (int64_t j = 0; j < g; ++j)
        p[j * (len + 1) + c] = visible ? dot(q + j * hd, kc + c * hd, hd)
                                       : -std::numeric_limits<float>::infinity();
    }
    std::vector<float> acc(g * hd, 0.f);
    for (int64_t j = 0; j < g; ++j) {
      float* pj = p.data() + j * (len + 1);
      pj[len] = dot(q_abs + j * hd, k_new, hd);
      const float m = *std::max_element(pj, pj + len + 1);  // finite: the own key
      float sum = 0.f;
      for (int64_t c = 0; c <= len; ++c) sum += (pj[c] = std::exp(pj[c] - m));
      const float inv = 1.f / sum;
      for (int64_t c = 0; c <= len; ++c) pj[c] *= inv;
    }
    for (int64_t c = 0; c <= len; ++c) {
      const float* vr = c < len ? vc + c * hd : v_new;
      for (int64_t j = 0; j < g; ++j) {
        const float w = p[j * (len + 1) + c];
        float* o = acc.data() + j * hd;
#pragma omp simd
        for (int64_t i = 0; i < hd; ++i) o[i] += w * vr[i];
      }
    }
    T* out = attn.data_ptr<T>() + b * nh_ * hd + kh * g * hd;
    for (int64_t i = 0; i < g * hd; ++i) out[i] = T(acc[i]);
    // After every read of the slot: the entry overwritten may hold the key at t - W.
    const int64_t w_at = cache_index(t) * hd;
    std::copy(k_new, k_new + hd, kc + w_at);
    std::copy(v_new, v_new + hd, vc + w_at);
  }

  std::vector<Layer> layers_;
  at::Tensor kpos_;  // int64 [slots, S + W]: the absolute position at each cache entry
  int64_t nh_, nkv_, hd_, sinks_, window_, group_, dense_rows_, cache_len_ = 0;
  float eps_;
  Kind kind_;
  c10::OperatorHandle linear_pointwise_;  // mkldnn::_linear_pointwise (prepacked weights)
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto released = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("matvec_supported", &sinkserve::matvec_supported);
  m.def("int4_matvec", &sinkserve::int4_matvec, released);
  m.def("int8_matvec", &sinkserve::int8_matvec, released);
  pybind11::class_<FusedDecode>(m, "FusedDecode")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, at::Tensor,
                          int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                          double>())
      .def("step", &FusedDecode::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
