// Declarations of the CPU kernels bound in module.cpp.
// Only module.cpp includes torch/extension.h: the kernels need ATen's Tensor and two
// factory functions, and the lighter headers keep the first-use build short.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <optional>

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor cache,
                                     at::Tensor block_tables, at::Tensor context_lens,
                                     int64_t block_size, double scale);

at::Tensor linear_bf16(at::Tensor x, at::Tensor packed, int64_t n,
                          std::optional<at::Tensor> bias, std::optional<at::Tensor> residual,
                          int64_t epilogue);

bool has_avx512_bf16();

// The AVX512-BF16 decode attention; false when not compiled in or the shape is unsupported.
bool decode_attention_bf16_avx512(const at::Tensor& q, const at::Tensor& cache,
                                  const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, int64_t block_size,
                                  double scale, at::Tensor& out);

at::Tensor rms_norm_bf16(at::Tensor x, at::Tensor weight, double eps);

void rope_store_kv_bf16(at::Tensor qkv, at::Tensor positions, at::Tensor cos,
                        at::Tensor sin, at::Tensor cache, at::Tensor slots,
                        int64_t num_heads, int64_t num_kv_heads);

// Causal attention of a prompt chunk: q [n, H, D], k/v [off + n, KVH, D] -> [n, H, D] (bf16).
bool prefill_attention_bf16(const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, double scale, at::Tensor& out);
at::Tensor causal_prompt_attention(at::Tensor q, at::Tensor k, at::Tensor v,
                                      double scale);

// A whole Llama decoder layer for a batch of decode tokens (bf16), composed of the kernels
// above in one call: RMSNorm, QKV, rope + KV store, paged attention, O + residual,
// RMSNorm, gate/up + SiLU-mul, down + residual. Weights are packed once (packed.py).
struct LlamaDecodeLayer {
  at::Tensor norm1, qkv, o, norm2, gate_up, down;  // norms [h]; the others packed
  std::optional<at::Tensor> qkv_bias, o_bias;      // float32
  int64_t qkv_n, o_n, gate_up_n, intermediate, down_n, heads, kv_heads;
  double eps, scale;
  at::Tensor cos, sin;  // [P, D/2] float32

  // x [B, h] -> [B, h]; cache [2, KVH, slots, D] of this layer.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& positions, at::Tensor cache,
                     const at::Tensor& slots, const at::Tensor& block_tables,
                     const at::Tensor& context_lens, int64_t block_size) const;
};
