// gemmakit CPU kernel: x @ W^T straight from a GGUF file's raw GGML blocks.
//
// It also runs plain 16-bit float matrices (GGML's F16 and BF16: a bfloat16 checkpoint's weights)
// in place, widening each weight to float32 exactly as it is used.
//
// The model keeps each quantised matrix as the file's own bytes ([N, row_bytes] uint8), so decoding
// a token streams 0.56-1.06 bytes per weight instead of the 1.1-1.3 of int8 codes + float scales.
// Every block format is "small integer codes with a float scale (and maybe an offset) per group of 16
// or 32 weights". With AVX-512 or AVX2 the types decoded in this file are multiplied straight from
// their blocks, the codes unpacked in registers (the "fused" sections below: table lookups on
// AVX-512, codes widened to floats with one scale per group on AVX2; with int8 activations, integer
// dots). The block families' types (ggml_blocks.h), and every type on the portable path, work in two
// cache-resident stages per tile of output rows:
//
//   1. decode: unpack the tile's bit fields into int8 codes (in L1), and the group scales/offsets
//      into floats, computed exactly as ggml does (d * sc, dmin * m rounded to float32 first).
//      Q8_0's codes are already int8 in the block: the dot reads them in place.
//   2. dot: y[m] += scale_g * (codes_g . x[m]_g) for up to four rows of x per pass, with the offset
//      terms added as offset_g * sum(x[m]_g) from per-group sums of x computed once per call.
//
// With float32 activations the result equals dequantise-then-matmul up to float32 rounding; with
// int8 activations (the "int8 activations" section: each 32 rounded to 8 bits with a scale, as
// llama.cpp does) it equals the dequantised weights times the rounded activations, and the dots are
// integer. Which types take which is ggml_matmul's `activations` argument. Rows of all matrices of
// one call (e.g. q, k and v in different types) are split together over torch's intra-op threads. ggml_dequantize() uses the same decoders and reproduces
// gemmakit.quant.ggml.dequantize bit for bit: code * scale, then + offset, two roundings (never fused).

#include <torch/types.h>  // not torch/extension.h: no pybind11 here, a third of the compile time
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "ggml_blocks.h"

#if defined(__GNUC__)
#define GK_INLINE __attribute__((always_inline))  // keeps accumulator arrays in registers
#else
#define GK_INLINE
#endif

namespace {

using namespace gemmakit_ggml;

// ------------------------------------------------------------------------------------ block types

// F16 and BF16 are plain 16-bit floats (GGML's block of one), taken here 32 at a time: a checkpoint's
// half-precision matrices run in place as they are stored, with float32 activations, so a bfloat16
// checkpoint computes exactly what its float32 expansion would (each weight widens exactly).
inline bool is_plain16(int64_t type) { return type == F16 || type == BF16; }

const Family* const kFamilies[] = {&kquants_family, &iq2_family, &iq13_family};

bool type_info(int64_t t, TypeInfo* info) {
  switch (t) {
    case Q8_0: *info = {32, 34, 32, false, "Q8_0"}; return true;
    case Q4_0: *info = {32, 18, 32, false, "Q4_0"}; return true;
    case Q4_1: *info = {32, 20, 32, true, "Q4_1"}; return true;
    case Q5_0: *info = {32, 22, 32, false, "Q5_0"}; return true;
    case Q5_1: *info = {32, 24, 32, true, "Q5_1"}; return true;
    case Q4_K: *info = {256, 144, 32, true, "Q4_K"}; return true;
    case Q5_K: *info = {256, 176, 32, true, "Q5_K"}; return true;
    case Q6_K: *info = {256, 210, 16, false, "Q6_K"}; return true;
    case F16: *info = {32, 64, 32, false, "F16"}; return true;
    case BF16: *info = {32, 64, 32, false, "BF16"}; return true;
    default:
      for (const Family* f : kFamilies)
        if (f->info(t, info)) return true;
      return false;
  }
}

// The types multiplied straight from their blocks under AVX-512 / AVX2 (fused_row); the rest, and
// every type of the portable build, are decoded a tile of rows at a time, then dotted.
inline bool has_fused(int64_t t) {
  return t == Q8_0 || t == Q4_0 || t == Q4_1 || t == Q5_0 || t == Q5_1 || t == Q4_K || t == Q5_K || t == Q6_K ||
         is_plain16(t);
}

TypeInfo checked_type(int64_t t) {
  TypeInfo info;
  TORCH_CHECK(type_info(t, &info), "ggml kernel: unsupported GGML type ", t);
  return info;
}

// ------------------------------------------------------------------------------------ helpers

// One 16-bit float (F16 or BF16, little-endian at p) as float32, exactly.
inline float plain16_to_f32(int64_t type, const uint8_t* p) {
  if (type == F16) return fp16_to_f32(p);
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Q4_K / Q5_K: the j-th (0..7) 6-bit scale and min packed in 12 bytes.
inline void k_scale_min(const uint8_t* s, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

#if defined(GK_AVX512) || defined(GK_AVX2)
// 16 bytes of nibbles -> low nibbles and high nibbles as 16 bytes each.
inline void split_nibbles(const uint8_t* p, __m128i* lo, __m128i* hi) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  *lo = _mm_and_si128(v, m);
  *hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
}
#endif

#if !defined(GK_AVX512) && defined(GK_AVX2)
// 16 bits -> 16 bytes, byte j = 16 where bit j is set, else 0.
inline __m128i spread16(uint32_t bits) {
  const __m128i v = _mm_shuffle_epi8(_mm_set1_epi16(int16_t(bits & 0xFFFF)),
                                     _mm_set_epi8(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0));
  const __m128i bit = _mm_set_epi8(-128, 64, 32, 16, 8, 4, 2, 1, -128, 64, 32, 16, 8, 4, 2, 1);
  return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(v, bit), bit), _mm_set1_epi8(16));
}
#endif

// Q4_0/Q4_1/Q5_0/Q5_1: one block's 32 codes. `qh` is the 32 fifth bits (0 for Q4), `bias` 8/16/0.
inline void decode_small(const uint8_t* qs, uint32_t qh, bool five, int bias, int8_t* out) {
#if defined(GK_AVX512)
  __m128i lo, hi;
  split_nibbles(qs, &lo, &hi);
  if (five) {
    const __m128i b16 = _mm_set1_epi8(16);
    lo = _mm_mask_add_epi8(lo, __mmask16(qh & 0xFFFF), lo, b16);
    hi = _mm_mask_add_epi8(hi, __mmask16(qh >> 16), hi, b16);
  }
  const __m128i b = _mm_set1_epi8(int8_t(bias));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_sub_epi8(lo, b));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_sub_epi8(hi, b));
#elif defined(GK_AVX2)
  __m128i lo, hi;
  split_nibbles(qs, &lo, &hi);
  if (five) {
    lo = _mm_or_si128(lo, spread16(qh));
    hi = _mm_or_si128(hi, spread16(qh >> 16));
  }
  const __m128i b = _mm_set1_epi8(int8_t(bias));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_sub_epi8(lo, b));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_sub_epi8(hi, b));
#else
  for (int j = 0; j < 16; ++j) {
    int lo = qs[j] & 0x0F, hi = qs[j] >> 4;
    if (five) {
      lo |= ((qh >> j) & 1) << 4;
      hi |= ((qh >> (j + 16)) & 1) << 4;
    }
    out[j] = int8_t(lo - bias);
    out[j + 16] = int8_t(hi - bias);
  }
#endif
}

// Q4_K / Q5_K: 32 bytes of nibbles (and, for Q5_K, 32 bytes of high bits, bit g for groups g, g+1)
// -> groups 2c (low nibbles) and 2c+1 (high nibbles) of 32 codes each.
inline void decode_k_pair(const uint8_t* qs, const uint8_t* qh, int g, int8_t* out) {
#if defined(GK_AVX512) || defined(GK_AVX2)
  for (int h = 0; h < 2; ++h) {
    __m128i lo, hi;
    split_nibbles(qs + 16 * h, &lo, &hi);
    if (qh != nullptr) {
      const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qh + 16 * h));
      const __m128i one = _mm_set1_epi8(1);
      // (bits >> g) & 1, moved to bit 4; epi16 shifts are safe once masked to one bit per byte.
      const __m128i b0 = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(bits, g), one), 4);
      const __m128i b1 = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(bits, g + 1), one), 4);
      lo = _mm_or_si128(lo, b0);
      hi = _mm_or_si128(hi, b1);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * h), lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 + 16 * h), hi);
  }
#else
  for (int i = 0; i < 32; ++i) {
    int lo = qs[i] & 0x0F, hi = qs[i] >> 4;
    if (qh != nullptr) {
      lo |= ((qh[i] >> g) & 1) << 4;
      hi |= ((qh[i] >> (g + 1)) & 1) << 4;
    }
    out[i] = int8_t(lo);
    out[32 + i] = int8_t(hi);
  }
#endif
}

#if defined(GK_AVX512) || defined(GK_AVX2)
// Q6_K: the codes at 16h + 32j (j = 0..3) of a half-block (ql 64 bytes, qh 32 bytes), 16 each, before
// the -32: low nibbles of ql | two high bits of qh, in ggml's order.
inline GK_INLINE void q6_groups(const uint8_t* ql, const uint8_t* qh, int h, __m128i c[4]) {
  const __m128i m4 = _mm_set1_epi8(0x0F), m30 = _mm_set1_epi8(0x30);
  const __m128i l0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ql + 16 * h));
  const __m128i l1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ql + 32 + 16 * h));
  const __m128i hb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qh + 16 * h));
  c[0] = _mm_or_si128(_mm_and_si128(l0, m4), _mm_and_si128(_mm_slli_epi16(hb, 4), m30));
  c[1] = _mm_or_si128(_mm_and_si128(l1, m4), _mm_and_si128(_mm_slli_epi16(hb, 2), m30));
  c[2] = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(l0, 4), m4), _mm_and_si128(hb, m30));
  c[3] = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(l1, 4), m4), _mm_and_si128(_mm_srli_epi16(hb, 2), m30));
}
#endif

// Q6_K: one half-block (ql 64 bytes, qh 32 bytes) -> 128 codes (minus 32).
inline void decode_q6_half(const uint8_t* ql, const uint8_t* qh, int8_t* out) {
#if defined(GK_AVX512) || defined(GK_AVX2)
  const __m128i b32 = _mm_set1_epi8(32);
  for (int h = 0; h < 2; ++h) {
    __m128i c[4];
    q6_groups(ql, qh, h, c);
    for (int j = 0; j < 4; ++j)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * j + 16 * h), _mm_sub_epi8(c[j], b32));
  }
