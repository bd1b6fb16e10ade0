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

// 32 codes from 4 grid words and their 32 sign bits (grid word i's in bits 8i..8i+7).
inline void put32(uint64_t g0, uint64_t g1, uint64_t g2, uint64_t g3, uint32_t signs, int8_t* out) {
  put8(g0, signs, out);
  put8(g1, signs >> 8, out + 8);
  put8(g2, signs >> 16, out + 16);
  put8(g3, signs >> 24, out + 24);
}

void decode_xxs(const uint8_t* row, int64_t nb, int8_t* codes, float* scale) {
  const Tables& t = grid_tables();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = row + 66 * b;
    const float d = fp16_to_f32(p);
    for (int j = 0; j < 8; ++j) {
      const uint8_t* q = p + 2 + 8 * j;
      const uint32_t aux = load_u32(q + 4);
      scale[8 * b + j] = group_scale(d, aux >> 28);
      const uint32_t signs = uint32_t(t.ksigns[aux & 127]) | uint32_t(t.ksigns[(aux >> 7) & 127]) << 8 |
                             uint32_t(t.ksigns[(aux >> 14) & 127]) << 16 | uint32_t(t.ksigns[(aux >> 21) & 127]) << 24;
      put32(t.iq2xxs[q[0]], t.iq2xxs[q[1]], t.iq2xxs[q[2]], t.iq2xxs[q[3]], signs, codes + 256 * b + 32 * j);
    }
  }
}

void decode_xs(const uint8_t* row, int64_t nb, int8_t* codes, float* scale) {
  const Tables& t = grid_tables();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = row + 74 * b;
    const float d = fp16_to_f32(p);
    for (int j = 0; j < 8; ++j) {
      const uint8_t s = p[66 + j];
      scale[16 * b + 2 * j] = group_scale(d, s & 15);
      scale[16 * b + 2 * j + 1] = group_scale(d, s >> 4);
      uint16_t w[4];
      std::memcpy(w, p + 2 + 8 * j, 8);
      const uint32_t signs = uint32_t(t.ksigns[w[0] >> 9]) | uint32_t(t.ksigns[w[1] >> 9]) << 8 |
                             uint32_t(t.ksigns[w[2] >> 9]) << 16 | uint32_t(t.ksigns[w[3] >> 9]) << 24;
      put32(t.iq2xs[w[0] & 511], t.iq2xs[w[1] & 511], t.iq2xs[w[2] & 511], t.iq2xs[w[3] & 511], signs,
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
    for (int j = 0; j < 8; ++j) {
      scale[16 * b + 2 * j] = group_scale(d, sc[j] & 15);
      scale[16 * b + 2 * j + 1] = group_scale(d, sc[j] >> 4);
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
