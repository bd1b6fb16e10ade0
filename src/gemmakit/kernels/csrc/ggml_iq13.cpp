// gemmakit's GGML kernel, the block family of IQ3_XXS, IQ3_S, IQ1_S and IQ1_M: rows decoded into int8 codes and
// per-group scales (ggml_blocks.h), which ggml_matmul.cpp multiplies and dequantises.
//
// All four are blocks of 256 weights whose magnitudes come from a grid (ggml-common.h's layouts):
//   IQ3_XXS (98 bytes)   fp16 d; 64 grid indices (4 weights each); per 32 weights a 32-bit word of four
//                        7-bit sign indices (ksigns: 8 signs each) and a 4-bit scale s:
//                        w = d * (0.5 + s) * 0.5 * (±grid).
//   IQ3_S   (110 bytes)  fp16 d; 64 grid indices' low 8 bits; their 9th bits (a byte per 32 weights); a
//                        sign bit per weight; a 4-bit scale s per 32 weights: w = d * (1 + 2s) * (±grid).
//   IQ1_S   (50 bytes)   fp16 d; 32 grid indices' low 8 bits (8 weights of -1/0/1 each); per 32 weights a
//                        16-bit word: the 4 indices' 3 high bits, a 3-bit scale s, the sign of a shift
//                        of 1/8: w = d * (2s + 1) * (grid ± 1/8).
//   IQ1_M   (56 bytes)   32 grid indices' low 8 bits; per 8 weights a nibble (3 high index bits, the
//                        shift's sign); a 3-bit scale s per 16 weights, four to a 16-bit word whose top
//                        nibbles are d's fp16 bits: w = d * (2s + 1) * (grid ± 1/8).
// IQ3's grid values are never 0, so ±grid as a code keeps ggml's signed zeros out of the question.
// IQ1's shift goes into the code: code = 8 * grid ± 1 and scale = d * (2s + 1) / 8 (exact: a power of
// two, far from float32's subnormals for any fp16 d), so code * scale is the exact product ggml
// rounds once, and the codes stay int8.
//
// Grid lookups are scalar loads (512-2048 entries: no register table holds them); the signs, the
// shifts and the widening to codes are a few vector operations per 32 weights.

#include "ggml_blocks.h"

namespace gemmakit_ggml {

namespace {

constexpr int64_t kBlock = 256;

bool info(int64_t type, TypeInfo* info) {
  switch (type) {
    case IQ3_XXS: *info = {kBlock, 98, 32, false, "IQ3_XXS"}; return true;
    case IQ3_S: *info = {kBlock, 110, 32, false, "IQ3_S"}; return true;
    case IQ1_S: *info = {kBlock, 50, 32, false, "IQ1_S"}; return true;
    case IQ1_M: *info = {kBlock, 56, 16, false, "IQ1_M"}; return true;
    default: return false;
  }
}

// The 32 sign bits of an IQ3_XXS group (bit j: weight j negative) from its word's four 7-bit indices.
inline uint32_t iq3xxs_signs(const Tables& t, uint32_t word) {
  return uint32_t(t.ksigns[word & 127]) | uint32_t(t.ksigns[(word >> 7) & 127]) << 8 |
         uint32_t(t.ksigns[(word >> 14) & 127]) << 16 | uint32_t(t.ksigns[(word >> 21) & 127]) << 24;
}

#if defined(GK_AVX512) || defined(GK_AVX2)
// 32 grid bytes (eight 4-weight entries) -> 32 codes, weight j negated where bit j of `signs` is set.
inline void iq3_store(__m256i g, uint32_t signs, int8_t* out) {
#if defined(GK_AVX512)
  const __m256i c = _mm256_mask_sub_epi8(g, __mmask32(signs), _mm256_setzero_si256(), g);
#else
  // byte j = 0xFF where bit j is set: byte j/8 of the word broadcast to byte j, tested against bit j%8
  const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32(int(signs)),
                                        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2,
                                                         2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201ull));
  const __m256i neg = _mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit);
  const __m256i c = _mm256_sub_epi8(_mm256_xor_si256(g, neg), neg);
#endif
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), c);
}

// The eight grid indices of a group of 32 weights, 8-bit (`qs`) or with a 9th bit each in `qh`.
inline __m256i iq3_index(const uint8_t* qs) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs)));
}
inline __m256i iq3_index(const uint8_t* qs, uint32_t qh) {  // bit k of qh -> bit 8 of index k
  const __m256i hi = _mm256_and_si256(_mm256_sllv_epi32(_mm256_set1_epi32(int(qh)), _mm256_setr_epi32(8, 7, 6, 5, 4, 3, 2, 1)),
                                      _mm256_set1_epi32(256));
  return _mm256_or_si256(iq3_index(qs), hi);
}

