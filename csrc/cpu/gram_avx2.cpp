// guidance_kernels._cpu: the AVX2 + FMA table of the row-shifted Gram and its backward (AMD Zen
// 1-3, Intel client and pre-Skylake-SP cores; 16 vector registers of 8 floats). Layouts and
// contract: gram_isa.h; drivers: gram_shifted.cpp; reference: backends/reference.py.
//
// Gram: the packed layout is the AVX-512 one (16 rows of a column in 64 bytes), built from two
// 8x8 in-register transposes per 8 columns. A 16x16 tile is computed as 16 x 6, 16 x 6 and 16 x 4
// strips, each 2 x J accumulators (J <= 6: 12 accumulators, 2 row vectors and a broadcast fill
// 15 of the 16 registers): per k two vector loads, J broadcasts and 2 J FMAs.
// Backward: 6 x 16 micro-tiles, the same micro-kernel with the roles swapped (2 loads of x' and 6
// broadcasts of M per 12 FMAs, the classic AVX2 GEMM tile); full aligned vectors of a final tile
// leave with streaming stores.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "gram_isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GK_AVX2 __attribute__((target("avx2,fma")))

namespace gk_cpu {
namespace {

constexpr int64_t MR = 6, W = 16;

// lanes 0 .. w - 1 of a 256-bit mask (all eight for w >= 8, none for w <= 0)
GK_AVX2 inline __m256i head_mask(int64_t w) {
  const int c = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(w, 8)));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// r[k] <- column k of the 8x8 block whose rows are r[0..7]
GK_AVX2 inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
  }
}

GK_AVX2 void pack(const float* x, int64_t ldx, int64_t n, int64_t k0, int64_t kc, int64_t groups, float* P,
                  float* lohi) {
  __m256 lo = _mm256_set1_ps(lohi[0]), hi = _mm256_set1_ps(lohi[1]);
  for (int64_t g = 0; g < groups; ++g) {
    float* pg = P + g * kc * 16;
    for (int64_t kk = 0; kk < kc; kk += 8) {
      const int64_t w = std::min<int64_t>(8, kc - kk);
      const __m256i m = head_mask(w);
      const __m256 live = _mm256_castsi256_ps(m);
      const __m256 x0 = _mm256_maskload_ps(x + k0 + kk, m);
      for (int h = 0; h < 2; ++h) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) {
          const int64_t row = 16 * g + 8 * h + i;
          if (row < n) {
            const float* src = x + row * ldx + k0 + kk;
            const __m256 v = w == 8 ? _mm256_loadu_ps(src) : _mm256_maskload_ps(src, m);
            lo = w == 8 ? _mm256_min_ps(lo, v) : _mm256_blendv_ps(lo, _mm256_min_ps(lo, v), live);
            hi = w == 8 ? _mm256_max_ps(hi, v) : _mm256_blendv_ps(hi, _mm256_max_ps(hi, v), live);
            r[i] = _mm256_sub_ps(v, x0);
          } else {
            r[i] = _mm256_setzero_ps();
          }
        }
        transpose8(r);
        for (int i = 0; i < w; ++i) _mm256_storeu_ps(pg + (kk + i) * 16 + 8 * h, r[i]);
      }
    }
  }
  alignas(32) float l[8], u[8];
  _mm256_store_ps(l, lo);
  _mm256_store_ps(u, hi);
  for (int i = 0; i < 8; ++i) {
    lohi[0] = std::min(lohi[0], l[i]);
    lohi[1] = std::max(lohi[1], u[i]);
  }
}

