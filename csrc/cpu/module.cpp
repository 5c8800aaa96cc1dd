// guidance_kernels._cpu: the Python bindings of the CPU extension (kernels: gram_shifted.cpp,
// gram_stats.cpp; the block cache: pool.cpp).
#include <torch/csrc/utils/pybind.h>

#include "cpu.h"

PYBIND11_MODULE(_cpu, m) {
  using namespace gk_cpu;
  namespace py = pybind11;
  m.doc() = "guidance_kernels CPU extension: row-shifted Gram and backward (AVX-512, AVX2), and a cache of large CPU blocks";
  m.def("isas", &isas, "the instruction sets of the Gram kernels this CPU and build run, best first");
  m.def("supported", &supported, "whether this CPU and build run the Gram kernels (AVX-512 or AVX2 + FMA)");
  m.def("gram_shifted_", &gram_shifted_, py::arg("x"), py::arg("out"), py::arg("kc"), py::arg("chunks"),
        py::arg("range"), py::arg("isa") = "",
        "out (n, n) <- (x - 1 x[0])(x - 1 x[0])ᵀ, fp32; range (2 or empty) <- {min, max} of x; isa: one of isas() "
        "('' = the best)");
  m.def("gram_backward_shifted_", &gram_backward_shifted_, py::arg("m"), py::arg("x"), py::arg("dx"), py::arg("kc"),
        py::arg("chunks"), py::arg("isa") = "", "dx (n, p) <- m (x - 1 x[0]), fp32; isa: one of isas() ('' = the best)");
  m.def("cross_shifted_", &cross_shifted_, py::arg("x"), py::arg("y"), py::arg("out"), py::arg("sums"), py::arg("kc"),
        py::arg("chunks"), py::arg("isa") = "",
        "out (m, m) <- z'ᵀz', sums (m) <- column sums of z' = [x - 1 x[0]  y - 1 y[0]] with each side padded to a "
        "multiple of 16 features (m = 16 (ceil(p / 16) + ceil(q / 16))), fp32");
  m.def("cross_backward_shifted_", &cross_backward_shifted_, py::arg("x"), py::arg("y"), py::arg("w"), py::arg("v"),
        py::arg("dx"), py::arg("chunks"), py::arg("isa") = "",
        "dx (n, p) <- [x - 1 x[0]  y - 1 y[0]] w + 1 vᵀ for w (p + q, p), v (p), fp32");
  m.def("gram_stats_", &gram_stats_, py::arg("k"), py::arg("l"), py::arg("out"),
        "out (P, 5) fp64 <- (sum K*L, sum K*K, sum L*L, tr K, tr L) of fp32 k, l (P, n, n)");
  m.def("gram_stats_backward_", &gram_stats_backward_, py::arg("g"), py::arg("k"), py::arg("l"), py::arg("dk"),
        py::arg("dl"), "dk, dl (P, n, n) fp32 (empty: skipped) <- the gradients of gram_stats_ for g (P, 5) fp64");
  m.def("pooled_empty", &pooled_empty, py::arg("sizes"), py::arg("dtype"),
        "an uninitialised contiguous CPU tensor whose 2 MiB-aligned block returns to the cache when it dies");
  m.def("pool_set_limit", &pool_set_limit, py::arg("bytes"), "most bytes the cache keeps (0: none); trims at once");
  m.def("pool_trim", &pool_trim, "free every cached block");
  m.def("pool_stats", &pool_stats, "[cached bytes, cached blocks, limit, hits, misses]");
}
