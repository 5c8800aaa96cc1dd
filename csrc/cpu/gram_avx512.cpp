// guidance_kernels._cpu: the AVX-512 table of the row-shifted Gram and its backward (layouts and
// contract: gram_isa.h; drivers: gram_shifted.cpp; reference: backends/reference.py).
//
// Gram: a block's rows are read 16 at a time as 16 columns of 16 rows (one 64-byte vector per
// column after a 16x16 in-register transpose). A 16x16 tile keeps 16 accumulators acc[j] (the 16
// rows i of group gi against row j of group gj): per k one vector load and 16 broadcast FMAs.
// Backward: 8 x 48 micro-tiles (8 x 3 accumulators: 3 loads and 8 broadcasts per 24 FMAs);
// full aligned vectors of a final tile leave with streaming stores (dX is written once: no read
// for ownership). Measured on a 2-core Xeon VM against 12 x 32 tiles: 5-15 % faster.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "gram_isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GK_AVX512 __attribute__((target("avx512f")))

namespace gk_cpu {
namespace {

constexpr int64_t MR = 8, NV = 3, W = 16 * NV;

GK_AVX512 inline __mmask16 head_mask(int64_t w) {
  return w >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << w) - 1u);
}

// r[k] <- column k of the 16x16 block whose rows are r[0..15]
GK_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(u[h + i], u[h + 4 + i], 0x88);
      t[h + 4 + i] = _mm512_shuffle_f32x4(u[h + i], u[h + 4 + i], 0xDD);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
  }
}

GK_AVX512 void pack(const float* x, int64_t ldx, int64_t n, int64_t k0, int64_t kc, int64_t groups, float* P,
                    float* lohi) {
  __m512 lo = _mm512_set1_ps(lohi[0]), hi = _mm512_set1_ps(lohi[1]);
  for (int64_t g = 0; g < groups; ++g) {
    float* pg = P + g * kc * 16;
    for (int64_t kk = 0; kk < kc; kk += 16) {
      const int64_t w = std::min<int64_t>(16, kc - kk);
      const __mmask16 m = head_mask(w);
      const __m512 x0 = _mm512_maskz_loadu_ps(m, x + k0 + kk);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t row = 16 * g + i;
        if (row < n) {
          const __m512 v = _mm512_maskz_loadu_ps(m, x + row * ldx + k0 + kk);
          lo = _mm512_mask_min_ps(lo, m, lo, v);
          hi = _mm512_mask_max_ps(hi, m, hi, v);
          r[i] = _mm512_sub_ps(v, x0);
        } else {
          r[i] = _mm512_setzero_ps();
        }
      }
      transpose16(r);
      for (int i = 0; i < w; ++i) _mm512_storeu_ps(pg + (kk + i) * 16, r[i]);
    }
  }
  lohi[0] = _mm512_reduce_min_ps(lo);
  lohi[1] = _mm512_reduce_max_ps(hi);
}

GK_AVX512 void tile(const float* P, int64_t kc, int64_t gi, int64_t gj, int64_t n, float* K, bool first) {
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  const float* a = P + gi * kc * 16;
  const float* b = P + gj * kc * 16;
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 av = _mm512_loadu_ps(a + 16 * k);
    const float* bk = b + 16 * k;
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(av, _mm512_set1_ps(bk[j]), acc[j]);
  }
  const int64_t i0 = 16 * gi, j0 = 16 * gj;
  const __mmask16 m = head_mask(n - i0);
  for (int j = 0; j < 16 && j0 + j < n; ++j) {
    float* out = K + (j0 + j) * n + i0;
    const __m512 v = first ? acc[j] : _mm512_add_ps(acc[j], _mm512_maskz_loadu_ps(m, out));
    _mm512_mask_storeu_ps(out, m, v);
  }
}

GK_AVX512 void tiles(const float* P, int64_t kc, int64_t groups, int64_t n, float* K, bool first) {
  for (int64_t gj = 0; gj < groups; ++gj)
    for (int64_t gi = gj; gi < groups; ++gi) tile(P, kc, gi, gj, n, K, first);
}

GK_AVX512 void pack_cols(const float* x, int64_t ldx, int64_t n, int64_t k0, int64_t cols, float* B) {
  const int64_t wp = (cols + W - 1) / W * W;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < wp; c += 16) {
      const __mmask16 m = c < cols ? head_mask(cols - c) : static_cast<__mmask16>(0);
      const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j * ldx + k0 + c), _mm512_maskz_loadu_ps(m, x + k0 + c));
      _mm512_storeu_ps(B + (c / W) * n * W + j * W + c % W, v);
    }
}

GK_AVX512 void bwd_tile(const float* A, const float* B, int64_t nj, float* out, int64_t ldo, int64_t rows, int64_t cols,
                        bool first, bool last) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nj; ++j) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + j * W + 16 * v);
    const float* aj = A + j * MR;
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(aj[r]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int v = 0; v < NV && 16 * v < cols; ++v) {
      float* o = out + r * ldo + 16 * v;
      if (first && last && cols - 16 * v >= 16 && (reinterpret_cast<uintptr_t>(o) & 63) == 0) {
        _mm512_stream_ps(o, acc[r][v]);
        continue;
      }
      const __mmask16 m = head_mask(cols - 16 * v);
      _mm512_mask_storeu_ps(o, m, first ? acc[r][v] : _mm512_add_ps(acc[r][v], _mm512_maskz_loadu_ps(m, o)));
    }
}

GK_AVX512 void pack_rows(const float* x, int64_t ldx, int64_t cols, int64_t k0, int64_t kc, int64_t gstride, float* P,
                         float* sums) {
  for (int64_t g = 0; g < (cols + 15) / 16; ++g) {
    const __mmask16 m = head_mask(cols - 16 * g);
    const __m512 x0 = _mm512_maskz_loadu_ps(m, x + 16 * g);
    __m512 s = _mm512_setzero_ps();
    float* pg = P + g * gstride;
    for (int64_t k = 0; k < kc; ++k) {
      const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + (k0 + k) * ldx + 16 * g), x0);
      _mm512_storeu_ps(pg + 16 * k, v);
      s = _mm512_add_ps(s, v);
    }
    _mm512_storeu_ps(sums + 16 * g, _mm512_add_ps(_mm512_loadu_ps(sums + 16 * g), s));
  }
}

const GramIsa kTable{"avx512", pack, tiles, MR, W, pack_cols, bwd_tile, pack_rows};

}  // namespace

const GramIsa* avx512_isa() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") ? &kTable : nullptr;
}

}  // namespace gk_cpu

#else  // not x86

namespace gk_cpu {
const GramIsa* avx512_isa() { return nullptr; }
}  // namespace gk_cpu

#endif
