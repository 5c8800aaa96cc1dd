// guidance_kernels._cpu: the feature-form product S = z'ᵀ z' of a pair, z' = [x' y'] with the row
// shifts x' = x - 1 x[0], y' = y - 1 y[0] (one symmetric product: its blocks are x'ᵀx', y'ᵀy' and
// x'ᵀy'), and the column sums of z', for fp32 x (n, p), y (n, q) on an x86 CPU. Reference:
// backends/reference.py `cross` (shift a row block of [x y], then MKL ?syrk); Python side:
// backends/cpu_gram.py; tests: tests/test_cpu_cross.py.
//
// A block of kc rows of z' is packed, shifted, 16 features of a row per 64 bytes (x's features in
// groups 0 .. gx - 1, y's in groups gx .. gx + gy - 1, each side zero-padded to 16: no transpose,
// no copy of z), and the Gram table's tiles accumulate the 16x16 tiles gi >= gj of S (half the
// multiply-adds of a general product). Threads split the rows (samples), each into a private S,
// summed at the end in thread order; S is then mirrored. The packing sums each block's rows
// before adding them to the column sums.
//
// Backward dX = z' w + 1 vᵀ (w: (p + q, p), v: (p)): the bias as one more feature (1 in z', v in
// w), w packed once into panels of the table's w columns, each panel of mr rows of z' packed
// (shifted) into mr x (p + q + 1) (L1), and the table's backward tiles write dX's rows with
// streaming stores (the shifted z' is never written out). Threads split the rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu.h"
#include "gram_isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GK_SFENCE() _mm_sfence()
#else
#define GK_SFENCE()
#endif

namespace {

using at::Tensor;
using gk_cpu::GramIsa;

#define GK_CHECK(fn, cond, ...) TORCH_CHECK(cond, "guidance_kernels._cpu.", fn, ": ", __VA_ARGS__)

int64_t groups_of(int64_t cols) { return (cols + 15) / 16; }

// S (m x m, upper triangle, written) and sums (m, written) of rows [r0, r1) of z'
void cross_rows(const GramIsa& t, const float* x, int64_t ldx, int64_t p, const float* y, int64_t ldy, int64_t q,
                int64_t r0, int64_t r1, int64_t kc, float* S, float* sums) {
  const int64_t gx = groups_of(p), groups = gx + groups_of(q), m = 16 * groups;
  std::fill(sums, sums + m, 0.0f);
  if (r1 <= r0) {  // no rows: the product of nothing
    std::fill(S, S + m * m, 0.0f);
    return;
  }
  std::vector<float> P(static_cast<size_t>(m * std::min(kc, r1 - r0)));
  for (int64_t k0 = r0; k0 < r1; k0 += kc) {
    const int64_t w = std::min(kc, r1 - k0);
    t.pack_rows(x, ldx, p, k0, w, 16 * w, P.data(), sums);
    t.pack_rows(y, ldy, q, k0, w, 16 * w, P.data() + gx * 16 * w, sums + 16 * gx);
    t.tiles(P.data(), w, groups, m, S, k0 == r0);
  }
}

// A (nj x mr, A[f][r]) <- rows i0 .. i0 + mr of [x' y' 1] (zero past n)
void pack_panel(const float* x, int64_t ldx, int64_t p, const float* y, int64_t ldy, int64_t q, int64_t n, int64_t i0,
                int64_t mr, float* A) {
  const int64_t nj = p + q + 1;
  for (int64_t r = 0; r < mr; ++r) {
    const int64_t row = i0 + r;
    if (row >= n) {
      for (int64_t f = 0; f < nj; ++f) A[f * mr + r] = 0.0f;
      continue;
    }
    const float* xr = x + row * ldx;
    const float* yr = y + row * ldy;
    for (int64_t f = 0; f < p; ++f) A[f * mr + r] = xr[f] - x[f];
    for (int64_t f = 0; f < q; ++f) A[(p + f) * mr + r] = yr[f] - y[f];
    A[(p + q) * mr + r] = 1.0f;
  }
}

}  // namespace

