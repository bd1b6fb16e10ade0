// Float rows -> GGML blocks, rounded exactly as llama.cpp's reference quantiser (and gguf-py's copy
// of it) rounds them, in one pass per block and in parallel over rows: gguf-py's numpy version makes
// several whole-array passes (~140M weights/s here), which is minutes for a 27B model.
//   Q8_0: 34 bytes per 32 weights: float16 d = absmax / 127, 32 int8 codes, w ~ d * q.
//   Q4_1: 20 bytes per 32 weights: float16 d, float16 m, 16 bytes of nibbles, w ~ d * q + m.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

// q = trunc((x - min) * id + 0.5) keeps the reference's separate multiply and add: a fused
// multiply-add, which -O3 -march=native may form, rounds once and can flip a code that sits within
// a rounding of a .5 boundary.
__attribute__((optimize("fp-contract=off")))
void quantize_block_q4_1(const float* x, uint8_t* out) {
  float lo = x[0], hi = x[0];
  for (int j = 1; j < 32; ++j) {
    lo = std::min(lo, x[j]);
    hi = std::max(hi, x[j]);
  }
  const float d = (hi - lo) / 15.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const uint16_t d16 = c10::Half(d).x, m16 = c10::Half(lo).x;
  std::memcpy(out, &d16, 2);
  std::memcpy(out + 2, &m16, 2);
  for (int j = 0; j < 16; ++j) {
    const float a = (x[j] - lo) * id + 0.5f;
    const float b = (x[j + 16] - lo) * id + 0.5f;
    const int qa = std::min(15, static_cast<int>(a)), qb = std::min(15, static_cast<int>(b));  // a, b >= 0.5
    out[4 + j] = static_cast<uint8_t>(qa | (qb << 4));
  }
}

// q = round(x * id), half away from zero as roundf and gguf-py's np_roundf both round; d is the
// float32 quotient, rounded to float16 only when stored, as in the reference.
void quantize_block_q8_0(const float* x, uint8_t* out) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const uint16_t d16 = c10::Half(d).x;
  std::memcpy(out, &d16, 2);
  for (int j = 0; j < 32; ++j) out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::round(x[j] * id)));
}

constexpr int64_t kQ4_1 = 3, kQ8_0 = 8;  // GGMLQuantizationType

}  // namespace

torch::Tensor ggml_quantize(torch::Tensor w, int64_t type) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.device().is_cpu(),
              "ggml_quantize: w must be a 2-D float32 CPU tensor");
  TORCH_CHECK(type == kQ4_1 || type == kQ8_0, "ggml_quantize: GGML type ", type, " is not Q4_1 (3) or Q8_0 (8)");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 32 == 0, "ggml_quantize: the row length ", K, " is not a multiple of 32");
  const int64_t bytes = type == kQ8_0 ? 34 : 20;
  auto x = w.contiguous();
  auto out = torch::empty({N, K / 32 * bytes}, torch::kUInt8);
  const float* src = x.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  auto block = type == kQ8_0 ? quantize_block_q8_0 : quantize_block_q4_1;
  at::parallel_for(0, N, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < K / 32; ++b) block(src + r * K + b * 32, dst + (r * (K / 32) + b) * bytes);
  });
  return out;
}