inline __m256i iq3_grid(const uint32_t* grid, __m256i idx) {
  return _mm256_i32gather_epi32(reinterpret_cast<const int*>(grid), idx, 4);
}

// Four 8-weight IQ1 entries -> 32 codes 8 * grid + shift, `shift` a byte of +-1 per weight.
inline void iq1_store(const uint64_t* grid, __m256i idx, __m256i shift, int8_t* out) {
  const __m256i g = _mm256_i64gather_epi64(reinterpret_cast<const long long*>(grid), idx, 8);
  // sign_epi8(8, g) is 8 * g for g in {-1, 0, 1}
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), g), shift));
}

// Four IQ1 indices: 8 bits each from `qs`, 3 high bits each from the low bits of the lanes of `h_shifted`.
inline __m256i iq1_index(const uint8_t* qs, __m256i h_shifted) {
  const __m256i lo = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(int(load_u32(qs))));
  return _mm256_or_si256(lo, _mm256_slli_epi64(_mm256_and_si256(h_shifted, _mm256_set1_epi64x(7)), 8));
}
#endif

#if !(defined(GK_AVX512) || defined(GK_AVX2))
// A shift of +1/8 (bit clear) or -1/8 (bit set) as 8 bytes of its code offset, +1 or -1.
inline int64_t iq1_shift(uint32_t negative) { return negative ? -1 : 0x0101010101010101ll; }

inline void iq3_group(const uint32_t* grid, const int idx[8], uint32_t signs, int8_t* out) {
  for (int k = 0; k < 8; ++k) {
    const uint32_t g = grid[idx[k]];
    for (int j = 0; j < 4; ++j) {
      const int v = int((g >> (8 * j)) & 0xFF);
      out[4 * k + j] = int8_t((signs >> (4 * k + j)) & 1 ? -v : v);
    }
  }
}

inline void iq1_group(const uint64_t* grid, const int idx[4], const int64_t shift[4], int8_t* out) {
  for (int k = 0; k < 4; ++k) {
    const uint64_t g = grid[idx[k]];
    const int s = shift[k] < 0 ? -1 : 1;
    for (int j = 0; j < 8; ++j) out[8 * k + j] = int8_t(8 * int(int8_t((g >> (8 * j)) & 0xFF)) + s);
  }
}
#endif

void decode_iq3xxs(const Tables& t, const uint8_t* row, int64_t nb, int8_t* codes, float* scale) {
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = row + 98 * b;
    const float d = fp16_to_f32(p);
    const uint8_t* qs = p + 2;
    for (int g = 0; g < 8; ++g) {
      const uint32_t word = load_u32(p + 66 + 4 * g);
      scale[8 * b + g] = d * (0.5f + float(word >> 28)) * 0.5f;
      int8_t* out = codes + kBlock * b + 32 * g;
#if defined(GK_AVX512) || defined(GK_AVX2)
      iq3_store(iq3_grid(t.iq3xxs, iq3_index(qs + 8 * g)), iq3xxs_signs(t, word), out);
#else
      int idx[8];
      for (int k = 0; k < 8; ++k) idx[k] = qs[8 * g + k];
      iq3_group(t.iq3xxs, idx, iq3xxs_signs(t, word), out);
#endif
    }
  }
}

void decode_iq3s(const Tables& t, const uint8_t* row, int64_t nb, int8_t* codes, float* scale) {
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = row + 110 * b;
    const float d = fp16_to_f32(p);
    const uint8_t *qs = p + 2, *qh = p + 66, *signs = p + 74, *sc = p + 106;
    for (int g = 0; g < 8; ++g) {
      scale[8 * b + g] = d * float(1 + 2 * ((sc[g / 2] >> (4 * (g % 2))) & 0x0F));
      int8_t* out = codes + kBlock * b + 32 * g;
#if defined(GK_AVX512) || defined(GK_AVX2)
      iq3_store(iq3_grid(t.iq3s, iq3_index(qs + 8 * g, qh[g])), load_u32(signs + 4 * g), out);
#else
      int idx[8];
      for (int k = 0; k < 8; ++k) idx[k] = qs[8 * g + k] | ((qh[g] >> k) & 1) << 8;
      iq3_group(t.iq3s, idx, load_u32(signs + 4 * g), out);
#endif
    }
  }
}

