// gemmakit's GGML kernel, the block family of Q2_K, Q3_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0 and MXFP4: rows
// decoded into int8 codes and per-group scales (ggml_blocks.h), which ggml_matmul.cpp multiplies and
// dequantises.
//
// Block layouts (bytes a block, then its fields in order) and what a weight is, in ggml's roundings:
//   Q2_K   84  scales[16] (lo nibble sc, hi m) | qs[64] 2-bit | d | dmin   w = (d*sc)*q - (dmin*m), 16 a group
//   Q3_K  110  hmask[32] | qs[64] 2-bit | scales[12] 16x 6-bit | d         w = (d*(sc-32)) * (q - 4*!h), 16 a group
//   IQ4_NL 18  d | qs[16] nibbles                                         w = d * level[q]
//   IQ4_XS 136 d | scales_h:u16 | scales_l[4] | qs[128]                   w = (d*(sc-32)) * level[q]
//   TQ1_0  54  qs[48] 5 base-3 digits a byte | qh[4] 4 digits a byte | d   w = d * (digit - 1)
//   TQ2_0  66  qs[64] 2-bit | d                                           w = d * (q - 1)
//   MXFP4  17  e (E8M0) | qs[16] nibbles                                  w = 2^(e-128) * e2m1x2[q]
// (d, dmin: fp16.) In the 2-bit types weight 128c + 32n + j of a block is bits 2n, 2n+1 of qs byte
// 32c + j, and Q3_K's high bit of that weight is bit 4c + n of hmask byte j. In the nibble types a
// run of 16 bytes holds 32 weights, the low nibbles first.
//
// Every code fits int8: Q2_K 0..3, Q3_K -4..3, the IQ4 levels -127..113, the ternary -1..1, MXFP4's
// doubled E2M1 values -12..12. Scales are one float32 product as in ggml (d * sc, with the integer
// sc - 32 converted exactly first); the ternary types and MXFP4 have one scale per block, repeated
// for each of its groups of 32.

#include "ggml_blocks.h"

namespace gemmakit_ggml {

namespace {

// IQ4_NL / IQ4_XS's sixteen non-uniform levels, and MXFP4's E2M1 values doubled (the block scale
// is halved to match), both as ggml-common.h defines them.
alignas(16) const int8_t kIQ4Levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
alignas(16) const int8_t kE2M1x2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

bool info(int64_t type, TypeInfo* info) {
  switch (type) {
    case Q2_K: *info = {256, 84, 16, true, "Q2_K"}; return true;
    case Q3_K: *info = {256, 110, 16, false, "Q3_K"}; return true;
    case IQ4_NL: *info = {32, 18, 32, false, "IQ4_NL"}; return true;
    case IQ4_XS: *info = {256, 136, 32, false, "IQ4_XS"}; return true;
    case TQ1_0: *info = {256, 54, 32, false, "TQ1_0"}; return true;
    case TQ2_0: *info = {256, 66, 32, false, "TQ2_0"}; return true;
    case MXFP4: *info = {32, 17, 32, false, "MXFP4"}; return true;
    default: return false;
  }
}

// MXFP4's block scale, an E8M0 exponent e, as 2^(e-127) halved (the codes are doubled): the float
// with exponent field e - 1, except e = 0 and 1, which are float32 subnormals 2^-128 and 2^-127.
inline float e8m0_half(uint8_t e) {
  const uint32_t bits = e < 2 ? uint32_t(0x00200000) << e : uint32_t(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// 16 bytes of nibbles -> 32 codes through a 16-entry table: low nibbles to out[0:16], high to out[16:32].
inline void nibble_levels(const uint8_t* qs, const int8_t* table, int8_t* out) {
#if defined(GK_AVX512) || defined(GK_AVX2)
  // one byte shuffle per 16 codes: the table is a register, the nibbles its indices
  const __m128i t = _mm_load_si128(reinterpret_cast<const __m128i*>(table));
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)), m = _mm_set1_epi8(0x0F);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_shuffle_epi8(t, _mm_and_si128(v, m)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_shuffle_epi8(t, _mm_and_si128(_mm_srli_epi16(v, 4), m)));
#else
  for (int j = 0; j < 16; ++j) {
    out[j] = table[qs[j] & 0x0F];
    out[16 + j] = table[qs[j] >> 4];
  }
#endif
}

// 32 bytes of 2-bit fields -> 128 codes, weight 32n + j = field n of byte j, minus `bias`.
inline void crumbs(const uint8_t* qs, int bias, int8_t* out) {
#if defined(GK_AVX512) || defined(GK_AVX2)
  // 16-bit shifts are safe: the mask keeps each byte's own two bits
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
  const __m256i m = _mm256_set1_epi8(3), b = _mm256_set1_epi8(int8_t(bias));
  for (int n = 0; n < 4; ++n)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * n),
                        _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 2 * n), m), b));
