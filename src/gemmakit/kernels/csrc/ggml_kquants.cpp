// gemmakit's GGML kernel, the block family of Q2_K, Q3_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0 and MXFP4: rows
// decoded into int8 codes and per-group scales (ggml_blocks.h), which ggml_matmul.cpp multiplies and
// dequantises.
//
// Block layouts (byte offsets in one block) and what a weight is, in ggml's roundings:
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
  for (int j = 0; j < 16; ++j) {
    out[j] = table[qs[j] & 0x0F];
    out[16 + j] = table[qs[j] >> 4];
  }
}

// 32 bytes of 2-bit fields -> 128 codes, weight 32n + j = field n of byte j, minus `bias`.
inline void crumbs(const uint8_t* qs, int bias, int8_t* out) {
  for (int n = 0; n < 4; ++n)
    for (int j = 0; j < 32; ++j) out[32 * n + j] = int8_t(((qs[j] >> (2 * n)) & 3) - bias);
}

// TQ1_0: a byte packs base-3 digits as a fixed-point fraction of 243 (the first digit most
// significant); multiplying by 3^n (mod 256) moves digit n to the top, and * 3 >> 8 reads it.
inline int8_t trit(uint8_t b, int pow3) {
  const uint8_t t = uint8_t(b * pow3);
  return int8_t(((t * 3) >> 8) - 1);
}

void q2_k_block(const uint8_t* p, int8_t* codes, float* scale, float* offset) {
  const float d = fp16_to_f32(p + 80), dmin = fp16_to_f32(p + 82);
  for (int g = 0; g < 16; ++g) {
    scale[g] = d * float(p[g] & 0x0F);
    offset[g] = -(dmin * float(p[g] >> 4));
  }
  crumbs(p + 16, 0, codes);
  crumbs(p + 48, 0, codes + 128);
}

void q3_k_block(const uint8_t* p, int8_t* codes, float* scale) {
  const uint8_t* hm = p;
  const uint8_t* sc = p + 96;
  const float d = fp16_to_f32(p + 108);
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
  static const int kPow3[5] = {1, 3, 9, 27, 81};
  for (int n = 0; n < 5; ++n) {
    for (int j = 0; j < 32; ++j) codes[32 * n + j] = trit(p[j], kPow3[n]);
    for (int j = 0; j < 16; ++j) codes[160 + 16 * n + j] = trit(p[32 + j], kPow3[n]);
  }
  for (int n = 0; n < 4; ++n)
    for (int j = 0; j < 4; ++j) codes[240 + 4 * n + j] = trit(p[48 + j], kPow3[n]);
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
