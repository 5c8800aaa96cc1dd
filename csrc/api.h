// Plain host-side interface between bindings.cpp (torch, pybind11) and the kernel files (.cu).
// Kept free of torch and of heavy CUDA headers so that the kernel translation units compile
// quickly and in parallel; only <cuda_runtime_api.h> for cudaStream_t / cudaError_t.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace gk {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Tile sizes shared by host (work-list construction) and device code.
constexpr int kTileM = 64;  // output tile rows
constexpr int kTileN = 64;  // output tile cols
constexpr int kTileK = 32;  // reduction step per shared-memory stage

// ---------------------------------------------------------------------------------------------
// Forward "product" jobs (split-K, fp32 atomics into zero-initialised outputs), of the
// row-shifted activations U' = U - 1 U[0], V' = V - 1 V[0] (row 0 = the first sample, at u / v):
//   layout NT (gram):  out[m][n] += sum_k U'[m][k] * V'[n][k]    U: M x K, V: N x K (row-major)
//   layout TN (cross): out[m][n] += sum_k U'[k][m] * V'[k][n]    U: K x M, V: K x N (row-major)
// U/V are activations (dtype DType) with unit column stride and row stride ldu/ldv (elements).
// symmetric: U == V and M == N; only tiles ti <= tj are listed and off-diagonal tiles are
// mirrored into out[n][m] as well.
// sum_u / sum_v (TN only, may be null): column sums of U' / V' (length M / N), accumulated by
// the tiles with tj == 0 / ti == 0 (cross puts them on its symmetric jobs, as sum_v).
// accumulate == 0 when the job's K range is a single split: each output element then has one
// writer and is stored (no zero fill, no atomics).
struct FwdJob {
  const void* u;
  const void* v;
  int64_t ldu;
  int64_t ldv;
  int64_t K;
  float* out;
  float* sum_u;
  float* sum_v;
  int32_t M;
  int32_t N;
  int32_t ldo;
  int32_t symmetric;
  int32_t accumulate;  // 1: split-K (outputs zeroed first, atomic adds); 0: one writer, stores
  int32_t pad;
};

struct FwdWork {
  int32_t job;
  int32_t ti;  // tile row index (units of kTileM)
  int32_t tj;  // tile col index (units of kTileN)
  int32_t pad;
  int64_t k0;  // reduction range [k0, k1)
  int64_t k1;
};

// ---------------------------------------------------------------------------------------------
// Backward jobs: out[m][j] = sum_t sum_k A_t[m][k] * B_t[k][j] + bias[j]   (out: M x N, x dtype)
// where the activation operand is row-shifted (x' = x - 1 x[0]) as it is loaded:
//   gram_backward  (kind 0): one term, A = ms (fp32, M x M, row-major, lda), B = x'.
//   cross_backward (kind 1): two terms, A_t = activation (x', then y'), B_t = fp32 (m, then n);
//                            bias = v (fp32, may be null).
// Every element of out is written exactly once (no atomics, no zero fill needed).
struct BwdJob {
  const void* a[2];
  const void* b[2];
  int64_t lda[2];
  int64_t ldb[2];
  int64_t K[2];
  int64_t N;
  int64_t ldo;
  int64_t work_begin;  // first block of this job; jobs are sorted by it and have >= 1 block
  void* out;           // activation dtype, M x N, row stride ldo
  const float* bias;   // length N or null
  int32_t nterms;
  int32_t M;
};
// Block b of a backward launch belongs to the last job with work_begin <= b; within the job,
// tile index t = b - work_begin, ti = t % ceil(M / kTileM) (fastest, so that the blocks sharing a
// column panel of the activation run together), tj = t / ceil(M / kTileM).

// Zero the outputs (and sums) of `jobs` (device array), then accumulate every work item.
// Both arrays live in device memory. Returns the first CUDA error (launch errors only).
cudaError_t launch_gram_fwd(DType dt, const FwdJob* jobs, int num_jobs,
                            const FwdWork* work, int64_t num_work, cudaStream_t stream);
cudaError_t launch_cross_fwd(DType dt, const FwdJob* jobs, int num_jobs,
                             const FwdWork* work, int64_t num_work, cudaStream_t stream);
cudaError_t launch_gram_bwd(DType dt, const BwdJob* jobs, int num_jobs, int64_t num_blocks,
                            cudaStream_t stream);
cudaError_t launch_cross_bwd(DType dt, const BwdJob* jobs, int num_jobs, int64_t num_blocks,
                             cudaStream_t stream);

}  // namespace gk