namespace gk_cpu {

// out (m, m) fp32 contiguous <- z'ᵀ z' and sums (m) fp32 <- the column sums of z', z' = [x' y']
// with each side's features padded to a multiple of 16 (m = 16 (ceil(p / 16) + ceil(q / 16));
// y's block starts at 16 ceil(p / 16); padded rows and columns are zero); rows in blocks of kc,
// split over at most `chunks` threads (each a private S).
void cross_shifted_(const Tensor& x, const Tensor& y, const Tensor& out, const Tensor& sums, int64_t kc, int64_t chunks,
                    const std::string& isa) {
  constexpr const char* fn = "cross_shifted_";
  check_activation(fn, x, "x");
  check_activation(fn, y, "y");
  const int64_t n = x.size(0), p = x.size(1), q = y.size(1), m = 16 * (groups_of(p) + groups_of(q));
  GK_CHECK(fn, y.size(0) == n, "x has ", n, " rows but y has ", y.size(0));
  GK_CHECK(fn, kc >= 1 && chunks >= 1, "kc and chunks must be positive");
  GK_CHECK(fn, out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == m &&
               out.size(1) == m && out.device().is_cpu(),
           "out must be a contiguous float32 CPU tensor of shape (", m, ", ", m, ")");
  GK_CHECK(fn, sums.scalar_type() == at::kFloat && sums.is_contiguous() && sums.dim() == 1 && sums.size(0) == m &&
               sums.device().is_cpu(),
           "sums must be a contiguous float32 CPU tensor of shape (", m, ")");
  const GramIsa& t = pick_isa(fn, isa);
  if (m == 0) return;
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  float* S = out.data_ptr<float>();
  float* sp = sums.data_ptr<float>();
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, n / kc));
  const int64_t step = (n + chunks - 1) / chunks;
  std::vector<std::vector<float>> priv(chunks - 1);
  at::parallel_for(0, chunks, 1, [&](int64_t a, int64_t b) {
    for (int64_t c = a; c < b; ++c) {
      float *dst = S, *dsum = sp;
      if (c > 0) {
        priv[c - 1].resize(static_cast<size_t>(m * m + m));
        dst = priv[c - 1].data();
        dsum = dst + m * m;
      }
      cross_rows(t, xp, x.stride(0), p, yp, y.stride(0), q, std::min(n, c * step), std::min(n, (c + 1) * step), kc,
                 dst, dsum);
    }
  });
  for (auto& v : priv) {
    add_into(S, v.data(), m * m);
    add_into(sp, v.data() + m * m, m);
  }
  mirror_upper(S, m);
}

// dx (n, p) fp32, unit column stride <- [x' y'] w + 1 vᵀ for x (n, p), y (n, q) fp32 with unit
// column stride, w (p + q, p) and v (p) contiguous fp32; rows split over at most `chunks` threads.
void cross_backward_shifted_(const Tensor& x, const Tensor& y, const Tensor& w, const Tensor& v, const Tensor& dx,
                             int64_t chunks, const std::string& isa) {
  constexpr const char* fn = "cross_backward_shifted_";
  check_activation(fn, x, "x");
  check_activation(fn, y, "y");
  const int64_t n = x.size(0), p = x.size(1), q = y.size(1), nj = p + q + 1;
  GK_CHECK(fn, y.size(0) == n, "x has ", n, " rows but y has ", y.size(0));
  GK_CHECK(fn, chunks >= 1, "chunks must be positive");
  GK_CHECK(fn, w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.size(0) == p + q && w.size(1) == p &&
               w.device().is_cpu(),
           "w must be a contiguous float32 CPU tensor of shape (", p + q, ", ", p, ")");
  GK_CHECK(fn, v.scalar_type() == at::kFloat && v.is_contiguous() && v.dim() == 1 && v.size(0) == p && v.device().is_cpu(),
           "v must be a contiguous float32 CPU tensor of shape (", p, ")");
  GK_CHECK(fn, dx.scalar_type() == at::kFloat && dx.dim() == 2 && dx.size(0) == n && dx.size(1) == p &&
               (dx.stride(1) == 1 || p <= 1) && dx.device().is_cpu(),
           "dx must be a float32 CPU tensor of shape (", n, ", ", p, ") with unit column stride");
  const GramIsa& t = pick_isa(fn, isa);
  if (n == 0 || p == 0) return;
  const int64_t MR = t.mr, W = t.w, cpanels = (p + W - 1) / W;
  // B[cp][f][c] = w[f][cp W + c], and v as feature p + q (zero past p)
  std::vector<float> B(static_cast<size_t>(cpanels * nj * W), 0.0f);
  const float* wp = w.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  for (int64_t cp = 0; cp < cpanels; ++cp)
    for (int64_t f = 0; f < nj; ++f)
      for (int64_t c = 0; c < W && cp * W + c < p; ++c)
        B[(cp * nj + f) * W + c] = f < p + q ? wp[f * p + cp * W + c] : vp[cp * W + c];
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  const int64_t ldd = dx.stride(0), panels = (n + MR - 1) / MR;
  chunks = std::max<int64_t>(1, std::min(chunks, panels));
  const int64_t step = (panels + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t a, int64_t b) {
    std::vector<float> A(static_cast<size_t>(nj * MR));
    for (int64_t c = a; c < b; ++c) {
      for (int64_t tp = c * step; tp < std::min(panels, (c + 1) * step); ++tp) {
        const int64_t i0 = tp * MR;
        pack_panel(xp, x.stride(0), p, yp, y.stride(0), q, n, i0, MR, A.data());
        for (int64_t cp = 0; cp < cpanels; ++cp)
          t.bwd_tile(A.data(), B.data() + cp * nj * W, nj, dp + i0 * ldd + cp * W, ldd, std::min(MR, n - i0),
                     std::min(W, p - cp * W), true, true);
      }
      GK_SFENCE();  // the streaming stores are visible before the thread returns
    }
  });
}

}  // namespace gk_cpu
