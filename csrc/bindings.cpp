// Host API of guidance_kernels._C: argument checks (flash-attention habit), output allocation,
// work-list construction and the grouped launches. The kernels live in the .cu files and see
// only api.h; this is the one translation unit that includes torch / pybind11. (Over 400 lines
// on purpose: splitting it would compile the torch / pybind11 headers, the build's critical
// path, once more per file.)
//
// Every function takes a whole list of layers of ONE dtype (float32, float16 or bfloat16); the
// Python backend (guidance_kernels/backends/cuda.py) groups mixed lists by dtype and sends
// float64 to the reference backend. Checks run in this order so that they can be exercised on a
// machine without a GPU: list lengths, rank, dtype, shapes, strides, and devices last.

// Light headers instead of <torch/extension.h> (which pulls in the whole C++ frontend): the
// Tensor class, the ATen op used here and torch's pybind11 type casters. This file is the
// critical path of the build, so this roughly halves the build time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "api.h"

#define GK_CHECK(cond, ...) TORCH_CHECK(cond, "guidance_kernels._C.", __func__, ": ", __VA_ARGS__)

#define CHECK_CUDA_CALL(expr)                                                                   \
  do {                                                                                          \
    const cudaError_t err_ = (expr);                                                            \
    TORCH_CHECK(err_ == cudaSuccess, "guidance_kernels._C: CUDA error in " #expr ": ",          \
                cudaGetErrorString(err_));                                                      \
  } while (0)

namespace {

using at::Tensor;
using TensorList = std::vector<Tensor>;

std::string item(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

#define CHECK_SAME_LENGTH(a, b)                                                                 \
  GK_CHECK(a.size() == b.size(), #a " and " #b " must have the same length, got ", a.size(),    \
           " and ", b.size())

gk::DType to_gk(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return gk::DType::F32;
    case at::kHalf: return gk::DType::F16;
    case at::kBFloat16: return gk::DType::BF16;
    default: TORCH_CHECK(false, "unreachable dtype");
  }
}

// An activation: 2-D, float32/float16/bfloat16 (all of a list the same), unit column stride,
// non-overlapping rows, sizes that fit the kernels' index types.
void check_activation(const Tensor& x, const std::string& name, at::ScalarType dtype,
                      const char* fn) {
  TORCH_CHECK(x.dim() == 2, "guidance_kernels._C.", fn, ": ", name,
              " must be 2-D (n, features), got shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "guidance_kernels._C.",
              fn, ": ", name, " has dtype ", st,
              "; the CUDA kernels take float32, float16 or bfloat16 (float64 runs on the reference "
              "backend)");
  TORCH_CHECK(st == dtype, "guidance_kernels._C.", fn, ": ", name, " has dtype ", st,
              " but the first tensor of the list has ", dtype,
              "; one call takes one dtype (the Python backend groups lists by dtype)");
  TORCH_CHECK(x.size(0) < (int64_t(1) << 31), "guidance_kernels._C.", fn, ": ", name,
              " has too many rows (", x.size(0), ")");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "guidance_kernels._C.", fn, ": ", name,
              " must have unit stride along its last dimension, got strides ", x.strides(),
              "; call .contiguous() first");
  TORCH_CHECK(x.size(0) <= 1 || x.stride(0) >= x.size(1), "guidance_kernels._C.", fn, ": ",
              name, " has overlapping rows (strides ", x.strides(), " for shape ", x.sizes(), ")");
}

// A float32 matrix operand (the small n x n / p x p / q x p / p factors): exact shape, contiguous.
void check_f32(const Tensor& m, const std::string& name, at::IntArrayRef shape, const char* fn) {
  TORCH_CHECK(m.scalar_type() == at::kFloat, "guidance_kernels._C.", fn, ": ", name,
              " must be float32, got ", m.scalar_type());
  TORCH_CHECK(m.sizes() == shape, "guidance_kernels._C.", fn, ": ", name, " must have shape ",
              shape, ", got ", m.sizes());
  TORCH_CHECK(m.is_contiguous(), "guidance_kernels._C.", fn, ": ", name,
              " must be contiguous, got strides ", m.strides());
}

void check_device(const Tensor& t, const std::string& name, const at::Device& device,
                  const char* fn) {
  TORCH_CHECK(t.is_cuda(), "guidance_kernels._C.", fn, ": ", name,
              " must be a CUDA tensor, got device ", t.device(),
              " (the CUDA backend runs on CUDA tensors only)");
  TORCH_CHECK(t.device() == device, "guidance_kernels._C.", fn, ": ", name, " is on ",
              t.device(), " but the first tensor is on ", device, "; all must share one device");
}

int sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int n = 0;
    CHECK_CUDA_CALL(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n > 0 ? n : 1;
  }
  return cache[device];
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Copies the host descriptor bytes to the device through pinned memory, asynchronously on the
// current stream (no host sync). The device buffer is used on the stream it was allocated on, so
// the caching allocator keeps it alive until the kernels that read it have run. During CUDA-graph
// capture the copy is replayed from the same host buffer, so that buffer is kept (unchanged) for
// the life of the process, one per distinct descriptor (pointers are static in a graph).
Tensor upload(const std::vector<uint8_t>& bytes, const at::Device& device) {
  auto host = at::empty({static_cast<int64_t>(bytes.size())},
                        at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), bytes.data(), bytes.size());
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CHECK_CUDA_CALL(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(), &status));
  if (status != cudaStreamCaptureStatusNone) {
    static std::mutex mu;
    static std::map<std::vector<uint8_t>, Tensor> kept;
    std::lock_guard<std::mutex> lock(mu);
    host = kept.emplace(bytes, host).first->second;
  }
  return host.to(device, /*non_blocking=*/true);
}

template <typename T>
void append(std::vector<uint8_t>& buf, const std::vector<T>& items) {
  const size_t off = buf.size();
  buf.resize(off + items.size() * sizeof(T));
  if (!items.empty()) std::memcpy(buf.data() + off, items.data(), items.size() * sizeof(T));
  while (buf.size() % 16) buf.push_back(0);
}

// Split-K planning for the forward products: every work item covers roughly the same number
// of (tile x K) units, about 4 items per SM in total, and at least kMinChunk of K each.
constexpr int64_t kMinChunk = 1024;

int64_t plan_chunk(int64_t total_units, int sms) {
  const int64_t target_items = 4 * static_cast<int64_t>(sms);
  int64_t chunk = std::max<int64_t>(kMinChunk, cdiv(total_units, target_items));
  return cdiv(chunk, gk::kTileK) * gk::kTileK;
}

struct FwdPlan {
  std::vector<gk::FwdJob> jobs;
  std::vector<int64_t> tiles;  // tiles per job (triangular for symmetric jobs)
};

// Fill jobs' accumulate flags and the work list; returns the device descriptor buffer.
Tensor build_fwd(FwdPlan& plan, const at::Device& device, int64_t* num_work_out,
                 size_t* work_offset_out) {
  int64_t total_units = 0;
  for (size_t j = 0; j < plan.jobs.size(); ++j) total_units += plan.tiles[j] * plan.jobs[j].K;
  const int64_t chunk = plan_chunk(total_units, sm_count(device.index()));
  std::vector<gk::FwdWork> work;
  for (size_t j = 0; j < plan.jobs.size(); ++j) {
    gk::FwdJob& J = plan.jobs[j];
    const int64_t splits = J.K > 0 ? cdiv(J.K, chunk) : 0;
    J.accumulate = (splits != 1) ? 1 : 0;  // K == 0: zero fill only
    const int64_t tm = cdiv(J.M, gk::kTileM), tn = cdiv(J.N, gk::kTileN);
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t k0 = s * chunk, k1 = std::min<int64_t>(J.K, k0 + chunk);
      for (int64_t ti = 0; ti < tm; ++ti) {
        for (int64_t tj = J.symmetric ? ti : 0; tj < tn; ++tj) {
          gk::FwdWork w;
          w.job = static_cast<int32_t>(j);
          w.ti = static_cast<int32_t>(ti);
          w.tj = static_cast<int32_t>(tj);
          w.pad = 0;
          w.k0 = k0;
          w.k1 = k1;
          work.push_back(w);
        }
      }
    }
  }
  GK_CHECK(static_cast<int64_t>(work.size()) < (int64_t(1) << 31), "too many work items");
  std::vector<uint8_t> bytes;
  append(bytes, plan.jobs);
  *work_offset_out = bytes.size();
  append(bytes, work);
  *num_work_out = static_cast<int64_t>(work.size());
  return upload(bytes, device);
}

at::TensorOptions f32_on(const at::Device& d) { return at::TensorOptions().dtype(at::kFloat).device(d); }

}  // namespace

