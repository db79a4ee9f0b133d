// Causal self-attention of one whole prompt (no earlier context), bf16, AVX512-BF16: the
// flash-attention scheme in tiles of 16 queries x 16 keys, scores and softmax in float32.
//
//   q [n, H, D], k and v [n, KVH, D]   bf16, rows may be strided (views of the fused QKV)
//   out [n, H, D]                      bf16
//
// Per KV head, K and V are first copied into the layouts vdpbf16ps wants, so that no
// reduction across lanes is ever needed:
//
//   kt [n/16, D/2, 16, 2]   kt[t, p, j, i] = k[16 t + j, 2 p + i]   (lanes = 16 keys)
//   vp [n/2, D, 2]          vp[p, d, i]    = v[2 p + i, d]          (pairs of keys)
//
// Then for each tile of 16 queries and each of the G query heads of that KV head:
//   s[16 x 16] = q kt   (one accumulator per query: 16 keys in its lanes)
//   running max m, sum l, and o = o * exp(m_old - m) + bf16(exp(s - m)) vp
// Work items (KV head, query tile) are ordered short-long-short-long, so that both
// threads get a similar share of the causal triangle.
#include "kernels.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX512BF16__
#include <immintrin.h>

namespace {

constexpr int kT = 16;

inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

struct Prompt {
  const uint16_t *q, *k, *v;
  int64_t ldq, ldk, ldv;  // row strides (elements)
  int64_t n, H, KVH;
  float scale;
  uint16_t* out;  // [n, H, D] contiguous
};

template <int D>
void relayout(const Prompt& P, int64_t kh, uint16_t* kt, uint16_t* vp) {
  const int64_t tiles = (P.n + kT - 1) / kT;
  std::memset(kt, 0, tiles * kT * D * 2);
  std::memset(vp, 0, tiles * kT * D * 2);
  for (int64_t pos = 0; pos < P.n; ++pos) {
    const uint16_t* kr = P.k + pos * P.ldk + kh * D;
    const uint16_t* vr = P.v + pos * P.ldv + kh * D;
    uint16_t* kd = kt + (pos / kT) * kT * D + (pos % kT) * 2;
    for (int d = 0; d < D; ++d) kd[(d / 2) * kT * 2 + (d % 2)] = kr[d];
    uint16_t* vd = vp + (pos / 2) * D * 2 + (pos % 2);
    for (int d = 0; d < D; ++d) vd[d * 2] = vr[d];
  }
}

// Queries [i0, i0 + 16) of head h (KV head kh) against keys [0, i0 + 16).
template <int D>
void tile(const Prompt& P, int64_t h, int64_t i0, const uint16_t* kt, const uint16_t* vp) {
  constexpr int C = D / 16;  // output accumulators (16 floats) per query
  const int64_t nq = std::min<int64_t>(kT, P.n - i0);
  alignas(64) float o[kT][D];
  alignas(64) uint16_t pb[kT][kT];
  float m[kT], l[kT];
  for (int i = 0; i < kT; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
    for (int d = 0; d < D; ++d) o[i][d] = 0.f;
  }
  const uint16_t* qrow[kT];
  for (int i = 0; i < kT; ++i) qrow[i] = P.q + (i0 + std::min<int64_t>(i, nq - 1)) * P.ldq + h * D;
  const int64_t last = i0 + nq - 1;  // last query; keys past it are never needed
  for (int64_t j0 = 0; j0 <= last; j0 += kT) {
    __m512 s[kT];
    for (int i = 0; i < kT; ++i) s[i] = _mm512_setzero_ps();
    const uint16_t* kb = kt + (j0 / kT) * kT * D;
    for (int p = 0; p < D / 2; ++p) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(kb + p * kT * 2);
      for (int i = 0; i < kT; ++i) {
        int32_t pair;
        std::memcpy(&pair, qrow[i] + 2 * p, 4);
        s[i] = _mm512_dpbf16_ps(s[i], (__m512bh)_mm512_set1_epi32(pair), kv);
      }
    }
    for (int i = 0; i < nq; ++i) {
      // Causal: query i0 + i sees keys j0 + j with j0 + j <= i0 + i (and j0 + j < n).
      const int64_t visible = std::min<int64_t>(i0 + i - j0 + 1, kT);
      const __mmask16 mask = visible >= kT ? (__mmask16)0xFFFF : (__mmask16)((1u << visible) - 1);
      const __m512 sv = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), mask, s[i],
                                           _mm512_set1_ps(P.scale));
      const float m_new = std::max(m[i], _mm512_reduce_max_ps(sv));
      const __m512 e = _mm512_maskz_mov_ps(mask, exp_ps(_mm512_sub_ps(sv, _mm512_set1_ps(m_new))));
      const __m256i e16 = (__m256i)_mm512_cvtneps_pbh(e);
      _mm256_store_si256(reinterpret_cast<__m256i*>(pb[i]), e16);
      const float alpha = _mm512_cvtss_f32(exp_ps(_mm512_set1_ps(m[i] - m_new)));
      const __m512 ef = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(e16), 16));
      l[i] = l[i] * alpha + _mm512_reduce_add_ps(ef);
      m[i] = m_new;
      __m512 acc[C];
      for (int c = 0; c < C; ++c) acc[c] = _mm512_mul_ps(_mm512_load_ps(o[i] + 16 * c), _mm512_set1_ps(alpha));
      const int64_t pairs = (std::min<int64_t>(visible, P.n - j0) + 1) / 2;
      for (int64_t pp = 0; pp < pairs; ++pp) {
        uint32_t w;
        std::memcpy(&w, &pb[i][2 * pp], 4);
        const __m512bh wb = (__m512bh)_mm512_set1_epi32(static_cast<int>(w));
        const uint16_t* vrow = vp + (j0 / 2 + pp) * D * 2;
        for (int c = 0; c < C; ++c)
          acc[c] = _mm512_dpbf16_ps(acc[c], wb, (__m512bh)_mm512_loadu_si512(vrow + 32 * c));
      }
      for (int c = 0; c < C; ++c) _mm512_store_ps(o[i] + 16 * c, acc[c]);
    }
  }
  for (int i = 0; i < nq; ++i) {
    const __m512 inv = _mm512_set1_ps(1.f / l[i]);
    uint16_t* dst = P.out + ((i0 + i) * P.H + h) * D;
    for (int c = 0; c < C; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(o[i] + 16 * c), inv)));
  }
}

