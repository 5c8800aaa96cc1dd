// guidance_kernels._cpu: the row-shifted Gram K = (x - 1 x0)(x - 1 x0)ᵀ of one fp32 activation on
// an x86 CPU with AVX-512, the shift fused into the packing of the product (no shifted copy of
// the activation, no second read of it). Reference: backends/reference.py (shift a column block,
// then MKL ?syrk); Python side: backends/cpu_gram.py; tests: tests/test_cpu_gram.py.
//
// Layout. x (n, p) is cut into column blocks of at most kc columns. A block is packed, shifted,
// into P: group g (rows 16g .. 16g+15) holds P[g][k][r] = x[16g+r][k0+k] - x[0][k0+k] (rows past
// n are zero), i.e. 16 rows of one column in one 64-byte vector (16x16 in-register transposes).
// A 16x16 tile of K for row groups (gi >= gj) keeps 16 accumulators acc[j] (the 16 rows i of
// group gi against row j of group gj): per k one vector load and 16 broadcast FMAs. Only tiles
// with gi >= gj are computed, half the multiply-adds of a general product; acc[j] is stored as
// the contiguous segment K[j][i0 .. i0+15] (the upper triangle), mirrored into the lower at the
// end. Threads split the columns (each packs and accumulates its own share into a private K,
// summed at the end), so there is no barrier inside the product.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#define GK_X86 1
#include <immintrin.h>
#define GK_AVX512 __attribute__((target("avx512f")))
#else
#define GK_X86 0
#endif

namespace {

using at::Tensor;

#if GK_X86

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

// P (groups x kc x 16) <- columns k0 .. k0+kc of x - 1 x0, packed as described above; lo / hi
// take the min / max of the raw x read (the scale check for free: the read happens anyway)
GK_AVX512 void pack_shifted(const float* x, int64_t ldx, int64_t n, int64_t k0, int64_t kc, int64_t groups,
                            float* P, __m512& lo, __m512& hi) {
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
}

// K[16gj + j][16gi .. 16gi+15] (=|+=) sum_k P[gi][k][:] P[gj][k][j], columns and rows past n skipped
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

// the upper triangle of K (n x n) of columns [c0, c1) of x, written (not accumulated); range
// <- {min, max} of those columns of x (+-inf when there are none)
GK_AVX512 void gram_columns(const float* x, int64_t ldx, int64_t n, int64_t c0, int64_t c1, int64_t kc, float* K,
                            float* range) {
  __m512 lo = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(-INFINITY);
  const int64_t groups = (n + 15) / 16;
  std::vector<float> P(static_cast<size_t>(groups * 16 * std::min(kc, std::max<int64_t>(c1 - c0, 1))));
  if (c1 <= c0)  // no columns: the Gram of nothing
    std::fill(K, K + n * n, 0.0f);
  for (int64_t k0 = c0; k0 < c1; k0 += kc) {
    const int64_t w = std::min(kc, c1 - k0);
    pack_shifted(x, ldx, n, k0, w, groups, P.data(), lo, hi);
    for (int64_t gj = 0; gj < groups; ++gj)
      for (int64_t gi = gj; gi < groups; ++gi) tile(P.data(), w, gi, gj, n, K, k0 == c0);
  }
  range[0] = _mm512_reduce_min_ps(lo);
  range[1] = _mm512_reduce_max_ps(hi);
}

// K's strict lower triangle <- its upper triangle (16x16 blocks through registers)
GK_AVX512 void mirror_upper(float* K, int64_t n) {
  const int64_t groups = (n + 15) / 16;
  for (int64_t bi = 0; bi < groups; ++bi) {
    const int64_t i0 = 16 * bi, hi = std::min<int64_t>(16, n - i0);
    for (int64_t r = 1; r < hi; ++r)  // diagonal block
      for (int64_t c = 0; c < r; ++c) K[(i0 + r) * n + i0 + c] = K[(i0 + c) * n + i0 + r];
    for (int64_t bj = bi + 1; bj < groups; ++bj) {  // K[bj block][bi block] <- K[bi block][bj block]ᵀ
      const int64_t j0 = 16 * bj, wj = std::min<int64_t>(16, n - j0);
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < hi ? _mm512_maskz_loadu_ps(head_mask(wj), K + (i0 + i) * n + j0) : _mm512_setzero_ps();
      transpose16(r);
      for (int j = 0; j < wj; ++j) _mm512_mask_storeu_ps(K + (j0 + j) * n + i0, head_mask(hi), r[j]);
    }
  }
}

GK_AVX512 void add_into(float* dst, const float* src, int64_t count) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_add_ps(_mm512_loadu_ps(dst + i), _mm512_loadu_ps(src + i)));
  for (; i < count; ++i) dst[i] += src[i];
}



