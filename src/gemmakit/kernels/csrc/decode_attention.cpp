// gemmakit CPU kernel: attention for one query per row (decoding), float32.
//
//     out[b, h] = softmax(cap(scale * q[b, h] . k[b, h / G, s]) + bias[b, s]) @ v[b, h / G, s]
//
// where G = heads / kv_heads (grouped-query attention), cap is the optional logit soft-cap
// (cap * tanh(x / cap)) and bias is the step's mask as 0 / -inf. torch's fused attention for the
// CPU is built for many queries: for one it spent ~100 us a layer on Gemma 3 270M (1.8 ms of a
// 15 ms decoding step), and the equivalent matmul/softmax ops cost as much in dispatch. Here a
// task is one kv head of one row (all its query heads) over a chunk of the keys: a pass of dot
// products, a softmax in place, and a pass accumulating the values, over contiguous head_dim vectors.
//
// Keys and values may also be int8 codes with a float32 scale per group of head_dim entries (the
// int8 KV cache, models/cache.py): they are then widened a block of keys at a time into a small
// float buffer, each entry as code * scale (the eager path's dequantisation, one rounding), and
// the same passes run over it, so the result equals attention over the dequantised cache.

#include <torch/types.h>  // not torch/extension.h: no pybind11 here, a third of the compile time
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define GK_ATTN_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GK_ATTN_AVX2 1  // gcc does not vectorise the float reductions below on its own (no -ffast-math)
#endif

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef GK_ATTN_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  sum = _mm512_reduce_add_ps(acc);
#elif defined(GK_ATTN_AVX2)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {  // y += w * x
  int64_t i = 0;
#ifdef GK_ATTN_AVX512
  const __m512 vw = _mm512_set1_ps(w);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(vw, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#elif defined(GK_ATTN_AVX2)
  const __m256 vw = _mm256_set1_ps(w);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vw, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += w * x[i];
}

#ifdef GK_ATTN_AVX512
// The two passes over a chunk's keys and values with all G query heads at once, for head_dim a
// multiple of 64: each key is loaded once for G independent dot chains (one chain per head with
// separate dot() calls is latency bound: 16 dependent FMAs per 256-d key), and each head's output
// stays in registers for a 64- or 32-wide slice of head_dim while the values stream past. Every
// output element sees the same float operations in the same order as dot() and axpy() above, so
// the results are bit-identical to the generic loops. On a 2-core Xeon, Gemma 3 270M's 18 layers
// at 640 keys took 0.85 ms against 1.39 (28 GB/s of keys and values: the memory's pace).
template <int G>
inline void scores_g(const float* qh, int64_t D, const float* kb, int64_t kstride, int64_t n, float* scores[G]) {
  for (int64_t s = 0; s < n; ++s) {
    const float* key = kb + s * kstride;
    __m512 acc[G];
    for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) {
      const __m512 kv = _mm512_loadu_ps(key + i);
      for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qh + g * D + i), kv, acc[g]);
    }
    for (int g = 0; g < G; ++g) scores[g][s] = _mm512_reduce_add_ps(acc[g]);
  }
}

