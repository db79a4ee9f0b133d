// The AVX512-BF16 path of paged decode attention (see paged_attention.cpp for the shapes and
// the portable path). Per (request, KV head), for the G query heads that share it:
//
//   scores  s[g, pos] = (q_g . k_pos) * scale        float32; 16 positions at a time: one
//                                                    vdpbf16ps accumulator per position, then
//                                                    one transpose-and-add reduces the 16
//   softmax           running max and sum (one pass), probabilities rounded to bf16
//   output  o[g, :]   = sum_pos p[g, pos] v_pos / sum  vdpbf16ps over pairs of positions,
//                                                    whose V rows are interleaved in registers
//
// Each K and V row is read from the cache once per (request, KV head), straight through
// the block table, in one stream that is prefetched a few chunks ahead, from one item into
// the next (the cache is far larger than L3: this kernel is bound by memory, not by
// arithmetic, and an unprefetched row costs a full DRAM latency).
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

constexpr int kChunk = 16;  // positions per score vector
constexpr int kGroup = 4;   // query heads per pass over K/V (kGroup * D / 16 accumulators)
constexpr int kBlock = 4;   // chunks per softmax update (and per prefetch step)

inline __m512 bf16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// s[i] = sum of the 16 lanes of a[i], for 16 vectors: a 4-level transpose-and-add.
inline __m512 reduce16(__m512 a[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // pairs of lanes: b[i] lanes hold partial sums of a[2i], a[2i+1]
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]))));
  // Each 128-bit lane j of c[i] now holds sums for a[4i .. 4i+3] (over lane j's elements).
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  // d[i]'s 128-bit lanes: halves of the sums for a[8i .. 8i+3], then for a[8i+4 .. 8i+7].
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88),
                       _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

inline void prefetch_row(const uint16_t* row, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(row) + o, _MM_HINT_T1);
}

struct Item {
  const uint16_t* q;     // [G, D] this item's query heads
  const uint16_t* const* rows;  // [len] K row of each position
  int64_t v_offset;      // V row = K row + v_offset
  int64_t len;
  float scale;
  uint16_t* out;         // [G, D]
};

// K row of every position of a request, walking its block table (no division per row).
void gather_rows(const uint16_t* k, const int64_t* table, int64_t len, int64_t block_size,
                 int64_t D, std::vector<const uint16_t*>& rows) {
  rows.resize(len);
  for (int64_t b = 0, pos = 0; pos < len; ++b) {
    const uint16_t* base = k + table[b] * block_size * D;
    for (int64_t o = 0; o < block_size && pos < len; ++o, ++pos) rows[pos] = base + o * D;
  }
}

// K rows of chunk c (kChunk positions from kChunk * c; past the end: the chunk's first row)
inline void chunk_rows(const Item& it, int64_t c, const uint16_t* rows[kChunk], int64_t& n) {
  const int64_t p0 = c * kChunk;
  n = std::min<int64_t>(kChunk, it.len - p0);
  for (int i = 0; i < kChunk; ++i) rows[i] = it.rows[p0 + (i < n ? i : 0)];
}

inline void prefetch_chunk(const Item& it, int64_t c, int D) {
  const int64_t p0 = c * kChunk, p1 = std::min<int64_t>(it.len, p0 + kChunk);
  for (int64_t p = p0; p < p1; ++p) {
    prefetch_row(it.rows[p], D * 2);
    prefetch_row(it.rows[p] + it.v_offset, D * 2);
  }
}

