// gemmakit CPU kernel: Gemma's optional per-head RMSNorm (QK-norm) and the rotary embedding in one
// call, float32.
//
//     y = x / sqrt(mean(x^2) + eps) * (offset + weight)      (when a weight is given)
//     out[i] = y[i] * cos[i] - y[i + h] * sin[i]        (i < h, h = rot / 2)
//     out[i] = y[i] * cos[i] + y[i - h] * sin[i]        (h <= i < rot)
//     out[i] = y[i]                                     (rot <= i: partial rotary)
//
// As torch ops this is ~9 dispatches per tensor (the norm, two slices, a negation, a concatenation,
// two products, a sum); a decoding step runs it for q and k in every layer, so dispatch cost more
// than the arithmetic on vectors of 256. The roundings are torch's except that the compiler may fuse
// a product with the following sum.

#include <torch/types.h>  // not torch/extension.h: no pybind11 here, a third of the compile time

#include "rows.h"

#include <vector>

// x [B, H, T, D] (any strides, contiguous last dim); weight [D] or an empty tensor for no norm;
// cos, sin [B, 1, T, rot] (any strides, contiguous last dim, rot even and <= D). Returns a new
// contiguous [B, H, T, D].
torch::Tensor norm_rope(torch::Tensor x, torch::Tensor weight, double eps, double offset, torch::Tensor cos,
                        torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && sin.sizes() == cos.sizes(), "norm_rope: x [B, H, T, D], cos/sin [B, 1, T, rot]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && cos.scalar_type() == torch::kFloat32 &&
                  sin.scalar_type() == torch::kFloat32, "norm_rope is float32");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), rot = cos.size(3);
  TORCH_CHECK(cos.size(0) == B && cos.size(1) == 1 && cos.size(2) == T && rot % 2 == 0 && rot <= D,
              "norm_rope: cos/sin must be [B, 1, T, rot] with an even rot <= head_dim");
  TORCH_CHECK(x.stride(3) == 1 && cos.stride(3) == 1 && sin.stride(3) == 1, "norm_rope: contiguous last dims");
  const bool norm = weight.defined() && weight.numel() > 0;
  TORCH_CHECK(!norm || (weight.scalar_type() == torch::kFloat32 && weight.numel() == D),
              "norm_rope: weight must be float32 with one entry per feature");
  auto wc = norm ? weight.contiguous() : weight;
  auto out = torch::empty({B, H, T, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const float* wp = norm ? wc.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  const int64_t half = rot / 2;
  const int64_t x0 = x.stride(0), x1 = x.stride(1), x2 = x.stride(2);
  const int64_t c0 = cos.stride(0), c2 = cos.stride(2), s0 = sin.stride(0), s2 = sin.stride(2);
  auto rows = [&](int64_t r0, int64_t r1) {
    std::vector<float> y(norm ? D : 0);
    for (int64_t r = r0; r < r1; ++r) {  // r = (b * H + h) * T + t, the output's row
      const int64_t t = r % T, h = (r / T) % H, b = r / (T * H);
      const float* v = xp + b * x0 + h * x1 + t * x2;
      const float* c = cp + b * c0 + t * c2;
      const float* s = sp + b * s0 + t * s2;
      float* o = op + r * D;
      const float* src = v;  // the vector to rotate: x itself, or its normalised copy
      if (norm) {
        gemmakit::rms_norm_row(v, wp, y.data(), D, feps, static_cast<float>(offset));
        src = y.data();
      }
      for (int64_t i = 0; i < half; ++i) o[i] = src[i] * c[i] - src[i + half] * s[i];
      for (int64_t i = half; i < rot; ++i) o[i] = src[i] * c[i] + src[i - half] * s[i];
      for (int64_t i = rot; i < D; ++i) o[i] = src[i];
    }
  };
  gemmakit::for_rows(B * H * T, D, 1 << 16, rows);  // a decoding step's few heads stay on this thread
  return out;
}