// o[g] += w[g][s] * value_s for s in order, skipping zero weights (as the generic loop's axpy does).
template <int G, int NV>
inline void values_g(const float* vb, int64_t vstride, int64_t n, int64_t D, float* const w[G], float* o) {
  for (int64_t d0 = 0; d0 < D; d0 += 16 * NV) {
    __m512 acc[G][NV];
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_loadu_ps(o + g * D + d0 + 16 * j);
    for (int64_t s = 0; s < n; ++s) {
      const float* value = vb + s * vstride + d0;
      __m512 x[NV];
      for (int j = 0; j < NV; ++j) x[j] = _mm512_loadu_ps(value + 16 * j);
      for (int g = 0; g < G; ++g) {
        const float ws = w[g][s];
        if (ws == 0.f) continue;
        const __m512 vw = _mm512_set1_ps(ws);
        for (int j = 0; j < NV; ++j) acc[g][j] = _mm512_fmadd_ps(vw, x[j], acc[g][j]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < NV; ++j) _mm512_storeu_ps(o + g * D + d0 + 16 * j, acc[g][j]);
  }
}
#endif

// Keys or values of one (row, kv head): float32 rows read in place, or int8 codes widened into
// `buf` (code * scale per group, as the eager path dequantises) a block of rows at a time.
struct Rows {
  const float* f = nullptr;   // float32 rows (nullptr: int8)
  const int8_t* q = nullptr;  // int8 codes
  const float* scale = nullptr;
  int64_t stride = 0, scale_stride = 0, groups = 1, D = 0;

  // Rows [s, s + n) as floats with their row stride: in place, or widened into buf ([n, D]).
  const float* get(int64_t s, int64_t n, float* buf, int64_t* row_stride) const {
    if (f != nullptr) {
      *row_stride = stride;
      return f + s * stride;
    }
    const int64_t len = D / groups;
    for (int64_t r = 0; r < n; ++r) {
      const int8_t* code = q + (s + r) * stride;
      const float* sc = scale + (s + r) * scale_stride;
      float* out = buf + r * D;
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t j = g * len; j < (g + 1) * len; ++j) out[j] = float(code[j]) * sc[g];
    }
    *row_stride = D;
    return buf;
  }
};

constexpr int64_t kBlock = 64;  // keys widened at a time from an int8 cache (64 KB of floats at D = 256)

Rows rows_of(const torch::Tensor& t, const torch::Tensor& scale, int64_t b, int64_t hk) {
  Rows r;
  r.D = t.size(3);
  r.stride = t.stride(2);
  if (t.scalar_type() == torch::kFloat32) {
    r.f = t.data_ptr<float>() + b * t.stride(0) + hk * t.stride(1);
    return r;
  }
  r.q = t.data_ptr<int8_t>() + b * t.stride(0) + hk * t.stride(1);
  r.scale = scale.data_ptr<float>() + b * scale.stride(0) + hk * scale.stride(1);
  r.scale_stride = scale.stride(2);
  r.groups = scale.size(3);
  return r;
}

void check_rows(const torch::Tensor& t, const torch::Tensor& scale, const char* what) {
  if (t.scalar_type() == torch::kFloat32) return;
  TORCH_CHECK(t.scalar_type() == torch::kInt8 && scale.defined() && scale.numel() > 0 &&
                  scale.scalar_type() == torch::kFloat32 && scale.dim() == 4 && scale.size(0) == t.size(0) &&
                  scale.size(1) == t.size(1) && scale.size(2) >= t.size(2) && scale.stride(3) == 1 &&
                  t.size(3) % scale.size(3) == 0,
              "decode_attention: ", what, " must be float32, or int8 codes with float32 scales [B, Hkv, S, groups]");
}

}  // namespace

torch::Tensor decode_attention_cached(torch::Tensor q, torch::Tensor k, torch::Tensor k_scale, torch::Tensor v,
                                      torch::Tensor v_scale, torch::Tensor bias, double scale, double softcap);

// q [B, H, 1, D]; k, v [B, Hkv, S, D] (any strides with a contiguous last dim); bias [B, 1, 1, S]
// (or [B, S]) float32, contiguous. softcap <= 0 means none. Returns [B, H, 1, D].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor bias, double scale,
                               double softcap) {
  TORCH_CHECK(k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32, "decode_attention is float32");
  return decode_attention_cached(q, k, torch::Tensor(), v, torch::Tensor(), bias, scale, softcap);
}

