// The block formats of gemmakit's GGML kernel (ggml_matmul.cpp), as the kernel sees them: a row of
// blocks decodes into int8 codes and one float scale (and, for some types, one float offset) per
// group of 16 or 32 weights, w = scale * code (+ offset), rounded exactly as ggml dequantises.
//
// ggml_matmul.cpp decodes its own types (Q4_0 ... Q8_0, Q4_K ... Q6_K) and multiplies most of them
// straight from their blocks. Every other type is a *family* in a file of its own, which only decodes
// rows; ggml_matmul.cpp multiplies (and dequantises) their codes with the same dot products:
//   ggml_kquants.cpp   Q2_K, Q3_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0, MXFP4
//   ggml_iq2.cpp       IQ2_XXS, IQ2_XS, IQ2_S
//   ggml_iq13.cpp      IQ3_XXS, IQ3_S, IQ1_S, IQ1_M
// The grid types' lookup tables are ggml's format, not ours to restate: gguf-py holds them, and
// gemmakit/kernels/build.py hands them to the kernel (ggml_set_tables) right after it loads.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define GK_AVX512 1
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define GK_AVX2 1
#endif
#if defined(GK_AVX512) || defined(GK_AVX2) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace gemmakit_ggml {

// GGML's type numbers (gguf's GGMLQuantizationType).
enum : int64_t {
  F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13,
  Q6_K = 14, IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22,
  IQ4_XS = 23, IQ1_M = 29, BF16 = 30, TQ1_0 = 34, TQ2_0 = 35, MXFP4 = 39
};

struct TypeInfo {
  int64_t block;      // weights per block
  int64_t bytes;      // bytes per block
  int64_t group;      // weights per scale group: 16 or 32
  bool has_offset;    // w = scale * code + offset (else w = scale * code)
  const char* name;
};

// Where a decoded row's codes are: group g starts at q + g * gstride.
struct Codes {
  const int8_t* q;
  int64_t gstride;
};

// One family of block types. info() is false for a type not the family's; decode() turns one row of
// `nb` blocks into codes (K int8 at `codes`), a scale per group at `scale` and, for a type with
// offsets, an offset per group at `offset`, and returns where the codes are.
struct Family {
  bool (*info)(int64_t type, TypeInfo* info);
  Codes (*decode)(int64_t type, const uint8_t* row, int64_t nb, int8_t* codes, float* scale, float* offset);
};
extern const Family kquants_family, iq2_family, iq13_family;

// The grid types' tables, exactly as ggml's ggml-common.h orders them: entry i of a grid is its 8 (or
// 4) weights' magnitudes as bytes, lowest weight in the lowest byte; ksigns[i] is the 7 sign bits i
// with an eighth that makes the parity even.
struct Tables {
  uint64_t iq2xxs[256], iq2xs[512], iq2s[1024], iq1s[2048];
  uint32_t iq3xxs[256], iq3s[512];
  uint8_t ksigns[128];
  bool ready = false;
};
extern Tables tables;
// The tables, or a clear error where build.py never set them.
const Tables& grid_tables();

inline float fp16_to_f32(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { man <<= 1; ++e; } while ((man & 0x400) == 0);
    bits = sign | (uint32_t(112 - e) << 23) | ((man & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

}  // namespace gemmakit_ggml
