// bf16 linear layers y = x @ W^T (+ bias) on AVX512-BF16, with W prepacked once.
//
// Packed weight, per tile of 64 output columns (N padded with zero rows to a multiple of
// 64, K padded to even):
//
//   packed [num_tiles, K/2, 64, 2]    packed[t, p, c, i] = W[64 t + c, 2 p + i]
//
// so that one k-pair of a tile is 4 zmm registers of (W[n, k], W[n, k+1]) pairs, the
// operand layout of vdpbf16ps. The micro-kernel keeps an MR x 64 block of outputs in
// float32 registers, broadcasts a (x[m, k], x[m, k+1]) pair per row, and streams the tile
// from k = 0 to K once per MR rows: at M = 1 every weight byte is read once (memory bound),
// at M = 64 the tile (K * 128 bytes <= 200 KB) stays in L2 and is reused for every row.
//
// Epilogues, each rounding exactly where the plain-torch reference rounds:
//   NONE      y = bf16(acc + bias)
//   RESIDUAL  y = bf16(residual + bf16(acc + bias))
//   SILU_MUL  tiles hold 32 gate columns then the 32 matching up columns;
//             y = bf16(bf16(silu(bf16(gate))) * bf16(up))     (N / 2 outputs)
#include "kernels.h"
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#ifdef __AVX512BF16__
#include <immintrin.h>

namespace {

constexpr int64_t kTile = 64;
constexpr int kMR = 6;  // 6 x 4 accumulators + 4 weight registers + 1 broadcast <= 32 zmm

enum Epilogue : int64_t { kNone = 0, kResidual = 1, kSiluMul = 2 };

inline __m512 bf16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m256i f32_to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
inline __m512 round_bf16(__m512 v) { return bf16_to_f32(f32_to_bf16(v)); }

inline __m512 silu(__m512 g) {
  // g * sigmoid(g), with exp from the 2^x decomposition (float32 accurate to ~1 ulp
  // before the bf16 rounding that follows).
  const __m512 x = _mm512_max_ps(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g),
                                               _mm512_set1_ps(88.f)),
                                 _mm512_set1_ps(-88.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_fmsub_ps(x, _mm512_set1_ps(1.44269504088896341f), n);
  // 2^f for f in [-0.5, 0.5]: degree-6 polynomial in f * ln 2.
  const __m512 r = _mm512_mul_ps(f, _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512 e = _mm512_scalef_ps(p, n);  // exp(-g)
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

struct Args {
  const uint16_t* x;
  int64_t ldx;
  const uint16_t* packed;
  int64_t K, Kp, N;
  const float* bias;  // [N] (packed column order) or null
  const uint16_t* residual;
  int64_t ldr;
  uint16_t* y;
  int64_t ldy;
  Epilogue epilogue;
};

// Bias, rounding and the fused epilogue for rows m0 .. m0+mr-1 of tile t, whose float32
// sums are in buf [mr, 64].
void epilogue(const Args& a, int64_t m0, int64_t t, int mr, const float* buf) {
  const int64_t n0 = t * kTile;
  for (int r = 0; r < mr; ++r) {
    __m512 acc[4];
    for (int j = 0; j < 4; ++j) acc[j] = _mm512_load_ps(buf + r * kTile + 16 * j);
    if (a.bias)
      for (int j = 0; j < 4; ++j) {
        const int64_t left = a.N - (n0 + 16 * j);
        if (left <= 0) break;
        const __mmask16 mk = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
        acc[j] = _mm512_add_ps(acc[j], _mm512_maskz_loadu_ps(mk, a.bias + n0 + 16 * j));
      }
    uint16_t* y = a.y + (m0 + r) * a.ldy;
    if (a.epilogue == kSiluMul) {
      const int64_t c0 = t * (kTile / 2);  // this tile's first gate column = output column
      for (int j = 0; j < 2; ++j) {
        const int64_t left = a.N / 2 - (c0 + 16 * j);
        if (left <= 0) break;
        const __mmask16 mk = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
        const __m512 g = round_bf16(silu(round_bf16(acc[j])));
        const __m512 v = _mm512_mul_ps(g, round_bf16(acc[j + 2]));
        _mm256_mask_storeu_epi16(y + c0 + 16 * j, mk, f32_to_bf16(v));
      }
      continue;
    }
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + 16 * j;
      const int64_t left = a.N - n;
      if (left <= 0) break;
      const __mmask16 mk = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
      __m512 v = acc[j];
      if (a.epilogue == kResidual) {
        const __m256i res = _mm256_maskz_loadu_epi16(mk, a.residual + (m0 + r) * a.ldr + n);
        v = _mm512_add_ps(round_bf16(v), bf16_to_f32(res));
      }
      _mm256_mask_storeu_epi16(y + n, mk, f32_to_bf16(v));
    }
  }
}

// One MR x 64 block: rows m0 .. m0+MR-1, tile t.
template <int MR>
void block(const Args& a, int64_t m0, int64_t t) {
  __m512 acc[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const uint16_t* w = a.packed + t * a.Kp * 2 * kTile;
  const uint16_t* x = a.x + m0 * a.ldx;
  const int64_t full = a.K / 2;
  for (int64_t p = 0; p < full; ++p, w += 2 * kTile) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 96);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * a.ldx + 2 * p, 4);
      const __m512bh xr = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xr, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xr, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xr, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xr, w3);
    }
  }
  if (a.K % 2) {  // last k alone; its partner weight is the zero padding
    for (int r = 0; r < MR; ++r) {
      const __m512bh xr = (__m512bh)_mm512_set1_epi32(x[r * a.ldx + a.K - 1]);
      for (int j = 0; j < 4; ++j)
        acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xr, (__m512bh)_mm512_loadu_si512(w + 32 * j));
    }
  }
  // Spill to a small buffer so that the epilogue's data-dependent loops do not keep the
  // accumulators in memory during the k loop.
  alignas(64) float buf[MR][kTile];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm512_store_ps(&buf[r][16 * j], acc[r][j]);
  epilogue(a, m0, t, MR, &buf[0][0]);
}

