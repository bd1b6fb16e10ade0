// gemmakit's GGML kernel, the block family of IQ2_XXS, IQ2_XS and IQ2_S: rows decoded into int8 codes and
// per-group scales (ggml_blocks.h), which ggml_matmul.cpp multiplies and dequantises.
//
// All three store a block of 256 weights as 32 grid points of 8 weights each: a grid word (8 magnitudes
// of 8, 25 or 43, one byte a weight) picked by an index, and 8 sign bits. The codes are the grid bytes,
// negated where a sign bit is set; the scale of a group is d * (0.5 + s) * 0.25 for its 4-bit s,
// multiplied in that order as ggml does, so scale * code is ggml's db * grid * sign bit for bit (the
// sign flip is exact). Per block (after the fp16 d):
//   IQ2_XXS (66 bytes, groups of 32): per 32 weights two 32-bit words, the first 4 grid indices as
//     bytes, the second four 7-bit sign indices (into ksigns) and s in its top 4 bits.
//   IQ2_XS (74 bytes, groups of 16): 32 16-bit words (9-bit grid index, 7-bit sign index above it),
//     then 8 bytes of s, the low nibble for the first 16 of each 32 weights, the high for the second.
//   IQ2_S (82 bytes, groups of 16): 32 low bytes of 10-bit grid indices, 32 bytes of plain sign bits,
//     8 bytes of the indices' top two bits (two for each of 4 grid points), then s as in IQ2_XS.
// Decoding runs for every weight of every decode step, as costly as the dot with one row of x: with
// AVX-512 / AVX2 a group's 4 grid words go into one register and are negated under the 32 sign bits
// (a mask register, or xor-and-subtract with the bits spread to bytes), one store for 32 codes.

#include "ggml_blocks.h"

namespace gemmakit_ggml {

namespace {

bool info(int64_t type, TypeInfo* info) {
  switch (type) {
    case IQ2_XXS: *info = {256, 66, 32, false, "IQ2_XXS"}; return true;
    case IQ2_XS: *info = {256, 74, 16, false, "IQ2_XS"}; return true;
    case IQ2_S: *info = {256, 82, 16, false, "IQ2_S"}; return true;
    default: return false;
  }
}

inline float group_scale(float d, uint32_t s) { return d * (0.5f + float(s)) * 0.25f; }

// 8 codes: grid word g's bytes, the j-th negated where bit j of `signs` is set. Within a 64-bit word:
// each sign bit is spread to its byte, turned into 0x01 / 0xFF per byte, and -v = (v ^ 0xFF) + 1 (no
// byte carries: the magnitudes are 8..43).
inline void put8(uint64_t g, uint32_t signs, int8_t* out) {
  const uint64_t ones = 0x0101010101010101ull;
  const uint64_t bit = ((signs & 0xFF) * ones) & 0x8040201008040201ull;  // byte j: bit j of signs, in place
  const uint64_t neg = (((bit + 0x7F7F7F7F7F7F7F7Full) | bit) >> 7) & ones;  // byte j: 1 where set
  const uint64_t v = (g ^ (neg * 0xFF)) + neg;
  std::memcpy(out, &v, 8);
}

#if defined(GK_AVX2) && !defined(GK_AVX512)
// 32 sign bits -> 32 bytes, 0xFF where the bit is set.
inline __m256i sign_bytes(uint32_t signs) {
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(int(signs)),
                                        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                          0x0101010101010101, 0));
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201ull));
  return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}
#endif

