// Python bindings of the CPU kernels (see model/kernels.py for when each is used).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over a paged KV cache (CPU)");
  m.def("linear_bf16", &linear_bf16, "bf16 linear with a prepacked weight (AVX512-BF16)");
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMSNorm of bf16 rows (AVX512-BF16)");
  m.def("rope_store_kv_bf16", &rope_store_kv_bf16,
        "rotary embedding of q and k in place, then k and v into their cache slots");
  m.def("causal_prompt_attention", &causal_prompt_attention,
        "causal attention of a prompt chunk after off cached keys (bf16, AVX512-BF16)");
  py::class_<LlamaDecodeLayer>(m, "LlamaDecodeLayer")
      .def(py::init([](at::Tensor norm1, at::Tensor qkv, int64_t qkv_n,
                       std::optional<at::Tensor> qkv_bias, at::Tensor o, int64_t o_n,
                       std::optional<at::Tensor> o_bias, at::Tensor norm2, at::Tensor gate_up,
                       int64_t gate_up_n, int64_t intermediate, at::Tensor down, int64_t down_n,
                       int64_t heads, int64_t kv_heads, double eps, double scale, at::Tensor cos,
                       at::Tensor sin) {
        return LlamaDecodeLayer{norm1, qkv, o, norm2, gate_up, down, qkv_bias, o_bias,
                                qkv_n, o_n, gate_up_n, intermediate, down_n, heads, kv_heads,
                                eps, scale, cos, sin};
      }))
      .def("forward", &LlamaDecodeLayer::forward, "x [B, h] -> [B, h] for decode tokens");
  m.def("has_avx512_bf16", &has_avx512_bf16, "whether the bf16 kernels were compiled");
}