// The same with keys and values that may be int8 codes with scales (k_scale / v_scale
// [B, Hkv, S, groups] float32; undefined for a float32 k / v).
torch::Tensor decode_attention_cached(torch::Tensor q, torch::Tensor k, torch::Tensor k_scale, torch::Tensor v,
                                      torch::Tensor v_scale, torch::Tensor bias, double scale, double softcap) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "q [B, H, 1, D], k/v [B, Hkv, S, D]");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && bias.scalar_type() == torch::kFloat32,
              "decode_attention: q and bias are float32");
  check_rows(k, k_scale, "keys");
  check_rows(v, v_scale, "values");
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
  const float* bp = bc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(softcap);
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  // Work items are (row, kv head, chunk of keys). All G query heads of a kv head go together, so
  // each key and value vector is read once, not G times (Gemma 3 270M: 4 heads share one). With
  // fewer (row, kv head) pairs than threads the keys are split into chunks, each with its own
  // running max, sum and output (flash-decoding), merged afterwards.
  const int64_t pairs = B * Hkv, threads = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((threads + pairs - 1) / pairs, S / 64));
  const int64_t span = (S + chunks - 1) / chunks;
  std::vector<float> part_out(pairs * chunks * G * D), part_max(pairs * chunks * G), part_sum(pairs * chunks * G);
  const bool widened = k.scalar_type() != torch::kFloat32 || v.scalar_type() != torch::kFloat32;
  at::parallel_for(0, pairs * chunks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(G * span), buf(widened ? kBlock * D : 0);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t pair = item / chunks, c = item % chunks, b = pair / Hkv, hk = pair % Hkv;
      const int64_t s0 = c * span, s1 = std::min(S, s0 + span), n = std::max<int64_t>(0, s1 - s0);
      const Rows keys = rows_of(k, k_scale, b, hk), values = rows_of(v, v_scale, b, hk);
      const float* row_bias = bp + b * S;
      const float* qh = qp + (b * H + hk * G) * D;  // the G query heads of this kv head, D apart
      float* o = part_out.data() + item * G * D;
      float* top = part_max.data() + item * G;
      float* total = part_sum.data() + item * G;
      std::fill(o, o + G * D, 0.f);
      std::fill(top, top + G, kNone);
      std::fill(total, total + G, 0.f);
      // raw q.k into p, then (masked keys aside) scale, soft-cap and bias, as the generic loop does
      bool batched = false;
#ifdef GK_ATTN_AVX512
      float* heads[8];  // each query head's row of p: its scores, then its softmax weights
      if (D % 64 == 0 && (G == 1 || G == 2 || G == 4 || G == 8)) {
        for (int64_t b0 = 0; b0 < n; b0 += kBlock) {  // a block of keys at a time (widened if int8)
          const int64_t m = std::min(kBlock, n - b0);
          int64_t ks;
          const float* k0 = keys.get(s0 + b0, m, buf.data(), &ks);
          for (int64_t g = 0; g < G; ++g) heads[g] = p.data() + g * span + b0;
          switch (G) {
            case 1: scores_g<1>(qh, D, k0, ks, m, heads); break;
            case 2: scores_g<2>(qh, D, k0, ks, m, heads); break;
            case 4: scores_g<4>(qh, D, k0, ks, m, heads); break;
            default: scores_g<8>(qh, D, k0, ks, m, heads); break;
          }
        }
        for (int64_t g = 0; g < G; ++g) heads[g] = p.data() + g * span;
        batched = true;
      }
#endif
      for (int64_t s = 0; s < n; ++s) {
        const float bias_s = row_bias[s0 + s];
        int64_t ks;
        const float* key = batched || bias_s == kNone ? nullptr : keys.get(s0 + s, 1, buf.data(), &ks);
        for (int64_t g = 0; g < G; ++g) {
          float x = kNone;
          if (bias_s != kNone) {
            x = fscale * (batched ? p[g * span + s] : dot(qh + g * D, key, D));
            if (cap > 0.f) x = cap * std::tanh(x / cap);
            x += bias_s;
          }
          p[g * span + s] = x;
          top[g] = std::max(top[g], x);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        if (top[g] == kNone) continue;  // no visible key in this chunk
        for (int64_t s = 0; s < n; ++s) {
          const float w = p[g * span + s] == kNone ? 0.f : std::exp(p[g * span + s] - top[g]);
          p[g * span + s] = w;
          total[g] += w;
        }
      }
      for (int64_t g = 0; g < G; ++g)  // a head with no visible key adds nothing
        if (top[g] == kNone) std::fill(p.begin() + g * span, p.begin() + g * span + n, 0.f);
#ifdef GK_ATTN_AVX512
      if (batched) {
        // a block of values at a time: each output's accumulator is stored and reloaded between
        // blocks, which leaves its chain of FMAs (and so the result) as in one pass
        for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
          const int64_t m = std::min(kBlock, n - b0);
          int64_t vs;
          const float* v0 = values.get(s0 + b0, m, buf.data(), &vs);
          float* w[8];
          for (int64_t g = 0; g < G; ++g) w[g] = heads[g] + b0;
          switch (G) {
            case 1: values_g<1, 4>(v0, vs, m, D, w, o); break;
            case 2: values_g<2, 4>(v0, vs, m, D, w, o); break;
            case 4: values_g<4, 4>(v0, vs, m, D, w, o); break;
            default: values_g<8, 2>(v0, vs, m, D, w, o); break;
          }
        }
        continue;
      }
#endif
      for (int64_t s = 0; s < n; ++s) {
        bool any = false;
        for (int64_t g = 0; g < G; ++g) any = any || p[g * span + s] != 0.f;
        if (!any) continue;  // a masked key: its value is never read (nor widened)
        int64_t vs;
        const float* value = values.get(s0 + s, 1, buf.data(), &vs);
        for (int64_t g = 0; g < G; ++g) {
          const float w = p[g * span + s];
          if (w != 0.f) axpy(w, value, o + g * D, D);
        }
      }
    }
  });
  // Merge the chunks of each (row, head): rescale every chunk to the overall max, then normalise.
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t b = pair / Hkv, hk = pair % Hkv;
    for (int64_t g = 0; g < G; ++g) {
      float* dst = op + (b * H + hk * G + g) * D;
      float m = kNone;
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, part_max[(pair * chunks + c) * G + g]);
      std::fill(dst, dst + D, 0.f);
      if (m == kNone) continue;  // no visible key at all: zeros (never read)
      float sum = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t at = (pair * chunks + c) * G + g;
        if (part_max[at] == kNone) continue;
        const float w = std::exp(part_max[at] - m);
        sum += w * part_sum[at];
        axpy(w, part_out.data() + at * D, dst, D);
      }
      const float inv = 1.f / sum;
      for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
    }
  }
  return out;
}