#else
  for (int n = 0; n < 4; ++n)
    for (int j = 0; j < 32; ++j) out[32 * n + j] = int8_t(((qs[j] >> (2 * n)) & 3) - bias);
#endif
}

// TQ1_0: a byte packs base-3 digits as a fixed-point fraction of 243 (the first digit most
// significant); multiplying by 3^n (mod 256) moves digit n to the top, and * 3 >> 8 reads it.
inline int8_t trit(uint8_t b, int pow3) {
  const uint8_t t = uint8_t(b * pow3);
  return int8_t(((t * 3) >> 8) - 1);
}

#if defined(GK_AVX512) || defined(GK_AVX2)
// The same, 32 (16) bytes at a time. Byte adds wrap mod 256, so t + t + t is the next digit's
// fraction; the digit (3t >> 8) is 0, 1 or 2 as t < 86, < 171 or above, two unsigned compares
// (signed ones after flipping the top bit), each -1 where it holds.
inline __m256i times3(__m256i t) { return _mm256_add_epi8(_mm256_add_epi8(t, t), t); }
inline __m128i times3(__m128i t) { return _mm_add_epi8(_mm_add_epi8(t, t), t); }

inline __m256i trits(__m256i t) {
  const __m256i s = _mm256_xor_si256(t, _mm256_set1_epi8(-128));
  const __m256i ge86 = _mm256_cmpgt_epi8(s, _mm256_set1_epi8(85 - 128)), ge171 = _mm256_cmpgt_epi8(s, _mm256_set1_epi8(170 - 128));
  return _mm256_sub_epi8(_mm256_sub_epi8(_mm256_set1_epi8(-1), ge86), ge171);
}
inline __m128i trits(__m128i t) {
  const __m128i s = _mm_xor_si128(t, _mm_set1_epi8(-128));
  const __m128i ge86 = _mm_cmpgt_epi8(s, _mm_set1_epi8(85 - 128)), ge171 = _mm_cmpgt_epi8(s, _mm_set1_epi8(170 - 128));
  return _mm_sub_epi8(_mm_sub_epi8(_mm_set1_epi8(-1), ge86), ge171);
}

// 16 small integers (bytes, signed where `sign`) times d, one float32 product each, into out[0:16].
inline void scaled16(__m128i v, bool sign, float d, float* out) {
#if defined(GK_AVX512)
  const __m512i w = sign ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v);
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_cvtepi32_ps(w), _mm512_set1_ps(d)));
#else
  const __m128i h = _mm_srli_si128(v, 8);
  const __m256i w0 = sign ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v);
  const __m256i w1 = sign ? _mm256_cvtepi8_epi32(h) : _mm256_cvtepu8_epi32(h);
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(w0), _mm256_set1_ps(d)));
  _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(w1), _mm256_set1_ps(d)));
#endif
}
#endif

void q2_k_block(const uint8_t* p, int8_t* codes, float* scale, float* offset) {
  const float d = fp16_to_f32(p + 80), dmin = fp16_to_f32(p + 82);
#if defined(GK_AVX512) || defined(GK_AVX2)
  const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(0x0F);
  scaled16(_mm_and_si128(sc, m), false, d, scale);
  scaled16(_mm_and_si128(_mm_srli_epi16(sc, 4), m), false, -dmin, offset);  // -(dmin * m), the same float
#else
  for (int g = 0; g < 16; ++g) {
    scale[g] = d * float(p[g] & 0x0F);
    offset[g] = -(dmin * float(p[g] >> 4));
  }
#endif
  crumbs(p + 16, 0, codes);
  crumbs(p + 48, 0, codes + 128);
}

void q3_k_block(const uint8_t* p, int8_t* codes, float* scale) {
  const uint8_t* hm = p;
  const uint8_t* sc = p + 96;
  const float d = fp16_to_f32(p + 108);
#if defined(GK_AVX512) || defined(GK_AVX2)
  {
    // low nibbles: bytes 0-7's low halves, then their high halves; top bits: byte 8 + s % 4's bit
    // pair s / 4, i.e. 32-bit lane s / 4 of bytes 8-11 shifted right by 2 * (s / 4)
    const __m128i lo8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc)), m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(lo8, m), _mm_and_si128(_mm_srli_epi16(lo8, 4), m));
    const __m128i hi = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32(int(load_u32(sc + 8))), _mm_setr_epi32(0, 2, 4, 6)),
                                     _mm_set1_epi8(3));
    scaled16(_mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), _mm_set1_epi8(32)), true, d, scale);
  }
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hm));
  const __m256i m3 = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4);
  for (int c = 0; c < 2; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 + 32 * c));
    for (int n = 0; n < 4; ++n) {
      // high bit 4c + n moved to bit 2 (masked to each byte's own bit, as in crumbs)
      const int b = 4 * c + n;
      const __m256i hb = b >= 2 ? _mm256_srli_epi16(h, b - 2) : _mm256_slli_epi16(h, 2 - b);
      const __m256i q = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 2 * n), m3), _mm256_and_si256(hb, four));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 128 * c + 32 * n), _mm256_sub_epi8(q, four));
    }
  }