void rows(const Args& a, int64_t m0, int64_t m1, int64_t t) {
  int64_t m = m0;
  for (; m + kMR <= m1; m += kMR) block<kMR>(a, m, t);
  switch (m1 - m) {
    case 5: block<5>(a, m, t); break;
    case 4: block<4>(a, m, t); break;
    case 3: block<3>(a, m, t); break;
    case 2: block<2>(a, m, t); break;
    case 1: block<1>(a, m, t); break;
    default: break;
  }
}

}  // namespace

at::Tensor linear_bf16(at::Tensor x, at::Tensor packed, int64_t n,
                          std::optional<at::Tensor> bias, std::optional<at::Tensor> residual,
                          int64_t epilogue) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "x must be [M, K] bf16 with contiguous rows");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 &&
                  packed.is_contiguous() && packed.size(2) == kTile && packed.size(3) == 2,
              "packed weight must come from pack_linear_weight");
  const int64_t M = x.size(0), K = x.size(1), T = packed.size(0);
  TORCH_CHECK(packed.size(1) == (K + 1) / 2, "packed weight K does not match x");
  TORCH_CHECK(epilogue >= kNone && epilogue <= kSiluMul, "unknown epilogue");
  const Epilogue ep = static_cast<Epilogue>(epilogue);
  TORCH_CHECK(n > 0 && n <= T * kTile, "bad N");
  TORCH_CHECK(ep != kSiluMul || (n % 2 == 0 && n / 2 <= T * kTile / 2), "bad N for silu_mul");
  const int64_t n_out = ep == kSiluMul ? n / 2 : n;
  auto y = at::empty({M, n_out}, x.options());
  Args a{reinterpret_cast<const uint16_t*>(x.data_ptr()), x.stride(0),
         reinterpret_cast<const uint16_t*>(packed.data_ptr()), K, packed.size(1), n,
         nullptr, nullptr, 0, reinterpret_cast<uint16_t*>(y.data_ptr()), n_out, ep};
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(ep != kSiluMul, "bias with silu_mul is not supported");
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == n, "bias size");
    a.bias = b.data_ptr<float>();
  }
  at::Tensor res;
  if (ep == kResidual) {
    TORCH_CHECK(residual.has_value(), "residual epilogue needs a residual");
    res = *residual;
    TORCH_CHECK(res.scalar_type() == at::kBFloat16 && res.dim() == 2 && res.size(0) == M &&
                    res.size(1) == n && res.stride(1) == 1,
                "residual must be [M, N] bf16 with contiguous rows");
    a.residual = reinterpret_cast<const uint16_t*>(res.data_ptr());
    a.ldr = res.stride(0);
  }
  if (M == 0) return y;
  // Work items: (tile, block of rows). Row blocks keep a tile's reuse across rows while
  // giving both threads work when there are few tiles and many rows (prefill).
  // With few tiles (N = 576: 9), a tile per item leaves one thread idle for a ninth of the
  // time: split the rows too, in multiples of kMR, while blocks keep >= 2 kMR rows.
  int64_t rows_per_item = M <= 64 ? M : 8 * kMR;
  const int64_t threads = at::get_num_threads();
  while (T * ((M + rows_per_item - 1) / rows_per_item) < 8 * threads && rows_per_item >= 4 * kMR)
    rows_per_item = (rows_per_item / 2 + kMR - 1) / kMR * kMR;
  const int64_t mblocks = (M + rows_per_item - 1) / rows_per_item;
  at::parallel_for(0, T * mblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / mblocks, mb = item % mblocks;
      const int64_t m0 = mb * rows_per_item;
      rows(a, m0, std::min(M, m0 + rows_per_item), t);
    }
  });
  return y;
}

bool has_avx512_bf16() { return true; }

#else  // no AVX512-BF16 at compile time: the Python side falls back to torch

at::Tensor linear_bf16(at::Tensor, at::Tensor, int64_t, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, int64_t) {
  TORCH_CHECK(false, "built without AVX512-BF16");
}

bool has_avx512_bf16() { return false; }

#endif