#else
  for (int i = 0; i < 32; ++i) {
    out[i] = int8_t(((ql[i] & 0x0F) | ((qh[i] & 3) << 4)) - 32);
    out[i + 32] = int8_t(((ql[i + 32] & 0x0F) | (((qh[i] >> 2) & 3) << 4)) - 32);
    out[i + 64] = int8_t(((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) - 32);
    out[i + 96] = int8_t(((ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)) - 32);
  }
#endif
}

// One row of `nb` blocks -> codes (into `codes`, except Q8_0), a float scale per group and, for the
// offset types, a float offset per group. Scales/offsets are rounded exactly as ggml computes them.
Codes decode_row(int64_t type, const uint8_t* row, int64_t nb, int8_t* codes, float* scale, float* offset) {
  switch (type) {
    case Q8_0:
      for (int64_t b = 0; b < nb; ++b) scale[b] = fp16_to_f32(row + 34 * b);
      return {reinterpret_cast<const int8_t*>(row + 2), 34};
    case Q4_0:
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + 18 * b;
        scale[b] = fp16_to_f32(p);
        decode_small(p + 2, 0, false, 8, codes + 32 * b);
      }
      break;
    case Q4_1:
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + 20 * b;
        scale[b] = fp16_to_f32(p);
        offset[b] = fp16_to_f32(p + 2);
        decode_small(p + 4, 0, false, 0, codes + 32 * b);
      }
      break;
    case Q5_0:
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + 22 * b;
        scale[b] = fp16_to_f32(p);
        decode_small(p + 6, load_u32(p + 2), true, 16, codes + 32 * b);
      }
      break;
    case Q5_1:
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + 24 * b;
        scale[b] = fp16_to_f32(p);
        offset[b] = fp16_to_f32(p + 2);
        decode_small(p + 8, load_u32(p + 4), true, 0, codes + 32 * b);
      }
      break;
    case Q4_K:
    case Q5_K: {
      const bool five = type == Q5_K;
      const int64_t bytes = five ? 176 : 144;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + bytes * b;
        const float d = fp16_to_f32(p), dmin = fp16_to_f32(p + 2);
        for (int j = 0; j < 8; ++j) {
          int sc, mn;
          k_scale_min(p + 4, j, &sc, &mn);
          scale[8 * b + j] = d * float(sc);
          offset[8 * b + j] = -(dmin * float(mn));
        }
        const uint8_t* qs = p + (five ? 48 : 16);
        for (int c = 0; c < 4; ++c)
          decode_k_pair(qs + 32 * c, five ? p + 16 : nullptr, 2 * c, codes + 256 * b + 64 * c);
      }
      break;
    }
    case Q6_K:
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + 210 * b;
        const float d = fp16_to_f32(p + 208);
        const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
        for (int j = 0; j < 16; ++j) scale[16 * b + j] = float(sc[j]) * d;
        decode_q6_half(p, p + 128, codes + 256 * b);
        decode_q6_half(p + 64, p + 160, codes + 256 * b + 128);
      }
      return {codes, 16};
    default:
      for (const Family* f : kFamilies) {
        TypeInfo info;
        if (f->info(type, &info)) return f->decode(type, row, nb, codes, scale, offset);
      }
      TORCH_CHECK(false, "ggml kernel: unsupported GGML type ", type);
  }
  return {codes, 32};
}

// ------------------------------------------------------------------------------------ dot

#if defined(GK_AVX512)
inline __m512 load_w16(const int8_t* q) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}
#elif defined(GK_AVX2)
inline __m256 load_w8(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}
inline float hsum256(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
#endif

// out[m] = sum_g scale[g] * (codes_g . x[m]_g) for MB rows of x (row stride K); GS = group size.
template <int MB, int GS>
inline void dot_rows(Codes c, const float* scale, const float* x, int64_t K, float* out) {
#if defined(GK_AVX512)
  // Units of 16 weights; four accumulators per row of x so the FMA chains overlap.
  constexpr int PER = GS / 16;
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int a = 0; a < 4; ++a) acc[m][a] = _mm512_setzero_ps();
  const int64_t U = K / 16;
  auto unit = [&](int64_t u, int a) {
    const int64_t g = u / PER;
    const __m512 w = _mm512_mul_ps(load_w16(c.q + g * c.gstride + (u % PER) * 16), _mm512_set1_ps(scale[g]));
    for (int m = 0; m < MB; ++m) acc[m][a] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + u * 16), acc[m][a]);
  };
  int64_t u = 0;
  for (; u + 4 <= U; u += 4) {
    unit(u, 0);
    unit(u + 1, 1);
    unit(u + 2, 2);
    unit(u + 3, 3);
  }
  for (; u < U; ++u) unit(u, 0);
  for (int m = 0; m < MB; ++m)
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
#elif defined(GK_AVX2)
  // a group's codes dotted unscaled (8 at a time, two chains), then scaled once
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t G = K / GS;
  for (int64_t g = 0; g < G; ++g) {
    const int8_t* q = c.q + g * c.gstride;
    __m256 w[GS / 8];
    for (int j = 0; j < GS / 8; ++j) w[j] = load_w8(q + 8 * j);
    const __m256 sg = _mm256_set1_ps(scale[g]);
    for (int m = 0; m < MB; ++m) {
      const float* xg = x + m * K + g * GS;
      __m256 p0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xg)), p1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(xg + 8));
      for (int j = 2; j < GS / 8; j += 2) {
        p0 = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xg + 8 * j), p0);
        p1 = _mm256_fmadd_ps(w[j + 1], _mm256_loadu_ps(xg + 8 * j + 8), p1);
      }
      acc[m] = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), sg, acc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) out[m] = hsum256(acc[m]);
#else
  const int64_t G = K / GS;
  for (int m = 0; m < MB; ++m) out[m] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    const int8_t* q = c.q + g * c.gstride;
    for (int m = 0; m < MB; ++m) {
      const float* xg = x + m * K + g * GS;
      float part = 0.f;
      for (int j = 0; j < GS; ++j) part += float(q[j]) * xg[j];
      out[m] += scale[g] * part;
    }
  }
#endif
}

// One matrix of a call: its rows [row0, row0 + N) of the combined row range.
struct Mat {
  const uint8_t* data;
  int64_t type, N, row_bytes, col0, row0;
  TypeInfo info;
  bool fused;  // multiplied straight from its blocks (else decoded a tile at a time)
  bool int8;   // its codes meet 8-bit activations (QuantX)
};

// ------------------------------------------------------------------------------------ int8 activations
//
// The decoded (non-fused) types can also multiply 8-bit activations, as llama.cpp does (and, with
// activations=2, the fused ones: "int8, fused" below): each row of x is rounded per block of 32 to
// int8 codes with one float scale (x ~ dx * xq; llama.cpp's Q8_0), and
// a group's codes . xq is an integer dot product, scaled once: scale_g * dx_b * (codes_g . xq_g).
// AVX-512 VNNI's vpdpbusd multiplies unsigned by signed bytes, so the weight codes go in as c + 128
// (c ^ 0x80) and each 4-byte lane starts from -128 * (its four xq's sum), which leaves exactly
// codes . xq. AVX2 multiplies |c| by xq carrying c's sign (vpmaddubsw, no saturation: 2 * 128 * 127
// < 2^15). Offsets (w = scale * code + offset) take the sums of the rounded activations, so that the
// product is the dequantised weights' times the rounded x, as llama.cpp's is.
struct QuantX {
  std::vector<int8_t> q;      // [M, K]
  std::vector<float> d;       // [M, K / 32]
  std::vector<int32_t> bias;  // [M, K / 4]: -128 * the sum of each 4 consecutive q
  std::vector<float> sum32, sum16;  // [M, K / 32], [M, K / 16]: d * the sum of q over each group
};

void quantize_x(const float* x, int64_t M, int64_t K, QuantX* out) {
  out->q.resize(M * K);
  out->d.resize(M * K / 32);
  out->bias.resize(M * K / 4);
  out->sum32.resize(M * K / 32);
  out->sum16.resize(M * K / 16);
  for (int64_t b = 0; b < M * K / 32; ++b) {
    const float* p = x + 32 * b;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(p[j]));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    out->d[b] = d;
    int8_t* q = out->q.data() + 32 * b;
    for (int j = 0; j < 32; ++j) q[j] = int8_t(std::nearbyint(p[j] * id));
    int32_t half[2] = {0, 0};
    for (int j = 0; j < 8; ++j) {
      const int32_t four = q[4 * j] + q[4 * j + 1] + q[4 * j + 2] + q[4 * j + 3];
      out->bias[8 * b + j] = -128 * four;
      half[j / 4] += four;
    }
    out->sum16[2 * b] = d * float(half[0]);
    out->sum16[2 * b + 1] = d * float(half[1]);
    out->sum32[b] = d * float(half[0] + half[1]);
  }
}

// out[m] = sum_g scale[g] * dx * (codes_g . xq[m]_g) for MB rows of quantised x; codes contiguous.
template <int MB, int GS>
inline void int_dot_rows(const int8_t* c, const float* scale, const QuantX& xq, int64_t m0, int64_t K, float* out) {
  const int8_t* q = xq.q.data() + m0 * K;
  const float* dx = xq.d.data() + m0 * (K / 32);
  int64_t k = 0;
#if defined(GK_AVX512) && defined(__AVX512VNNI__)
  const int32_t* bias = xq.bias.data() + m0 * (K / 4);
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  // lane l (4 weights) of a 64-weight step: its group of the step's 64 / GS, and its block of 32
  const __m512i by_group = GS == 32 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                    : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i by_block = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  for (; k + 64 <= K; k += 64) {
    const __m512i cu = _mm512_xor_si512(_mm512_loadu_si512(c + k), flip);
    const __m512 s = _mm512_permutexvar_ps(by_group, _mm512_castps128_ps512(_mm_loadu_ps(scale + k / GS)));
    for (int m = 0; m < MB; ++m) {
      const __m512i t = _mm512_dpbusd_epi32(_mm512_loadu_si512(bias + m * (K / 4) + k / 4), cu,
                                            _mm512_loadu_si512(q + m * K + k));
      const __m512 d = _mm512_permutexvar_ps(by_block, _mm512_castps128_ps512(_mm_loadu_ps(dx + m * (K / 32) + k / 32)));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(s, d), acc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
#elif defined(GK_AVX2)
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (; k + 32 <= K; k += 32) {
    const __m256i cv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + k));
    const __m256i ca = _mm256_abs_epi8(cv);
    const __m256 s = GS == 32 ? _mm256_set1_ps(scale[k / 32])
                              : _mm256_set_m128(_mm_set1_ps(scale[k / 16 + 1]), _mm_set1_ps(scale[k / 16]));
    for (int m = 0; m < MB; ++m) {
      const __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * K + k)), cv);
      const __m256i t = _mm256_madd_epi16(_mm256_maddubs_epi16(ca, xv), ones);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(s, _mm256_set1_ps(dx[m * (K / 32) + k / 32])), acc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    out[m] = _mm_cvtss_f32(lo);
  }
