// Small bf16 kernels of a Llama layer that are one call here and 5-10 torch ops in the
// reference (RMSNorm; rotary embedding plus the KV-cache store). Each rounds to bf16
// exactly where the plain-torch reference does, so the two agree to the last bit except
// where a float32 sum is taken in a different order.
#include "kernels.h"
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __AVX512BF16__
#include <immintrin.h>

namespace {

inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline void store_bf16(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

}  // namespace

// y = bf16(weight * bf16(x / rms(x)))  (F.rms_norm in float32, then the weight in bf16)
at::Tensor rms_norm_bf16(at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "x must be [T, h] bf16 with contiguous rows");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() &&
                  weight.numel() == x.size(1),
              "weight must be [h] bf16");
  const int64_t T = x.size(0), h = x.size(1), ldx = x.stride(0);
  auto y = at::empty({T, h}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint16_t* row = xp + t * ldx;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t i = 0; i < h; i += 16) {
        const __m512 v = load_bf16(row + i, tail_mask(h - i));
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / h + static_cast<float>(eps));
      const __m512 r = _mm512_set1_ps(inv);
      for (int64_t i = 0; i < h; i += 16) {
        const __mmask16 m = tail_mask(h - i);
        const __m512 n = round_bf16(_mm512_mul_ps(load_bf16(row + i, m), r));
        store_bf16(yp + t * h + i, _mm512_mul_ps(n, load_bf16(wp + i, m)), m);
      }
    }
  });
  return y;
}

// In place on qkv [T, (H + 2 KVH) * D]: rotate the q and k heads of each token by its
// position (rotate-half layout, cos/sin [P, D/2] float32 rounded to bf16 as the reference
// does), then store k and v into cache [2, KVH, slots, D] at slots[t].
void rope_store_kv_bf16(at::Tensor qkv, at::Tensor positions, at::Tensor cos,
                        at::Tensor sin, at::Tensor cache, at::Tensor slots,
                        int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kBFloat16 && qkv.stride(1) == 1,
              "qkv must be [T, (H + 2 KVH) D] bf16 with contiguous rows");
  TORCH_CHECK(cache.dim() == 4 && cache.size(0) == 2 && cache.size(1) == num_kv_heads &&
                  cache.scalar_type() == at::kBFloat16 && cache.is_contiguous(),
              "cache must be [2, KVH, slots, D] bf16, contiguous");
  const int64_t T = qkv.size(0), D = cache.size(3), half = D / 2, S = cache.size(2);
  TORCH_CHECK(D % 2 == 0 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * D, "qkv width");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && cos.size(1) == half &&
                  sin.sizes() == cos.sizes() && sin.is_contiguous(),
              "cos/sin must be [P, D/2] float32");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
                  positions.numel() == T && slots.numel() == T,
              "positions and slots must be [T] int64");
  auto pos_c = positions.contiguous();
  auto slot_c = slots.contiguous();
  const int64_t* pos = pos_c.data_ptr<int64_t>();
  const int64_t* slot = slot_c.data_ptr<int64_t>();
  const int64_t P = cos.size(0), ld = qkv.stride(0);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < P && slot[t] >= 0 && slot[t] < S,
                "position or slot out of range");
  auto* base = reinterpret_cast<uint16_t*>(qkv.data_ptr());
  auto* kc = reinterpret_cast<uint16_t*>(cache.data_ptr());
  auto* vc = kc + num_kv_heads * S * D;
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      uint16_t* row = base + t * ld;
      const float* c = cp + pos[t] * half;
      const float* s = sp + pos[t] * half;
      for (int64_t head = 0; head < num_heads + num_kv_heads; ++head) {
        uint16_t* x = row + head * D;
        for (int64_t i = 0; i < half; i += 16) {
          const __mmask16 m = tail_mask(half - i);
          const __m512 cv = round_bf16(_mm512_maskz_loadu_ps(m, c + i));
          const __m512 sv = round_bf16(_mm512_maskz_loadu_ps(m, s + i));
          const __m512 x1 = load_bf16(x + i, m), x2 = load_bf16(x + half + i, m);
          const __m512 o1 = _mm512_sub_ps(round_bf16(_mm512_mul_ps(x1, cv)),
                                          round_bf16(_mm512_mul_ps(x2, sv)));
          const __m512 o2 = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, cv)),
                                          round_bf16(_mm512_mul_ps(x1, sv)));
          store_bf16(x + i, o1, m);
          store_bf16(x + half + i, o2, m);
        }
      }
      const uint16_t* k = row + num_heads * D;
      const uint16_t* v = k + num_kv_heads * D;
      for (int64_t kh = 0; kh < num_kv_heads; ++kh) {
        std::memcpy(kc + (kh * S + slot[t]) * D, k + kh * D, D * 2);
        std::memcpy(vc + (kh * S + slot[t]) * D, v + kh * D, D * 2);
      }
    }
  });
}

#else

at::Tensor rms_norm_bf16(at::Tensor, at::Tensor, double) {
  TORCH_CHECK(false, "built without AVX512-BF16");
}
void rope_store_kv_bf16(at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                        at::Tensor, at::Tensor, int64_t, int64_t) {
  TORCH_CHECK(false, "built without AVX512-BF16");
}

#endif
