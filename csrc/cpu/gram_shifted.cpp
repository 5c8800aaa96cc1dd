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
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

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


#endif  // GK_X86

bool supported() {
#if GK_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

#define GK_CHECK(cond, ...) TORCH_CHECK(cond, "guidance_kernels._cpu.gram_shifted_: ", __VA_ARGS__)

// out (n, n) fp32 contiguous <- (x - 1 x[0])(x - 1 x[0])ᵀ for x (n, p) fp32 with unit column
// stride; columns in blocks of kc, split over at most `chunks` threads (each a private Gram).
// range: an empty tensor, or 2 fp32 that receive {min, max} of x (+-inf for an empty x; where x
// holds NaN they are unspecified: the caller's decision must not depend on them then).
void gram_shifted_(const Tensor& x, const Tensor& out, int64_t kc, int64_t chunks, const Tensor& range) {
  GK_CHECK(supported(), "this CPU (or build) has no AVX-512");
  GK_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be a 2-D float32 CPU tensor");
  GK_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "x must have unit column stride, got strides ", x.strides());
  const int64_t n = x.size(0), p = x.size(1);
  GK_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == n &&
               out.size(1) == n && out.device().is_cpu(),
           "out must be a contiguous float32 CPU tensor of shape (", n, ", ", n, ")");
  GK_CHECK(kc >= 1 && chunks >= 1, "kc and chunks must be positive");
  GK_CHECK(range.numel() == 0 || (range.numel() == 2 && range.scalar_type() == at::kFloat && range.is_contiguous() &&
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


}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "guidance_kernels CPU kernels (AVX-512): the row-shifted Gram with the shift fused into packing";
  m.def("supported", &supported, "whether this CPU and build run the AVX-512 kernels");
  m.def("gram_shifted_", &gram_shifted_, pybind11::arg("x"), pybind11::arg("out"), pybind11::arg("kc"),
        pybind11::arg("chunks"), pybind11::arg("range"),
        "out (n, n) <- (x - 1 x[0])(x - 1 x[0])ᵀ, fp32; range (2 or empty) <- {min, max} of x");
}
