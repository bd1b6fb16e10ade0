// The Python module of gemmakit's CPU kernels: ggml_matmul.cpp (raw GGML blocks),
// decode_attention.cpp (one-query attention), rms_norm.cpp (Gemma's RMSNorm in one call), rope.cpp
// (QK-norm + rotary embedding in one call), gelu_mul.cpp (the MLP's GELU(gate) * up in one pass),
// ggml_quantize.cpp (float rows -> Q8_0 or Q4_1 blocks), bpe.cpp (SentencePiece's BPE encoding over
// a compact vocabulary) and decode_step.cpp (a decoding step's layers in one call), compiled together
// as one extension.

#include <torch/extension.h>

#include "bpe.h"
#include "decode_step.h"

#include <string>
#include <vector>

torch::Tensor ggml_matmul(torch::Tensor x, std::vector<torch::Tensor> blocks, std::vector<int64_t> types, int64_t K,
                          int64_t activations);
torch::Tensor ggml_dequantize(torch::Tensor blocks, int64_t type, int64_t K);
void ggml_dequantize_into(torch::Tensor blocks, int64_t type, int64_t K, torch::Tensor out);
std::string ggml_simd();
void ggml_set_tables(torch::Tensor iq2xxs, torch::Tensor iq2xs, torch::Tensor iq2s, torch::Tensor iq1s,
                     torch::Tensor iq3xxs, torch::Tensor iq3s, torch::Tensor ksigns);
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor bias, double scale,
                               double softcap);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps, double offset);
torch::Tensor norm_rope(torch::Tensor x, torch::Tensor weight, double eps, double offset, torch::Tensor cos,
                        torch::Tensor sin);
torch::Tensor gelu_mul(torch::Tensor gate, torch::Tensor up);
torch::Tensor ggml_quantize(torch::Tensor w, int64_t type);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ggml_matmul", &ggml_matmul, "x @ concat(W_i)^T for raw GGML block rows W_i; activations 0 float32, "
        "1 int8 where the kernel decodes the type, 2 int8 for every quantised type");
  m.def("ggml_dequantize", &ggml_dequantize, "raw GGML block rows -> float32, bit-identical to ggml");
  m.def("ggml_dequantize_into", &ggml_dequantize_into, "ggml_dequantize into a given [N, K] float32 or bfloat16 tensor");
  m.def("ggml_set_tables", &ggml_set_tables, "the IQ types' grids and sign table, as uint8 tensors of their bytes");
  m.def("ggml_simd", &ggml_simd, "the SIMD path ggml_matmul was built with: avx512, avx2 or scalar");
  m.def("decode_attention", &decode_attention, "softmax(cap(scale q.k) + bias) @ v for one query per row");
  m.def("rms_norm", &rms_norm, "x / sqrt(mean(x^2) + eps) * (offset + weight), float32");
  m.def("norm_rope", &norm_rope, "optional RMSNorm, then the rotary embedding (half-split), float32");
  m.def("ggml_quantize", &ggml_quantize, "float32 [N, K] -> GGML Q8_0 or Q4_1 block rows, llama.cpp's rounding");
  m.def("gelu_mul", &gelu_mul, "GELU(tanh)(gate) * up as x / (1 + exp(-2u)) * up, float32");

  py::class_<BPEVocab>(m, "BPEVocab", "SentencePiece BPE encoding over a compact vocabulary (bpe.h)")
      .def(py::init<const std::vector<std::string>&, const std::vector<float>&, const std::string&, int64_t>())
      .def("encode", &BPEVocab::encode, "token ids of a text (no special-token handling)")
      .def("piece", &BPEVocab::piece, "the piece of an id")
      .def("piece_to_id", [](const BPEVocab& v, const std::string& p) { return v.piece_to_id(p); })
      .def("__len__", &BPEVocab::size);
  py::class_<DecodePart>(m, "DecodePart", "one part of a projection: GGML blocks or a dense matrix")
      .def_static("ggml", [](std::vector<torch::Tensor> blocks, std::vector<int64_t> types, int64_t K,
                             int64_t activations) {
        DecodePart p;
        p.kind = 0, p.tensors = std::move(blocks), p.types = std::move(types), p.K = K, p.activations = activations;
        return p;
      })
      .def_static("dense", [](torch::Tensor weight) {
        DecodePart p;
        p.kind = 1, p.tensors = {weight};
        return p;
      });
  py::class_<DecodeProjection>(m, "DecodeProjection", "parts with one input, outputs side by side")
      .def(py::init([](std::vector<DecodePart> parts) {
        DecodeProjection p;
        p.parts = std::move(parts);
        return p;
      }));
  py::class_<DecodeStack>(m, "DecodeStack", "the attention layers of a decoder, run one token at a time")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, double, double, double, torch::Tensor>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("step", &DecodeStack::step);
}