#else
  for (int m = 0; m < MB; ++m) out[m] = 0.f;
#endif
  for (; k < K; k += GS) {  // the rest (and the portable build): one group at a time
    for (int m = 0; m < MB; ++m) {
      int32_t t = 0;
      for (int j = 0; j < GS; ++j) t += int32_t(c[k + j]) * q[m * K + k + j];
      out[m] += scale[k / GS] * dx[m * (K / 32) + k / 32] * float(t);
    }
  }
}

// sum_g a[g] * b[g] (a row's offsets by the sums of x: G is K / 16 or K / 32), in vector lanes.
inline float dot_floats(const float* a, const float* b, int64_t G) {
  int64_t g = 0;
  float t = 0.f;
#if defined(GK_AVX512)
  __m512 acc = _mm512_setzero_ps();
  for (; g + 16 <= G; g += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + g), _mm512_loadu_ps(b + g), acc);
  t = _mm512_reduce_add_ps(acc);
#elif defined(GK_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (; g + 8 <= G; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + g), _mm256_loadu_ps(b + g), acc);
  t = hsum256(acc);
#endif
  for (; g < G; ++g) t += a[g] * b[g];
  return t;
}

template <int MB>
inline void dot_block(const Mat& mat, Codes c, const float* scale, const float* offset, const float* x,
                      const float* xsum, const QuantX* xq, int64_t m0, int64_t K, int64_t G, float* y, int64_t ldy) {
  float out[MB];
  if (mat.int8) {
    if (mat.info.group == 16)
      int_dot_rows<MB, 16>(c.q, scale, *xq, m0, K, out);
    else
      int_dot_rows<MB, 32>(c.q, scale, *xq, m0, K, out);
  } else if (mat.info.group == 16) {
    dot_rows<MB, 16>(c, scale, x, K, out);
  } else {
    dot_rows<MB, 32>(c, scale, x, K, out);
  }
  if (mat.info.has_offset)
    for (int m = 0; m < MB; ++m) out[m] += dot_floats(offset, xsum + m * G, G);
  for (int m = 0; m < MB; ++m) y[m * ldy] = out[m];
}

// ------------------------------------------------------------------------------------ int8, fused
//
// With int8 activations (activations=2), the types with a fused path are multiplied straight from
// their blocks too: the codes are unpacked in registers into bytes and meet xq in integer dot products
// of 4 bytes a lane (vpdpbusd with AVX-512 VNNI or AVX-VNNI, else vpmaddubsw + vpmaddwd), each lane
// then scaled by its group's scale times its block's dx. Unsigned codes (Q4_K, Q5_K, Q4_1, Q5_1:
// 0..31) go in as they are; the others go in unsigned too, c + 128 for Q8_0 (VNNI; AVX2 takes the
// sign trick of int_dot_rows) and before the -32 / -8 / -16 of Q6_K / Q4_0 / Q5_0, their lanes
// starting from that constant times the sum of their four xq (QuantX::bias, shifted right by 0 /
// 2 / 4 / 3). Scales and offsets are the floats decode_row computes,
// and the offsets meet QuantX::sum32, so the product is the decoded int8 path's up to float32 rounding.

#if defined(GK_AVX512) || defined(GK_AVX2)
// Q4_K / Q5_K: the 8 six-bit scales and mins of a block (12 bytes at s) as floats, 4 bytes at a time.
inline void k_scales8(const uint8_t* s, __m256* sc, __m256* mn) {
  const uint32_t u0 = load_u32(s), u1 = load_u32(s + 4), u2 = load_u32(s + 8);
  const __m128i v = _mm_set_epi32(int(((u2 >> 4) & 0x0F0F0F0F) | (((u1 >> 6) & 0x03030303) << 4)),  // mins 4-7
                                  int(u1 & 0x3F3F3F3F),                                              // mins 0-3
                                  int((u2 & 0x0F0F0F0F) | (((u0 >> 6) & 0x03030303) << 4)),         // scales 4-7
                                  int(u0 & 0x3F3F3F3F));                                             // scales 0-3
  *sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
  *mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(v, v)));
}
#endif

// The 32-weight block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): bytes a block, where the codes start,
// and the shift that turns QuantX::bias (-128 * a lane's sum of xq) into the lane's start: the codes
// go in unsigned (Q8_0's as c ^ 0x80, Q4_0's / Q5_0's before their -8 / -16), -1 where they need none.
template <int64_t TYPE>
struct Small {
  static constexpr bool five = TYPE == Q5_0 || TYPE == Q5_1, has_min = TYPE == Q4_1 || TYPE == Q5_1;
  static constexpr int64_t bytes = TYPE == Q8_0 ? 34 : TYPE == Q4_0 ? 18 : TYPE == Q4_1 ? 20 : TYPE == Q5_0 ? 22 : 24;
  static constexpr int64_t qs_at = TYPE == Q8_0 || TYPE == Q4_0 ? 2 : TYPE == Q4_1 ? 4 : TYPE == Q5_0 ? 6 : 8;
  static constexpr int shift = TYPE == Q8_0 ? 0 : TYPE == Q4_0 ? 4 : TYPE == Q5_0 ? 3 : -1;
};

// One block at p as int8 codes (decode_small's), for the blocks after the last whole vector step.
template <int64_t TYPE>
inline void small_codes(const uint8_t* p, int8_t* c) {
  using S = Small<TYPE>;
  if constexpr (TYPE == Q8_0)
    std::memcpy(c, p + 2, 32);
  else
    decode_small(p + S::qs_at, S::five ? load_u32(p + (S::has_min ? 4 : 2)) : 0, S::five,
                 TYPE == Q4_0 ? 8 : TYPE == Q5_0 ? 16 : 0, c);
}

// tail[m] += block b's product, one block in scalar code.
template <int64_t TYPE, int MB>
inline void small_tail(const uint8_t* p, int64_t b, const QuantX& xq, int64_t m0, int64_t K, float* tail) {
  int8_t c[32];
  small_codes<TYPE>(p, c);
  const float w = fp16_to_f32(p);
  const int64_t G32 = K / 32;
  for (int m = 0; m < MB; ++m) {
    const int8_t* qm = xq.q.data() + (m0 + m) * K + 32 * b;
    int32_t t = 0;
    for (int j = 0; j < 32; ++j) t += int32_t(c[j]) * qm[j];
    tail[m] += w * xq.d[(m0 + m) * G32 + b] * float(t);
    if constexpr (Small<TYPE>::has_min) tail[m] += fp16_to_f32(p + 2) * xq.sum32[(m0 + m) * G32 + b];
  }
}

#if defined(GK_AVX512) && defined(__AVX512VNNI__)
#define GK_INT8_ROWS 1
inline bool has_int8_row(int64_t t) { return has_fused(t) && !is_plain16(t); }

// Lanes l of the result: v[idx[l]] for idx = {a x8, b x8} (two groups of 32 in one zmm of lanes).
inline __m512i pair_index(int a, int b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(a)), _mm256_set1_epi32(b), 1);
}

// The fp16 at p's bits.
inline int16_t f16_bits(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return int16_t(h);
}

// The 32 codes of the block at p as unsigned bytes (see Small).
template <int64_t TYPE>
GK_INLINE inline __m256i small_u8(const uint8_t* p) {
  using S = Small<TYPE>;
  if constexpr (TYPE == Q8_0)
    return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2)), _mm256_set1_epi8(char(0x80)));
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + S::qs_at));
  __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
  if constexpr (S::five) u = _mm256_mask_add_epi8(u, __mmask32(load_u32(p + (S::has_min ? 4 : 2))), u, _mm256_set1_epi8(16));
  return u;
}

// acc/tail (+)= one row of 32-weight blocks times xq: four blocks a step, their scales (and mins) in
// one register, two blocks a zmm of lanes.
template <int64_t TYPE, int MB>
GK_INLINE inline void int8_small(const uint8_t* row, int64_t nb, const QuantX& xq, int64_t m0, int64_t K,
                                 __m512 (&acc)[2][MB], float (&tail)[MB]) {
  using S = Small<TYPE>;
  const int8_t* q = xq.q.data() + m0 * K;
  const float* dx = xq.d.data() + m0 * (K / 32);
  const float* s32 = xq.sum32.data() + m0 * (K / 32);
  const int32_t* bias = xq.bias.data() + m0 * (K / 4);
  const int64_t G32 = K / 32;
  const __m512i idx[2] = {pair_index(0, 1), pair_index(2, 3)};
  __m128 off[MB];
  for (int m = 0; m < MB; ++m) off[m] = _mm_setzero_ps();
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) {
    const uint8_t* p = row + S::bytes * b;
    constexpr int64_t B = S::bytes;
    const __m128 w = _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, f16_bits(p + 3 * B), f16_bits(p + 2 * B), f16_bits(p + B), f16_bits(p)));
    __m512 f[MB];
    for (int m = 0; m < MB; ++m) f[m] = _mm512_castps128_ps512(_mm_mul_ps(w, _mm_loadu_ps(dx + m * G32 + b)));
    if constexpr (S::has_min) {
      const __m128 mn = _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, f16_bits(p + 3 * B + 2), f16_bits(p + 2 * B + 2),
                                                   f16_bits(p + B + 2), f16_bits(p + 2)));
      for (int m = 0; m < MB; ++m) off[m] = _mm_fmadd_ps(mn, _mm_loadu_ps(s32 + m * G32 + b), off[m]);
    }
    for (int s = 0; s < 2; ++s) {
      const __m512i codes =
          _mm512_inserti64x4(_mm512_castsi256_si512(small_u8<TYPE>(p + 2 * s * B)), small_u8<TYPE>(p + (2 * s + 1) * B), 1);
      const int64_t k = 32 * (b + 2 * s);
      for (int m = 0; m < MB; ++m) {
        __m512i start = _mm512_setzero_si512();
        if constexpr (S::shift >= 0) start = _mm512_srai_epi32(_mm512_loadu_si512(bias + m * (K / 4) + k / 4), S::shift);
        const __m512i t = _mm512_dpbusd_epi32(start, codes, _mm512_loadu_si512(q + m * K + k));
        acc[s][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_permutexvar_ps(idx[s], f[m]), acc[s][m]);
      }
    }
  }
  for (; b < nb; ++b) small_tail<TYPE, MB>(row + S::bytes * b, b, xq, m0, K, tail);
  for (int m = 0; m < MB; ++m) {
    __m128 o = _mm_add_ps(off[m], _mm_movehl_ps(off[m], off[m]));
    o = _mm_add_ss(o, _mm_movehdup_ps(o));
    tail[m] += _mm_cvtss_f32(o);
  }
}

