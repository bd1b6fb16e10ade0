// gemmakit CPU kernel: the layers of a one-token decoding step in one call (see decode_step.h).

#include "decode_step.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>

torch::Tensor ggml_matmul(torch::Tensor x, std::vector<torch::Tensor> blocks, std::vector<int64_t> types, int64_t K,
                          int64_t activations);
torch::Tensor decode_attention_cached(torch::Tensor q, torch::Tensor k, torch::Tensor k_scale, torch::Tensor v,
                                      torch::Tensor v_scale, torch::Tensor bias, double scale, double softcap);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps, double offset);
torch::Tensor norm_rope(torch::Tensor x, torch::Tensor weight, double eps, double offset, torch::Tensor cos,
                        torch::Tensor sin);
torch::Tensor gelu_mul(torch::Tensor gate, torch::Tensor up);

namespace {

torch::Tensor apply_part(const DecodePart& p, const torch::Tensor& x) {
  switch (p.kind) {
    case 0:
      return ggml_matmul(x, p.tensors, p.types, p.K, p.activations);
    case 1:
      return at::linear(x, p.tensors[0]);
  }
  TORCH_CHECK(false, "decode_step: unknown projection kind ", p.kind);
}

// The fused step runs the Gemma 1-3 layout, whose norm weights are stored as offsets from one.
constexpr double kNormOffset = 1.0;

// An absent norm passes x through, as nn.Identity does in the eager model.
torch::Tensor maybe_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  return weight.defined() ? rms_norm(x, weight, eps, kNormOffset) : x;
}

torch::Tensor defined_or_none(const torch::Tensor& t) { return t.numel() > 0 ? t : torch::Tensor(); }

// cache[b, h, slots[b], :] = src[b * row_stride + h * head_stride, + D) for every row and kv head:
// the step's new key or value vectors copied straight into their slots (what the eager layers'
// index_copy_/scatter_ do, without dispatched ops per buffer per layer).
void store(const torch::Tensor& cache, const std::vector<int64_t>& slots, const float* src, int64_t row_stride,
           int64_t head_stride, int64_t B, int64_t Hkv, int64_t D) {
  TORCH_CHECK(cache.scalar_type() == torch::kFloat32 && cache.size(0) == B && cache.size(1) == Hkv &&
                  cache.size(3) == D && cache.stride(3) == 1, "decode_step: a float32 [B, kv_heads, slots, head_dim] cache");
  float* base = cache.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slots[b] >= 0 && slots[b] < cache.size(2), "decode_step: slot ", slots[b], " outside the cache");
    for (int64_t h = 0; h < Hkv; ++h)
      std::memcpy(base + b * cache.stride(0) + h * cache.stride(1) + slots[b] * cache.stride(2),
                  src + b * row_stride + h * head_stride, sizeof(float) * D);
  }
}

// The int8 cache's write: each new vector's groups of D / groups entries as codes with one scale
// apiece, computed as LayerCache.store does (absmax / 127, at least 1e-12; x / scale rounded half
// to even), so the fused and eager steps leave the same bytes in the cache.
void store_int8(const torch::Tensor& codes, const torch::Tensor& scales, const std::vector<int64_t>& slots,
                const float* src, int64_t row_stride, int64_t head_stride, int64_t B, int64_t Hkv, int64_t D) {
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && codes.size(0) == B && codes.size(1) == Hkv && codes.size(3) == D &&
                  codes.stride(3) == 1 && scales.scalar_type() == torch::kFloat32 && scales.dim() == 4 &&
                  scales.size(2) == codes.size(2) && scales.stride(3) == 1 && D % scales.size(3) == 0,
              "decode_step: an int8 [B, kv_heads, slots, head_dim] cache with float32 [.., groups] scales");
  const int64_t groups = scales.size(3), len = D / groups;
  int8_t* cbase = codes.data_ptr<int8_t>();
  float* sbase = scales.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slots[b] >= 0 && slots[b] < codes.size(2), "decode_step: slot ", slots[b], " outside the cache");
    for (int64_t h = 0; h < Hkv; ++h) {
      const float* x = src + b * row_stride + h * head_stride;
      int8_t* c = cbase + b * codes.stride(0) + h * codes.stride(1) + slots[b] * codes.stride(2);
      float* sc = sbase + b * scales.stride(0) + h * scales.stride(1) + slots[b] * scales.stride(2);
      for (int64_t g = 0; g < groups; ++g) {
        float top = 0.f;
        for (int64_t j = g * len; j < (g + 1) * len; ++j) top = std::max(top, std::fabs(x[j]));
        const float s = std::max(top / 127.0f, 1e-12f);
        sc[g] = s;
        for (int64_t j = g * len; j < (g + 1) * len; ++j) c[j] = static_cast<int8_t>(std::nearbyint(x[j] / s));
      }
    }
  }
}

}  // namespace

torch::Tensor DecodeProjection::apply(const torch::Tensor& x) const {
  if (parts.size() == 1) return apply_part(parts[0], x);
  std::vector<torch::Tensor> outs;
  for (const DecodePart& p : parts) outs.push_back(apply_part(p, x));
  return at::cat(outs, 1);
}

DecodeStack::DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
                         double scale, double attn_softcap, torch::Tensor final_norm)
    : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), intermediate_(intermediate), eps_(eps),
      scale_(scale), attn_softcap_(attn_softcap), final_norm_(final_norm) {
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0, "decode_step: bad head counts");
}

