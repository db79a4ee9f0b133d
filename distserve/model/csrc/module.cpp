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
        "causal attention of a whole prompt (bf16, AVX512-BF16)");
  m.def("has_avx512_bf16", &has_avx512_bf16, "whether the bf16 kernels were compiled");
}