// 32 codes from 4 grid words and their 32 sign bits (grid word i's in bits 8i..8i+7).
inline void put32(uint64_t g0, uint64_t g1, uint64_t g2, uint64_t g3, uint32_t signs, int8_t* out) {
#if defined(GK_AVX512)
  const __m256i g = _mm256_set_epi64x(int64_t(g3), int64_t(g2), int64_t(g1), int64_t(g0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_mask_sub_epi8(g, __mmask32(signs), _mm256_setzero_si256(), g));
#elif defined(GK_AVX2)
  const __m256i g = _mm256_set_epi64x(int64_t(g3), int64_t(g2), int64_t(g1), int64_t(g0));
  const __m256i m = sign_bytes(signs);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_sub_epi8(_mm256_xor_si256(g, m), m));
#else
  put8(g0, signs, out);
  put8(g1, signs >> 8, out + 8);
  put8(g2, signs >> 16, out + 16);
  put8(g3, signs >> 24, out + 24);
#endif
}

// The sign bytes of a block's 32 grid points from their 7-bit indices: ksigns[i] is i with an eighth
// bit that makes the parity even, which AVX2 computes for the whole block at once (8 or 16 indices a
// register, the parity by three shift-xors), else the bytes are looked up. signs[j] is group j's 32
// bits (grid point 4j + i's byte i).
#if defined(GK_AVX512) || defined(GK_AVX2)
// Each lane's 7-bit values (none above bit 6 of any byte) with the parity bit set in bit 7.
inline __m256i with_parity(__m256i s) {
  __m256i x = _mm256_xor_si256(s, _mm256_srli_epi32(s, 4));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 2));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 1));  // bit 0 of each byte: the parity of its bits 0..6
  return _mm256_or_si256(s, _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi8(1)), 7));
}
#endif

// IQ2_XXS: each group's 4 indices in bits 0..27 of its second 32-bit word.
inline void xxs_signs(const Tables& t, const uint8_t* qs, uint32_t signs[8]) {
#if defined(GK_AVX512) || defined(GK_AVX2)
  alignas(32) uint64_t lanes[8];
  for (int h = 0; h < 2; ++h) {
    const __m256i a = _mm256_srli_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * h)), 32);
    __m256i v = _mm256_and_si256(a, _mm256_set1_epi64x(0x7F));  // index i moved to byte i
    v = _mm256_or_si256(v, _mm256_and_si256(_mm256_slli_epi64(a, 1), _mm256_set1_epi64x(0x7F00)));
    v = _mm256_or_si256(v, _mm256_and_si256(_mm256_slli_epi64(a, 2), _mm256_set1_epi64x(0x7F0000)));
    v = _mm256_or_si256(v, _mm256_and_si256(_mm256_slli_epi64(a, 3), _mm256_set1_epi64x(0x7F000000)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 4 * h), with_parity(v));
  }
  for (int j = 0; j < 8; ++j) signs[j] = uint32_t(lanes[j]);
#else
  for (int j = 0; j < 8; ++j) {
    const uint32_t a = load_u32(qs + 8 * j + 4);
    signs[j] = uint32_t(t.ksigns[a & 127]) | uint32_t(t.ksigns[(a >> 7) & 127]) << 8 |
               uint32_t(t.ksigns[(a >> 14) & 127]) << 16 | uint32_t(t.ksigns[(a >> 21) & 127]) << 24;
  }
#endif
}

// IQ2_XS: each 16-bit word's index in its top 7 bits.
inline void xs_signs(const Tables& t, const uint8_t* qs, uint32_t signs[8]) {
#if defined(GK_AVX512) || defined(GK_AVX2)
  const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
  const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32));
  const __m256i s0 = with_parity(_mm256_srli_epi16(w0, 9)), s1 = with_parity(_mm256_srli_epi16(w1, 9));
  // 16-bit lanes (all under 256) to bytes; packus interleaves the 128-bit halves, the permute restores the order
  const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packus_epi16(s0, s1), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(signs), bytes);
#else
  for (int j = 0; j < 8; ++j) {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= uint32_t(t.ksigns[load_u16(qs + 8 * j + 2 * i) >> 9]) << (8 * i);
    signs[j] = v;
  }
#endif
}

