// gemmakit CPU kernel: a whole one-token decoding step of a Gemma attention decoder in one call.
//
// Eagerly, a step of Gemma 3 270M is ~1,000 dispatched ops (norms, views, splits, cache writes,
// GELU, residual adds) around its ~75 matmuls; through Python each costs microseconds, ~8 ms of a
// ~26 ms step on a 2-core EPYC. Here the same pieces (the block kernels, rms_norm, norm_rope,
// decode_attention, gelu_mul) run back to back from C++: the same functions on the same inputs
// in the same order, so the result equals the eager step bit for bit. The stack is built once from
// the model's weights (gemmakit/models/fused_decode.py); each step passes the hidden state, the
// caches and the step's rotary tables and masks.

#pragma once

#include <torch/types.h>

#include <vector>

// A linear map of one input to the side-by-side outputs of one or more parts. A part is GGML
// blocks (several matrices in one kernel call) or a dense float32 matrix.
struct DecodePart {
  int64_t kind = 0;                    // 0 GGML blocks, 1 dense float32
  std::vector<torch::Tensor> tensors;  // GGML: blocks per matrix; dense: {weight}
  std::vector<int64_t> types;          // GGML types, one per matrix
  int64_t K = 0;
  int64_t activations = 0;             // GGML: ggml_matmul's activations (0 float32, 1 auto, 2 int8)
};

struct DecodeProjection {
  std::vector<DecodePart> parts;
  torch::Tensor apply(const torch::Tensor& x) const;  // x [B, K] float32 contiguous -> [B, N]
};

struct DecodeLayer {
  bool global = true;
  // RMSNorm weights (offsets from one); an undefined tensor means the norm is absent.
  torch::Tensor attn_norm, post_attn_norm, q_norm, k_norm, mlp_norm, post_mlp_norm;
  DecodeProjection qkv, o, gate_up, down;
};

class DecodeStack {
 public:
  DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps, double scale,
              double attn_softcap, torch::Tensor final_norm);

  // norms: {attn, post_attn, q, k, mlp, post_mlp}, an empty tensor for an absent one.
  void add_layer(bool global, std::vector<torch::Tensor> norms, DecodeProjection qkv, DecodeProjection o,
                 DecodeProjection gate_up, DecodeProjection down);

  // h [B, hidden] float32 (the scaled embeddings). keys/values: one [B, kv_heads, slots, head_dim]
  // buffer per layer. Row b of a global layer writes column slots_g[b] and attends to columns
  // [0, bias_g.size(-1)); of a local layer, ring slot slots_l[b], attending to slots
  // [0, bias_l.size(-1)) (a slot past those is the serving cache's trash slot). cos/sin [B, 1, 1, rot],
  // bias [B, 1, 1, S] (0 / -inf). Returns the final norm's output [B, hidden]: the LM head stays
  // the model's own call, so its path (and rounding) is exactly the eager one.
  // key_scales / value_scales: empty for a float32 cache; for an int8 one (int8 keys and values),
  // one float32 [B, kv_heads, slots, groups] scale buffer per layer, the new vectors quantised
  // into them exactly as LayerCache.store does.
  torch::Tensor step(torch::Tensor h, std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                     std::vector<torch::Tensor> key_scales, std::vector<torch::Tensor> value_scales,
                     torch::Tensor cos_g, torch::Tensor sin_g, torch::Tensor bias_g, std::vector<int64_t> slots_g,
                     torch::Tensor cos_l, torch::Tensor sin_l, torch::Tensor bias_l,
                     std::vector<int64_t> slots_l) const;

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  int64_t heads_, kv_heads_, head_dim_, intermediate_;
  double eps_, scale_, attn_softcap_;
  torch::Tensor final_norm_;
  std::vector<DecodeLayer> layers_;
};
