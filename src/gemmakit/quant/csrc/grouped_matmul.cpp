// gemmakit CPU kernel: x @ W^T where W is stored as int8 codes with one float scale (and optionally
// one float offset) per group of `group` consecutive input weights:
//
//     W[n, k] = scale[n, k / group] * codes[n, k] + offset[n, k / group]
//
// Every GGML block format (Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K, Q6_K) is exactly this after unpacking
// its bits, so one kernel runs them all without expanding the weights to float. Decoding one token
// reads every weight once, so the kernel is built to stream the codes: it converts eight codes at a
// time to float, multiplies them with the (cache-resident) activations, and applies the group scale
// to a whole vector of partial sums; the offset term is offset . sum(x over the group), computed from
// per-group sums of x prepared once per call.
//
// Rows of the output are split over torch's intra-op threads (at::parallel_for). Up to four rows of
// x share each loaded code vector, which covers decode, small batches and speculative verification;
// the Python side sends longer inputs (prefill) to dequantise-then-matmul, which is compute bound.

#include <torch/types.h>  // not torch/extension.h: no pybind11 here, a third of the compile time
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GEMMAKIT_AVX2 1
#endif

namespace {

#ifdef GEMMAKIT_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
#endif

// One output row n for MB rows of x (MB <= 4): out[m] = sum_g scale[g] * (codes_g . x[m]_g).
template <int MB>
inline void row_dot(const int8_t* codes, const float* scale, const float* x, int64_t K, int64_t group,
                    float* out) {
  const int64_t G = K / group;
#ifdef GEMMAKIT_AVX2
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 part[MB];
    for (int m = 0; m < MB; ++m) part[m] = _mm256_setzero_ps();
    const int8_t* q = codes + g * group;
    for (int64_t j = 0; j < group; j += 8) {
      __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j));
      __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
      for (int m = 0; m < MB; ++m)
        part[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + g * group + j), part[m]);
    }
    __m256 s = _mm256_set1_ps(scale[g]);
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(s, part[m], acc[m]);
  }
  for (int m = 0; m < MB; ++m) out[m] = hsum(acc[m]);
#else
  for (int m = 0; m < MB; ++m) out[m] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    for (int m = 0; m < MB; ++m) {
      float part = 0.f;
      for (int64_t j = 0; j < group; ++j) part += float(codes[g * group + j]) * x[m * K + g * group + j];
      out[m] += scale[g] * part;
    }
  }
#endif
}

template <int MB>
void rows_block(const int8_t* codes, const float* scale, const float* offset, const float* xsum,
                const float* x, float* y, int64_t m0, int64_t N, int64_t K, int64_t group,
                int64_t n_begin, int64_t n_end) {
  const int64_t G = K / group;
  float out[MB];
  for (int64_t n = n_begin; n < n_end; ++n) {
    row_dot<MB>(codes + n * K, scale + n * G, x + m0 * K, K, group, out);
    if (offset != nullptr) {
      const float* o = offset + n * G;
      for (int m = 0; m < MB; ++m) {
        const float* xs = xsum + (m0 + m) * G;
        float t = 0.f;
        for (int64_t g = 0; g < G; ++g) t += o[g] * xs[g];
        out[m] += t;
      }
    }
    for (int m = 0; m < MB; ++m) y[(m0 + m) * N + n] = out[m];
  }
}

}  // namespace

torch::Tensor grouped_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scale,
                             torch::Tensor offset, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: [M, K] float32");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8 && codes.is_contiguous(), "codes: [N, K] int8");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(codes.size(1) == K && group > 0 && group % 8 == 0 && K % group == 0, "shape/group mismatch");
  const int64_t G = K / group;
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N * G, "scale: [N, K/group] float32");
  const bool has_offset = offset.numel() > 0;
  TORCH_CHECK(!has_offset || (offset.scalar_type() == torch::kFloat32 && offset.is_contiguous() && offset.numel() == N * G),
              "offset: [N, K/group] float32 or empty");
  auto y = torch::empty({M, N}, x.options());
  torch::Tensor xsum;
  if (has_offset) xsum = x.view({M, G, group}).sum(-1).contiguous();
  const int8_t* c = codes.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  const float* o = has_offset ? offset.data_ptr<float>() : nullptr;
  const float* xs = has_offset ? xsum.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) rows_block<4>(c, s, o, xs, xp, yp, m, N, K, group, n0, n1);
    switch (M - m) {
      case 3: rows_block<3>(c, s, o, xs, xp, yp, m, N, K, group, n0, n1); break;
      case 2: rows_block<2>(c, s, o, xs, xp, yp, m, N, K, group, n0, n1); break;
      case 1: rows_block<1>(c, s, o, xs, xp, yp, m, N, K, group, n0, n1); break;
      default: break;
    }
  });
  return y;
}

// W = scale * codes + offset as float32 [N, K]: the long-input path (prefill) dequantises a layer in
// one parallel pass and hands it to a float GEMM, which is compute bound there.
torch::Tensor grouped_dequantize(torch::Tensor codes, torch::Tensor scale, torch::Tensor offset, int64_t group) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8 && codes.is_contiguous(), "codes: [N, K] int8");
  const int64_t N = codes.size(0), K = codes.size(1);
  TORCH_CHECK(group > 0 && K % group == 0 && scale.numel() == N * (K / group) && scale.is_contiguous(), "scale shape");
  const bool has_offset = offset.numel() > 0;
  auto w = torch::empty({N, K}, scale.options());
  const int8_t* c = codes.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  const float* o = has_offset ? offset.data_ptr<float>() : nullptr;
  float* wp = w.data_ptr<float>();
  const int64_t G = K / group;
  at::parallel_for(0, N * G, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float sc = s[b], of = o ? o[b] : 0.f;
      const int8_t* q = c + b * group;
      float* out = wp + b * group;
      for (int64_t j = 0; j < group; ++j) out[j] = o ? sc * float(q[j]) + of : sc * float(q[j]);
    }
  });
  return w;
}

bool has_avx2() {
#ifdef GEMMAKIT_AVX2
  return true;
#else
  return false;
#endif
}

// The module definition (this file's functions and ggml_matmul.cpp's) lives in module.cpp.
