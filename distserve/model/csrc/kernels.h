// Declarations of the CPU kernels bound in module.cpp.
#pragma once
#include <torch/extension.h>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens,
                                     int64_t block_size, double scale);

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor packed, int64_t n,
                          c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> residual,
                          int64_t epilogue);

bool has_avx512_bf16();

// The AVX512-BF16 decode attention; false when not compiled in or the shape is unsupported.
bool decode_attention_bf16_avx512(const torch::Tensor& q, const torch::Tensor& cache,
                                  const torch::Tensor& block_tables,
                                  const torch::Tensor& context_lens, int64_t block_size,
                                  double scale, torch::Tensor& out);

torch::Tensor rms_norm_bf16(torch::Tensor x, torch::Tensor weight, double eps);

void rope_store_kv_bf16(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos,
                        torch::Tensor sin, torch::Tensor cache, torch::Tensor slots,
                        int64_t num_heads, int64_t num_kv_heads);