// out[m] = row . (dx * xq)[m0 + m] (+ the offsets) for one row of raw blocks of a type with a fused path.
template <int MB>
void int8_row(int64_t type, const uint8_t* row, int64_t nb, const QuantX& xq, int64_t m0, int64_t K, float* out) {
  const int8_t* q = xq.q.data() + m0 * K;
  const float* dx = xq.d.data() + m0 * (K / 32);
  const int32_t* bias = xq.bias.data() + m0 * (K / 4);
  const int64_t G32 = K / 32;
  __m512 acc[2][MB];
  __m256 off[MB];
  float tail[MB];  // the 32-weight blocks' offsets and last blocks
  for (int m = 0; m < MB; ++m) {
    tail[m] = 0.f;
    acc[0][m] = acc[1][m] = _mm512_setzero_ps();
    off[m] = _mm256_setzero_ps();
  }
  switch (type) {
    case Q4_K:
    case Q5_K: {
      const bool five = type == Q5_K;
      const int64_t bytes = five ? 176 : 144;
      const float* s32 = xq.sum32.data() + m0 * G32;
      const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
      const __m512i idx[4] = {pair_index(0, 1), pair_index(2, 3), pair_index(4, 5), pair_index(6, 7)};
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + bytes * b;
        __m256 scs, mns;
        k_scales8(p + 4, &scs, &mns);
        const __m256 sv = _mm256_mul_ps(_mm256_set1_ps(fp16_to_f32(p)), scs);
        const __m256 mv = _mm256_mul_ps(_mm256_set1_ps(-fp16_to_f32(p + 2)), mns);  // -(dmin * m)
        __m512 f[MB];
        for (int m = 0; m < MB; ++m) {
          f[m] = _mm512_castps256_ps512(_mm256_mul_ps(sv, _mm256_loadu_ps(dx + m * G32 + 8 * b)));
          off[m] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(s32 + m * G32 + 8 * b), off[m]);
        }
        const uint8_t* qs = p + (five ? 48 : 16);
        const __m256i hb = five ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)) : _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          // 32 bytes: low nibbles are group 2c, high nibbles group 2c+1; bit 2c (2c+1) of qh their fifth
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
          __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
          if (five) {
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c), one), 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c + 1), one), 4));
          }
          const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
          for (int m = 0; m < MB; ++m) {
            const __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes,
                                                  _mm512_loadu_si512(q + m * K + 256 * b + 64 * c));
            acc[c & 1][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_permutexvar_ps(idx[c], f[m]), acc[c & 1][m]);
          }
        }
      }
      break;
    }
    case Q6_K: {
      const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
      const __m512i twice = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
      // lanes of 64 weights -> their group of 16 among the block's: step s of the block covers 4s..4s+3
      __m512i idx[4];
      for (int s = 0; s < 4; ++s)
        idx[s] = _mm512_add_epi32(_mm512_set1_epi32(4 * s), _mm512_srli_epi32(
                     _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2));
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + 210 * b;
        const __m512 sv = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192)))),
            _mm512_set1_ps(fp16_to_f32(p + 208)));
        __m512 f[MB];
        for (int m = 0; m < MB; ++m)
          f[m] = _mm512_mul_ps(sv, _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(_mm256_loadu_ps(dx + m * G32 + 8 * b))));
        for (int h = 0; h < 2; ++h) {
          const uint8_t* ql = p + 64 * h;
          const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
          const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
          const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h));
          // the codes (before the -32) at 0-31, 32-63, 64-95, 96-127 of this half-block
          const __m256i c0 = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30));
          const __m256i c1 = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30));
          const __m256i c2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(hb, m30));
          const __m256i c3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                             _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30));
          const __m512i codes[2] = {_mm512_inserti64x4(_mm512_castsi256_si512(c0), c1, 1),
                                    _mm512_inserti64x4(_mm512_castsi256_si512(c2), c3, 1)};
          for (int s = 0; s < 2; ++s) {
            const int64_t k = 256 * b + 128 * h + 64 * s;
            for (int m = 0; m < MB; ++m) {
              const __m512i start = _mm512_srai_epi32(_mm512_loadu_si512(bias + m * (K / 4) + k / 4), 2);
              const __m512i t = _mm512_dpbusd_epi32(start, codes[s], _mm512_loadu_si512(q + m * K + k));
              acc[s][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_permutexvar_ps(idx[2 * h + s], f[m]), acc[s][m]);
            }
          }
        }
      }
      break;
    }
    case Q8_0: int8_small<Q8_0, MB>(row, nb, xq, m0, K, acc, tail); break;
    case Q4_0: int8_small<Q4_0, MB>(row, nb, xq, m0, K, acc, tail); break;
    case Q4_1: int8_small<Q4_1, MB>(row, nb, xq, m0, K, acc, tail); break;
    case Q5_0: int8_small<Q5_0, MB>(row, nb, xq, m0, K, acc, tail); break;
    case Q5_1: int8_small<Q5_1, MB>(row, nb, xq, m0, K, acc, tail); break;
    default:
      TORCH_CHECK(false, "ggml kernel: no int8 row kernel for GGML type ", type);
  }
  for (int m = 0; m < MB; ++m) {
    __m128 o = _mm_add_ps(_mm256_castps256_ps128(off[m]), _mm256_extractf128_ps(off[m], 1));
    o = _mm_add_ps(o, _mm_movehl_ps(o, o));
    o = _mm_add_ss(o, _mm_movehdup_ps(o));
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m])) + _mm_cvtss_f32(o) + tail[m];
  }
}
#elif defined(GK_AVX2)
#define GK_INT8_ROWS 1
inline bool has_int8_row(int64_t t) { return has_fused(t) && !is_plain16(t); }

// u (unsigned bytes) . s (signed bytes), 4 bytes a lane: AVX-VNNI's vpdpbusd, else vpmaddubsw (whose
// pair sums stay below 2^15 here: |u| <= 128, |s| <= 127) and vpmaddwd.
inline __m256i udot(__m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// acc/tail (+)= one row of 32-weight blocks times xq, a block at a time (blocks b and b+1 into the
// accumulator sets 0 and NA - 1). Q8_0's codes take the sign trick; the rest go in unsigned (Small),
// the fifth bits made bytes by a shuffle and compare.
template <int64_t TYPE, int MB, int NA>
GK_INLINE inline void int8_small(const uint8_t* row, int64_t nb, const QuantX& xq, int64_t m0, int64_t K,
                                 __m256 (&acc)[NA][MB], float (&tail)[MB]) {
  using S = Small<TYPE>;
  const int8_t* q = xq.q.data() + m0 * K;
  const float* dx = xq.d.data() + m0 * (K / 32);
  const float* s32 = xq.sum32.data() + m0 * (K / 32);
  const int32_t* bias = xq.bias.data() + m0 * (K / 4);
  const int64_t G32 = K / 32;
  const __m256i m4 = _mm256_set1_epi8(0x0F), b10 = _mm256_set1_epi8(0x10);
  const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  const __m256i others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe), ones = _mm256_set1_epi64x(-1);
  auto block = [&](int64_t b, __m256* a) GK_INLINE {
    const uint8_t* p = row + S::bytes * b;
    const float w = fp16_to_f32(p);
    if constexpr (TYPE == Q8_0) {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
      const __m256i ca = _mm256_abs_epi8(c);
      for (int m = 0; m < MB; ++m) {
        const __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * K + 32 * b)), c);
        a[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(udot(ca, xs)), _mm256_set1_ps(w * dx[m * G32 + b]), a[m]);
      }
    } else {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + S::qs_at));
      __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), m4);
      if constexpr (S::five) {
        const int qh = int(load_u32(p + (S::has_min ? 4 : 2)));
        const __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(qh), spread), others), ones);
        u = _mm256_or_si256(u, _mm256_and_si256(set, b10));
      }
      for (int m = 0; m < MB; ++m) {
        __m256i t = udot(u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * K + 32 * b)));
        if constexpr (S::shift >= 0)
          t = _mm256_add_epi32(t, _mm256_srai_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias + m * (K / 4) + 8 * b)), S::shift));
        a[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(w * dx[m * G32 + b]), a[m]);
      }
      if constexpr (S::has_min) {
        const float mn = fp16_to_f32(p + 2);
        for (int m = 0; m < MB; ++m) tail[m] += mn * s32[m * G32 + b];
      }
    }
  };
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    block(b, acc[0]);
    block(b + 1, acc[NA - 1]);
  }
  if (b < nb) block(b, acc[0]);
}