#else
  for (int s = 0; s < 16; ++s) {
    const int lo = s < 8 ? sc[s] & 0x0F : sc[s - 8] >> 4;
    const int hi = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
    scale[s] = d * float((lo | (hi << 4)) - 32);
  }
  for (int c = 0; c < 2; ++c) {
    const uint8_t* qs = p + 32 + 32 * c;
    for (int n = 0; n < 4; ++n)
      for (int j = 0; j < 32; ++j) {
        const int low = (qs[j] >> (2 * n)) & 3, high = (hm[j] >> (4 * c + n)) & 1;
        codes[128 * c + 32 * n + j] = int8_t((low | (high << 2)) - 4);
      }
  }
#endif
}

void iq4_xs_block(const uint8_t* p, int8_t* codes, float* scale) {
  const float d = fp16_to_f32(p);
  const uint16_t sh = load_u16(p + 2);
  for (int g = 0; g < 8; ++g) {
    const int ls = ((p[4 + g / 2] >> (4 * (g % 2))) & 0x0F) | (((sh >> (2 * g)) & 3) << 4);
    scale[g] = d * float(ls - 32);
    nibble_levels(p + 8 + 16 * g, kIQ4Levels, codes + 32 * g);
  }
}

void tq1_0_block(const uint8_t* p, int8_t* codes) {
#if defined(GK_AVX512) || defined(GK_AVX2)
  __m256i t0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  __m128i t1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32));
  for (int n = 0; n < 5; ++n) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 32 * n), trits(t0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 160 + 16 * n), trits(t1));
    t0 = times3(t0);
    t1 = times3(t1);
  }
  // qh's 4 bytes times 1, 3, 9, 27 as the four 32-bit lanes of one register
  const __m128i h0 = _mm_set1_epi32(int(load_u32(p + 48))), h1 = times3(h0), h2 = times3(h1), h3 = times3(h2);
  const __m128i h = _mm_blend_epi32(_mm_blend_epi32(_mm_blend_epi32(h0, h1, 0x2), h2, 0x4), h3, 0x8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + 240), trits(h));
#else
  static const int kPow3[5] = {1, 3, 9, 27, 81};
  for (int n = 0; n < 5; ++n) {
    for (int j = 0; j < 32; ++j) codes[32 * n + j] = trit(p[j], kPow3[n]);
    for (int j = 0; j < 16; ++j) codes[160 + 16 * n + j] = trit(p[32 + j], kPow3[n]);
  }
  for (int n = 0; n < 4; ++n)
    for (int j = 0; j < 4; ++j) codes[240 + 4 * n + j] = trit(p[48 + j], kPow3[n]);
#endif
}

Codes decode(int64_t type, const uint8_t* row, int64_t nb, int8_t* codes, float* scale, float* offset) {
  switch (type) {
    case Q2_K:
      for (int64_t b = 0; b < nb; ++b) q2_k_block(row + 84 * b, codes + 256 * b, scale + 16 * b, offset + 16 * b);
      return {codes, 16};
    case Q3_K:
      for (int64_t b = 0; b < nb; ++b) q3_k_block(row + 110 * b, codes + 256 * b, scale + 16 * b);
      return {codes, 16};
    case IQ4_NL:
      for (int64_t b = 0; b < nb; ++b) {
        scale[b] = fp16_to_f32(row + 18 * b);
        nibble_levels(row + 18 * b + 2, kIQ4Levels, codes + 32 * b);
      }
      break;
    case IQ4_XS:
      for (int64_t b = 0; b < nb; ++b) iq4_xs_block(row + 136 * b, codes + 256 * b, scale + 8 * b);
      break;
    case TQ1_0:
    case TQ2_0: {
      const int64_t bytes = type == TQ1_0 ? 54 : 66;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* p = row + bytes * b;
        const float d = fp16_to_f32(p + bytes - 2);
        for (int g = 0; g < 8; ++g) scale[8 * b + g] = d;
        if (type == TQ1_0) {
          tq1_0_block(p, codes + 256 * b);
        } else {
          crumbs(p, 1, codes + 256 * b);
          crumbs(p + 32, 1, codes + 256 * b + 128);
        }
      }
      break;
    }
    case MXFP4:
      for (int64_t b = 0; b < nb; ++b) {
        scale[b] = e8m0_half(row[17 * b]);
        nibble_levels(row + 17 * b + 1, kE2M1x2, codes + 32 * b);
      }
      break;
    default:
      TORCH_CHECK(false, "ggml kernel: GGML type ", type, " is not of this family");
  }
  return {codes, 32};
}

}  // namespace

const Family kquants_family = {info, decode};

}  // namespace gemmakit_ggml