// ------------------------------------------------------------------------------------ gram
// Every product is of the row-shifted activation x' = x - 1 x[0] (x'[i][f] = x[i][f] - x[0][f]);
// the kernels subtract row 0 while loading tiles (no copy of the activation, no extra pass).
// xs[i]: (n_i, p_i) -> [x' @ x'.T] as (n_i, n_i) float32.
TensorList gram(const TensorList& xs) {
  if (xs.empty()) return {};
  const auto dtype = xs[0].scalar_type();
  for (size_t i = 0; i < xs.size(); ++i) check_activation(xs[i], item("xs", i), dtype, "gram");
  const at::Device device = xs[0].device();
  for (size_t i = 0; i < xs.size(); ++i) check_device(xs[i], item("xs", i), device, "gram");

  const c10::cuda::CUDAGuard guard(device);
  TensorList out;
  FwdPlan plan;
  for (const auto& x : xs) {
    const int64_t n = x.size(0), p = x.size(1);
    out.push_back(at::empty({n, n}, f32_on(device)));
    gk::FwdJob J{};
    J.u = J.v = x.data_ptr();
    J.ldu = J.ldv = x.stride(0);
    J.K = p;
    J.out = out.back().data_ptr<float>();
    J.M = J.N = J.ldo = static_cast<int32_t>(n);
    J.symmetric = 1;
    plan.jobs.push_back(J);
    const int64_t t = cdiv(n, gk::kTileM);
    plan.tiles.push_back(t * (t + 1) / 2);
  }
  int64_t num_work = 0;
  size_t work_off = 0;
  Tensor desc = build_fwd(plan, device, &num_work, &work_off);
  const auto* base = desc.data_ptr<uint8_t>();
  CHECK_CUDA_CALL(gk::launch_gram_fwd(to_gk(dtype), reinterpret_cast<const gk::FwdJob*>(base),
                                      static_cast<int>(plan.jobs.size()),
                                      reinterpret_cast<const gk::FwdWork*>(base + work_off),
                                      num_work, c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

// ms[i]: (n_i, n_i) float32, xs[i]: (n_i, p_i) -> [ms[i] @ x'] as (n_i, p_i) in xs' dtype.
TensorList gram_backward(const TensorList& ms, const TensorList& xs) {
  CHECK_SAME_LENGTH(ms, xs);
  if (xs.empty()) return {};
  const auto dtype = xs[0].scalar_type();
  for (size_t i = 0; i < xs.size(); ++i) {
    check_activation(xs[i], item("xs", i), dtype, "gram_backward");
    check_f32(ms[i], item("ms", i), {xs[i].size(0), xs[i].size(0)}, "gram_backward");
  }
  const at::Device device = xs[0].device();
  for (size_t i = 0; i < xs.size(); ++i) {
    check_device(xs[i], item("xs", i), device, "gram_backward");
    check_device(ms[i], item("ms", i), device, "gram_backward");
  }

  const c10::cuda::CUDAGuard guard(device);
  TensorList out;
  std::vector<gk::BwdJob> jobs;
  int64_t blocks = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const int64_t n = xs[i].size(0), p = xs[i].size(1);
    out.push_back(at::empty({n, p}, xs[i].options().memory_format(at::MemoryFormat::Contiguous)));
    const int64_t nb = cdiv(n, gk::kTileM) * cdiv(p, gk::kTileN);
    if (nb == 0) continue;
    gk::BwdJob J{};
    J.nterms = 1;
    J.a[0] = ms[i].data_ptr();
    J.lda[0] = n;
    J.b[0] = xs[i].data_ptr();
    J.ldb[0] = xs[i].stride(0);
    J.K[0] = n;
    J.M = static_cast<int32_t>(n);
    J.N = p;
    J.out = out.back().data_ptr();
    J.ldo = p;
    J.bias = nullptr;
    J.work_begin = blocks;
    blocks += nb;
    jobs.push_back(J);
  }
  if (jobs.empty()) return out;
  std::vector<uint8_t> bytes;
  append(bytes, jobs);
  Tensor desc = upload(bytes, device);
  CHECK_CUDA_CALL(gk::launch_gram_bwd(to_gk(dtype),
                                      reinterpret_cast<const gk::BwdJob*>(desc.data_ptr<uint8_t>()),
                                      static_cast<int>(jobs.size()), blocks,
                                      c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

// ------------------------------------------------------------------------------------ cross
// Pairs xs[i]: (n_i, p_i), ys[i]: (n_i, q_i) -> ([x'ᵀx'], [y'ᵀy'], [x'ᵀy'], [Σ_rows x'], [Σ_rows y'])
// with x' = x - 1 x[0], y' = y - 1 y[0].
std::tuple<TensorList, TensorList, TensorList, TensorList, TensorList> cross(const TensorList& xs,
                                                                             const TensorList& ys) {
  CHECK_SAME_LENGTH(xs, ys);
  TensorList aa, bb, cc, sx, sy;
  if (xs.empty()) return {aa, bb, cc, sx, sy};
  const auto dtype = xs[0].scalar_type();
  for (size_t i = 0; i < xs.size(); ++i) {
    check_activation(xs[i], item("xs", i), dtype, "cross");
    check_activation(ys[i], item("ys", i), dtype, "cross");
    GK_CHECK(xs[i].size(0) == ys[i].size(0), "xs[", i, "] and ys[", i,
             "] must have the same number of rows, got ", xs[i].sizes(), " and ", ys[i].sizes());
  }
  const at::Device device = xs[0].device();
  for (size_t i = 0; i < xs.size(); ++i) {
    check_device(xs[i], item("xs", i), device, "cross");
    check_device(ys[i], item("ys", i), device, "cross");
  }

  const c10::cuda::CUDAGuard guard(device);
  FwdPlan plan;
  for (size_t i = 0; i < xs.size(); ++i) {
    const auto &x = xs[i], &y = ys[i];
    const int64_t n = x.size(0), p = x.size(1), q = y.size(1);
    GK_CHECK(p < (int64_t(1) << 31) && q < (int64_t(1) << 31), "feature dims too large");
    aa.push_back(at::empty({p, p}, f32_on(device)));
    bb.push_back(at::empty({q, q}, f32_on(device)));
    cc.push_back(at::empty({p, q}, f32_on(device)));
    sx.push_back(at::empty({p}, f32_on(device)));
    sy.push_back(at::empty({q}, f32_on(device)));
    const int64_t tp = cdiv(p, gk::kTileM), tq = cdiv(q, gk::kTileM);
    auto job = [&](const Tensor& u, const Tensor& v, const Tensor& o, int32_t M, int32_t N,
                   int sym) {
      gk::FwdJob J{};
      J.u = u.data_ptr();
      J.v = v.data_ptr();
      J.ldu = u.stride(0);
      J.ldv = v.stride(0);
      J.K = n;
      J.out = o.data_ptr<float>();
      J.M = M;
      J.N = N;
      J.ldo = N;
      J.symmetric = sym;
      return J;
    };
    // The column sums of x' / y' ride on the symmetric jobs' first tile row (ti == 0 covers
    // every column once), so they are right even when the other side is empty (p or q == 0).
    gk::FwdJob A = job(x, x, aa.back(), p, p, 1);
    A.sum_v = sx.back().data_ptr<float>();
    plan.jobs.push_back(A);
    plan.tiles.push_back(tp * (tp + 1) / 2);
    gk::FwdJob B = job(y, y, bb.back(), q, q, 1);
    B.sum_v = sy.back().data_ptr<float>();
    plan.jobs.push_back(B);
    plan.tiles.push_back(tq * (tq + 1) / 2);
    plan.jobs.push_back(job(x, y, cc.back(), p, q, 0));
    plan.tiles.push_back(tp * tq);
  }
  int64_t num_work = 0;
  size_t work_off = 0;
  Tensor desc = build_fwd(plan, device, &num_work, &work_off);
  const auto* base = desc.data_ptr<uint8_t>();
  CHECK_CUDA_CALL(gk::launch_cross_fwd(to_gk(dtype), reinterpret_cast<const gk::FwdJob*>(base),
                                       static_cast<int>(plan.jobs.size()),
                                       reinterpret_cast<const gk::FwdWork*>(base + work_off),
                                       num_work, c10::cuda::getCurrentCUDAStream().stream()));
  return {aa, bb, cc, sx, sy};
}

// [x' @ ms[i] + y' @ ns[i] + vs[i]]: x (n,p), m (p,p), y (n,q), n (q,p), v (p,) -> (n,p), with
// x' = x - 1 x[0], y' = y - 1 y[0].
TensorList cross_backward(const TensorList& xs, const TensorList& ms, const TensorList& ys,
                          const TensorList& ns, const TensorList& vs) {
  CHECK_SAME_LENGTH(xs, ms);
  CHECK_SAME_LENGTH(xs, ys);
  CHECK_SAME_LENGTH(xs, ns);
  CHECK_SAME_LENGTH(xs, vs);
  if (xs.empty()) return {};
  const auto dtype = xs[0].scalar_type();
  for (size_t i = 0; i < xs.size(); ++i) {
    check_activation(xs[i], item("xs", i), dtype, "cross_backward");
    check_activation(ys[i], item("ys", i), dtype, "cross_backward");
    const int64_t n = xs[i].size(0), p = xs[i].size(1), q = ys[i].size(1);
    GK_CHECK(ys[i].size(0) == n, "xs[", i, "] and ys[", i,
             "] must have the same number of rows, got ", xs[i].sizes(), " and ", ys[i].sizes());
    check_f32(ms[i], item("ms", i), {p, p}, "cross_backward");
    check_f32(ns[i], item("ns", i), {q, p}, "cross_backward");
    check_f32(vs[i], item("vs", i), {p}, "cross_backward");
  }
  const at::Device device = xs[0].device();
  for (size_t i = 0; i < xs.size(); ++i) {
    check_device(xs[i], item("xs", i), device, "cross_backward");
    check_device(ms[i], item("ms", i), device, "cross_backward");
    check_device(ys[i], item("ys", i), device, "cross_backward");
    check_device(ns[i], item("ns", i), device, "cross_backward");
    check_device(vs[i], item("vs", i), device, "cross_backward");
  }

  const c10::cuda::CUDAGuard guard(device);
  TensorList out;
  std::vector<gk::BwdJob> jobs;
  int64_t blocks = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const int64_t n = xs[i].size(0), p = xs[i].size(1), q = ys[i].size(1);
    out.push_back(at::empty({n, p}, xs[i].options().memory_format(at::MemoryFormat::Contiguous)));
    const int64_t nb = cdiv(n, gk::kTileM) * cdiv(p, gk::kTileN);
    if (nb == 0) continue;
    gk::BwdJob J{};
    J.nterms = 2;
    J.a[0] = xs[i].data_ptr();
    J.lda[0] = xs[i].stride(0);
    J.b[0] = ms[i].data_ptr();
    J.ldb[0] = p;
    J.K[0] = p;
    J.a[1] = ys[i].data_ptr();
    J.lda[1] = ys[i].stride(0);
    J.b[1] = ns[i].data_ptr();
    J.ldb[1] = p;
    J.K[1] = q;
    J.M = static_cast<int32_t>(n);
    J.N = p;
    J.out = out.back().data_ptr();
    J.ldo = p;
    J.bias = vs[i].data_ptr<float>();
    J.work_begin = blocks;
    blocks += nb;
    jobs.push_back(J);
  }
  if (jobs.empty()) return out;
  std::vector<uint8_t> bytes;
  append(bytes, jobs);
  Tensor desc = upload(bytes, device);
  CHECK_CUDA_CALL(gk::launch_cross_bwd(to_gk(dtype),
                                       reinterpret_cast<const gk::BwdJob*>(desc.data_ptr<uint8_t>()),
                                       static_cast<int>(jobs.size()), blocks,
                                       c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "guidance_kernels CUDA kernels: grouped Gram / cross-covariance products and their "
            "backward passes (see guidance_kernels.backends.cuda)";
  m.def("gram", &gram,
        "[x' @ x'.T] (fp32), x' = x - x[0] (row-shifted), for a list of 2-D CUDA tensors of one "
        "dtype",
        py::arg("xs"));
  m.def("gram_backward", &gram_backward, "[m @ x'] in x's dtype (x' = x - x[0])", py::arg("ms"),
        py::arg("xs"));
  m.def("cross", &cross,
        "([x'ᵀx'], [y'ᵀy'], [x'ᵀy'], [Σx'], [Σy']) (fp32) for pairs (x' = x - x[0], y' = y - y[0])",
        py::arg("xs"), py::arg("ys"));
  m.def("cross_backward", &cross_backward, "[x' @ m + y' @ n + v] in x's dtype (row-shifted)",
        py::arg("xs"), py::arg("ms"), py::arg("ys"), py::arg("ns"), py::arg("vs"));
  m.attr("ROW_SHIFTED") = true;
  m.attr("TILE_M") = gk::kTileM;
  m.attr("TILE_K") = gk::kTileK;
}