// out[m] = row . (dx * xq)[m0 + m] (+ the offsets) for one row of raw blocks of a type with a fused path.
template <int MB>
void int8_row(int64_t type, const uint8_t* row, int64_t nb, const QuantX& xq, int64_t m0, int64_t K, float* out) {
  const int8_t* q = xq.q.data() + m0 * K;
  const float* dx = xq.d.data() + m0 * (K / 32);
  const int32_t* bias = xq.bias.data() + m0 * (K / 4);
  const int64_t G32 = K / 32;
  // Two accumulator sets (overlapping chains) for every row count alike, so that a row of x gets the
  // same sums in any batch (one set for several rows would save registers but change the order).
  constexpr int NA = 2;
  __m256 acc[NA][MB], off[MB];
  float tail[MB];  // the 32-weight blocks' offsets
  for (int m = 0; m < MB; ++m) {
    for (int a = 0; a < NA; ++a) acc[a][m] = _mm256_setzero_ps();
    off[m] = _mm256_setzero_ps();
    tail[m] = 0.f;
  }
  switch (type) {
    case Q4_K:
    case Q5_K: {
      const bool five = type == Q5_K;
      const int64_t bytes = five ? 176 : 144;
      const float* s32 = xq.sum32.data() + m0 * G32;
      const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + bytes * b;
        __m256 scs, mns;
        k_scales8(p + 4, &scs, &mns);
        const __m256 sv = _mm256_mul_ps(_mm256_set1_ps(fp16_to_f32(p)), scs);
        const __m256 mv = _mm256_mul_ps(_mm256_set1_ps(-fp16_to_f32(p + 2)), mns);  // -(dmin * m)
        __m256 f[MB];
        for (int m = 0; m < MB; ++m) {
          f[m] = _mm256_mul_ps(sv, _mm256_loadu_ps(dx + m * G32 + 8 * b));
          off[m] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(s32 + m * G32 + 8 * b), off[m]);
        }
        const uint8_t* qs = p + (five ? 48 : 16);
        const __m256i hb = five ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)) : _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          // 32 bytes: low nibbles are group 2c, high nibbles group 2c+1; bit 2c (2c+1) of qh their fifth
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
          __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
          if (five) {
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c), one), 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * c + 1), one), 4));
          }
          const __m256i g0 = _mm256_set1_epi32(2 * c), g1 = _mm256_set1_epi32(2 * c + 1);
          for (int m = 0; m < MB; ++m) {
            const int8_t* qm = q + m * K + 256 * b + 64 * c;
            const __m256i t0 = udot(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qm)));
            const __m256i t1 = udot(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qm + 32)));
            acc[0][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t0), _mm256_permutevar8x32_ps(f[m], g0), acc[0][m]);
            acc[NA - 1][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t1), _mm256_permutevar8x32_ps(f[m], g1), acc[NA - 1][m]);
          }
        }
      }
      break;
    }
    case Q6_K: {
      const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
      const __m256i twice = _mm256_set_epi32(3, 3, 2, 2, 1, 1, 0, 0);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + 210 * b;
        const __m256 d = _mm256_set1_ps(fp16_to_f32(p + 208));
        const __m256 sv[2] = {
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 192)))), d),
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 200)))), d)};
        for (int h = 0; h < 2; ++h) {
          // this half's 8 groups of 16 times their blocks' dx
          __m256 f[MB];
          for (int m = 0; m < MB; ++m)
            f[m] = _mm256_mul_ps(sv[h], _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(dx + m * G32 + 8 * b + 4 * h)), twice));
          const uint8_t* ql = p + 64 * h;
          const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
          const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
          const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h));
          // the codes (before the -32) at 0-31, 32-63, 64-95, 96-127 of this half-block
          const __m256i c[4] = {
              _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30)),
              _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30)),
              _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(hb, m30)),
              _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30))};
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const int64_t k = 256 * b + 128 * h + 32 * j;
            const __m256i g = _mm256_set_epi32(2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j, 2 * j, 2 * j, 2 * j);
            for (int m = 0; m < MB; ++m) {
              const __m256i start = _mm256_srai_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias + m * (K / 4) + k / 4)), 2);
              const __m256i t = _mm256_add_epi32(start, udot(c[j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * K + k))));
              acc[(j & 1) * (NA - 1)][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_permutevar8x32_ps(f[m], g),
                                                           acc[(j & 1) * (NA - 1)][m]);
            }
          }
        }
      }
      break;
    }
    case Q8_0: int8_small<Q8_0, MB, NA>(row, nb, xq, m0, K, acc, tail); break;
    case Q4_0: int8_small<Q4_0, MB, NA>(row, nb, xq, m0, K, acc, tail); break;
    case Q4_1: int8_small<Q4_1, MB, NA>(row, nb, xq, m0, K, acc, tail); break;
    case Q5_0: int8_small<Q5_0, MB, NA>(row, nb, xq, m0, K, acc, tail); break;
    case Q5_1: int8_small<Q5_1, MB, NA>(row, nb, xq, m0, K, acc, tail); break;
    default:
      TORCH_CHECK(false, "ggml kernel: no int8 row kernel for GGML type ", type);
  }
  for (int m = 0; m < MB; ++m) {
    __m256 s = _mm256_add_ps(acc[0][m], off[m]);
    for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[a][m]);
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    out[m] = _mm_cvtss_f32(lo) + tail[m];
  }
}
#endif

#if defined(GK_AVX512)
// ------------------------------------------------------------------------------------ fused (AVX-512)
//
// For M=1 a separate decode pass costs as much as the dot, so with AVX-512 every type is multiplied
// straight from its blocks (Q6_K's codes are assembled as int8 in registers). 4- and 5-bit codes become floats by table lookup: a group's
// 16 possible weights scale * q + offset fill one zmm register, and vpermps picks them by nibble
// (it reads only the low 4 bits of each index, so the nibble needs no masking); the fifth bit (a
// 32-bit mask in Q5_0/Q5_1, a byte test in Q5_K) adds 16 * scale under a mask register. Offsets
// live in the table, so these types need no sums of x.

// acc[m] (+)= w0 . x[m][0:16] and acc2[m] (+)= w1 . x[m][16:32], x pointing at the group.
template <int MB>
GK_INLINE inline void fma32(__m512 w0, __m512 w1, const float* x, int64_t K, __m512* a0, __m512* a1) {
  for (int m = 0; m < MB; ++m) {
    a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K), a0[m]);
    a1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + 16), a1[m]);
  }
}

// acc[m] += d * (w0 . x[m][0:16] + w1 . x[m][16:32]): a block's codes dotted unscaled, then scaled once.
template <int MB>
GK_INLINE inline void scaled_dot32(__m512 w0, __m512 w1, float d, const float* x, int64_t K, __m512* acc) {
  const __m512 dv = _mm512_set1_ps(d);
  for (int m = 0; m < MB; ++m) {
    const __m512 s = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(x + m * K)));
    acc[m] = _mm512_fmadd_ps(s, dv, acc[m]);
  }
}

template <int MB>
GK_INLINE inline void fma16(__m512 w, const float* x, int64_t K, __m512* a) {
  for (int m = 0; m < MB; ++m) a[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K), a[m]);
}

// The fp16 at p, widened and broadcast to 16 lanes (vpbroadcastw + vcvtph2ps).
inline __m512 bcast_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _mm512_cvtph_ps(_mm256_set1_epi16(int16_t(h)));
}

inline __m512 iota16(float start) {
  return _mm512_add_ps(_mm512_set1_ps(start),
                       _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
}

// Two blocks per step into separate accumulators (constant indices keep them in registers).
template <int MB, typename Block>
inline GK_INLINE void blocks_in_pairs(int64_t nb, Block& block, __m512 (&acc)[4][MB]) {
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    block(b, acc[0], acc[1]);
    block(b + 1, acc[2], acc[3]);
  }
  if (b < nb) block(b, acc[0], acc[1]);
}

// out[m] = row . x[m] for one row of raw blocks of a fused type.
template <int MB>
void fused_row(int64_t type, const uint8_t* row, int64_t nb, const float* x, int64_t K, const float* /*xsum*/,
               int64_t /*G32*/, float* out) {
  __m512 acc[4][MB];
  for (int a = 0; a < 4; ++a)
    for (int m = 0; m < MB; ++m) acc[a][m] = _mm512_setzero_ps();
  switch (type) {
    case Q8_0: {
      if constexpr (MB <= 2) {
        // Few rows of x: each block's dot of its codes is scaled once (one multiply a block, not
        // one per 16 weights), which matters when the conversions and FMAs, not memory, set the pace.
        auto block = [&](int64_t b, __m512* a0, __m512* /*a1*/) GK_INLINE {
          const uint8_t* p = row + 34 * b;
          const __m512 w0 = load_w16(reinterpret_cast<const int8_t*>(p + 2));
          const __m512 w1 = load_w16(reinterpret_cast<const int8_t*>(p + 18));
          scaled_dot32<MB>(w0, w1, fp16_to_f32(p), x + 32 * b, K, a0);
        };
        blocks_in_pairs<MB>(nb, block, acc);
      } else {
        auto block = [&](int64_t b, __m512* a0, __m512* a1) GK_INLINE {
          const uint8_t* p = row + 34 * b;
          const __m512 d = bcast_f16(p);
          const __m512 w0 = _mm512_mul_ps(load_w16(reinterpret_cast<const int8_t*>(p + 2)), d);
          const __m512 w1 = _mm512_mul_ps(load_w16(reinterpret_cast<const int8_t*>(p + 18)), d);
          fma32<MB>(w0, w1, x + 32 * b, K, a0, a1);
        };
        blocks_in_pairs<MB>(nb, block, acc);
      }
      break;
    }
    case Q4_0:
    case Q4_1:
    case Q5_0:
    case Q5_1: {
      const bool five = type == Q5_0 || type == Q5_1, has_min = type == Q4_1 || type == Q5_1;
      const int64_t bytes = type == Q4_0 ? 18 : type == Q4_1 ? 20 : type == Q5_0 ? 22 : 24;
      const int64_t qs_at = type == Q4_0 ? 2 : type == Q4_1 ? 4 : type == Q5_0 ? 6 : 8;
      const float bias = type == Q4_0 ? -8.f : type == Q5_0 ? -16.f : 0.f;
      const __m512 lo_q = iota16(bias), sixteen = _mm512_set1_ps(16.f);
      if (MB <= 2 && !has_min) {
        // Few rows of x, no minimum: the codes' own values from a constant table, each block's dot
        // scaled once, as for Q8_0 above (two fewer multiplies a block, and no widened scale).
        auto block = [&](int64_t b, __m512* a0, __m512* /*a1*/) GK_INLINE {
          const uint8_t* p = row + bytes * b;
          const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + qs_at)));
          __m512 w0 = _mm512_permutexvar_ps(q, lo_q), w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lo_q);
          if (five) {
            const uint32_t qh = load_u32(p + 2);
            w0 = _mm512_mask_add_ps(w0, __mmask16(qh & 0xFFFF), w0, sixteen);
            w1 = _mm512_mask_add_ps(w1, __mmask16(qh >> 16), w1, sixteen);
          }
          scaled_dot32<MB>(w0, w1, fp16_to_f32(p), x + 32 * b, K, a0);
        };
        blocks_in_pairs<MB>(nb, block, acc);
        break;
      }
      auto block = [&](int64_t b, __m512* a0, __m512* a1) GK_INLINE {
        const uint8_t* p = row + bytes * b;
        const __m512 d = bcast_f16(p);
        const __m512 t0 = has_min ? _mm512_fmadd_ps(d, lo_q, bcast_f16(p + 2)) : _mm512_mul_ps(d, lo_q);
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + qs_at)));
        const __m512i qh4 = _mm512_srli_epi32(q, 4);
        __m512 w0 = _mm512_permutexvar_ps(q, t0), w1 = _mm512_permutexvar_ps(qh4, t0);
        if (five) {
          const uint32_t qh = load_u32(p + (has_min ? 4 : 2));
          const __m512 d16 = _mm512_mul_ps(d, sixteen);  // the fifth bit's weight
          w0 = _mm512_mask_add_ps(w0, __mmask16(qh & 0xFFFF), w0, d16);
          w1 = _mm512_mask_add_ps(w1, __mmask16(qh >> 16), w1, d16);
        }
        fma32<MB>(w0, w1, x + 32 * b, K, a0, a1);
      };
      blocks_in_pairs<MB>(nb, block, acc);
      break;
    }
    case Q4_K:
    case Q5_K: {
      const bool five = type == Q5_K;
      const int64_t bytes = five ? 176 : 144;
      const __m512 lo_q = iota16(0.f);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + bytes * b;
        const float d = fp16_to_f32(p), dmin = fp16_to_f32(p + 2);
        const uint8_t* qs = p + (five ? 48 : 16);
        const __m128i qh0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));  // (Q4_K: unused)
        const __m128i qh1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32));
        const float* xb = x + 256 * b;
        float scs[8], mns[8];
        for (int j = 0; j < 8; ++j) {
          int sc, mn;
          k_scale_min(p + 4, j, &sc, &mn);
          scs[j] = d * float(sc);
          mns[j] = -(dmin * float(mn));
        }
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          const __m512i q0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 32 * c)));
          const __m512i q1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 32 * c + 16)));
          // group 2c: the low nibbles, group 2c+1: the high ones
          auto group = [&](int g, __m512i i0, __m512i i1, __m512* a0, __m512* a1) GK_INLINE {
            const float sf = scs[g];
            const __m512 s = _mm512_set1_ps(sf), o = _mm512_set1_ps(mns[g]);
            const __m512 t0 = _mm512_fmadd_ps(s, lo_q, o);
            __m512 w0 = _mm512_permutexvar_ps(i0, t0), w1 = _mm512_permutexvar_ps(i1, t0);
            if (five) {
              const __m512 s16 = _mm512_set1_ps(16.f * sf);  // the fifth bit's weight
              const __m128i bit = _mm_set1_epi8(char(1 << g));
              w0 = _mm512_mask_add_ps(w0, _mm_test_epi8_mask(qh0, bit), w0, s16);
              w1 = _mm512_mask_add_ps(w1, _mm_test_epi8_mask(qh1, bit), w1, s16);
            }
            fma32<MB>(w0, w1, xb + 32 * g, K, a0, a1);
          };
          group(2 * c, q0, q1, acc[0], acc[1]);
          group(2 * c + 1, _mm512_srli_epi32(q0, 4), _mm512_srli_epi32(q1, 4), acc[2], acc[3]);
        }
      }
      break;
    }
    case Q6_K: {
      // The 6-bit codes are assembled as int8 in registers (as decode_q6_half does), then widened.
      const __m128i b32 = _mm_set1_epi8(32);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + 210 * b;
        const float d = fp16_to_f32(p + 208);
        const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
        for (int half = 0; half < 2; ++half) {
          const uint8_t* ql = p + 64 * half;
          const uint8_t* qh = p + 128 + 32 * half;
          const float* xh = x + 256 * b + 128 * half;
          const int8_t* sh = sc + 8 * half;
          for (int h = 0; h < 2; ++h) {
            __m128i c[4];
            q6_groups(ql, qh, h, c);
            // codes at 16h + 32j of this half: scale sh[(16h + 32j) / 16] = sh[h + 2j]
            auto unit = [&](__m128i codes, int j, __m512* a) GK_INLINE {
              const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(codes, b32)));
              fma16<MB>(_mm512_mul_ps(w, _mm512_set1_ps(float(sh[h + 2 * j]) * d)), xh + 16 * h + 32 * j, K, a);
            };
            unit(c[0], 0, acc[0]);
            unit(c[1], 1, acc[1]);
            unit(c[2], 2, acc[2]);
            unit(c[3], 3, acc[3]);
          }
        }
      }
      break;
    }
    case F16:
    case BF16: {
      // 32 weights (64 bytes) a block: vcvtph2ps, or a bfloat16's bits shifted into a float32's top half
      const bool half = type == F16;
      auto block = [&](int64_t b, __m512* a0, __m512* a1) GK_INLINE {
        const uint8_t* p = row + 64 * b;
        const __m256i h0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i h1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
        const __m512 w0 = half ? _mm512_cvtph_ps(h0) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h0), 16));
        const __m512 w1 = half ? _mm512_cvtph_ps(h1) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h1), 16));
        fma32<MB>(w0, w1, x + 32 * b, K, a0, a1);
      };
      blocks_in_pairs<MB>(nb, block, acc);
      break;
    }
    default:
      TORCH_CHECK(false, "ggml kernel: no fused path for GGML type ", type);
  }
  for (int m = 0; m < MB; ++m)
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]), _mm512_add_ps(acc[2][m], acc[3][m])));
}

