// gemmakit CPU kernel: Gemma's RMSNorm in one pass per row, float32.
//
//     out = x / sqrt(mean(x^2) + eps) * (1 + weight)
//
// A decoding step of Gemma 3 270M runs 109 norms on vectors of 640 or 256 entries; as torch ops each
// is eight dispatches (pow, mean, add, rsqrt, two multiplies, the 1 + weight, a copy) costing more
// than the arithmetic. Here it is one call. The roundings follow torch's: the mean is a float32 sum
// (in another order) divided by the row length, then eps added, rsqrt, and x * r * (1 + w).

#include <torch/types.h>  // not torch/extension.h: no pybind11 here, a third of the compile time
#include <ATen/Parallel.h>

#include <cmath>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// x [..., D] float32 contiguous, weight [D] float32 (stored as the offset from one).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32, "rms_norm is float32");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.numel() == D, "rms_norm: weight must have one entry per feature");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t rows = D ? xc.numel() / D : 0;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  auto norm_rows = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* v = xp + r * D;
      float* o = op + r * D;
      int64_t i = 0;
      float ss = 0.f;
#if defined(__AVX512F__)
      __m512 acc = _mm512_setzero_ps();
      for (; i + 16 <= D; i += 16) {
        const __m512 a = _mm512_loadu_ps(v + i);
        acc = _mm512_fmadd_ps(a, a, acc);
      }
      ss = _mm512_reduce_add_ps(acc);
#endif
      for (; i < D; ++i) ss += v[i] * v[i];
      const float r_inv = 1.f / std::sqrt(ss / float(D) + feps);
      i = 0;
#if defined(__AVX512F__)
      const __m512 vr = _mm512_set1_ps(r_inv), one = _mm512_set1_ps(1.f);
      for (; i + 16 <= D; i += 16) {
        const __m512 scaled = _mm512_mul_ps(_mm512_loadu_ps(v + i), vr);
        _mm512_storeu_ps(o + i, _mm512_mul_ps(scaled, _mm512_add_ps(one, _mm512_loadu_ps(wp + i))));
      }
#endif
      for (; i < D; ++i) o[i] = (v[i] * r_inv) * (1.f + wp[i]);
    }
  };
  // A decoding step's norms are one to a few rows: threads would cost more than they save.
  if (rows * D < (1 << 16)) norm_rows(0, rows);
  else at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(D, 1)), norm_rows);
  return out;
}
