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
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu.h"
#include "gram_isa.h"

namespace {

using at::Tensor;
using gk_cpu::GramIsa;

#define GK_CHECK(cond, ...) TORCH_CHECK(cond, "guidance_kernels._cpu.cross_shifted_: ", __VA_ARGS__)

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

void check_side(const Tensor& t, const char* name) {
  GK_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && t.device().is_cpu(), name,
           " must be a 2-D float32 CPU tensor, got ", t.sizes(), " ", t.scalar_type());
  GK_CHECK(t.stride(1) == 1 || t.size(1) <= 1, name, " must have unit column stride, got strides ", t.strides());
}

}  // namespace

namespace gk_cpu {

// out (m, m) fp32 contiguous <- z'ᵀ z' and sums (m) fp32 <- the column sums of z', z' = [x' y']
// with each side's features padded to a multiple of 16 (m = 16 (ceil(p / 16) + ceil(q / 16));
// y's block starts at 16 ceil(p / 16); padded rows and columns are zero); rows in blocks of kc,
// split over at most `chunks` threads (each a private S).
void cross_shifted_(const Tensor& x, const Tensor& y, const Tensor& out, const Tensor& sums, int64_t kc, int64_t chunks,
                    const std::string& isa) {
  check_side(x, "x");
  check_side(y, "y");
  const int64_t n = x.size(0), p = x.size(1), q = y.size(1), m = 16 * (groups_of(p) + groups_of(q));
  GK_CHECK(y.size(0) == n, "x has ", n, " rows but y has ", y.size(0));
  GK_CHECK(kc >= 1 && chunks >= 1, "kc and chunks must be positive");
  GK_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == m &&
               out.size(1) == m && out.device().is_cpu(),
           "out must be a contiguous float32 CPU tensor of shape (", m, ", ", m, ")");
  GK_CHECK(sums.scalar_type() == at::kFloat && sums.is_contiguous() && sums.dim() == 1 && sums.size(0) == m &&
               sums.device().is_cpu(),
           "sums must be a contiguous float32 CPU tensor of shape (", m, ")");
  const GramIsa& t = pick_isa("cross_shifted_", isa);
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

}  // namespace gk_cpu