// ---- backward: dX = M X' (X' = x - 1 x0), the shift fused into the packing of X' -----------
// M (n, n) is packed once into panels of MR rows, A[t][j][r] = M[MR t + r][j] (zero past n). A
// block of kc columns of X' is packed, shifted, into panels of W = 16 NV columns, B[c / W][j][c % W]
// (the row segments of x are read once, long and contiguous). A micro-tile of MR rows x W columns
// of dX keeps MR x NV accumulators: per j, NV vector loads of the panel and MR broadcasts of A.
// Each panel of B meets every panel of A in turn (slabs of kJ rows of it, only for n > kJ);
// meanwhile the next block's rows of x are prefetched into L2, a few lines per tile, for the
// pack. Full aligned vectors of dX are written with streaming stores when the tile is final (dX is
// written once: no read for ownership). Threads split the columns of dX (no shared output, no
// reduction). Measured on the 2-core VM against the first version (12 x 32 tiles, slabs of 256
// rows, no prefetch): 8 x 48 tiles, whole panels up to n = 2048 and the prefetch were 5-15 %
// faster at n = 256 .. 2048 (fewer loads per FMA, no partial panel at n = 256, no re-read of dX).
constexpr int64_t kJ = 2048;

template <int MR>
void pack_m(const float* M, int64_t n, float* A) {
  const int64_t panels = (n + MR - 1) / MR;
  for (int64_t t = 0; t < panels; ++t)
    for (int64_t j = 0; j < n; ++j)
      for (int r = 0; r < MR; ++r) {
        const int64_t i = MR * t + r;
        A[(t * n + j) * MR + r] = i < n ? M[i * n + j] : 0.0f;
      }
}

// B <- columns k0 .. k0 + w of x - 1 x0 in panels of W columns, zero past w up to a multiple of W
GK_AVX512 void pack_cols_shifted(const float* x, int64_t ldx, int64_t n, int64_t k0, int64_t w, float* B, int64_t W) {
  const int64_t wp = (w + W - 1) / W * W;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < wp; c += 16) {
      const __mmask16 m = c < w ? head_mask(w - c) : static_cast<__mmask16>(0);
      const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j * ldx + k0 + c), _mm512_maskz_loadu_ps(m, x + k0 + c));
      _mm512_storeu_ps(B + (c / W) * n * W + j * W + c % W, v);
    }
}

// out[r][c] (=|+=) sum_j A[j][r] B[j][c] for r < rows, c < cols (<= 16 NV); `last`: no later slab adds
template <int MR, int NV>
GK_AVX512 void bwd_tile(const float* A, const float* B, int64_t W, int64_t nj, float* out, int64_t ldo, int64_t rows,
                        int64_t cols, bool first, bool last) {
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

// dX[:, c0:c1] for one thread
template <int MR, int NV>
GK_AVX512 void backward_columns(const float* A, const float* x, int64_t ldx, int64_t n, int64_t c0, int64_t c1,
                                int64_t kc, float* dx, int64_t ldd) {
  constexpr int64_t W = 16 * NV;
  const int64_t panels = (n + MR - 1) / MR, kcw = (kc + W - 1) / W * W;
  std::vector<float> B(static_cast<size_t>(n * kcw));
  for (int64_t k0 = c0; k0 < c1; k0 += kcw) {
    const int64_t w = std::min(kcw, c1 - k0), cpanels = (w + W - 1) / W;
    pack_cols_shifted(x, ldx, n, k0, w, B.data(), W);
    // the next block's 64-byte lines of x, spread evenly over this block's tiles
    const int64_t nk0 = k0 + kcw, nw = std::min(kcw, c1 - nk0), per_row = nw > 0 ? (nw + 15) / 16 : 0;
    const int64_t lines = per_row * n, tiles = ((n + kJ - 1) / kJ) * panels * cpanels;
    int64_t fetched = 0, tile_no = 0;
    for (int64_t c = 0; c < w; c += W)
      for (int64_t j0 = 0; j0 < n; j0 += kJ)
        for (int64_t t = 0; t < panels; ++t) {
          bwd_tile<MR, NV>(A + (t * n + j0) * MR, B.data() + (c / W) * n * W + j0 * W, W, std::min(kJ, n - j0),
                           dx + MR * t * ldd + k0 + c, ldd, std::min<int64_t>(MR, n - MR * t), std::min(W, w - c),
                           j0 == 0, j0 + kJ >= n);
          for (const int64_t upto = lines * ++tile_no / tiles; fetched < upto; ++fetched)
            _mm_prefetch(reinterpret_cast<const char*>(x + (fetched / per_row) * ldx + nk0 + 16 * (fetched % per_row)),
                         _MM_HINT_T1);
        }
  }
  _mm_sfence();  // the streaming stores are visible before the thread returns
}

#endif  // GK_X86

}  // namespace

