// gemmakit's GGML kernel, the block family of Q2_K, Q3_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0 and MXFP4: rows decoded into int8 codes and
// per-group scales (ggml_blocks.h), which ggml_matmul.cpp multiplies and dequantises.

#include "ggml_blocks.h"

namespace gemmakit_ggml {

namespace {

bool info(int64_t /*type*/, TypeInfo* /*info*/) { return false; }

Codes decode(int64_t type, const uint8_t* /*row*/, int64_t /*nb*/, int8_t* codes, float* /*scale*/, float* /*offset*/) {
  TORCH_CHECK(false, "ggml kernel: GGML type ", type, " is not of this family");
  return {codes, 32};
}

}  // namespace

const Family kquants_family = {info, decode};

}  // namespace gemmakit_ggml
