// gemmakit CPU kernel: attention for one query per row (decoding), float32.
//
//     out[b, h] = softmax(cap(scale * q[b, h] . k[b, h / G, s]) + bias[b, s]) @ v[b, h / G, s]
//
// where G = heads / kv_heads (grouped-query attention), cap is the optional logit soft-cap
// (cap * tanh(x / cap)) and bias is the step's mask as 0 / -inf. torch's fused attention for the
// CPU is built for many queries: for one it spent ~100 us a layer on Gemma 3 270M (1.8 ms of a
// 15 ms decoding step), and the equivalent matmul/softmax ops cost as much in dispatch. Here each
// (row, head) pair is one task on torch's intra-op threads: a pass of dot products over the keys,
// a softmax in place, and a pass accumulating the values, all over contiguous vectors of head_dim.

#include <torch/types.h>  // not torch/extension.h: no pybind11 here, a third of the compile time
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define GK_ATTN_AVX512 1
#endif

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef GK_ATTN_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {  // y += w * x
  int64_t i = 0;
#ifdef GK_ATTN_AVX512
  const __m512 vw = _mm512_set1_ps(w);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(vw, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += w * x[i];
}

}  // namespace

// q [B, H, 1, D]; k, v [B, Hkv, S, D] (any strides with a contiguous last dim); bias [B, 1, 1, S]
// (or [B, S]) float32, contiguous. softcap <= 0 means none. Returns [B, H, 1, D].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor bias, double scale,
                               double softcap) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "q [B, H, 1, D], k/v [B, Hkv, S, D]");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
                  v.scalar_type() == torch::kFloat32 && bias.scalar_type() == torch::kFloat32,
              "decode_attention is float32");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && k.size(0) == B && v.sizes() == k.sizes() && k.size(3) == D,
              "k/v shape does not match q");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k/v need a contiguous last dim");
  TORCH_CHECK(bias.numel() == B * S, "bias: one entry per key of each row");
  auto qc = q.contiguous();
  auto bc = bias.contiguous();
  auto out = torch::empty({B, H, 1, D}, q.options());
  const int64_t G = H / Hkv;
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(softcap);
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(S);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H, hk = h / G;
      const float* qv = qp + t * D;
      const float* kb = kp + b * k.stride(0) + hk * k.stride(1);
      const float* vb = vp + b * v.stride(0) + hk * v.stride(1);
      const float* row_bias = bp + b * S;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < S; ++s) {
        float x = fscale * dot(qv, kb + s * k.stride(2), D);
        if (cap > 0.f) x = cap * std::tanh(x / cap);
        x += row_bias[s];
        p[s] = x;
        top = std::max(top, x);
      }
      float* o = op + t * D;
      std::fill(o, o + D, 0.f);
      if (top == -std::numeric_limits<float>::infinity()) continue;  // no visible key: zeros (never read)
      float total = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        const float w = p[s] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(p[s] - top);
        p[s] = w;
        total += w;
      }
      for (int64_t s = 0; s < S; ++s)
        if (p[s] != 0.f) axpy(p[s], vb + s * v.stride(2), o, D);
      const float inv = 1.f / total;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  });
  return out;
}
