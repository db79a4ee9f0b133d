// LlamaDecodeLayer::forward: the decode-only fast path of model/llama.py's LlamaLayer, the
// same kernels in the same order, without the ~40 Python-level calls per layer in between
// (at batch 1 those cost more than a layer's attention).
#include "kernels.h"

at::Tensor LlamaDecodeLayer::forward(const at::Tensor& x, const at::Tensor& positions,
                                     at::Tensor cache, const at::Tensor& slots,
                                     const at::Tensor& block_tables,
                                     const at::Tensor& context_lens, int64_t block_size) const {
  constexpr int64_t kNone = 0, kResidual = 1, kSiluMul = 2;  // epilogues of linear.cpp
  const int64_t B = x.size(0), D = cache.size(3);
  auto proj = linear_bf16(rms_norm_bf16(x, norm1, eps), qkv, qkv_n, qkv_bias, std::nullopt, kNone);
  rope_store_kv_bf16(proj, positions, cos, sin, cache, slots, heads, kv_heads);
  auto q = proj.narrow(1, 0, heads * D).view({B, heads, D});
  auto attn = paged_decode_attention(q, cache, block_tables, context_lens, block_size, scale);
  auto h = linear_bf16(attn.view({B, heads * D}), o, o_n, o_bias, x, kResidual);
  auto act = linear_bf16(rms_norm_bf16(h, norm2, eps), gate_up, gate_up_n, std::nullopt,
                         std::nullopt, kSiluMul);
  if (act.size(1) != intermediate) act = act.narrow(1, 0, intermediate);
  return linear_bf16(act, down, down_n, std::nullopt, h, kResidual);
}
