// guidance_kernels._cpu: what one instruction set provides to the row-shifted Gram and its
// backward. gram_shifted.cpp holds the drivers (blocking, threads, prefetch, mirror) and picks a
// table at run time; gram_avx512.cpp and gram_avx2.cpp implement the tables; tests:
// tests/test_cpu_gram.py (every table this CPU runs, against float64).
//
// Shared layouts. Gram: a block of kc columns of x' = x - 1 x0 is packed into P (groups x kc x
// 16): P[g][k][r] = x'[16g + r][k0 + k], rows past n zero. Backward dX = M x': A (panels x n x
// mr) holds M's rows, A[t][j][r] = M[mr t + r][j] (zero past n); B (panels x n x w) holds a block
// of columns of x', B[c / w][j][c % w] (zero past the block's width). Feature form (S = z'ᵀ z' for
// z' = [x' y'], cross_shifted.cpp): a block of kc rows of z' is packed into P as 16 features of one
// row per 64 bytes, P[g][k][c] = z'[k0 + k][16 g + c] (no transpose), and `tiles` computes S.
#pragma once
#include <cstdint>
#include <string>

namespace gk_cpu {

struct GramIsa {
  const char* name;
  // P <- columns k0 .. k0 + kc of x', packed as above (groups = ceil(n / 16)); lohi[0] / lohi[1]
  // <- the min / max of lohi and of the raw x read (the scale check at no extra pass)
  void (*pack)(const float* x, int64_t ldx, int64_t n, int64_t k0, int64_t kc, int64_t groups, float* P, float* lohi);
  // for every 16 x 16 tile gi >= gj: K[16 gj + j][16 gi + i] (=|+=) sum_k P[gi][k][i] P[gj][k][j]
  // (the upper triangle of K, n x n; rows and columns past n skipped); `first`: store, not add
  void (*tiles)(const float* P, int64_t kc, int64_t groups, int64_t n, float* K, bool first);
  int64_t mr, w;  // the backward's micro-tile: mr rows x w columns of dX
  // B <- columns k0 .. k0 + cols of x' in panels of w columns, as above
  void (*pack_cols)(const float* x, int64_t ldx, int64_t n, int64_t k0, int64_t cols, float* B);
  // out[r][c] (=|+=) sum_{j < nj} A[j][r] B[j][c] for r < rows, c < cols (<= w), A and B one
  // panel each; `first`: store, not add; `last`: no later call adds (streaming stores allowed)
  void (*bwd_tile)(const float* A, const float* B, int64_t nj, float* out, int64_t ldo, int64_t rows, int64_t cols,
                   bool first, bool last);
  // P[g][k][c] <- x'[k0 + k][16 g + c] for k < kc, groups g < ceil(cols / 16) (group stride
  // gstride floats, columns past cols zero), x' = x - 1 x[0] (row 0 at x, row stride ldx);
  // sums[16 g + c] += the sum of those kc values (summed in the block first)
  void (*pack_rows)(const float* x, int64_t ldx, int64_t cols, int64_t k0, int64_t kc, int64_t gstride, float* P,
                    float* sums);
};

// gram_shifted.cpp: the table named `isa` ("" or "best": the best this CPU runs; an error that
// names `fn` and what is available otherwise), and helpers the drivers share
const GramIsa& pick_isa(const char* fn, const std::string& isa);
void mirror_upper(float* K, int64_t n);  // K's strict lower triangle <- its upper triangle
void add_into(float* dst, const float* src, int64_t count);

// the tables, or nullptr where this build or CPU lacks the instruction set
const GramIsa* avx512_isa();
const GramIsa* avx2_isa();

}  // namespace gk_cpu