void decode_iq1s(const Tables& t, const uint8_t* row, int64_t nb, int8_t* codes, float* scale) {
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = row + 50 * b;
    const float d = fp16_to_f32(p);
    const uint8_t* qs = p + 2;
    for (int g = 0; g < 8; ++g) {
      const uint32_t h = load_u16(p + 34 + 2 * g);
      const float dl = d * float(2 * ((h >> 12) & 7) + 1);
      scale[8 * b + g] = dl * 0.125f;
      int8_t* out = codes + kBlock * b + 32 * g;
#if defined(GK_AVX512) || defined(GK_AVX2)
      const __m256i hs = _mm256_srlv_epi64(_mm256_set1_epi64x(h), _mm256_setr_epi64x(0, 3, 6, 9));
      iq1_store(t.iq1s, iq1_index(qs + 4 * g, hs), _mm256_set1_epi8(h & 0x8000 ? -1 : 1), out);
#else
      const int64_t s = iq1_shift(h & 0x8000);
      const int64_t shift[4] = {s, s, s, s};
      int idx[4];
      for (int k = 0; k < 4; ++k) idx[k] = qs[4 * g + k] | ((h >> (3 * k)) & 7) << 8;
      iq1_group(t.iq1s, idx, shift, out);
#endif
    }
  }
}

void decode_iq1m(const Tables& t, const uint8_t* row, int64_t nb, int8_t* codes, float* scale) {
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = row + 56 * b;
    const uint8_t *qs = p, *qh = p + 32;
    uint16_t sc[4];
    for (int i = 0; i < 4; ++i) sc[i] = load_u16(p + 48 + 2 * i);
    const uint16_t dbits = uint16_t((sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000));
    uint8_t dh[2];
    std::memcpy(dh, &dbits, 2);
    const float d = fp16_to_f32(dh);
    for (int g = 0; g < 8; ++g) {  // 32 weights: two scale groups of 16, four grid entries of 8
      const uint32_t w = sc[g / 2] >> (6 * (g % 2));
      scale[16 * b + 2 * g] = d * float(2 * (w & 7) + 1) * 0.125f;
      scale[16 * b + 2 * g + 1] = d * float(2 * ((w >> 3) & 7) + 1) * 0.125f;
      const uint32_t h = load_u16(qh + 2 * g);  // a nibble per grid entry
      int8_t* out = codes + kBlock * b + 32 * g;
#if defined(GK_AVX512) || defined(GK_AVX2)
      const __m256i hs = _mm256_srlv_epi64(_mm256_set1_epi64x(h), _mm256_setr_epi64x(0, 4, 8, 12));
      // +1 per byte, or -1 where the entry's bit 3 is set
      const __m256i neg = _mm256_cmpeq_epi64(_mm256_and_si256(hs, _mm256_set1_epi64x(8)), _mm256_set1_epi64x(8));
      const __m256i shift = _mm256_sub_epi8(_mm256_set1_epi8(1), _mm256_and_si256(neg, _mm256_set1_epi8(2)));
      iq1_store(t.iq1s, iq1_index(qs + 4 * g, hs), shift, out);
#else
      int idx[4];
      int64_t shift[4];
      for (int k = 0; k < 4; ++k) {
        const uint32_t n = h >> (4 * k);
        idx[k] = qs[4 * g + k] | (n & 7) << 8;
        shift[k] = iq1_shift(n & 8);
      }
      iq1_group(t.iq1s, idx, shift, out);
#endif
    }
  }
}

Codes decode(int64_t type, const uint8_t* row, int64_t nb, int8_t* codes, float* scale, float* /*offset*/) {
  const Tables& t = grid_tables();
  switch (type) {
    case IQ3_XXS: decode_iq3xxs(t, row, nb, codes, scale); return {codes, 32};
    case IQ3_S: decode_iq3s(t, row, nb, codes, scale); return {codes, 32};
    case IQ1_S: decode_iq1s(t, row, nb, codes, scale); return {codes, 32};
    case IQ1_M: decode_iq1m(t, row, nb, codes, scale); return {codes, 16};
    default: TORCH_CHECK(false, "ggml kernel: GGML type ", type, " is not of this family");
  }
  return {codes, 32};
}

}  // namespace

const Family iq13_family = {info, decode};

}  // namespace gemmakit_ggml
