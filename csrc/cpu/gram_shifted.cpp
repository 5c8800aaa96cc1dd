// guidance_kernels._cpu: the row-shifted Gram K = (x - 1 x0)(x - 1 x0)ᵀ of one fp32 activation on
// an x86 CPU and its backward dX = M (x - 1 x0), the shift fused into the packing of each product
// (no shifted copy of the activation, no second read of it). Reference: backends/reference.py
// (shift a column block, then MKL ?syrk / GEMM); Python side: backends/cpu_gram.py; tests:
// tests/test_cpu_gram.py.
//
// This file holds the drivers; the packing and the register tiles come from a table per
// instruction set (gram_isa.h: AVX-512 in gram_avx512.cpp, AVX2 + FMA in gram_avx2.cpp), the
// best the CPU runs unless the caller names one.
//
// Gram: x (n, p) is cut into column blocks of at most kc columns; each block is packed, shifted,
// and every 16x16 tile with row group gi >= gj is accumulated (half the multiply-adds of a
// general product) into the upper triangle of K, mirrored into the lower at the end. Threads
// split the columns (each packs and accumulates its own share into a private K, summed at the
// end), so there is no barrier inside the product.
//
// Backward: M is packed once into panels of mr rows; a block of kc columns of x' is packed,
// shifted, into panels of w columns (the row segments of x are read once, long and contiguous).
// Each panel of B meets every panel of A in turn (slabs of kJ rows of it, only for n > kJ);
// meanwhile the next block's rows of x are prefetched into L2, a few lines per tile, for the
// pack. Threads split the columns of dX (no shared output, no reduction). Whole panels up to
// n = 2048 and the prefetch were 5-15 % faster at n = 256 .. 2048 than slabs of 256 rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu.h"
#include "gram_isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#define GK_X86 1
#include <immintrin.h>
#else
#define GK_X86 0
#endif

namespace {

using at::Tensor;
using gk_cpu::GramIsa;

constexpr int64_t kJ = 2048;

// the upper triangle of K (n x n) of columns [c0, c1) of x, written (not accumulated); range
// <- {min, max} of those columns of x (+-inf when there are none)
void gram_columns(const GramIsa& isa, const float* x, int64_t ldx, int64_t n, int64_t c0, int64_t c1, int64_t kc,
                  float* K, float* range) {
  range[0] = INFINITY;
  range[1] = -INFINITY;
  const int64_t groups = (n + 15) / 16;
  std::vector<float> P(static_cast<size_t>(groups * 16 * std::min(kc, std::max<int64_t>(c1 - c0, 1))));
  if (c1 <= c0)  // no columns: the Gram of nothing
    std::fill(K, K + n * n, 0.0f);
  for (int64_t k0 = c0; k0 < c1; k0 += kc) {
    const int64_t w = std::min(kc, c1 - k0);
    isa.pack(x, ldx, n, k0, w, groups, P.data(), range);
    isa.tiles(P.data(), w, groups, n, K, k0 == c0);
  }
}

// A <- M (n, n) in panels of mr rows (gram_isa.h)
void pack_m(const float* M, int64_t n, int64_t mr, float* A) {
  const int64_t panels = (n + mr - 1) / mr;
  for (int64_t t = 0; t < panels; ++t)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t r = 0; r < mr; ++r) {
        const int64_t i = mr * t + r;
        A[(t * n + j) * mr + r] = i < n ? M[i * n + j] : 0.0f;
      }
}