void DecodeStack::add_layer(bool global, std::vector<torch::Tensor> norms, DecodeProjection qkv, DecodeProjection o,
                            DecodeProjection gate_up, DecodeProjection down) {
  TORCH_CHECK(norms.size() == 6, "decode_step: six norm weights per layer (empty for an absent one)");
  DecodeLayer layer;
  layer.global = global;
  layer.attn_norm = defined_or_none(norms[0]);
  layer.post_attn_norm = defined_or_none(norms[1]);
  layer.q_norm = defined_or_none(norms[2]);
  layer.k_norm = defined_or_none(norms[3]);
  layer.mlp_norm = defined_or_none(norms[4]);
  layer.post_mlp_norm = defined_or_none(norms[5]);
  TORCH_CHECK(layer.attn_norm.defined() && layer.mlp_norm.defined(), "decode_step: pre-norms are required");
  layer.qkv = std::move(qkv);
  layer.o = std::move(o);
  layer.gate_up = std::move(gate_up);
  layer.down = std::move(down);
  layers_.push_back(std::move(layer));
}

torch::Tensor DecodeStack::step(torch::Tensor h, std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                                std::vector<torch::Tensor> key_scales, std::vector<torch::Tensor> value_scales,
                                torch::Tensor cos_g, torch::Tensor sin_g, torch::Tensor bias_g,
                                std::vector<int64_t> slots_g, torch::Tensor cos_l, torch::Tensor sin_l,
                                torch::Tensor bias_l, std::vector<int64_t> slots_l) const {
  const int64_t L = num_layers();
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == L && static_cast<int64_t>(values.size()) == L,
              "decode_step: one key and one value buffer per layer");
  const bool int8 = !key_scales.empty();
  TORCH_CHECK(!int8 || (static_cast<int64_t>(key_scales.size()) == L && static_cast<int64_t>(value_scales.size()) == L),
              "decode_step: an int8 cache needs one key and one value scale buffer per layer");
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == torch::kFloat32, "decode_step: h must be [B, hidden] float32");
  const int64_t B = h.size(0), H = heads_, Hkv = kv_heads_, D = head_dim_;
  TORCH_CHECK(static_cast<int64_t>(slots_g.size()) == B && static_cast<int64_t>(slots_l.size()) == B,
              "decode_step: one write slot per row for each layer kind");
  const double no_norm_eps = 0.0;
  const torch::Tensor no_norm = torch::empty({0});  // norm_rope's "no QK-norm"
  h = h.contiguous();
  for (int64_t i = 0; i < L; ++i) {
    const DecodeLayer& layer = layers_[i];
    const torch::Tensor& cos = layer.global ? cos_g : cos_l;
    const torch::Tensor& sin = layer.global ? sin_g : sin_l;
    const torch::Tensor& bias = layer.global ? bias_g : bias_l;
    const std::vector<int64_t>& slots = layer.global ? slots_g : slots_l;
    const int64_t S = bias.size(-1);
    TORCH_CHECK(keys[i].dim() == 4 && keys[i].size(2) >= S, "decode_step: layer ", i, ": the cache cannot hold this step");

    // Attention: pre-norm, q|k|v in one call, QK-norm + RoPE, store k/v, attend, output projection.
    const torch::Tensor qkv = layer.qkv.apply(rms_norm(h, layer.attn_norm, eps_, kNormOffset));
    TORCH_CHECK(qkv.is_contiguous() && qkv.size(1) == (H + 2 * Hkv) * D, "decode_step: q|k|v has the wrong width");
    const torch::Tensor q4 = qkv.narrow(1, 0, H * D).view({B, 1, H, D}).transpose(1, 2);
    const torch::Tensor k4 = qkv.narrow(1, H * D, Hkv * D).view({B, 1, Hkv, D}).transpose(1, 2);
    const torch::Tensor v4 = qkv.narrow(1, (H + Hkv) * D, Hkv * D).view({B, 1, Hkv, D}).transpose(1, 2);
    const torch::Tensor q = norm_rope(q4, layer.q_norm.defined() ? layer.q_norm : no_norm,
                                      layer.q_norm.defined() ? eps_ : no_norm_eps, kNormOffset, cos, sin);
    const torch::Tensor k = norm_rope(k4, layer.k_norm.defined() ? layer.k_norm : no_norm,
                                      layer.k_norm.defined() ? eps_ : no_norm_eps, kNormOffset, cos, sin);
    const float* new_values = qkv.data_ptr<float>() + (H + Hkv) * D;
    torch::Tensor k_scale, v_scale;  // undefined: a float32 cache
    if (int8) {
      store_int8(keys[i], key_scales[i], slots, k.data_ptr<float>(), Hkv * D, D, B, Hkv, D);
      store_int8(values[i], value_scales[i], slots, new_values, qkv.size(1), D, B, Hkv, D);
      k_scale = key_scales[i].narrow(2, 0, S);
      v_scale = value_scales[i].narrow(2, 0, S);
    } else {
      store(keys[i], slots, k.data_ptr<float>(), Hkv * D, D, B, Hkv, D);
      store(values[i], slots, new_values, qkv.size(1), D, B, Hkv, D);
    }
    const torch::Tensor attended = decode_attention_cached(q, keys[i].narrow(2, 0, S), k_scale,
                                                           values[i].narrow(2, 0, S), v_scale, bias, scale_,
                                                           attn_softcap_);
    h = h + maybe_norm(layer.o.apply(attended.view({B, H * D})), layer.post_attn_norm, eps_);

    // MLP: pre-norm, gate|up in one call, GELU(tanh) * up, down projection.
    const torch::Tensor gu = layer.gate_up.apply(rms_norm(h, layer.mlp_norm, eps_, kNormOffset));
    const torch::Tensor act = gelu_mul(gu.narrow(1, 0, intermediate_), gu.narrow(1, intermediate_, intermediate_));
    h = h + maybe_norm(layer.down.apply(act), layer.post_mlp_norm, eps_);
  }
  return rms_norm(h, final_norm_, eps_, kNormOffset);
}