// The 16 scales of an IQ2_XS / IQ2_S block from its 8 bytes of 4-bit s (low nibble first).
inline void scales16(float d, const uint8_t* sc, float* out) {
#if defined(GK_AVX512) || defined(GK_AVX2)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc)), m = _mm_set1_epi8(0x0F);
  const __m128i s = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
#if defined(GK_AVX512)
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(s));
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(d), _mm512_add_ps(_mm512_set1_ps(0.5f), f)),
                                      _mm512_set1_ps(0.25f)));
#else
  for (int h = 0; h < 2; ++h) {
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(h ? _mm_srli_si128(s, 8) : s));
    _mm256_storeu_ps(out + 8 * h, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(d), _mm256_add_ps(_mm256_set1_ps(0.5f), f)),
                                                _mm256_set1_ps(0.25f)));
  }
#endif
#else
  for (int j = 0; j < 8; ++j) {
    out[2 * j] = group_scale(d, sc[j] & 15);
    out[2 * j + 1] = group_scale(d, sc[j] >> 4);
  }
#endif
}

void decode_xxs(const uint8_t* row, int64_t nb, int8_t* codes, float* scale) {
  const Tables& t = grid_tables();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = row + 66 * b;
    const float d = fp16_to_f32(p);
    uint32_t signs[8];
    xxs_signs(t, p + 2, signs);
    for (int j = 0; j < 8; ++j) {
      const uint8_t* q = p + 2 + 8 * j;
      scale[8 * b + j] = group_scale(d, q[7] >> 4);
      put32(t.iq2xxs[q[0]], t.iq2xxs[q[1]], t.iq2xxs[q[2]], t.iq2xxs[q[3]], signs[j], codes + 256 * b + 32 * j);
    }
  }
}

void decode_xs(const uint8_t* row, int64_t nb, int8_t* codes, float* scale) {
  const Tables& t = grid_tables();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = row + 74 * b;
    const float d = fp16_to_f32(p);
    scales16(d, p + 66, scale + 16 * b);
    uint32_t signs[8];
    xs_signs(t, p + 2, signs);
    for (int j = 0; j < 8; ++j) {
      uint16_t w[4];
      std::memcpy(w, p + 2 + 8 * j, 8);
      put32(t.iq2xs[w[0] & 511], t.iq2xs[w[1] & 511], t.iq2xs[w[2] & 511], t.iq2xs[w[3] & 511], signs[j],
            codes + 256 * b + 32 * j);
    }
  }
}

void decode_s(const uint8_t* row, int64_t nb, int8_t* codes, float* scale) {
  const Tables& t = grid_tables();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = row + 82 * b;
    const float d = fp16_to_f32(p);
    const uint8_t *qs = p + 2, *sg = p + 34, *qh = p + 66, *sc = p + 74;
    scales16(d, sc, scale + 16 * b);
    for (int j = 0; j < 8; ++j) {
      const uint8_t* q = qs + 4 * j;
      const uint32_t h = qh[j];
      put32(t.iq2s[q[0] | (h & 3) << 8], t.iq2s[q[1] | (h & 12) << 6], t.iq2s[q[2] | (h & 48) << 4],
            t.iq2s[q[3] | (h & 192) << 2], load_u32(sg + 4 * j), codes + 256 * b + 32 * j);
    }
  }
}

Codes decode(int64_t type, const uint8_t* row, int64_t nb, int8_t* codes, float* scale, float* /*offset*/) {
  switch (type) {
    case IQ2_XXS: decode_xxs(row, nb, codes, scale); return {codes, 32};
    case IQ2_XS: decode_xs(row, nb, codes, scale); return {codes, 16};
    case IQ2_S: decode_s(row, nb, codes, scale); return {codes, 16};
    default: TORCH_CHECK(false, "ggml kernel: GGML type ", type, " is not of this family");
  }
  return {codes, 32};
}

}  // namespace

const Family iq2_family = {info, decode};

}  // namespace gemmakit_ggml
