// Backward kernel of the gram and cross ops (gram_bwd.cu, cross_bwd.cu): out = sum_t A_t B_t
// (+ bias), one fp32 operand and one row-shifted activation operand x' = x - 1 x[0] per term
// (A is the activation when CROSS, B otherwise), written in the activation dtype.
//   gram_backward  (CROSS = false): out = ms @ x'                 (ms fp32 n x n, x n x p)
//   cross_backward (CROSS = true):  out = x' @ m + y' @ n + v
// Both operands are staged in shared memory as fp32 (x' subtracted in fp32 while loading) and
// multiplied with 3xTF32 WMMA (16x16x8): each operand split into hi + lo TF32 parts, three MMAs.
// (x' of bf16/fp16 activations is no longer exact in TF32, so both sides are split for every
// dtype: ~fp32 accuracy before the final rounding to the activation dtype.)
// Each output element has exactly one writer: no atomics, no zero fill, no K split (K <= p+q).
#pragma once

#include "common.cuh"

namespace gk {

constexpr int kLdA = kTileK + 4;  // fp32 A tile (64 x 32) row stride
constexpr int kLdB = kTileN + 4;  // fp32 B tile (32 x 64) row stride

template <bool EXACT_A, bool EXACT_B, typename Acc>
__device__ __forceinline__ void backward_mma(Acc (&acc)[2][2], const float* sA, const float* sB,
                                          int wm, int wn) {
#pragma unroll
  for (int kk = 0; kk < kTileK; kk += 8) {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> ah[2], al[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> bh[2], bl[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      wmma::load_matrix_sync(ah[i], sA + (wm * 32 + i * 16) * kLdA + kk, kLdA);
      if constexpr (EXACT_A) {
        round_tf32(ah[i]);
      } else {
        split_tf32(ah[i], al[i]);
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::load_matrix_sync(bh[j], sB + kk * kLdB + wn * 32 + j * 16, kLdB);
      if constexpr (EXACT_B) {
        round_tf32(bh[j]);
      } else {
        split_tf32(bh[j], bl[j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if constexpr (!EXACT_A) wmma::mma_sync(acc[i][j], al[i], bh[j], acc[i][j]);
        if constexpr (!EXACT_B) wmma::mma_sync(acc[i][j], ah[i], bl[j], acc[i][j]);
        wmma::mma_sync(acc[i][j], ah[i], bh[j], acc[i][j]);
      }
  }
}

template <typename T, bool CROSS>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const BwdJob* __restrict__ jobs, int num_jobs) {
#if GK_TENSOR_CORES
  using S = typename Elem<T>::storage;
  __shared__ __align__(128) float sA[kTileM * kLdA];
  __shared__ __align__(128) float sB[kTileK * kLdB];
  __shared__ __align__(128) float sC[kTileM * kLdC];

  // Find this block's job: the last one with work_begin <= blockIdx.x (binary search).
  const int64_t b = blockIdx.x;
  int lo = 0, hi = num_jobs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (jobs[mid].work_begin <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const BwdJob& Jg = jobs[lo];
  const int64_t tiles_m = (int64_t(Jg.M) + kTileM - 1) / kTileM;
  const int64_t local = b - Jg.work_begin;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;
  const int64_t m0 = (local % tiles_m) * kTileM;
  const int64_t n0 = (local / tiles_m) * kTileN;
  const int64_t M = Jg.M, N = Jg.N;

  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  const int nterms = Jg.nterms;
  for (int t = 0; t < nterms; ++t) {
    const int64_t K = Jg.K[t], lda = Jg.lda[t], ldb = Jg.ldb[t];
    const void* a = Jg.a[t];
    const void* b = Jg.b[t];
    // Vector loads: 16 bytes for fp32 rows, 8 bytes (4 elements) for 16-bit rows.
    const bool va = CROSS ? ((reinterpret_cast<uintptr_t>(a) % (4 * sizeof(S))) == 0 && lda % 4 == 0)
                             : (aligned16(a) && lda % 4 == 0);
    const bool vb = CROSS ? (aligned16(b) && ldb % 4 == 0)
                             : ((reinterpret_cast<uintptr_t>(b) % (4 * sizeof(S))) == 0 && ldb % 4 == 0);
    // Reference row (row 0 of the activation) for this thread's 4 tile columns. gram_backward:
    // the columns are features n0.., fixed for the block; cross_backward: the K range (features
    // k..), reloaded per step.
    float ref[4] = {0.f, 0.f, 0.f, 0.f};
    if constexpr (!CROSS) {
      load_ref_row<T, 4>(ref, static_cast<const S*>(b), n0 + thread_col<kTileN, 4>(), N, vb);
    }
    for (int64_t k = 0; k < K; k += kTileK) {
      if constexpr (CROSS) {
        load_ref_row<T, 4>(ref, static_cast<const S*>(a), k + thread_col<kTileK, 4>(), K, va);
        load_tile_f32<T, kTileM, kTileK, kLdA, true>(sA, static_cast<const S*>(a), lda, m0, k, M, K, va, ref);
        load_tile_f32<float, kTileK, kTileN, kLdB, false>(sB, static_cast<const float*>(b), ldb, k, n0, K, N, vb, ref);
      } else {
        load_tile_f32<float, kTileM, kTileK, kLdA, false>(sA, static_cast<const float*>(a), lda, m0, k, M, K, va, ref);
        load_tile_f32<T, kTileK, kTileN, kLdB, true>(sB, static_cast<const S*>(b), ldb, k, n0, K, N, vb, ref);
      }
      __syncthreads();
      backward_mma<false, false>(acc, sA, sB, wm, wn);
      __syncthreads();
    }
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(sC + (wm * 32 + i * 16) * kLdC + wn * 32 + j * 16, acc[i][j], kLdC,
                              wmma::mem_row_major);
  __syncthreads();
  T* out = static_cast<T*>(Jg.out);
  const float* bias = Jg.bias;
  const int64_t ldo = Jg.ldo;
  for (int idx = tid; idx < kTileM * kTileN; idx += kThreads) {
    const int r = idx / kTileN, c = idx % kTileN;
    if (m0 + r < M && n0 + c < N) {
      float v = sC[r * kLdC + c];
      if (bias != nullptr) v += bias[n0 + c];
      out[(m0 + r) * ldo + n0 + c] = Elem<T>::from_float(v);
    }
  }
#else
  __trap();
#endif
}

template <bool CROSS>
cudaError_t launch_backward(DType dt, const BwdJob* jobs, int num_jobs, int64_t num_blocks,
                             cudaStream_t stream) {
  if (num_blocks <= 0 || num_jobs <= 0) return cudaSuccess;
  if (num_blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(num_blocks));
  switch (dt) {
    case DType::F32:
      backward_kernel<float, CROSS><<<grid, kThreads, 0, stream>>>(jobs, num_jobs);
      break;
    case DType::F16:
      backward_kernel<__half, CROSS><<<grid, kThreads, 0, stream>>>(jobs, num_jobs);
      break;
    case DType::BF16:
      backward_kernel<__nv_bfloat16, CROSS><<<grid, kThreads, 0, stream>>>(jobs, num_jobs);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace gk
