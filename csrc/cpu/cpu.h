// guidance_kernels._cpu: declarations shared by the CPU extension's files (module.cpp binds them).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace gk_cpu {

// gram_shifted.cpp: the row-shifted Gram and its backward (AVX-512 or AVX2 + FMA; isa "" = the best)
std::vector<std::string> isas();  // the instruction sets this CPU and build run, best first
bool supported();                 // isas() is not empty
// an error naming `fn` and `name` unless t is a 2-D float32 CPU tensor with unit column stride
void check_activation(const char* fn, const at::Tensor& t, const char* name);
void gram_shifted_(const at::Tensor& x, const at::Tensor& out, int64_t kc, int64_t chunks, const at::Tensor& range,
                   const std::string& isa);
void gram_backward_shifted_(const at::Tensor& m, const at::Tensor& x, const at::Tensor& dx, int64_t kc, int64_t chunks,
                            const std::string& isa);

// cross_shifted.cpp: the feature form's z'ᵀz' (z' = [x' y'], each side padded to 16 features) and
// the column sums of z'
void cross_shifted_(const at::Tensor& x, const at::Tensor& y, const at::Tensor& out, const at::Tensor& sums, int64_t kc,
                    int64_t chunks, const std::string& isa);
// and its backward dx = [x' y'] w + 1 vᵀ
void cross_backward_shifted_(const at::Tensor& x, const at::Tensor& y, const at::Tensor& w, const at::Tensor& v,
                             const at::Tensor& dx, int64_t chunks, const std::string& isa);

// gram_stats.cpp: CKA statistics of stacked fp32 centered Grams (P, n, n) -> (P, 5) fp64, and backward
void gram_stats_(const at::Tensor& k, const at::Tensor& l, const at::Tensor& out);
void gram_stats_backward_(const at::Tensor& g, const at::Tensor& k, const at::Tensor& l, const at::Tensor& dk,
                          const at::Tensor& dl);

// pool.cpp: large CPU tensors whose pages are kept for reuse
at::Tensor pooled_empty(const std::vector<int64_t>& sizes, at::ScalarType dtype);
void pool_set_limit(int64_t bytes);
void pool_trim();
std::vector<int64_t> pool_stats();  // {cached bytes, cached blocks, limit, hits, misses}

}  // namespace gk_cpu