#endif

#if !defined(GK_AVX512) && defined(GK_AVX2)
// ------------------------------------------------------------------------------------ fused (AVX2)
//
// Without AVX-512 there is no 16-entry register table, so codes are widened to floats (vpmovsxbd +
// vcvtdq2ps) and each group's dot product is formed unscaled, then scaled once:
// acc += scale_g * (codes_g . x_g). That is 3 vector ops per 8 weights instead of the decode pass's
// store, reload and per-weight multiply, and it keeps two cores at the memory bandwidth for Q8_0
// (~14 GB/s here, against ~8 for decode-then-dot). Offsets are added afterwards from the per-group
// sums of x, as offset_g * sum(x_g).

// The 16 int8 codes in c times x[m][0:16], into two partial sums per row of x (codes 0-7 and 8-15);
// FIRST starts the partials instead of adding to them.
template <int MB, bool FIRST>
GK_INLINE inline void codes16(__m128i c, const float* x, int64_t K, __m256* p0, __m256* p1) {
  const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
  const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(c, c)));
  for (int m = 0; m < MB; ++m) {
    const float* xm = x + m * K;
    if (FIRST) {
      p0[m] = _mm256_mul_ps(w0, _mm256_loadu_ps(xm));
      p1[m] = _mm256_mul_ps(w1, _mm256_loadu_ps(xm + 8));
    } else {
      p0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), p0[m]);
      p1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), p1[m]);
    }
  }
}

// acc[m] += scale * (codes . x[m]) for one group of 32 codes (lo: the first 16, hi: the rest).
template <int MB>
GK_INLINE inline void group32(__m128i lo, __m128i hi, const float* x, int64_t K, float scale, __m256* acc) {
  __m256 p0[MB], p1[MB];
  codes16<MB, true>(lo, x, K, p0, p1);
  codes16<MB, false>(hi, x + 16, K, p0, p1);
  const __m256 s = _mm256_set1_ps(scale);
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(_mm256_add_ps(p0[m], p1[m]), s, acc[m]);
}

// The same for a group of 16 (Q6_K).
template <int MB>
GK_INLINE inline void group16(__m128i c, const float* x, int64_t K, float scale, __m256* acc) {
  __m256 p0[MB], p1[MB];
  codes16<MB, true>(c, x, K, p0, p1);
  const __m256 s = _mm256_set1_ps(scale);
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(_mm256_add_ps(p0[m], p1[m]), s, acc[m]);
}

// out[m] = row . x[m] for one row of raw blocks; xsum ([MB, G32] at stride G32) holds the sums of x
// over each group of 32 for the offset types.
template <int MB>
void fused_row(int64_t type, const uint8_t* row, int64_t nb, const float* x, int64_t K, const float* xsum,
               int64_t G32, float* out) {
  // Two accumulator sets for one row of x (alternate groups overlap their FMA chains); one for more,
  // which have independent chains per row already and need the registers.
  constexpr int NA = MB == 1 ? 2 : 1;
  __m256 acc[NA][MB];
  float off[MB];  // sum_g offset_g * sum(x[m]_g)
  for (int m = 0; m < MB; ++m) {
    off[m] = 0.f;
    for (int a = 0; a < NA; ++a) acc[a][m] = _mm256_setzero_ps();
  }
  auto add_offset = [&](int64_t g, float o) GK_INLINE {
    for (int m = 0; m < MB; ++m) off[m] += o * xsum[m * G32 + g];
  };
  // Blocks b and b+1 into the two accumulator sets (constant indices keep them in registers).
  auto in_pairs = [&](auto&& block) GK_INLINE {
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      block(b, acc[0]);
      block(b + 1, acc[NA - 1]);
    }
    if (b < nb) block(b, acc[0]);
  };
  switch (type) {
    case Q8_0:
      in_pairs([&](int64_t b, __m256* a) GK_INLINE {
        const uint8_t* p = row + 34 * b;
        const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2));
        const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 18));
        group32<MB>(lo, hi, x + 32 * b, K, fp16_to_f32(p), a);
      });
      break;
    case Q4_0:
    case Q4_1:
    case Q5_0:
    case Q5_1: {
      const bool five = type == Q5_0 || type == Q5_1, has_min = type == Q4_1 || type == Q5_1;
      const int64_t bytes = type == Q4_0 ? 18 : type == Q4_1 ? 20 : type == Q5_0 ? 22 : 24;
      const int64_t qs_at = type == Q4_0 ? 2 : type == Q4_1 ? 4 : type == Q5_0 ? 6 : 8;
      // In one ymm: the 16 low nibbles (codes 0-15) then the 16 high ones (codes 16-31). The fifth
      // bits become bytes by the usual shuffle/compare trick; for Q5_0 a clear bit gives nib | 0xF0,
      // which is nib - 16 as int8, so the bias costs nothing.
      const __m256i m4 = _mm256_set1_epi8(0x0F), f0 = _mm256_set1_epi8(char(0xF0)), b10 = _mm256_set1_epi8(0x10);
      const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
      const __m256i others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe), ones = _mm256_set1_epi64x(-1);
      const __m256i bias8 = _mm256_set1_epi8(type == Q4_0 ? 8 : 0);
      in_pairs([&](int64_t b, __m256* a) GK_INLINE {
        const uint8_t* p = row + bytes * b;
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + qs_at));
        __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), m4);
        if (five) {
          const int qh = int(load_u32(p + (has_min ? 4 : 2)));
          const __m256i set = _mm256_cmpeq_epi8(
              _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(qh), spread), others), ones);
          q = _mm256_or_si256(q, has_min ? _mm256_and_si256(set, b10) : _mm256_andnot_si256(set, f0));
        } else {
          q = _mm256_sub_epi8(q, bias8);
        }
        group32<MB>(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1), x + 32 * b, K, fp16_to_f32(p), a);
        if (has_min) add_offset(b, fp16_to_f32(p + 2));
      });
      break;
    }
    case Q4_K:
    case Q5_K: {
      const bool five = type == Q5_K;
      const int64_t bytes = five ? 176 : 144;
      const __m128i one = _mm_set1_epi8(1);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + bytes * b;
        const float d = fp16_to_f32(p), dmin = fp16_to_f32(p + 2);
        const uint8_t* qs = p + (five ? 48 : 16);
        const float* xb = x + 256 * b;
        for (int c = 0; c < 4; ++c) {
          // bytes 32c..32c+31: low nibbles are group 2c, high nibbles group 2c+1
          __m128i lo0, hi0, lo1, hi1;
          split_nibbles(qs + 32 * c, &lo0, &hi0);
          split_nibbles(qs + 32 * c + 16, &lo1, &hi1);
          if (five) {  // bit 2c (2c+1) of qh[i] is the fifth bit of element i of group 2c (2c+1)
            const __m128i h0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
            const __m128i h1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32));
            auto bit4 = [&](__m128i h, int g) GK_INLINE {
              return _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, g), one), 4);
            };
            lo0 = _mm_or_si128(lo0, bit4(h0, 2 * c));
            lo1 = _mm_or_si128(lo1, bit4(h1, 2 * c));
            hi0 = _mm_or_si128(hi0, bit4(h0, 2 * c + 1));
            hi1 = _mm_or_si128(hi1, bit4(h1, 2 * c + 1));
          }
          int sc, mn;
          k_scale_min(p + 4, 2 * c, &sc, &mn);
          group32<MB>(lo0, lo1, xb + 64 * c, K, d * float(sc), acc[0]);
          add_offset(8 * b + 2 * c, -(dmin * float(mn)));
          k_scale_min(p + 4, 2 * c + 1, &sc, &mn);
          group32<MB>(hi0, hi1, xb + 64 * c + 32, K, d * float(sc), acc[NA - 1]);
          add_offset(8 * b + 2 * c + 1, -(dmin * float(mn)));
        }
      }
      break;
    }
    case Q6_K: {
      const __m128i b32 = _mm_set1_epi8(32);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + 210 * b;
        const float d = fp16_to_f32(p + 208);
        const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
        for (int half = 0; half < 2; ++half) {
          const float* xh = x + 256 * b + 128 * half;
          const int8_t* sh = sc + 8 * half;
          for (int h = 0; h < 2; ++h) {
            __m128i c[4];
            q6_groups(p + 64 * half, p + 128 + 32 * half, h, c);
            // codes at 16h + 32j of this half, scale sh[h + 2j]
            for (int j = 0; j < 4; ++j)
              group16<MB>(_mm_sub_epi8(c[j], b32), xh + 16 * h + 32 * j, K, float(sh[h + 2 * j]) * d, acc[(j & 1) * (NA - 1)]);
          }
        }
      }
      break;
    }
    case F16:
    case BF16: {
      const bool half = type == F16;
      in_pairs([&](int64_t b, __m256* a) GK_INLINE {
        const uint8_t* p = row + 64 * b;
        for (int q = 0; q < 4; ++q) {
          const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * q));
#if defined(__F16C__)
          const __m256 w = half ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
          alignas(32) float f[8];
          for (int j = 0; j < 8; ++j) f[j] = plain16_to_f32(type, p + 16 * q + 2 * j);
          const __m256 w = _mm256_load_ps(f);
#endif
          for (int m = 0; m < MB; ++m) a[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + 32 * b + 8 * q), a[m]);
        }
      });
      break;
    }
    default:
      TORCH_CHECK(false, "ggml kernel: no fused path for GGML type ", type);
  }
  for (int m = 0; m < MB; ++m) {
    __m256 s = acc[0][m];
    for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[a][m]);
    out[m] = hsum256(s) + off[m];
  }
}