// dX[:, c0:c1] for one thread
void backward_columns(const GramIsa& isa, const float* A, const float* x, int64_t ldx, int64_t n, int64_t c0,
                      int64_t c1, int64_t kc, float* dx, int64_t ldd) {
  const int64_t MR = isa.mr, W = isa.w;
  const int64_t panels = (n + MR - 1) / MR, kcw = (kc + W - 1) / W * W;
  std::vector<float> B(static_cast<size_t>(n * kcw));
  for (int64_t k0 = c0; k0 < c1; k0 += kcw) {
    const int64_t w = std::min(kcw, c1 - k0), cpanels = (w + W - 1) / W;
    isa.pack_cols(x, ldx, n, k0, w, B.data());
    // the next block's 64-byte lines of x, spread evenly over this block's tiles
    const int64_t nk0 = k0 + kcw, nw = std::min(kcw, c1 - nk0), per_row = nw > 0 ? (nw + 15) / 16 : 0;
    const int64_t lines = per_row * n, tiles = ((n + kJ - 1) / kJ) * panels * cpanels;
    int64_t fetched = 0, tile_no = 0;
    for (int64_t c = 0; c < w; c += W)
      for (int64_t j0 = 0; j0 < n; j0 += kJ)
        for (int64_t t = 0; t < panels; ++t) {
          isa.bwd_tile(A + (t * n + j0) * MR, B.data() + (c / W) * n * W + j0 * W, std::min(kJ, n - j0),
                       dx + MR * t * ldd + k0 + c, ldd, std::min<int64_t>(MR, n - MR * t), std::min(W, w - c), j0 == 0,
                       j0 + kJ >= n);
#if GK_X86
          for (const int64_t upto = lines * ++tile_no / tiles; fetched < upto; ++fetched)
            _mm_prefetch(reinterpret_cast<const char*>(x + (fetched / per_row) * ldx + nk0 + 16 * (fetched % per_row)),
                         _MM_HINT_T1);
#endif
        }
  }
#if GK_X86
  _mm_sfence();  // the streaming stores are visible before the thread returns
#endif
}

}  // namespace

namespace gk_cpu {

std::vector<std::string> isas() {
  std::vector<std::string> out;
  for (const GramIsa* t : {avx512_isa(), avx2_isa()})
    if (t != nullptr) out.emplace_back(t->name);
  return out;
}

bool supported() { return !isas().empty(); }

#define GK_CHECK(fn, cond, ...) TORCH_CHECK(cond, "guidance_kernels._cpu.", fn, ": ", __VA_ARGS__)

// K's strict lower triangle <- its upper triangle, in 16x16 blocks (both blocks stay in L1)
void mirror_upper(float* K, int64_t n) {
  for (int64_t i0 = 0; i0 < n; i0 += 16)
    for (int64_t j0 = i0; j0 < n; j0 += 16)
      for (int64_t i = i0; i < std::min(i0 + 16, n); ++i)
        for (int64_t j = std::max(j0, i + 1); j < std::min(j0 + 16, n); ++j) K[j * n + i] = K[i * n + j];
}

void add_into(float* dst, const float* src, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] += src[i];
}

void check_activation(const char* fn, const Tensor& t, const char* name) {
  GK_CHECK(fn, t.dim() == 2 && t.scalar_type() == at::kFloat && t.device().is_cpu(), name,
           " must be a 2-D float32 CPU tensor, got ", t.sizes(), " ", t.scalar_type());
  GK_CHECK(fn, t.stride(1) == 1 || t.size(1) <= 1, name, " must have unit column stride, got strides ", t.strides());
}

const GramIsa& pick_isa(const char* fn, const std::string& isa) {
  for (const GramIsa* t : {gk_cpu::avx512_isa(), gk_cpu::avx2_isa()})
    if (t != nullptr && (isa.empty() || isa == "best" || isa == t->name)) return *t;
  std::string have;
  for (const auto& s : gk_cpu::isas()) have += (have.empty() ? "" : ", ") + s;
  GK_CHECK(fn, false, isa.empty() || isa == "best" ? std::string("this CPU (or build) has neither AVX-512 nor AVX2 + FMA")
                                                   : "isa '" + isa + "' is not run by this CPU (or build); it runs: " +
                                                         (have.empty() ? std::string("none") : have));
  return *gk_cpu::avx2_isa();  // unreachable
}

}  // namespace gk_cpu