// t[j][0 .. 15] <- sum_{k < kn} v[16 k .. 16 k + 15] s[ss k + j] for j < J (<= 6): 2 J accumulators
// as named variables (GCC 12 keeps an array of them in memory, a store per FMA in the loop)
#define GK_ACC(j) __m256 c##j##0 = _mm256_setzero_ps(), c##j##1 = _mm256_setzero_ps();
#define GK_STEP(j)                                   \
  if constexpr (J > j) {                             \
    const __m256 b = _mm256_broadcast_ss(sk + j);    \
    c##j##0 = _mm256_fmadd_ps(v0, b, c##j##0);       \
    c##j##1 = _mm256_fmadd_ps(v1, b, c##j##1);       \
  }
#define GK_SAVE(j)                      \
  if constexpr (J > j) {                \
    _mm256_store_ps(t[j], c##j##0);     \
    _mm256_store_ps(t[j] + 8, c##j##1); \
  }
template <int J>
GK_AVX2 inline void micro(const float* v, const float* s, int64_t ss, int64_t kn, float (*t)[16]) {
  GK_ACC(0) GK_ACC(1) GK_ACC(2) GK_ACC(3) GK_ACC(4) GK_ACC(5)
  for (int64_t k = 0; k < kn; ++k) {
    const __m256 v0 = _mm256_loadu_ps(v + 16 * k), v1 = _mm256_loadu_ps(v + 16 * k + 8);
    const float* sk = s + ss * k;
    GK_STEP(0) GK_STEP(1) GK_STEP(2) GK_STEP(3) GK_STEP(4) GK_STEP(5)
  }
  GK_SAVE(0) GK_SAVE(1) GK_SAVE(2) GK_SAVE(3) GK_SAVE(4) GK_SAVE(5)
}
#undef GK_ACC
#undef GK_STEP
#undef GK_SAVE

// K[j0 + j][i0 .. i0 + 15] (=|+=) sum_k a[k][:] b[k][j] for j < J (a, b: packed groups; b from
// the strip's first row)
template <int J>
GK_AVX2 inline void strip(const float* a, const float* b, int64_t kc, float* K, int64_t n, int64_t i0, int64_t j0,
                          bool first) {
  alignas(32) float t[J][16];
  micro<J>(a, b, 16, kc, t);
  const int jn = static_cast<int>(std::min<int64_t>(J, n - j0));
  if (n - i0 >= 16) {  // whole rows: plain loads and stores (masked ones are slow on AMD cores)
    for (int j = 0; j < jn; ++j) {
      float* out = K + (j0 + j) * n + i0;
      __m256 v0 = _mm256_load_ps(t[j]), v1 = _mm256_load_ps(t[j] + 8);
      if (!first) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(out));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(out + 8));
      }
      _mm256_storeu_ps(out, v0);
      _mm256_storeu_ps(out + 8, v1);
    }
    return;
  }
  // a tail: masked moves, and none at all for a half wholly past n (AMD documents masked-out
  // lanes past the end of an array as implementation dependent)
  const __m256i m0 = head_mask(n - i0), m1 = head_mask(n - i0 - 8);
  const bool second = n - i0 > 8;
  for (int j = 0; j < jn; ++j) {
    float* out = K + (j0 + j) * n + i0;
    __m256 v0 = _mm256_load_ps(t[j]), v1 = _mm256_load_ps(t[j] + 8);
    if (!first) v0 = _mm256_add_ps(v0, _mm256_maskload_ps(out, m0));
    _mm256_maskstore_ps(out, m0, v0);
    if (!second) continue;
    if (!first) v1 = _mm256_add_ps(v1, _mm256_maskload_ps(out + 8, m1));
    _mm256_maskstore_ps(out + 8, m1, v1);
  }
}

GK_AVX2 void tiles(const float* P, int64_t kc, int64_t groups, int64_t n, float* K, bool first) {
  for (int64_t gj = 0; gj < groups; ++gj) {
    const float* b = P + gj * kc * 16;
    for (int64_t gi = gj; gi < groups; ++gi) {
      const float* a = P + gi * kc * 16;
      const int64_t i0 = 16 * gi, j0 = 16 * gj;
      strip<6>(a, b, kc, K, n, i0, j0, first);
      if (j0 + 6 < n) strip<6>(a, b + 6, kc, K, n, i0, j0 + 6, first);
      if (j0 + 12 < n) strip<4>(a, b + 12, kc, K, n, i0, j0 + 12, first);
    }
  }
}

