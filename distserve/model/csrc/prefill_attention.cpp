// Causal attention of a prompt chunk, bf16, AVX512-BF16: the flash-attention scheme in
// tiles of 16 queries x 16 keys, scores and softmax in float32.
//
//   q [n, H, D]                        bf16, rows may be strided (views of the fused QKV)
//   k and v [off + n, KVH, D]          bf16, rows and heads may be strided: the chunk's
//                                      own keys, after `off` keys of earlier context (a
//                                      prefix-cache hit or an earlier chunk), gathered
//   out [n, H, D]                      bf16
//
// Query i sits at position off + i and sees keys 0 .. off + i.
//
// Q and V are first copied into the layouts vdpbf16ps wants, so that no reduction across
// lanes is ever needed:
//
//   qt [n/16, D/2, 16, 2]   qt[t, p, i, c] = q[16 t + i, 2 p + c]   (lanes = 16 queries)
//   vp [n/2, D, 2]          vp[p, d, c]    = v[2 p + c, d]          (pairs of keys)
//
// Then for each tile of 16 queries and each of the G query heads of a KV head, per tile of
// 16 keys: s_j = qt . k_j (one vector per key, queries in lanes), running max m and sum l
// elementwise, o^T = o^T * exp(m_old - m) + bf16(exp(s - m)) vp (o^T: [D, 16 queries]).
// Work items (KV head, query tile) are ordered short-long-short-long, so that both
// threads get a similar share of the causal triangle.
#include "avx512_exp.h"
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

struct Prompt {
  const uint16_t *q, *k, *v;
  int64_t ldq, ldk, ldv;  // row strides (elements)
  int64_t hk, hv;         // head strides of k and v (elements)
  int64_t n, H, KVH;
  int64_t off;            // keys before the chunk's own: the query i is at position off + i
  float scale;
  uint16_t* out;  // [n, H, D] contiguous
};

// Per KV head: vp [n/2, D, 2] (pairs of keys); per query head: qt [n/16, D/2, 16, 2]
// (lanes = 16 queries). Padding rows are zero.
template <int D>
void relayout_v(const Prompt& P, int64_t kh, uint16_t* vp) {
  const int64_t tiles = (P.off + P.n + kT - 1) / kT;
  std::memset(vp, 0, tiles * kT * D * 2);
  for (int64_t pos = 0; pos < P.off + P.n; ++pos) {
    const uint16_t* vr = P.v + pos * P.ldv + kh * P.hv;
    uint16_t* vd = vp + (pos / 2) * D * 2 + (pos % 2);
    for (int d = 0; d < D; ++d) vd[d * 2] = vr[d];
  }
}

template <int D>
void relayout_q(const Prompt& P, int64_t h, uint16_t* qt) {
  const int64_t tiles = (P.n + kT - 1) / kT;
  std::memset(qt, 0, tiles * kT * D * 2);
  for (int64_t i = 0; i < P.n; ++i) {
    const uint16_t* qr = P.q + i * P.ldq + h * D;
    uint16_t* qd = qt + (i / kT) * kT * D + (i % kT) * 2;
    for (int d = 0; d < D; ++d) qd[(d / 2) * kT * 2 + (d % 2)] = qr[d];
  }
}