namespace {

// the checks both entry points share: x (n, p) and the blocking arguments; the table to use
const GramIsa& check_common(const char* fn, const Tensor& x, int64_t kc, int64_t chunks, const std::string& isa) {
  gk_cpu::check_activation(fn, x, "x");
  GK_CHECK(fn, kc >= 1 && chunks >= 1, "kc and chunks must be positive");
  return gk_cpu::pick_isa(fn, isa);
}

}  // namespace

namespace gk_cpu {

// out (n, n) fp32 contiguous <- (x - 1 x[0])(x - 1 x[0])ᵀ for x (n, p) fp32 with unit column
// stride; columns in blocks of kc, split over at most `chunks` threads (each a private Gram).
// range: an empty tensor, or 2 fp32 that receive {min, max} of x (+-inf for an empty x; where x
// holds NaN they are unspecified: the caller's decision must not depend on them then).
void gram_shifted_(const Tensor& x, const Tensor& out, int64_t kc, int64_t chunks, const Tensor& range,
                   const std::string& isa) {
  constexpr const char* fn = "gram_shifted_";
  const GramIsa& t = check_common(fn, x, kc, chunks, isa);
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
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  float* K = out.data_ptr<float>();
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, p / kc));
  std::vector<float> ranges(static_cast<size_t>(2 * chunks));
  if (chunks == 1) {
    gram_columns(t, xp, ldx, n, 0, p, kc, K, ranges.data());
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
        gram_columns(t, xp, ldx, n, std::min(p, c * step), std::min(p, (c + 1) * step), kc, dst, ranges.data() + 2 * c);
      }
    });
    for (auto& v : priv) gk_cpu::add_into(K, v.data(), n * n);
  }
  gk_cpu::mirror_upper(K, n);
  for (int64_t c = 0; c < chunks; ++c) {
    lohi[0] = std::min(lohi[0], ranges[2 * c]);
    lohi[1] = std::max(lohi[1], ranges[2 * c + 1]);
  }
  if (range.numel() == 2) std::copy(lohi, lohi + 2, range.data_ptr<float>());
}

// dx (n, p) fp32, unit column stride <- m (n, n) (x - 1 x[0]) for x (n, p) fp32 with unit column
// stride; columns in blocks of kc, split over at most `chunks` threads.
void gram_backward_shifted_(const Tensor& m, const Tensor& x, const Tensor& dx, int64_t kc, int64_t chunks,
                            const std::string& isa) {
  constexpr const char* fn = "gram_backward_shifted_";
  const GramIsa& t = check_common(fn, x, kc, chunks, isa);
  const int64_t n = x.size(0), p = x.size(1);
  GK_CHECK(fn, m.scalar_type() == at::kFloat && m.is_contiguous() && m.dim() == 2 && m.size(0) == n && m.size(1) == n &&
                m.device().is_cpu(),
            "m must be a contiguous float32 CPU tensor of shape (", n, ", ", n, ")");
  GK_CHECK(fn, dx.scalar_type() == at::kFloat && dx.dim() == 2 && dx.size(0) == n && dx.size(1) == p &&
                (dx.stride(1) == 1 || p <= 1) && dx.device().is_cpu(),
            "dx must be a float32 CPU tensor of shape (", n, ", ", p, ") with unit column stride");
  if (n == 0 || p == 0) return;
  std::vector<float> A(static_cast<size_t>((n + t.mr - 1) / t.mr * t.mr * n));
  pack_m(m.data_ptr<float>(), n, t.mr, A.data());
  const float* xp = x.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, (p + 63) / 64));
  const int64_t step = ((p + chunks - 1) / chunks + 63) / 64 * 64;
  at::parallel_for(0, chunks, 1, [&](int64_t a, int64_t b) {
    for (int64_t c = a; c < b; ++c)
      if (c * step < p)
        backward_columns(t, A.data(), xp, x.stride(0), n, c * step, std::min(p, (c + 1) * step), kc, dp, dx.stride(0));
  });
}

}  // namespace gk_cpu
