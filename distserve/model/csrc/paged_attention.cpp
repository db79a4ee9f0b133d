// Decode attention straight from the paged KV cache: one query token per request attends
// to its whole context, reading K/V rows through the block table (no gathered copy).
//
//   q            [B, H, D]            bf16 or float32
//   cache        [2, KVH, slots, D]   one layer of the cache, same dtype (slot = block * BS + offset)
//   block_tables [B, W]               int64, W >= ceil(len / BS)
//   context_lens [B]                  int64
//   out          [B, H, D]            same dtype as q
//
// Work is split over (request, KV head); the G = H / KVH query heads sharing a KV head are
// handled together, so each K/V row is read once. Scores, softmax and the weighted sum are
// in float32. This file's loops are the portable path (float32, or bf16 without AVX512-BF16
// or with head_dim other than 64 and 128); paged_attention_bf16.cpp is the vectorized one.
#include "kernels.h"
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline void row_to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
void decode_attention(const at::Tensor& q, const at::Tensor& cache,
                      const at::Tensor& block_tables, const at::Tensor& context_lens,
                      int64_t block_size, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = cache.size(1), slots = cache.size(2), W = block_tables.size(1);
  const int64_t G = H / KVH;
  const T* qp = q.data_ptr<T>();
  const T* kp = cache.data_ptr<T>();
  const T* vp = kp + KVH * slots * D;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();

  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), krow(D), vrow(D), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KVH, kh = item % KVH, len = lens[b];
      scores.assign(G * len, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        row_to_float(qp + (b * H + kh * G + g) * D, qf.data() + g * D, D);
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] *= static_cast<float>(scale);
      }
      const T* kbase = kp + kh * slots * D;
      const T* vbase = vp + kh * slots * D;
      for (int64_t pos = 0; pos < len; ++pos) {
        const int64_t slot = tables[b * W + pos / block_size] * block_size + pos % block_size;
        row_to_float(kbase + slot * D, krow.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qg[d] * krow[d];
          scores[g * len + pos] = s;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * len;
        float mx = -INFINITY;
        for (int64_t i = 0; i < len; ++i) mx = sg[i] > mx ? sg[i] : mx;
        float sum = 0.f;
        for (int64_t i = 0; i < len; ++i) {
          sg[i] = std::exp(sg[i] - mx);
          sum += sg[i];
        }
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < len; ++i) sg[i] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t pos = 0; pos < len; ++pos) {
        const int64_t slot = tables[b * W + pos / block_size] * block_size + pos % block_size;
        row_to_float(vbase + slot * D, vrow.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * len + pos];
          float* ag = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) ag[d] += p * vrow[d];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* dst = op + (b * H + kh * G + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[g * D + d]);
      }
    }
  });
}

}  // namespace

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor cache,
                                     at::Tensor block_tables, at::Tensor context_lens,
                                     int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 4 && cache.size(0) == 2, "bad shapes");
  TORCH_CHECK(q.device().is_cpu() && cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type(), "q and cache dtypes differ");
  TORCH_CHECK(q.size(2) == cache.size(3) && q.size(1) % cache.size(1) == 0, "head mismatch");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block tables and lengths must be int64");
  q = q.contiguous();
  TORCH_CHECK(cache.is_contiguous(), "cache must be contiguous");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = at::empty_like(q);
  if (q.scalar_type() == at::kBFloat16) {
    if (decode_attention_bf16_avx512(q, cache, tables, lens, block_size, scale, out)) return out;
    decode_attention<at::BFloat16>(q, cache, tables, lens, block_size, scale, out);
  } else if (q.scalar_type() == at::kFloat) {
    decode_attention<float>(q, cache, tables, lens, block_size, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports bfloat16 and float32");
  }
  return out;
}