GK_AVX2 void pack_cols(const float* x, int64_t ldx, int64_t n, int64_t k0, int64_t cols, float* B) {
  const int64_t wp = (cols + W - 1) / W * W;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < wp; c += 8) {
      const float *src = x + j * ldx + k0 + c, *src0 = x + k0 + c;
      __m256 v;
      if (cols - c >= 8) {
        v = _mm256_sub_ps(_mm256_loadu_ps(src), _mm256_loadu_ps(src0));
      } else if (cols - c <= 0) {  // padding: no access past the block
        v = _mm256_setzero_ps();
      } else {
        const __m256i m = head_mask(cols - c);
        v = _mm256_sub_ps(_mm256_maskload_ps(src, m), _mm256_maskload_ps(src0, m));
      }
      _mm256_storeu_ps(B + (c / W) * n * W + j * W + c % W, v);
    }
}

GK_AVX2 void bwd_tile(const float* A, const float* B, int64_t nj, float* out, int64_t ldo, int64_t rows, int64_t cols,
                      bool first, bool last) {
  alignas(32) float t[MR][W];
  micro<MR>(B, A, MR, nj, t);  // t[r][c] = sum_j B[j][c] A[j][r]
  for (int r = 0; r < rows; ++r)
    for (int v = 0; v < 2 && 8 * v < cols; ++v) {
      float* o = out + r * ldo + 8 * v;
      const __m256 a = _mm256_load_ps(t[r] + 8 * v);
      if (first && last && cols - 8 * v >= 8 && (reinterpret_cast<uintptr_t>(o) & 31) == 0) {
        _mm256_stream_ps(o, a);
        continue;
      }
      const __m256i m = head_mask(cols - 8 * v);
      _mm256_maskstore_ps(o, m, first ? a : _mm256_add_ps(a, _mm256_maskload_ps(o, m)));
    }
}

GK_AVX2 void pack_rows(const float* x, int64_t ldx, int64_t cols, int64_t k0, int64_t kc, int64_t gstride, float* P,
                       float* sums) {
  for (int64_t g = 0; g < (cols + 15) / 16; ++g)
    for (int64_t h = 0; h < 16; h += 8) {
      if (cols - 16 * g - h <= 0) {  // a half wholly past cols: zeros, no access past the row
        for (int64_t k = 0; k < kc; ++k) _mm256_storeu_ps(P + g * gstride + h + 16 * k, _mm256_setzero_ps());
        continue;
      }
      const __m256i m = head_mask(cols - 16 * g - h);
      const __m256 x0 = _mm256_maskload_ps(x + 16 * g + h, m);
      __m256 s = _mm256_setzero_ps();
      float* pg = P + g * gstride + h;
      const bool whole = cols - 16 * g - h >= 8;
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = x + (k0 + k) * ldx + 16 * g + h;
        const __m256 v = _mm256_sub_ps(whole ? _mm256_loadu_ps(src) : _mm256_maskload_ps(src, m), x0);
        _mm256_storeu_ps(pg + 16 * k, v);
        s = _mm256_add_ps(s, v);
      }
      _mm256_storeu_ps(sums + 16 * g + h, _mm256_add_ps(_mm256_loadu_ps(sums + 16 * g + h), s));
    }
}

const GramIsa kTable{"avx2", pack, tiles, MR, W, pack_cols, bwd_tile, pack_rows};

}  // namespace

const GramIsa* avx2_isa() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? &kTable : nullptr;
}

}  // namespace gk_cpu

#else  // not x86

namespace gk_cpu {
const GramIsa* avx2_isa() { return nullptr; }
}  // namespace gk_cpu

#endif