namespace gk_cpu {

bool supported() {
#if GK_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

#define GK_CHECK(fn, cond, ...) TORCH_CHECK(cond, "guidance_kernels._cpu.", fn, ": ", __VA_ARGS__)

// the checks both entry points share: the CPU, x (n, p) and the blocking arguments
static void check_common(const char* fn, const Tensor& x, int64_t kc, int64_t chunks) {
  GK_CHECK(fn, supported(), "this CPU (or build) has no AVX-512");
  GK_CHECK(fn, x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be a 2-D float32 CPU tensor");
  GK_CHECK(fn, x.stride(1) == 1 || x.size(1) <= 1, "x must have unit column stride, got strides ", x.strides());
  GK_CHECK(fn, kc >= 1 && chunks >= 1, "kc and chunks must be positive");
}

// out (n, n) fp32 contiguous <- (x - 1 x[0])(x - 1 x[0])ᵀ for x (n, p) fp32 with unit column
// stride; columns in blocks of kc, split over at most `chunks` threads (each a private Gram).
// range: an empty tensor, or 2 fp32 that receive {min, max} of x (+-inf for an empty x; where x
// holds NaN they are unspecified: the caller's decision must not depend on them then).
void gram_shifted_(const Tensor& x, const Tensor& out, int64_t kc, int64_t chunks, const Tensor& range) {
  constexpr const char* fn = "gram_shifted_";
  check_common(fn, x, kc, chunks);
  const int64_t n = x.size(0), p = x.size(1);
  GK_CHECK(fn, out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == n &&
               out.size(1) == n && out.device().is_cpu(),
           "out must be a contiguous float32 CPU tensor of shape (", n, ", ", n, ")");
  GK_CHECK(fn, range.numel() == 0 || (range.numel() == 2 && range.scalar_type() == at::kFloat && range.is_contiguous() &&
                                  range.device().is_cpu()),
           "range must be empty or 2 contiguous float32 CPU values");
  float lohi[2] = {INFINITY, -INFINITY};
  if (range.numel() == 2) std::copy(lohi, lohi + 2, range.data_ptr<float>());
  if (n == 0) return;
#if GK_X86
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  float* K = out.data_ptr<float>();
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, p / kc));
  std::vector<float> ranges(static_cast<size_t>(2 * chunks));
  if (chunks == 1) {
    gram_columns(xp, ldx, n, 0, p, kc, K, ranges.data());
  } else {
    std::vector<std::vector<float>> priv(chunks - 1);
    const int64_t step = (p + chunks - 1) / chunks;
    at::parallel_for(0, chunks, 1, [&](int64_t a, int64_t b) {
      for (int64_t c = a; c < b; ++c) {
        float* dst = K;
        if (c > 0) {
          priv[c - 1].resize(static_cast<size_t>(n * n));
          dst = priv[c - 1].data();
        }
        gram_columns(xp, ldx, n, std::min(p, c * step), std::min(p, (c + 1) * step), kc, dst, ranges.data() + 2 * c);
      }
    });
    for (auto& v : priv) add_into(K, v.data(), n * n);
  }
  mirror_upper(K, n);
  for (int64_t c = 0; c < chunks; ++c) {
    lohi[0] = std::min(lohi[0], ranges[2 * c]);
    lohi[1] = std::max(lohi[1], ranges[2 * c + 1]);
  }
  if (range.numel() == 2) std::copy(lohi, lohi + 2, range.data_ptr<float>());
#endif
}

// dx (n, p) fp32, unit column stride <- m (n, n) (x - 1 x[0]) for x (n, p) fp32 with unit column
// stride; columns in blocks of kc, split over at most `chunks` threads.
void gram_backward_shifted_(const Tensor& m, const Tensor& x, const Tensor& dx, int64_t kc, int64_t chunks) {
  constexpr const char* fn = "gram_backward_shifted_";
  check_common(fn, x, kc, chunks);
  const int64_t n = x.size(0), p = x.size(1);
  GK_CHECK(fn, m.scalar_type() == at::kFloat && m.is_contiguous() && m.dim() == 2 && m.size(0) == n && m.size(1) == n &&
                m.device().is_cpu(),
            "m must be a contiguous float32 CPU tensor of shape (", n, ", ", n, ")");
  GK_CHECK(fn, dx.scalar_type() == at::kFloat && dx.dim() == 2 && dx.size(0) == n && dx.size(1) == p &&
                (dx.stride(1) == 1 || p <= 1) && dx.device().is_cpu(),
            "dx must be a float32 CPU tensor of shape (", n, ", ", p, ") with unit column stride");
  if (n == 0 || p == 0) return;
#if GK_X86
  constexpr int MR = 8, NV = 3;
  std::vector<float> A(static_cast<size_t>((n + MR - 1) / MR * MR * n));
  pack_m<MR>(m.data_ptr<float>(), n, A.data());
  const float* xp = x.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, (p + 63) / 64));
  const int64_t step = ((p + chunks - 1) / chunks + 63) / 64 * 64;
  at::parallel_for(0, chunks, 1, [&](int64_t a, int64_t b) {
    for (int64_t c = a; c < b; ++c)
      if (c * step < p)
        backward_columns<MR, NV>(A.data(), xp, x.stride(0), n, c * step, std::min(p, (c + 1) * step), kc, dp, dx.stride(0));
  });
#endif
}

}  // namespace gk_cpu
