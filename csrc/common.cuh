// Device-side helpers shared by the kernel files. Only CUDA headers: no torch, no pybind11.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "api.h"

// Tensor-core code (bf16 WMMA, tf32 WMMA) needs sm_80+. setup.py only targets sm_80+, but
// guard the bodies so a stray lower target still compiles (and traps if ever launched).
#if !defined(__CUDA_ARCH__) || (__CUDA_ARCH__ >= 800)
#define GK_TENSOR_CORES 1
#else
#define GK_TENSOR_CORES 0
#endif

namespace gk {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;  // 4 warps, each owns a 32 x 32 quarter of the 64 x 64 tile
constexpr int kLdC = kTileN + 4;  // fp32 staging tile row stride (floats)

// ------------------------------------------------------------------ element types
template <typename T> struct Elem;
template <> struct Elem<float> {
  using storage = float;
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <> struct Elem<__half> {
  using storage = uint16_t;
  static __device__ __forceinline__ float to_float(uint16_t v) {
    return __half2float(__ushort_as_half(v));
  }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Elem<__nv_bfloat16> {
  using storage = uint16_t;
  static __device__ __forceinline__ float to_float(uint16_t v) {
    return __bfloat162float(__ushort_as_bfloat16(v));
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ------------------------------------------------------------------ row-shifted loads
// Every product of the backend contract uses the row-shifted activation x' = x - 1 x[0]
// (x'[i][f] = x[i][f] - x[0][f]). The loaders below subtract the reference row (row 0 of the
// matrix g, i.e. the first sample) in fp32 as a tile is loaded; elements outside the matrix stay
// exactly 0 (never -x[0][f]). The difference of two bf16/fp16 values is exact in fp32 (unless
// their exponents are more than ~16 apart, then it is rounded once to fp32).
//
// With kThreads a multiple of the vectors per tile row, a thread always loads the same tile
// columns, so it needs only VEC reference values per tile (load_ref_row).
template <int C, int VEC>
__device__ __forceinline__ int thread_col() {
  constexpr int VPR = C / VEC;
  static_assert(kThreads % VPR == 0, "a thread must keep its tile columns across rows");
  return (threadIdx.x % VPR) * VEC;
}

// Read VEC consecutive elements g[gr][gc..] as fp32 (zeros out of bounds), minus ref.
template <typename T, int VEC>
__device__ __forceinline__ void read_shifted(float (&v)[VEC],
                                             const typename Elem<T>::storage* __restrict__ g,
                                             int64_t ld, int64_t gr, int64_t gc, int64_t rmax,
                                             int64_t cmax, bool vec_ok, const float (&ref)[VEC]) {
  using S = typename Elem<T>::storage;
  static_assert(VEC * sizeof(S) == 16 || VEC * sizeof(S) == 8, "8- or 16-byte vectors");
  if (vec_ok && gr < rmax && gc + VEC <= cmax) {
    const S* src = g + gr * ld + gc;
    if constexpr (VEC * sizeof(S) == 16) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
      if constexpr (sizeof(S) == 4) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = __uint_as_float(w[e]) - ref[e];
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          v[e] = Elem<T>::to_float(static_cast<uint16_t>((w[e / 2] >> (16 * (e % 2))) & 0xffffu)) - ref[e];
      }
    } else {
      const uint2 raw = __ldg(reinterpret_cast<const uint2*>(src));
      const uint32_t w[2] = {raw.x, raw.y};
      if constexpr (sizeof(S) == 4) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = __uint_as_float(w[e]) - ref[e];
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          v[e] = Elem<T>::to_float(static_cast<uint16_t>((w[e / 2] >> (16 * (e % 2))) & 0xffffu)) - ref[e];
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      v[e] = (gr < rmax && gc + e < cmax) ? Elem<T>::to_float(g[gr * ld + gc + e]) - ref[e] : 0.f;
  }
}

// ref[e] = g[0][gc + e] as fp32 (0 beyond cmax). g is the matrix base (row 0 = first sample).
template <typename T, int VEC>
__device__ __forceinline__ void load_ref_row(float (&ref)[VEC],
                                             const typename Elem<T>::storage* __restrict__ g,
                                             int64_t gc, int64_t cmax, bool vec_ok) {
  const float zero[VEC] = {};
  read_shifted<T, VEC>(ref, g, 0, 0, gc, 1, cmax, vec_ok, zero);
}

// R x C tile at (r0, c0) of g (row stride ld, unit column stride) into fp32 shared s (row stride
// LDS), 4 elements per thread-step, zero-filled outside [0, rmax) x [0, cmax). SHIFT: subtract
// the reference row (x' tiles of activations); otherwise a plain copy (the fp32 factors).
// `ref` holds this thread's 4 reference values (thread_col<C, 4>()); ignored unless SHIFT.
template <typename T, int R, int C, int LDS, bool SHIFT>
__device__ __forceinline__ void load_tile_f32(float* __restrict__ s,
                                              const typename Elem<T>::storage* __restrict__ g,
                                              int64_t ld, int64_t r0, int64_t c0, int64_t rmax,
                                              int64_t cmax, bool vec_ok, const float (&ref)[4]) {
  static_assert(C % 4 == 0 && LDS % 4 == 0, "tile widths must be multiples of 4");
  constexpr int GPR = C / 4;
  constexpr int NG = R * GPR;
  const int c = thread_col<C, 4>();
  const float zero[4] = {0.f, 0.f, 0.f, 0.f};
  const float(&sub)[4] = SHIFT ? ref : zero;
#pragma unroll
  for (int i = threadIdx.x; i < NG; i += kThreads) {
    const int r = i / GPR;
    float v[4];
    read_shifted<T, 4>(v, g, ld, r0 + r, c0 + c, rmax, cmax, vec_ok, sub);
    *reinterpret_cast<float4*>(s + r * LDS + c) = make_float4(v[0], v[1], v[2], v[3]);
  }
}

// Forward operand tiles (16-byte vectors of T), row-shifted. fp32 inputs: x' stored as fp32 in
// s_hi (3xTF32 splits it later). bf16/fp16 inputs: x' (exact in fp32) is split into two bf16
// values, hi = bf16(x') and lo = bf16(x' - hi), stored in s_hi / s_lo (~16 significant bits,
// relative error <= 2^-17; bf16 for fp16 inputs too: no overflow of x - x0, no subnormal lo).
// Returns whether this thread stored a nonzero lo (the block skips the lo products of a K step
// where every difference is exact in bf16, e.g. near-equal values or zeros).
template <typename T, int R, int C, int LDS>
__device__ __forceinline__ bool load_tile_fwd(void* __restrict__ s_hi, void* __restrict__ s_lo,
                                              const typename Elem<T>::storage* __restrict__ g,
                                              int64_t ld, int64_t r0, int64_t c0, int64_t rmax,
                                              int64_t cmax, bool vec_ok,
                                              const float (&ref)[16 / sizeof(typename Elem<T>::storage)]) {
  using S = typename Elem<T>::storage;
  constexpr int VEC = 16 / sizeof(S);
  static_assert(C % VEC == 0, "tile width must be a multiple of the vector width");
  static_assert((LDS * sizeof(S)) % 16 == 0, "shared row stride must keep 16-byte alignment");
  constexpr int VPR = C / VEC;
  constexpr int NV = R * VPR;
  const int c = thread_col<C, VEC>();
  bool any_lo = false;
#pragma unroll
  for (int i = threadIdx.x; i < NV; i += kThreads) {
    const int r = i / VPR;
    float v[VEC];
    read_shifted<T, VEC>(v, g, ld, r0 + r, c0 + c, rmax, cmax, vec_ok, ref);
    if constexpr (sizeof(S) == 4) {
      *reinterpret_cast<float4*>(static_cast<float*>(s_hi) + r * LDS + c) =
          make_float4(v[0], v[1], v[2], v[3]);
    } else {
      uint32_t hw[VEC / 2], lw[VEC / 2];
#pragma unroll
      for (int e = 0; e < VEC; e += 2) {
        const __nv_bfloat16 h0 = __float2bfloat16_rn(v[e]), h1 = __float2bfloat16_rn(v[e + 1]);
        const __nv_bfloat16 l0 = __float2bfloat16_rn(v[e] - __bfloat162float(h0));
        const __nv_bfloat16 l1 = __float2bfloat16_rn(v[e + 1] - __bfloat162float(h1));
        const uint32_t lb = uint32_t(__bfloat16_as_ushort(l0)) | (uint32_t(__bfloat16_as_ushort(l1)) << 16);
        hw[e / 2] = uint32_t(__bfloat16_as_ushort(h0)) | (uint32_t(__bfloat16_as_ushort(h1)) << 16);
        lw[e / 2] = lb;
        any_lo |= (lb & 0x7fff7fffu) != 0u;  // ignore -0
      }
      S* dh = static_cast<S*>(s_hi) + r * LDS + c;
      S* dl = static_cast<S*>(s_lo) + r * LDS + c;
      *reinterpret_cast<uint4*>(dh) = make_uint4(hw[0], hw[1], hw[2], hw[3]);
      *reinterpret_cast<uint4*>(dl) = make_uint4(lw[0], lw[1], lw[2], lw[3]);
    }
  }
  return any_lo;
}

// ------------------------------------------------------------------ tf32 splitting
// x = hi + lo with hi, lo both tf32: hi * y + lo * y recovers ~21 mantissa bits of x.
template <typename Frag>
__device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int t = 0; t < hi.num_elements; ++t) {
    const float x = hi.x[t];
    const float h = wmma::__float_to_tf32(x);
    hi.x[t] = h;
    lo.x[t] = wmma::__float_to_tf32(x - h);
  }
}

template <typename Frag>
__device__ __forceinline__ void round_tf32(Frag& f) {
#pragma unroll
  for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace gk