template <int D>
void run(const Prompt& P) {
  const int64_t tiles = (P.n + kT - 1) / kT, G = P.H / P.KVH;
  std::vector<uint16_t> kt(P.KVH * tiles * kT * D), vp(P.KVH * tiles * kT * D);
  at::parallel_for(0, P.KVH, 1, [&](int64_t b, int64_t e) {
    for (int64_t kh = b; kh < e; ++kh)
      relayout<D>(P, kh, kt.data() + kh * tiles * kT * D, vp.data() + kh * tiles * kT * D);
  });
  at::parallel_for(0, P.KVH * tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t kh = item % P.KVH, k = item / P.KVH;
      const int64_t t = k % 2 ? tiles - 1 - k / 2 : k / 2;  // short, long, short, ...
      for (int64_t g = 0; g < G; ++g)
        tile<D>(P, kh * G + g, t * kT, kt.data() + kh * tiles * kT * D,
                vp.data() + kh * tiles * kT * D);
    }
  });
}

}  // namespace

bool prefill_attention_bf16(const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, double scale, at::Tensor& out) {
  const int64_t D = q.size(2);
  if ((D != 64 && D != 128) || q.stride(2) != 1 || k.stride(2) != 1 || v.stride(2) != 1 ||
      q.stride(1) != D || k.stride(1) != D || v.stride(1) != D)
    return false;
  Prompt P{reinterpret_cast<const uint16_t*>(q.data_ptr()),
           reinterpret_cast<const uint16_t*>(k.data_ptr()),
           reinterpret_cast<const uint16_t*>(v.data_ptr()),
           q.stride(0), k.stride(0), v.stride(0), q.size(0), q.size(1), k.size(1),
           static_cast<float>(scale), reinterpret_cast<uint16_t*>(out.data_ptr())};
  if (D == 64) run<64>(P);
  else run<128>(P);
  return true;
}

#else

bool prefill_attention_bf16(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            double, at::Tensor&) {
  return false;
}

#endif

at::Tensor causal_prompt_attention(at::Tensor q, at::Tensor k, at::Tensor v,
                                      double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.size(0) == k.size(0) &&
                  k.sizes() == v.sizes() && q.size(2) == k.size(2) && q.size(1) % k.size(1) == 0,
              "q [n, H, D], k and v [n, KVH, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "bf16 only");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  TORCH_CHECK(prefill_attention_bf16(q, k, v, scale, out),
              "unsupported layout (head_dim 64 or 128, contiguous heads) or no AVX512-BF16");
  return out;
}