// One pass over the context in blocks of kBlock chunks of 16 positions, with a running
// softmax (max m and sum l per head) updated once per block: per block, the G heads'
// scores, then p = exp(s - m) rounded to bf16, then acc = acc * exp(m_old - m) + p V.
// K and V rows are streamed together, the next block's prefetched into L2 while this one
// is used, from the last block of an item into the first of the next.
template <int D, int GMAX>
void attend(const Item& it, const Item* next, int G) {
  constexpr int C = D / 32;
  // acc[g][2c] holds d = 32c + {0-3, 8-11, 16-19, 24-27}, acc[g][2c+1] the other 16: the
  // order in which unpacklo/hi interleave two V rows.
  __m512 acc[GMAX][2 * C];
  float m[GMAX], l[GMAX];
  for (int g = 0; g < GMAX; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
    for (int c = 0; c < 2 * C; ++c) acc[g][c] = _mm512_setzero_ps();
  }
  const int64_t chunks = (it.len + kChunk - 1) / kChunk;
  const int64_t next_chunks = next != nullptr ? (next->len + kChunk - 1) / kChunk : 0;
  alignas(64) uint16_t pb[GMAX][kBlock * kChunk];  // this block's probabilities, bf16
  for (int64_t c0 = 0; c0 < chunks; c0 += kBlock) {
    for (int64_t c = c0 + kBlock; c < c0 + 2 * kBlock; ++c) {
      if (c < chunks) prefetch_chunk(it, c, D);
      else if (c - chunks < next_chunks) prefetch_chunk(*next, c - chunks, D);
    }
    const int nc = static_cast<int>(std::min<int64_t>(kBlock, chunks - c0));
    const uint16_t* rows[kBlock][kChunk];
    int64_t n[kBlock];
    __mmask16 valid[kBlock];
    for (int b = 0; b < nc; ++b) {
      chunk_rows(it, c0 + b, rows[b], n[b]);
      valid[b] = (__mmask16)((1u << n[b]) - 1);
    }
    for (int g = 0; g < G; ++g) {
      __m512 sv[kBlock];
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int b = 0; b < nc; ++b) {
        __m512 sc[kChunk];
        for (int i = 0; i < kChunk; ++i) {
          __m512 a = _mm512_setzero_ps();
          for (int cc = 0; cc < C; ++cc)
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(it.q + g * D + 32 * cc),
                                 (__m512bh)_mm512_loadu_si512(rows[b][i] + 32 * cc));
          sc[i] = a;
        }
        sv[b] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), valid[b], reduce16(sc),
                                   _mm512_set1_ps(it.scale));
        mx = _mm512_max_ps(mx, sv[b]);
      }
      const float m_new = std::max(m[g], _mm512_reduce_max_ps(mx));
      const __m512 vmax = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      for (int b = 0; b < nc; ++b) {
        const __m512 p = _mm512_maskz_mov_ps(valid[b], exp_ps(_mm512_sub_ps(sv[b], vmax)));
        const __m256i p16 = (__m256i)_mm512_cvtneps_pbh(p);
        _mm256_store_si256(reinterpret_cast<__m256i*>(&pb[g][b * kChunk]), p16);
        sum = _mm512_add_ps(sum, bf16_to_f32(p16));
      }
      // exp(m_old - m_new): 0 on the first block (m_old = -inf), 1 when the max held.
      const float alpha = _mm512_cvtss_f32(exp_ps(_mm512_set1_ps(m[g] - m_new)));
      l[g] = l[g] * alpha + _mm512_reduce_add_ps(sum);
      m[g] = m_new;
      if (alpha != 1.f)
        for (int cc = 0; cc < 2 * C; ++cc) acc[g][cc] = _mm512_mul_ps(acc[g][cc], _mm512_set1_ps(alpha));
    }
    for (int b = 0; b < nc; ++b)
      for (int i = 0; i < n[b]; i += 2) {  // a masked-out odd last position has p = 0
        const __m512i* r0 = reinterpret_cast<const __m512i*>(rows[b][i] + it.v_offset);
        const __m512i* r1 = reinterpret_cast<const __m512i*>(rows[b][i + 1] + it.v_offset);
        __m512i lo[C], hi[C];
        for (int cc = 0; cc < C; ++cc) {
          const __m512i x = _mm512_loadu_si512(r0 + cc), y = _mm512_loadu_si512(r1 + cc);
          lo[cc] = _mm512_unpacklo_epi16(x, y);
          hi[cc] = _mm512_unpackhi_epi16(x, y);
        }
        for (int g = 0; g < GMAX; ++g) {
          if (g >= G) break;
          uint32_t pair;
          std::memcpy(&pair, &pb[g][b * kChunk + i], 4);
          const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
          for (int cc = 0; cc < C; ++cc) {
            acc[g][2 * cc] = _mm512_dpbf16_ps(acc[g][2 * cc], w, (__m512bh)lo[cc]);
            acc[g][2 * cc + 1] = _mm512_dpbf16_ps(acc[g][2 * cc + 1], w, (__m512bh)hi[cc]);
          }
        }
      }
  }
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int g = 0; g < G; ++g) {
    const __m512 inv = _mm512_set1_ps(1.f / l[g]);
    uint16_t* o = it.out + g * D;
    for (int cc = 0; cc < C; ++cc) {
      const __m512 a = _mm512_permutex2var_ps(acc[g][2 * cc], first, acc[g][2 * cc + 1]);
      const __m512 b = _mm512_permutex2var_ps(acc[g][2 * cc], second, acc[g][2 * cc + 1]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32 * cc),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(a, inv)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 32 * cc + 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(b, inv)));
    }
  }
}

}  // namespace

bool decode_attention_bf16_avx512(const at::Tensor& q, const at::Tensor& cache,
                                  const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, int64_t block_size,
                                  double scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  if (D != 64 && D != 128) return false;
  const int64_t KVH = cache.size(1), slots = cache.size(2), W = block_tables.size(1);
  const int G = static_cast<int>(H / KVH);
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kp = reinterpret_cast<const uint16_t*>(cache.data_ptr());
  const uint16_t* vp = kp + KVH * slots * D;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  // Items (request, KV head) in order; each thread gathers the next item's rows before it
  // runs the current one, so that prefetching continues across items.
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<const uint16_t*> rows[2];
    auto make = [&](int64_t item, std::vector<const uint16_t*>& r) {
      const int64_t b = item / KVH, kh = item % KVH;
      gather_rows(kp + kh * slots * D, tables + b * W, lens[b], block_size, D, r);
      return Item{qp + (b * H + kh * G) * D, r.data(), vp - kp, lens[b],
                  static_cast<float>(scale), op + (b * H + kh * G) * D};
    };
    Item cur = make(begin, rows[0]);
    for (int64_t c = 0; c < std::min<int64_t>(kBlock, (cur.len + kChunk - 1) / kChunk); ++c)
      prefetch_chunk(cur, c, static_cast<int>(D));
    for (int64_t item = begin; item < end; ++item) {
      const bool more = item + 1 < end;
      const Item next = more ? make(item + 1, rows[(item - begin + 1) % 2]) : cur;
      for (int g0 = 0; g0 < G; g0 += kGroup) {  // heads in groups of kGroup, one pass each
        Item part = cur;
        part.q += g0 * D;
        part.out += g0 * D;
        const int n = std::min(kGroup, G - g0);
        const Item* ahead = (more && g0 + kGroup >= G) ? &next : nullptr;
        if (D == 64) attend<64, kGroup>(part, ahead, n);
        else attend<128, kGroup>(part, ahead, n);
      }
      cur = next;
    }
  });
  return true;
}

#else

bool decode_attention_bf16_avx512(const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, int64_t, double,
                                  at::Tensor&) {
  return false;
}

#endif
