// A decode step of single-token rows through every layer in one call (CPU, int4 weights):
// the arithmetic between the matmuls runs as plain loops on rows of a few hundred values
// (attention split over rows and KV heads on torch's threads), instead of ~250 small ATen
// calls a layer from Python. The matmuls are the ones `quant.linear` picks: the int4
// kernel, or from `dense_rows` rows the weight's dense copy prepacked for oneDNN. See
// cpu_decode.py for when the engine takes this path and what it returns.
//
// Numerics follow model.py's eager path: float32 residual stream and norms; bfloat16
// activations into the matmuls (rounded where the eager path rounds); attention in
// float32 over the float32 cache. RoPE runs in float32 here (bfloat16 there), so the two
// paths agree to bfloat16 rounding, not bit for bit.
#include <torch/extension.h>

#include <ATen/Parallel.h>

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

// F.rms_norm(x, w).to(bfloat16) for one row.
void rms_norm(const float* x, const float* w, BF16* out, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = BF16(x[i] * inv * w[i]);
}

// RoPE in the rotate-half layout: x * cos + swap_halves(x) * sin, with sin signed as
// rope.rope_tables lays it out ([-sin, sin]).
void rope(const BF16* x, const float* cos, const float* sin, float* out, int64_t hd) {
  const int64_t h = hd / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    out[i] = a * cos[i] + b * sin[i];
    out[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

struct Layer {
  at::Tensor attn_norm, ffn_norm;  // float32 [H]
  at::Tensor qkv_bias;             // bfloat16 [(nH + 2 nKV) hd], or undefined
  at::Tensor packed[4], scales_zeros[4];  // int4 qkv, o, gate_up, down (quant.Int4Weight)
  at::Tensor dense[4];             // their dense copies, prepacked for oneDNN
  at::Tensor k, v;                 // the layer's float32 cache [slots, nKV, S + W, hd]
};

class FusedDecode {
 public:
  FusedDecode(std::vector<at::Tensor> norms, std::vector<at::Tensor> biases,
              std::vector<at::Tensor> weights, std::vector<at::Tensor> dense,
              std::vector<at::Tensor> caches, at::Tensor kpos, int64_t num_heads,
              int64_t num_kv_heads, int64_t head_dim, int64_t sinks, int64_t window,
              int64_t group, int64_t dense_rows, double eps)
      : kpos_(kpos), nh_(num_heads), nkv_(num_kv_heads), hd_(head_dim), sinks_(sinks),
        window_(window), group_(group), dense_rows_(dense_rows), eps_(static_cast<float>(eps)),
        linear_pointwise_(c10::Dispatcher::singleton().findSchemaOrThrow(
            "mkldnn::_linear_pointwise", "")) {
    const size_t n = norms.size() / 2;
    TORCH_CHECK(biases.size() == n || biases.empty(), "one qkv bias a layer, or none");
    TORCH_CHECK(weights.size() == 8 * n && dense.size() == 4 * n && caches.size() == 2 * n,
                "per-layer tensor counts");
    for (size_t i = 0; i < n; ++i) {
      Layer l;
      l.attn_norm = norms[2 * i];
      l.ffn_norm = norms[2 * i + 1];
      if (!biases.empty()) l.qkv_bias = biases[i];
      for (int j = 0; j < 4; ++j) {
        l.packed[j] = weights[8 * i + 2 * j];
        l.scales_zeros[j] = weights[8 * i + 2 * j + 1];
        l.dense[j] = dense[4 * i + j];
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
  // Writes each row's keys and values into its slot and its position into kpos.
  at::Tensor step(at::Tensor x, at::Tensor slots, at::Tensor positions, at::Tensor cos,
                  at::Tensor sin) {
    const int64_t rows = x.size(0), hidden = x.size(1);
    TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat, "x: float32 [B, H]");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "contiguous cos/sin");
    const auto bf = x.options().dtype(at::kBFloat16);
    at::Tensor h = at::empty({rows, hidden}, bf);
    at::Tensor attn = at::empty({rows, nh_ * hd_}, bf);
    float* xs = x.data_ptr<float>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    for (const Layer& l : layers_) {
      norm_rows(xs, l.attn_norm, h, rows, hidden);
      at::Tensor qkv = matmul(h, l, 0);
      if (l.qkv_bias.defined()) qkv.add_(l.qkv_bias);
      at::parallel_for(0, rows * nkv_, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          attend(l, qkv, attn, i / nkv_, i % nkv_, slot, pos, cos, sin);
      });
      add_rows(xs, matmul(attn, l, 1), rows * hidden);
      norm_rows(xs, l.ffn_norm, h, rows, hidden);
      const at::Tensor gate_up = matmul(h, l, 2);  // as model.py: silu(gate) * up
      const int64_t inter = gate_up.size(1) / 2;
      const at::Tensor act =
          at::silu(gate_up.narrow(1, 0, inter)) * gate_up.narrow(1, inter, inter);
      add_rows(xs, matmul(act, l, 3), rows * hidden);
    }
    int64_t* kp = kpos_.data_ptr<int64_t>();
    for (int64_t b = 0; b < rows; ++b) kp[slot[b] * cache_len_ + cache_index(pos[b])] = pos[b];
    return x;
  }

 private:
  int64_t cache_index(int64_t p) const {
    return p < sinks_ ? p : sinks_ + (p - sinks_) % window_;
  }

  // `in` (bfloat16 [rows, K]) times projection j, in bfloat16, as quant.linear computes it.
  at::Tensor matmul(const at::Tensor& in, const Layer& l, int j) const {
    if (in.size(0) < dense_rows_)
      return at::_weight_int4pack_mm_for_cpu(in, l.packed[j], group_, l.scales_zeros[j]);
    const auto dtype = l.dense[j].scalar_type();
    torch::jit::Stack stack{in.to(dtype), l.dense[j], c10::IValue(), std::string("none"),
                            c10::List<std::optional<at::Scalar>>(), std::string("")};
    linear_pointwise_.callBoxed(&stack);
    return stack[0].toTensor().to(in.scalar_type());
  }

  void norm_rows(const float* xs, const at::Tensor& w, at::Tensor& out, int64_t rows,
                 int64_t hidden) const {
    BF16* o = out.data_ptr<BF16>();
    for (int64_t b = 0; b < rows; ++b)
      rms_norm(xs + b * hidden, w.data_ptr<float>(), o + b * hidden, hidden, eps_);
  }

  static void add_rows(float* xs, const at::Tensor& delta, int64_t n) {
    const BF16* d = delta.data_ptr<BF16>();
    for (int64_t i = 0; i < n; ++i) xs[i] += static_cast<float>(d[i]);
  }

  // One row's g query heads of KV head kh: attend to the slot's visible keys (sinks scored
  // with the query at its cache position, the window at its absolute one) and the row's
  // own key; write the bfloat16 output, then the row's key and value into the slot.
  void attend(const Layer& l, const at::Tensor& qkv, at::Tensor& attn, int64_t b, int64_t kh,
              const int64_t* slot, const int64_t* pos, const at::Tensor& cos,
              const at::Tensor& sin) const {
    const int64_t hd = hd_, g = nh_ / nkv_, rows = qkv.size(0), t = pos[b];
    const BF16* row = qkv.data_ptr<BF16>() + b * qkv.size(1);
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
      const BF16* q = row + (kh * g + j) * hd;
      rope(q, cos_abs, sin_abs, q_abs + j * hd, hd);
      rope(q, cos_cache, sin_cache, q_sink + j * hd, hd);
    }
    rope(row + (nh_ + kh) * hd, cos_abs, sin_abs, k_new, hd);
    const BF16* v_raw = row + (nh_ + nkv_ + kh) * hd;
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
    BF16* out = attn.data_ptr<BF16>() + b * nh_ * hd + kh * g * hd;
    for (int64_t i = 0; i < g * hd; ++i) out[i] = BF16(acc[i]);
    // After every read of the slot: the entry overwritten may hold the key at t - W.
    const int64_t w_at = cache_index(t) * hd;
    std::copy(k_new, k_new + hd, kc + w_at);
    std::copy(v_new, v_new + hd, vc + w_at);
  }

  std::vector<Layer> layers_;
  at::Tensor kpos_;  // int64 [slots, S + W]: the absolute position at each cache entry
  int64_t nh_, nkv_, hd_, sinks_, window_, group_, dense_rows_, cache_len_ = 0;
  float eps_;
  c10::OperatorHandle linear_pointwise_;  // mkldnn::_linear_pointwise (prepacked weights)
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<FusedDecode>(m, "FusedDecode")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, at::Tensor, int64_t, int64_t, int64_t,
                          int64_t, int64_t, int64_t, int64_t, double>())
      .def("step", &FusedDecode::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
