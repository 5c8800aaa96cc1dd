// Forward kernel of the gram and cross ops (gram_fwd.cu, cross_fwd.cu): grouped split-K products,
// gram in NT layout (CROSS = false), cross in TN layout (CROSS = true).
// One launch covers every layer: blockIdx.x indexes a work list of (job, tile, K-range) items.
// Every product is of the row-shifted activations x' = x - 1 x[0] (subtracted in fp32 while the
// tiles are loaded). Each 64 x 64 output tile is accumulated in fp32 by tensor cores: fp32 inputs
// use 3xTF32 WMMA 16x16x8 on x' (~fp32 accuracy); bf16/fp16 inputs split x' into bf16 hi + lo
// and use up to three bf16 WMMA 16x16x16 products (the lo ones are skipped for K steps where
// x' is exact in bf16). Results are added to the zero-initialised fp32 output with atomics
// (split K) or stored, mirrored for symmetric off-diagonal tiles.
#pragma once

#include "common.cuh"

namespace gk {

// Zero the outputs (M x N, contiguous: ldo == N) and column sums of the split-K jobs.
// grid: (x blocks striding the elements, y blocks striding the jobs). A template so that each
// kernel file that includes this header can emit it without a link-time clash.
template <int kUnused = 0>
__global__ void zero_outputs_kernel(const FwdJob* __restrict__ jobs, int num_jobs) {
  for (int j = blockIdx.y; j < num_jobs; j += gridDim.y) {
    const FwdJob J = jobs[j];
    if (!J.accumulate) continue;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    const int64_t start = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t total = int64_t(J.M) * J.ldo;
    for (int64_t i = start; i < total; i += stride) J.out[i] = 0.f;
    if (J.sum_u != nullptr)
      for (int64_t i = start; i < J.M; i += stride) J.sum_u[i] = 0.f;
    if (J.sum_v != nullptr)
      for (int64_t i = start; i < J.N; i += stride) J.sum_v[i] = 0.f;
  }
}

__device__ __forceinline__ void add_or_store(float* p, float v, bool accumulate) {
  if (accumulate) {
    atomicAdd(p, v);
  } else {
    *p = v;
  }
}

template <typename T, bool CROSS>
struct FwdSmem {
  using S = typename Elem<T>::storage;
  static constexpr bool kSplit = sizeof(S) == 2;  // 16-bit inputs: bf16 hi + lo tiles
  static constexpr int kPad = 16 / sizeof(S);
  static constexpr int kRows = CROSS ? kTileK : kTileM;  // shared tile rows
  static constexpr int kCols = CROSS ? kTileM : kTileK;  // shared tile cols
  static constexpr int kLd = kCols + kPad;
  static constexpr int kElems = kRows * kLd;
};

// acc[i][j] += U_tile * V_tile for this warp's 32 x 32 quarter, 16-bit inputs held as bf16
// hi + lo pairs: hi*hi (+ lo*hi + hi*lo when `with_lo`, block-uniform). bf16 WMMA products are
// exact and accumulate in fp32, so this is ~16-bit-pair accurate (the lo*lo term, <= 2^-16 of
// the product, is dropped).
template <bool CROSS, typename Acc>
__device__ __forceinline__ void fwd_mma_16bit(Acc (&acc)[2][2], const __nv_bfloat16* sUh,
                                              const __nv_bfloat16* sUl, const __nv_bfloat16* sVh,
                                              const __nv_bfloat16* sVl, int wm, int wn,
                                              bool with_lo) {
  constexpr int LD = FwdSmem<__nv_bfloat16, CROSS>::kLd;
  using LayoutA = typename std::conditional<CROSS, wmma::col_major, wmma::row_major>::type;
  using LayoutB = typename std::conditional<CROSS, wmma::row_major, wmma::col_major>::type;
#pragma unroll
  for (int kk = 0; kk < kTileK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, LayoutA> a[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, LayoutB> b[2];
    if (with_lo) {
      // lo(U) * hi(V), then hi(U) * lo(V): small terms first.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int m = wm * 32 + i * 16;
        wmma::load_matrix_sync(a[i], CROSS ? sUl + kk * LD + m : sUl + m * LD + kk, LD);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = wn * 32 + j * 16;
        wmma::load_matrix_sync(b[j], CROSS ? sVh + kk * LD + n : sVh + n * LD + kk, LD);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int m = wm * 32 + i * 16;
        wmma::load_matrix_sync(a[i], CROSS ? sUh + kk * LD + m : sUh + m * LD + kk, LD);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = wn * 32 + j * 16;
        wmma::load_matrix_sync(b[j], CROSS ? sVl + kk * LD + n : sVl + n * LD + kk, LD);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = wn * 32 + j * 16;
        wmma::load_matrix_sync(b[j], CROSS ? sVh + kk * LD + n : sVh + n * LD + kk, LD);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int m = wm * 32 + i * 16;
        wmma::load_matrix_sync(a[i], CROSS ? sUh + kk * LD + m : sUh + m * LD + kk, LD);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = wn * 32 + j * 16;
        wmma::load_matrix_sync(b[j], CROSS ? sVh + kk * LD + n : sVh + n * LD + kk, LD);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
  }
}

// Same for fp32 inputs: 3xTF32 (a_lo*b_hi + a_hi*b_lo + a_hi*b_hi).
template <bool CROSS, typename Acc>
__device__ __forceinline__ void fwd_mma_f32(Acc (&acc)[2][2], const float* sU, const float* sV,
                                            int wm, int wn) {
  constexpr int LD = FwdSmem<float, CROSS>::kLd;
  using LayoutA = typename std::conditional<CROSS, wmma::col_major, wmma::row_major>::type;
  using LayoutB = typename std::conditional<CROSS, wmma::row_major, wmma::col_major>::type;
#pragma unroll
  for (int kk = 0; kk < kTileK; kk += 8) {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LayoutA> ah[2], al[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LayoutB> bh[2], bl[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int m = wm * 32 + i * 16;
      wmma::load_matrix_sync(ah[i], CROSS ? sU + kk * LD + m : sU + m * LD + kk, LD);
      split_tf32(ah[i], al[i]);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int n = wn * 32 + j * 16;
      wmma::load_matrix_sync(bh[j], CROSS ? sV + kk * LD + n : sV + n * LD + kk, LD);
      split_tf32(bh[j], bl[j]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::mma_sync(acc[i][j], al[i], bh[j], acc[i][j]);
        wmma::mma_sync(acc[i][j], ah[i], bl[j], acc[i][j]);
        wmma::mma_sync(acc[i][j], ah[i], bh[j], acc[i][j]);
      }
  }
}

// Sum of the shifted tile's column c (this K step) from shared memory.
template <bool SPLIT, int LD>
__device__ __forceinline__ float tile_colsum(const void* s_hi, const void* s_lo, int c) {
  float t = 0.f;
  if constexpr (SPLIT) {
    const __nv_bfloat16* h = static_cast<const __nv_bfloat16*>(s_hi);
    const __nv_bfloat16* l = static_cast<const __nv_bfloat16*>(s_lo);
#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk)
      t += __bfloat162float(h[kk * LD + c]) + __bfloat162float(l[kk * LD + c]);
  } else {
    const float* f = static_cast<const float*>(s_hi);
#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk) t += f[kk * LD + c];
  }
  return t;
}

// Products of the row-shifted activations U' = U - 1 U[0], V' = V - 1 V[0] (row 0 = the first
// sample: in NT the first row of U/V, in TN the first row of the K range's matrix, i.e. J.u/J.v
// itself; the shift is applied while loading, see load_tile_fwd).
template <typename T, bool CROSS>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const FwdJob* __restrict__ jobs, const FwdWork* __restrict__ work) {
#if GK_TENSOR_CORES
  using S = typename Elem<T>::storage;
  using Sm = FwdSmem<T, CROSS>;
  constexpr bool kSplit = Sm::kSplit;
  constexpr int LD = Sm::kLd;
  constexpr int VEC = 16 / sizeof(S);
  __shared__ __align__(128) S sU[Sm::kElems];
  __shared__ __align__(128) S sV[Sm::kElems];
  __shared__ __align__(128) S sUl[kSplit ? Sm::kElems : 1];
  __shared__ __align__(128) S sVl[kSplit ? Sm::kElems : 1];
  __shared__ __align__(128) float sC[kTileM * kLdC];

  const FwdWork w = work[blockIdx.x];
  const FwdJob J = jobs[w.job];
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;
  const int64_t m0 = int64_t(w.ti) * kTileM;
  const int64_t n0 = int64_t(w.tj) * kTileN;
  const S* U = static_cast<const S*>(J.u);
  const S* V = static_cast<const S*>(J.v);
  const bool vu = aligned16(U) && (J.ldu % VEC == 0);
  const bool vv = aligned16(V) && (J.ldv % VEC == 0);
  // Column sums (cross only): threads 0..63 sum U's tile columns, 64..127 V's.
  const bool do_su = CROSS && J.sum_u != nullptr && w.tj == 0;
  const bool do_sv = CROSS && J.sum_v != nullptr && w.ti == 0;
  float colsum = 0.f;

  // Reference values (row 0) for this thread's tile columns. TN: the columns are features, fixed
  // for the block, so they are loaded once; NT: the columns are the K range, reloaded per step.
  float refU[VEC], refV[VEC];
  if constexpr (CROSS) {
    load_ref_row<T, VEC>(refU, U, m0 + thread_col<kTileM, VEC>(), J.M, vu);
    load_ref_row<T, VEC>(refV, V, n0 + thread_col<kTileN, VEC>(), J.N, vv);
  }

  using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, (sizeof(S) == 2 ? 16 : 8), float>;
  AccFrag acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t k = w.k0; k < w.k1; k += kTileK) {
    bool lo = false;
    if constexpr (CROSS) {
      lo |= load_tile_fwd<T, kTileK, kTileM, LD>(sU, sUl, U, J.ldu, k, m0, w.k1, J.M, vu, refU);
      lo |= load_tile_fwd<T, kTileK, kTileN, LD>(sV, sVl, V, J.ldv, k, n0, w.k1, J.N, vv, refV);
    } else {
      const int64_t kc = k + thread_col<kTileK, VEC>();
      load_ref_row<T, VEC>(refU, U, kc, w.k1, vu);
      load_ref_row<T, VEC>(refV, V, kc, w.k1, vv);
      lo |= load_tile_fwd<T, kTileM, kTileK, LD>(sU, sUl, U, J.ldu, m0, k, J.M, w.k1, vu, refU);
      lo |= load_tile_fwd<T, kTileN, kTileK, LD>(sV, sVl, V, J.ldv, n0, k, J.N, w.k1, vv, refV);
    }
    // One barrier that also tells every warp whether any lo part of this step is nonzero.
    const bool with_lo = __syncthreads_or(lo) != 0;
    if constexpr (CROSS) {
      if (do_su && tid < kTileM) colsum += tile_colsum<kSplit, LD>(sU, sUl, tid);
      if (do_sv && tid >= kThreads - kTileN)
        colsum += tile_colsum<kSplit, LD>(sV, sVl, tid - (kThreads - kTileN));
    }
    if constexpr (kSplit) {
      fwd_mma_16bit<CROSS>(acc, reinterpret_cast<const __nv_bfloat16*>(sU),
                        reinterpret_cast<const __nv_bfloat16*>(sUl),
                        reinterpret_cast<const __nv_bfloat16*>(sV),
                        reinterpret_cast<const __nv_bfloat16*>(sVl), wm, wn, with_lo);
    } else {
      (void)with_lo;
      fwd_mma_f32<CROSS>(acc, reinterpret_cast<const float*>(sU), reinterpret_cast<const float*>(sV),
                      wm, wn);
    }
    __syncthreads();
  }

  // Epilogue: stage the fp32 tile in shared memory, then add it (and its mirror) to the output.
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(sC + (wm * 32 + i * 16) * kLdC + wn * 32 + j * 16, acc[i][j], kLdC,
                              wmma::mem_row_major);
  __syncthreads();
  const int64_t M = J.M, N = J.N, ldo = J.ldo;
  const bool acc_out = J.accumulate != 0;
  for (int idx = tid; idx < kTileM * kTileN; idx += kThreads) {
    const int r = idx / kTileN, c = idx % kTileN;
    if (m0 + r < M && n0 + c < N) add_or_store(J.out + (m0 + r) * ldo + n0 + c, sC[r * kLdC + c], acc_out);
  }
  if (J.symmetric && w.ti != w.tj) {
    // out[n][m] += tile[m][n]; consecutive threads walk m so the global adds stay coalesced.
    for (int idx = tid; idx < kTileM * kTileN; idx += kThreads) {
      const int c = idx / kTileM, r = idx % kTileM;
      if (m0 + r < M && n0 + c < N) add_or_store(J.out + (n0 + c) * ldo + m0 + r, sC[r * kLdC + c], acc_out);
    }
  }
  if constexpr (CROSS) {
    if (do_su && tid < kTileM && m0 + tid < M) add_or_store(J.sum_u + m0 + tid, colsum, acc_out);
    if (do_sv && tid >= kThreads - kTileN) {
      const int c = tid - (kThreads - kTileN);
      if (n0 + c < N) add_or_store(J.sum_v + n0 + c, colsum, acc_out);
    }
  }
#else
  __trap();
#endif
}

// Host-side launcher shared by gram_fwd.cu (CROSS = false: NT layout) and cross_fwd.cu
// (CROSS = true: TN layout).
template <bool CROSS>
cudaError_t launch_forward(DType dt, const FwdJob* jobs, int num_jobs,
                               const FwdWork* work, int64_t num_work, cudaStream_t stream) {
  if (num_jobs > 0) {
    const dim3 zgrid(64, num_jobs < 65535 ? num_jobs : 65535);
    zero_outputs_kernel<0><<<zgrid, 256, 0, stream>>>(jobs, num_jobs);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (num_work <= 0) return cudaSuccess;
  if (num_work > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(num_work));
  switch (dt) {
    case DType::F32:
      forward_kernel<float, CROSS><<<grid, kThreads, 0, stream>>>(jobs, work);
      break;
    case DType::F16:
      forward_kernel<__half, CROSS><<<grid, kThreads, 0, stream>>>(jobs, work);
      break;
    case DType::BF16:
      forward_kernel<__nv_bfloat16, CROSS><<<grid, kThreads, 0, stream>>>(jobs, work);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace gk
