// guidance_kernels._cpu: the CKA statistics of stacked fp32 centered Grams and their backward in
// one pass each, without the fp64 Gram-sized temporaries of the torch formulation (4 MiB each
// at n = 256 and 8 pairs; their allocation and page faults cost more than the arithmetic).
// Reference: metrics.gram_stats (forward) and ops/stats.py _bwd (backward); Python side:
// backends/cpu_stats.py; tests: tests/test_cpu_stats.py.
//
// Forward: st[i] = (Σ K∘L, Σ K∘K, Σ L∘L, tr K, tr L) in fp64 (products of fp32 values are exact
// there), summed per row into 8 partial sums, rows combined in order. Backward, per element,
// the torch formulation's fp64 operations in its order, then rounded to fp32:
// dK = g0 L + (2 g1) K (+ g3 on the diagonal), dL = g0 K + (2 g2) L (+ g4 on the diagonal).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "cpu.h"

namespace gk_cpu {
namespace {

#define GK_STATS_CHECK(cond, ...) TORCH_CHECK(cond, "guidance_kernels._cpu.gram_stats: ", __VA_ARGS__)

void check_stack(const at::Tensor& t, const char* name, int64_t P, int64_t n) {
  GK_STATS_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous() && t.dim() == 3 &&
                     t.size(0) == P && t.size(1) == n && t.size(2) == n,
                 name, " must be a contiguous float32 CPU tensor of shape (", P, ", ", n, ", ", n, "), got ",
                 t.sizes(), " ", t.scalar_type());
}

// o[c] <- fp32(ga a[c] + gb b[c], plus d where c == r), each product and sum rounded in fp64
void grad_row(float* o, const float* a, const float* b, double ga, double gb, double d, int64_t r, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    const double p0 = ga * static_cast<double>(a[c]), p1 = gb * static_cast<double>(b[c]);
    const double v = p0 + p1;
    o[c] = static_cast<float>(c == r ? v + d : v);
  }
}

}  // namespace

void gram_stats_(const at::Tensor& k, const at::Tensor& l, const at::Tensor& out) {
  GK_STATS_CHECK(k.dim() == 3, "k must be (P, n, n), got ", k.sizes());
  const int64_t P = k.size(0), n = k.size(1);
  check_stack(k, "k", P, n);
  check_stack(l, "l", P, n);
  GK_STATS_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous() && out.dim() == 2 && out.size(0) == P &&
                     out.size(1) == 5 && out.device().is_cpu(),
                 "out must be a contiguous float64 CPU tensor of shape (", P, ", 5)");
  const float* kp = k.data_ptr<float>();
  const float* lp = l.data_ptr<float>();
  double* op = out.data_ptr<double>();
  at::parallel_for(0, P, 1, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const float* K = kp + i * n * n;
      const float* L = lp + i * n * n;
      double kl = 0, kk = 0, ll = 0, tk = 0, tl = 0;
      for (int64_t r = 0; r < n; ++r) {
        double s[3][8] = {};
        const float* kr = K + r * n;
        const float* lr = L + r * n;
        int64_t c = 0;
        for (; c + 8 <= n; c += 8)
          for (int u = 0; u < 8; ++u) {
            const double x = kr[c + u], y = lr[c + u];
            s[0][u] += x * y;
            s[1][u] += x * x;
            s[2][u] += y * y;
          }
        for (; c < n; ++c) {
          const double x = kr[c], y = lr[c];
          s[0][0] += x * y;
          s[1][0] += x * x;
          s[2][0] += y * y;
        }
        for (int u = 0; u < 8; ++u) {
          kl += s[0][u];
          kk += s[1][u];
          ll += s[2][u];
        }
        tk += kr[r];
        tl += lr[r];
      }
      double* o = op + 5 * i;
      o[0] = kl;
      o[1] = kk;
      o[2] = ll;
      o[3] = tk;
      o[4] = tl;
    }
  });
}

void gram_stats_backward_(const at::Tensor& g, const at::Tensor& k, const at::Tensor& l, const at::Tensor& dk,
                          const at::Tensor& dl) {
  const int64_t P = k.size(0), n = k.dim() == 3 ? k.size(1) : 0;
  check_stack(k, "k", P, n);
  check_stack(l, "l", P, n);
  GK_STATS_CHECK(g.scalar_type() == at::kDouble && g.is_contiguous() && g.dim() == 2 && g.size(0) == P &&
                     g.size(1) == 5 && g.device().is_cpu(),
                 "g must be a contiguous float64 CPU tensor of shape (", P, ", 5)");
  const bool want_k = dk.defined() && dk.numel() > 0, want_l = dl.defined() && dl.numel() > 0;
  if (want_k) check_stack(dk, "dk", P, n);
  if (want_l) check_stack(dl, "dl", P, n);
  const double* gp = g.data_ptr<double>();
  const float* kp = k.data_ptr<float>();
  const float* lp = l.data_ptr<float>();
  float* dkp = want_k ? dk.data_ptr<float>() : nullptr;
  float* dlp = want_l ? dl.data_ptr<float>() : nullptr;
  at::parallel_for(0, P * n, 16, [&](int64_t a, int64_t b) {
    for (int64_t row = a; row < b; ++row) {
      const int64_t i = row / n, r = row % n;
      const double* gi = gp + 5 * i;
      const double g0 = gi[0], g1 = 2 * gi[1], g2 = 2 * gi[2];
      const float* kr = kp + row * n;
      const float* lr = lp + row * n;
      if (want_k) grad_row(dkp + row * n, lr, kr, g0, g1, gi[3], r, n);
      if (want_l) grad_row(dlp + row * n, kr, lr, g0, g2, gi[4], r, n);
    }
  });
}

}  // namespace gk_cpu