#endif

// How far ahead of the row being multiplied to prefetch, and the decode path's tile of rows (sized
// to stay well inside L1 next to the activations). The prefetch fills L2, not L1 (T1, not T0): on a
// 2-core Xeon streaming a 712 MB Q8_0 matrix from DRAM, T0 reached 16.7 GB/s and T1 20.8 (8-64 KB
// ahead all alike); the L1 streamer brings the lines the rest of the way.
constexpr int64_t kPrefetchBytes = 16384, kTileBytes = 16384;
// A thread's rows of a matrix too big for the caches are read as kStreams interleaved runs, one row
// of each in turn: more misses in flight than one sequential run keeps. The same Xeon streamed the
// 712 MB matrix at 18-19 GB/s in one run, 25 in four, 23.5 in eight (a pure read: 28).
constexpr int64_t kStreams = 4, kStreamMinBytes = 1 << 20;

#if defined(GK_AVX512) || defined(GK_AVX2)
// How many rows ahead of the one being multiplied to prefetch, and the prefetch of row r + ahead.
inline int64_t rows_ahead(const Mat& mat) { return std::max<int64_t>(2, kPrefetchBytes / mat.row_bytes); }

inline void prefetch_row(const Mat& mat, int64_t r, int64_t ahead) {
  if (r + ahead < mat.N) {
    const char* p = reinterpret_cast<const char*>(mat.data + (r + ahead) * mat.row_bytes);
    for (int64_t o = 0; o < mat.row_bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
  }
}

// one_row(r, row) for the rows [r0, r1) of a row-at-a-time kernel, each prefetched `ahead` rows early,
// in kStreams interleaved runs where the rows are big enough.
template <typename F>
inline void stream_rows(const Mat& mat, int64_t r0, int64_t r1, F&& one_row) {
  const int64_t ahead = rows_ahead(mat);
  const int64_t streams = (r1 - r0) * mat.row_bytes >= kStreamMinBytes ? kStreams : 1;
  const int64_t run = (r1 - r0 + streams - 1) / streams;  // rows per stream (the last may be short)
  for (int64_t i = 0; i < run; ++i)
    for (int64_t s = 0; s < streams; ++s) {
      const int64_t r = r0 + s * run + i;
      if (r >= r1) continue;
      prefetch_row(mat, r, ahead);
      one_row(r, mat.data + r * mat.row_bytes);
    }
}
#endif

// Rows [r0, r1) of one matrix, all M rows of x: decode a tile of rows once (into L1), then run
// every block of up to four rows of x over it.
void matmul_rows(const Mat& mat, int64_t r0, int64_t r1, const float* x, const float* xsum32, const float* xsum16,
                 const QuantX* xq, int64_t M,
                 int64_t K, float* y, int64_t ldy, std::vector<int8_t>& codes, std::vector<float>& sc,
                 std::vector<float>& off) {
  const int64_t nb = K / mat.info.block;
#if defined(GK_AVX512) || defined(GK_AVX2)
  if (mat.fused) {
    const float* xsum = xsum32;
    const int64_t G32 = K / 32;
    stream_rows(mat, r0, r1, [&](int64_t r, const uint8_t* row) {
      for (int64_t m = 0; m < M; m += 4) {
        float out[4];
        const int64_t mb = std::min<int64_t>(4, M - m);
        switch (mb) {
          case 4: fused_row<4>(mat.type, row, nb, x + m * K, K, xsum ? xsum + m * G32 : nullptr, G32, out); break;
          case 3: fused_row<3>(mat.type, row, nb, x + m * K, K, xsum ? xsum + m * G32 : nullptr, G32, out); break;
          case 2: fused_row<2>(mat.type, row, nb, x + m * K, K, xsum ? xsum + m * G32 : nullptr, G32, out); break;
          default: fused_row<1>(mat.type, row, nb, x + m * K, K, xsum ? xsum + m * G32 : nullptr, G32, out); break;
        }
        for (int64_t j = 0; j < mb; ++j) y[(m + j) * ldy + mat.col0 + r] = out[j];
      }
    });
    return;
  }
#endif
#if defined(GK_INT8_ROWS)
  if (mat.int8 && has_int8_row(mat.type)) {
    stream_rows(mat, r0, r1, [&](int64_t r, const uint8_t* row) {
      for (int64_t m = 0; m < M; m += 4) {
        float out[4];
        const int64_t mb = std::min<int64_t>(4, M - m);
        switch (mb) {
          case 4: int8_row<4>(mat.type, row, nb, *xq, m, K, out); break;
          case 3: int8_row<3>(mat.type, row, nb, *xq, m, K, out); break;
          case 2: int8_row<2>(mat.type, row, nb, *xq, m, K, out); break;
          default: int8_row<1>(mat.type, row, nb, *xq, m, K, out); break;
        }
        for (int64_t j = 0; j < mb; ++j) y[(m + j) * ldy + mat.col0 + r] = out[j];
      }
    });
    return;
  }
#endif
  if (is_plain16(mat.type)) {  // no codes to decode: widen each weight as it is used
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = mat.data + r * mat.row_bytes;
      for (int64_t m = 0; m < M; ++m) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += plain16_to_f32(mat.type, row + 2 * k) * x[m * K + k];
        y[m * ldy + mat.col0 + r] = acc;
      }
    }
    return;
  }
  const int64_t G = K / mat.info.group;
  // sums of x per group, for the offsets (of the rounded x where that meets the codes)
  const float* xsum = mat.int8 ? (mat.info.group == 16 ? xq->sum16.data() : xq->sum32.data())
                               : (mat.info.group == 16 ? xsum16 : xsum32);
  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(32, kTileBytes / K));
  codes.resize(tile * K);
  sc.resize(tile * G);
  off.resize(tile * G);
  std::vector<Codes> rows(tile);
#if defined(GK_AVX512) || defined(GK_AVX2)
  const int64_t ahead = rows_ahead(mat);
#endif
  for (int64_t t0 = r0; t0 < r1; t0 += tile) {
    const int64_t t1 = std::min(r1, t0 + tile);
    for (int64_t r = t0; r < t1; ++r) {
      const int64_t i = r - t0;
#if defined(GK_AVX512) || defined(GK_AVX2)
      prefetch_row(mat, r, ahead);
#endif
      int8_t* mine = codes.data() + i * K;
      rows[i] = decode_row(mat.type, mat.data + r * mat.row_bytes, nb, mine, sc.data() + i * G, off.data() + i * G);
      if (mat.int8 && rows[i].gstride != mat.info.group) {  // the integer dot reads the codes contiguous
        for (int64_t g = 0; g < G; ++g) std::memcpy(mine + g * mat.info.group, rows[i].q + g * rows[i].gstride, mat.info.group);
        rows[i] = {mine, mat.info.group};
      }
    }
    int64_t m = 0;
    for (; m < M; m += 4) {
      const int64_t mb = std::min<int64_t>(4, M - m);
      for (int64_t r = t0; r < t1; ++r) {
        const int64_t i = r - t0;
        float* yr = y + m * ldy + mat.col0 + r;
        const float* xm = x + m * K;
        const float* xs = xsum ? xsum + m * G : nullptr;
        switch (mb) {
          case 4: dot_block<4>(mat, rows[i], sc.data() + i * G, off.data() + i * G, xm, xs, xq, m, K, G, yr, ldy); break;
          case 3: dot_block<3>(mat, rows[i], sc.data() + i * G, off.data() + i * G, xm, xs, xq, m, K, G, yr, ldy); break;
          case 2: dot_block<2>(mat, rows[i], sc.data() + i * G, off.data() + i * G, xm, xs, xq, m, K, G, yr, ldy); break;
          default: dot_block<1>(mat, rows[i], sc.data() + i * G, off.data() + i * G, xm, xs, xq, m, K, G, yr, ldy); break;
        }
      }
    }
  }
}

void check_blocks(const torch::Tensor& b, const TypeInfo& info, int64_t K, const char* what) {
  TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == torch::kUInt8 && b.dim() == 2 && b.is_contiguous(),
              what, ": expected a contiguous [N, row_bytes] uint8 CPU tensor, got ", b.scalar_type(), " of shape ",
              b.sizes());
  TORCH_CHECK(K > 0 && K % info.block == 0, what, ": K=", K, " is not a positive multiple of ", info.name,
              "'s block size ", info.block);
  const int64_t row_bytes = K / info.block * info.bytes;
  TORCH_CHECK(b.size(1) == row_bytes, what, ": a ", info.name, " row of K=", K, " weights has ", row_bytes,
              " bytes, but the tensor's rows have ", b.size(1));
}

// ------------------------------------------------------------------------------------ dequantise

