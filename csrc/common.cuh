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

// ------------------------------------------------------------------ global -> shared tiles
// Copy the R x C tile starting at (r0, c0) of the row-major matrix g (row stride ld, unit column
// stride) into shared s (row stride LDS), zero-filling rows >= rmax and columns >= cmax. Raw
// copy (no conversion). 16-byte vector loads when the whole vector is in bounds and aligned.
template <typename S, int R, int C, int LDS>
__device__ __forceinline__ void load_tile_raw(S* __restrict__ s, const S* __restrict__ g,
                                              int64_t ld, int64_t r0, int64_t c0, int64_t rmax,
                                              int64_t cmax, bool vec_ok) {
  constexpr int VEC = 16 / sizeof(S);
  static_assert(C % VEC == 0, "tile width must be a multiple of the vector width");
  static_assert((LDS * sizeof(S)) % 16 == 0, "shared row stride must keep 16-byte alignment");
  constexpr int VPR = C / VEC;
  constexpr int NV = R * VPR;
#pragma unroll
  for (int i = threadIdx.x; i < NV; i += kThreads) {
    const int r = i / VPR;
    const int c = (i % VPR) * VEC;
    const int64_t gr = r0 + r;
    const int64_t gc = c0 + c;
    S* dst = s + r * LDS + c;
    if (vec_ok && gr < rmax && gc + VEC <= cmax) {
      *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(g + gr * ld + gc));
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        dst[e] = (gr < rmax && gc + e < cmax) ? g[gr * ld + gc + e] : S(0);
      }
    }
  }
}

// Same, converting elements of type T to fp32 in shared memory (4 elements per thread-step).
template <typename T, int R, int C, int LDS>
__device__ __forceinline__ void load_tile_f32(float* __restrict__ s,
                                              const typename Elem<T>::storage* __restrict__ g,
                                              int64_t ld, int64_t r0, int64_t c0, int64_t rmax,
                                              int64_t cmax, bool vec_ok) {
  using S = typename Elem<T>::storage;
  static_assert(C % 4 == 0 && LDS % 4 == 0, "tile widths must be multiples of 4");
  constexpr int GPR = C / 4;
  constexpr int NG = R * GPR;
#pragma unroll
  for (int i = threadIdx.x; i < NG; i += kThreads) {
    const int r = i / GPR;
    const int c = (i % GPR) * 4;
    const int64_t gr = r0 + r;
    const int64_t gc = c0 + c;
    float4 v;
    if (vec_ok && gr < rmax && gc + 4 <= cmax) {
      const S* src = g + gr * ld + gc;
      if constexpr (sizeof(S) == 4) {
        v = __ldg(reinterpret_cast<const float4*>(src));
      } else {
        const uint2 raw = __ldg(reinterpret_cast<const uint2*>(src));
        v.x = Elem<T>::to_float(static_cast<uint16_t>(raw.x & 0xffffu));
        v.y = Elem<T>::to_float(static_cast<uint16_t>(raw.x >> 16));
        v.z = Elem<T>::to_float(static_cast<uint16_t>(raw.y & 0xffffu));
        v.w = Elem<T>::to_float(static_cast<uint16_t>(raw.y >> 16));
      }
    } else {
      float t[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        t[e] = (gr < rmax && gc + e < cmax) ? Elem<T>::to_float(g[gr * ld + gc + e]) : 0.f;
      }
      v = make_float4(t[0], t[1], t[2], t[3]);
    }
    *reinterpret_cast<float4*>(s + r * LDS + c) = v;
  }
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