// Queries [i0, i0 + 16) of head h (KV head kh) against keys [0, off + i0 + 16). Registers hold
// one vector per key with the 16 queries in its lanes, so the softmax's max and sum over
// keys are elementwise, and no reduction across lanes is needed anywhere.
template <int D>
void tile(const Prompt& P, int64_t h, int64_t kh, int64_t i0, const uint16_t* qt,
          const uint16_t* vp) {
  const int64_t nq = std::min<int64_t>(kT, P.n - i0);
  alignas(64) float ot[D][kT];  // output, transposed: ot[d][query]
  for (int d = 0; d < D; ++d) _mm512_store_ps(ot[d], _mm512_setzero_ps());
  __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
  const uint16_t* qb = qt + (i0 / kT) * kT * D;
  const __m512i interleave = _mm512_set_epi16(
      31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
      23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);  // fmt: (p0[q], p1[q]) pairs
  const int64_t q0 = P.off + i0;  // position of the tile's first query
  for (int64_t j0 = 0; j0 < q0 + nq; j0 += kT) {
    const int64_t nk = std::min<int64_t>(kT, P.off + P.n - j0);
    const uint16_t* krow[kT];
    for (int j = 0; j < kT; ++j)
      krow[j] = P.k + (j0 + std::min<int64_t>(j, nk - 1)) * P.ldk + kh * P.hk;
    __m512 s[kT];
    for (int j = 0; j < kT; ++j) s[j] = _mm512_setzero_ps();
    for (int p = 0; p < D / 2; ++p) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(qb + p * kT * 2);
      for (int j = 0; j < kT; ++j) {
        int32_t pair;
        std::memcpy(&pair, krow[j] + 2 * p, 4);
        s[j] = _mm512_dpbf16_ps(s[j], qv, (__m512bh)_mm512_set1_epi32(pair));
      }
    }
    // Key j0 + j is visible to query lane q when j0 + j <= q0 + q (and j < nk).
    __m512 mx = m;
    for (int j = 0; j < kT; ++j) {
      const int64_t first = j0 + j - q0;  // first query lane that sees this key
      const __mmask16 vis = j >= nk || first >= kT ? (__mmask16)0
                            : first <= 0           ? (__mmask16)0xFFFF
                                                   : (__mmask16)(0xFFFFu << first);
      s[j] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), vis, s[j], _mm512_set1_ps(P.scale));
      mx = _mm512_max_ps(mx, s[j]);
    }
    const __m512 alpha = exp_ps(_mm512_sub_ps(m, mx));  // 0 where m was -inf
    m = mx;
    __m512 sum = _mm512_setzero_ps();
    __m512i pp[kT / 2];
    for (int j = 0; j < kT; j += 2) {
      const __m512 e0 = exp_ps(_mm512_sub_ps(s[j], mx)), e1 = exp_ps(_mm512_sub_ps(s[j + 1], mx));
      // bf16 values of the probabilities, as the products below use them
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);  // [e0 | e1], 16 bf16 each
      pp[j / 2] = _mm512_permutexvar_epi16(interleave, both);
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(both)), 16)));
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(both, 1)), 16)));
    }
    l = _mm512_fmadd_ps(l, alpha, sum);
    const uint16_t* vb = vp + (j0 / 2) * D * 2;
    for (int d = 0; d < D; ++d) {
      __m512 acc = _mm512_mul_ps(_mm512_load_ps(ot[d]), alpha);
      for (int jp = 0; jp < kT / 2; ++jp) {
        int32_t pair;
        std::memcpy(&pair, vb + (jp * D + d) * 2, 4);
        acc = _mm512_dpbf16_ps(acc, (__m512bh)pp[jp], (__m512bh)_mm512_set1_epi32(pair));
      }
      _mm512_store_ps(ot[d], acc);
    }
  }
  alignas(64) float inv[kT];
  _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.f), l));
  alignas(64) float row[D];
  for (int q = 0; q < nq; ++q) {
    for (int d = 0; d < D; ++d) row[d] = ot[d][q] * inv[q];
    uint16_t* dst = P.out + ((i0 + q) * P.H + h) * D;
    for (int d = 0; d < D; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(row + d)));
  }
}

template <int D>
void run(const Prompt& P) {
  const int64_t tiles = (P.n + kT - 1) / kT, G = P.H / P.KVH, span = tiles * kT * D;
  const int64_t vspan = ((P.off + P.n + kT - 1) / kT) * kT * D;
  std::vector<uint16_t> qt(P.H * span), vp(P.KVH * vspan);
  at::parallel_for(0, P.H + P.KVH, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (i < P.H) relayout_q<D>(P, i, qt.data() + i * span);
      else relayout_v<D>(P, i - P.H, vp.data() + (i - P.H) * vspan);
    }
  });
  at::parallel_for(0, P.KVH * tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t kh = item % P.KVH, k = item / P.KVH;
      const int64_t t = k % 2 ? tiles - 1 - k / 2 : k / 2;  // short, long, short, ...
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kh * G + g;
        tile<D>(P, h, kh, t * kT, qt.data() + h * span, vp.data() + kh * vspan);
      }
    }
  });
}

}  // namespace

bool prefill_attention_bf16(const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, double scale, at::Tensor& out) {
  const int64_t D = q.size(2);
  if ((D != 64 && D != 128) || q.stride(2) != 1 || k.stride(2) != 1 || v.stride(2) != 1 ||
      q.stride(1) != D)
    return false;
  Prompt P{reinterpret_cast<const uint16_t*>(q.data_ptr()),
           reinterpret_cast<const uint16_t*>(k.data_ptr()),
           reinterpret_cast<const uint16_t*>(v.data_ptr()),
           q.stride(0), k.stride(0), v.stride(0), k.stride(1), v.stride(1),
           q.size(0), q.size(1), k.size(1), k.size(0) - q.size(0),
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
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.size(0) <= k.size(0) &&
                  k.sizes() == v.sizes() && q.size(2) == k.size(2) && q.size(1) % k.size(1) == 0,
              "q [n, H, D], k and v [off + n, KVH, D] (off earlier keys)");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "bf16 only");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  TORCH_CHECK(prefill_attention_bf16(q, k, v, scale, out),
              "unsupported layout (head_dim 64 or 128, contiguous heads) or no AVX512-BF16");
  return out;
}