// Keep a product from being fused with the following add (ggml rounds both).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define GK_OPAQUE(v) __asm__("" : "+v"(v))
#else
#define GK_OPAQUE(v) do { volatile float gk_tmp = (v); (v) = gk_tmp; } while (0)
#endif

// out[k] = float(code) * scale_g (+ offset_g) for one row, in ggml's order and roundings.
inline void dequant_row(Codes c, const float* scale, const float* offset, int64_t K, int64_t GS, float* out) {
  const int64_t G = K / GS;
  for (int64_t g = 0; g < G; ++g) {
    const int8_t* q = c.q + g * c.gstride;
    float* o = out + g * GS;
#if defined(GK_AVX512)
    const __m512 s = _mm512_set1_ps(scale[g]);
    for (int64_t j = 0; j < GS; j += 16) {
      __m512 w = _mm512_mul_ps(load_w16(q + j), s);
      if (offset != nullptr) {
        GK_OPAQUE(w);
        w = _mm512_add_ps(w, _mm512_set1_ps(offset[g]));
      }
      _mm512_storeu_ps(o + j, w);
    }
#elif defined(GK_AVX2)
    const __m256 s = _mm256_set1_ps(scale[g]);
    for (int64_t j = 0; j < GS; j += 8) {
      __m256 w = _mm256_mul_ps(load_w8(q + j), s);
      if (offset != nullptr) {
        GK_OPAQUE(w);
        w = _mm256_add_ps(w, _mm256_set1_ps(offset[g]));
      }
      _mm256_storeu_ps(o + j, w);
    }
#else
    for (int64_t j = 0; j < GS; ++j) {
      float w = float(q[j]) * scale[g];
      if (offset != nullptr) {
        GK_OPAQUE(w);
        w = w + offset[g];
      }
      o[j] = w;
    }
#endif
  }
}

}  // namespace

// y = x @ [W_0; W_1; ...]^T where W_i is blocks[i] (raw GGML rows of type types[i], K inputs each).
// activations: 0 float32 (the result equals dequantise-then-matmul up to float32 rounding); 1 (auto)
// int8 wherever the integer dot is the faster one; 2 int8 for every quantised type (F16/BF16 stay
// float32). Auto is int8 for every quantised type on the AVX2 and AVX-512 builds, float32 in the
// portable one (its integer dot is scalar). One choice for every row count, so that a sequence's
// logits do not depend on the batch it decodes in (speculative rounds, serving), even where the
// float dot is the faster: Q8_0 with 4-8 rows on AVX2, by ~15% (benchmarks/RESULTS.md).
torch::Tensor ggml_matmul(torch::Tensor x, std::vector<torch::Tensor> blocks, std::vector<int64_t> types, int64_t K,
                          int64_t activations) {
  TORCH_CHECK(activations >= 0 && activations <= 2, "ggml_matmul: activations must be 0 (float32), 1 (auto) or 2 (int8)");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "ggml_matmul: x must be a contiguous [M, K] float32 CPU tensor, got ", x.scalar_type(), " of shape ",
              x.sizes());
  TORCH_CHECK(x.size(1) == K, "ggml_matmul: x has ", x.size(1), " columns but K=", K);
  TORCH_CHECK(!blocks.empty() && blocks.size() == types.size(), "ggml_matmul: need one type per matrix (got ",
              blocks.size(), " matrices and ", types.size(), " types)");
  const int64_t M = x.size(0);
  std::vector<Mat> mats;
  int64_t total = 0;
  bool any_offset32 = false, any_offset16 = false, any_int8 = false;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const TypeInfo info = checked_type(types[i]);
    const std::string what = "ggml_matmul: blocks[" + std::to_string(i) + "]";
    check_blocks(blocks[i], info, K, what.c_str());
#if defined(GK_AVX512) || defined(GK_AVX2)
    const bool simd = true;
#else
    const bool simd = false;  // the portable build decodes every type, in float32 unless int8 is forced
#endif
    const bool plain = is_plain16(types[i]);
    const bool want_int8 = activations == 2 || (activations == 1 && simd);
    const bool fused = simd && has_fused(types[i]) && !(want_int8 && !plain);
    const bool int8 = !plain && !fused && want_int8;
    any_int8 = any_int8 || int8;
    any_offset32 = any_offset32 || (info.has_offset && info.group == 32 && !int8);
    any_offset16 = any_offset16 || (info.has_offset && info.group == 16 && !int8);
    mats.push_back({blocks[i].data_ptr<uint8_t>(), types[i], blocks[i].size(0), blocks[i].size(1), total, total, info,
                    fused, int8});
    total += blocks[i].size(0);

  }
  auto y = torch::empty({M, total}, x.options());
  if (M == 0 || total == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Sums of x over each group of 32 (and of 16) for the offset terms: w = scale * code + offset
  // contributes offset_g * sum(x_g).
  auto group_sums = [&](int64_t GS, std::vector<float>& sums) {
    const int64_t G = K / GS;
    sums.resize(M * G);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        const float* p = xp + m * K + g * GS;
        float s = 0.f;
        for (int j = 0; j < GS; ++j) s += p[j];
        sums[m * G + g] = s;
      }
  };
  std::vector<float> xsum32, xsum16;
  if (any_offset32) group_sums(32, xsum32);
  if (any_offset16) group_sums(16, xsum16);
  const float* xs32 = any_offset32 ? xsum32.data() : nullptr;
  const float* xs16 = any_offset16 ? xsum16.data() : nullptr;
  QuantX xq;
  if (any_int8) quantize_x(xp, M, K, &xq);
  const int64_t grain = std::max<int64_t>(16, (1 << 16) / K);
  at::parallel_for(0, total, grain, [&](int64_t n0, int64_t n1) {
    std::vector<int8_t> codes;
    std::vector<float> sc, off;
    for (const Mat& mat : mats) {
      const int64_t r0 = std::max(n0, mat.row0) - mat.row0, r1 = std::min(n1, mat.row0 + mat.N) - mat.row0;
      if (r0 < r1) matmul_rows(mat, r0, r1, xp, xs32, xs16, any_int8 ? &xq : nullptr, M, K, yp, total, codes, sc, off);
    }
  });
  return y;
}

// The [N, K] float32 weights of one matrix of raw GGML rows, bit-identical to
// gemmakit.quant.ggml.dequantize.
// float32 -> bfloat16 bits, rounding to nearest even as torch's conversion does (weights hold no NaN,
// but one stays a quiet NaN).
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Into ``out`` ([N, K] float32 or bfloat16, contiguous), so that parts fused into one weight (q|k|v)
// are dequantised straight into their rows of one buffer for the prefill GEMM, with no concatenation.
// bfloat16 (the bfloat16 prefill) equals the float32 result converted by torch, without the
// float32 matrix ever being written.
void ggml_dequantize_into(torch::Tensor blocks, int64_t type, int64_t K, torch::Tensor w) {
  const TypeInfo info = checked_type(type);
  check_blocks(blocks, info, K, "ggml_dequantize: blocks");
  const int64_t N = blocks.size(0), row_bytes = blocks.size(1), nb = K / info.block, G = K / info.group;
  const bool bf16 = w.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((bf16 || w.scalar_type() == torch::kFloat32) && w.is_contiguous() && w.dim() == 2 && w.size(0) == N &&
                  w.size(1) == K, "ggml_dequantize: out must be a contiguous [N, K] float32 or bfloat16 tensor");
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  float* wp = bf16 ? nullptr : w.data_ptr<float>();
  uint16_t* bp = bf16 ? reinterpret_cast<uint16_t*>(w.data_ptr<at::BFloat16>()) : nullptr;
  if (is_plain16(type)) {  // each weight widened exactly (and for bfloat16 out, a BF16 one kept as it is)
    at::parallel_for(0, N, std::max<int64_t>(1, (1 << 15) / K), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = 0; k < K; ++k) {
          const uint8_t* p = src + r * row_bytes + 2 * k;
          if (!bf16) wp[r * K + k] = plain16_to_f32(type, p);
          else if (type == BF16) std::memcpy(bp + r * K + k, p, 2);
          else bp[r * K + k] = bf16_bits(plain16_to_f32(type, p));
        }
    });
    return;
  }
  at::parallel_for(0, N, std::max<int64_t>(1, (1 << 15) / K), [&](int64_t r0, int64_t r1) {
    std::vector<int8_t> codes(K);
    std::vector<float> sc(G), off(G), row(bf16 ? K : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const Codes c = decode_row(type, src + r * row_bytes, nb, codes.data(), sc.data(), off.data());
      float* dst = bf16 ? row.data() : wp + r * K;
      dequant_row(c, sc.data(), info.has_offset ? off.data() : nullptr, K, info.group, dst);
      if (bf16)
        for (int64_t k = 0; k < K; ++k) bp[r * K + k] = bf16_bits(dst[k]);
    }
  });
}

torch::Tensor ggml_dequantize(torch::Tensor blocks, int64_t type, int64_t K) {
  auto w = torch::empty({blocks.size(0), K}, torch::dtype(torch::kFloat32));
  ggml_dequantize_into(blocks, type, K, w);
  return w;
}

std::string ggml_simd() {
#if defined(GK_AVX512)
  return "avx512";
#elif defined(GK_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

namespace gemmakit_ggml {

Tables tables;

const Tables& grid_tables() {
  TORCH_CHECK(tables.ready, "ggml kernel: the IQ grid tables were never set (gemmakit.kernels.build sets them "
              "from gguf-py when it loads the kernel)");
  return tables;
}

}  // namespace gemmakit_ggml

// The grid types' lookup tables, from gguf-py (build.py): each a uint8 tensor of the table's bytes.
void ggml_set_tables(torch::Tensor iq2xxs, torch::Tensor iq2xs, torch::Tensor iq2s, torch::Tensor iq1s,
                     torch::Tensor iq3xxs, torch::Tensor iq3s, torch::Tensor ksigns) {
  using gemmakit_ggml::tables;
  auto put = [](const torch::Tensor& t, void* dst, size_t bytes, const char* what) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kUInt8 && t.is_contiguous() &&
                    size_t(t.numel()) == bytes, "ggml_set_tables: ", what, " must be ", bytes, " contiguous bytes");
    std::memcpy(dst, t.data_ptr<uint8_t>(), bytes);
  };
  put(iq2xxs, tables.iq2xxs, sizeof tables.iq2xxs, "iq2xxs");
  put(iq2xs, tables.iq2xs, sizeof tables.iq2xs, "iq2xs");
  put(iq2s, tables.iq2s, sizeof tables.iq2s, "iq2s");
  put(iq1s, tables.iq1s, sizeof tables.iq1s, "iq1s");
  put(iq3xxs, tables.iq3xxs, sizeof tables.iq3xxs, "iq3xxs");
  put(iq3s, tables.iq3s, sizeof tables.iq3s, "iq3s");
  put(ksigns, tables.ksigns, sizeof tables.ksigns, "ksigns");
  tables.ready = true;
}
