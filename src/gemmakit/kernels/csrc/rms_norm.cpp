// gemmakit CPU kernel: Gemma's RMSNorm in one pass per row, float32.
//
//     out = x / sqrt(mean(x^2) + eps) * (offset + weight)      (offset 1 up to Gemma 3, 0 after)
//
// A decoding step of Gemma 3 270M runs 109 norms on vectors of 640 or 256 entries; as torch ops each
// is eight dispatches (pow, mean, add, rsqrt, two multiplies, the 1 + weight, a copy) costing more
// than the arithmetic. Here it is one call. The roundings follow torch's: the mean is a float32 sum
// (in another order) divided by the row length, then eps added, rsqrt, and x * r * (offset + w).

#include <torch/types.h>  // not torch/extension.h: no pybind11 here, a third of the compile time

#include "rows.h"

// x [..., D] float32 contiguous, weight [D] float32.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps, double offset) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32, "rms_norm is float32");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.numel() == D, "rms_norm: weight must have one entry per feature");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t rows = D ? xc.numel() / D : 0;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float feps = static_cast<float>(eps), foffset = static_cast<float>(offset);
  gemmakit::for_rows(rows, D, 1 << 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) gemmakit::rms_norm_row(xp + r * D, wp, op + r * D, D, feps, foffset);
  });
  return out;
}
