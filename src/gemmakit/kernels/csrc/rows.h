// Shared by gemmakit's row-wise float32 kernels (rms_norm.cpp, rope.cpp, gelu_mul.cpp): Gemma's
// RMSNorm of one row, and the rule for when a call's rows are worth splitting over threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace gemmakit {

// o = v / sqrt(mean(v^2) + eps) * (offset + w) for one row of D floats: offset 1 where w is stored
// as the offset from one (Gemma 1-3), 0 where it is the scale itself (Gemma 4, 3n; 0 + w is w).
// The roundings follow torch's: the mean is a float32 sum (in sixteen lanes, then combined) divided
// by D, then eps added, one over the square root, and (v * r) * (offset + w). o may be a scratch row.
inline void rms_norm_row(const float* v, const float* w, float* o, int64_t D, float eps, float offset) {
  int64_t i = 0;
  float ss = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= D; i += 16) {
    const __m512 a = _mm512_loadu_ps(v + i);
    acc = _mm512_fmadd_ps(a, a, acc);
  }
  ss = _mm512_reduce_add_ps(acc);
#else
  // sixteen running sums, then combined: a chain of D dependent adds would cost more than the rest
  float acc[16] = {0.f};
  for (; i + 16 <= D; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += v[i + j] * v[i + j];
  for (int j = 0; j < 16; ++j) ss += acc[j];
#endif
  for (; i < D; ++i) ss += v[i] * v[i];
  const float r_inv = 1.f / std::sqrt(ss / float(D) + eps);
  i = 0;
#if defined(__AVX512F__)
  const __m512 vr = _mm512_set1_ps(r_inv), vo = _mm512_set1_ps(offset);
  for (; i + 16 <= D; i += 16) {
    const __m512 scaled = _mm512_mul_ps(_mm512_loadu_ps(v + i), vr);
    _mm512_storeu_ps(o + i, _mm512_mul_ps(scaled, _mm512_add_ps(vo, _mm512_loadu_ps(w + i))));
  }
#endif
  for (; i < D; ++i) o[i] = (v[i] * r_inv) * (offset + w[i]);
}

// fn(r0, r1) over rows [0, rows) of row_len elements each: on the calling thread when the call has
// fewer than serial_below elements (a decoding step's one to a few rows, where waking threads costs
// more than it saves), else over torch's threads in chunks of about 16K elements.
template <class F>
void for_rows(int64_t rows, int64_t row_len, int64_t serial_below, const F& fn) {
  if (rows * row_len < serial_below) fn(0, rows);
  else at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(row_len, 1)), fn);
}

}  // namespace gemmakit
