"""Build script. The pure-Python package always installs; the CPU extension
``guidance_kernels._cpu`` (``csrc/cpu``) is added whenever torch imports at build time, and the CUDA extension
``guidance_kernels._C`` (sources in ``csrc/``) is added when a CUDA toolkit (nvcc) and a CUDA
build of torch are present. Install torch first and build without isolation:

    pip install torch
    pip install --no-build-isolation -e ".[dev]"

Environment switches (see docs/cuda.md):

``GUIDANCE_KERNELS_SKIP_CUDA_BUILD=1``  never build the CUDA extension.
``GUIDANCE_KERNELS_SKIP_CPU_BUILD=1``   never build the CPU extension ``guidance_kernels._cpu``
                                        (``csrc/cpu``: AVX-512 / AVX2 kernels, any C++17 compiler;
                                        without it the CPU path uses MKL through PyTorch).
``GUIDANCE_KERNELS_FORCE_BUILD=1``      both extensions are required: a missing toolkit or a CPU-only
                                        torch is an error instead of a skipped build.
``GUIDANCE_KERNELS_CUDA_ARCHS``         target architectures, ``;``/``,``/space separated, each
                                        ``80``, ``8.0``, ``sm_80`` or ``90a``, optionally with
                                        ``+PTX``; default ``80+PTX;90a`` (SASS for sm_80 and
                                        sm_90a, plus compute_80 PTX that later GPUs JIT-compile).
``MAX_JOBS``                            parallel compile jobs for ninja (torch's switch).
``NVCC_THREADS``                        ``nvcc --threads`` (parallel gencode targets per file).
``CUDA_HOME``                           the toolkit; by default found from ``nvcc`` on PATH,
                                        following wrapper scripts to the real toolkit.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "guidance_kernels._C"
SOURCES = [
    "csrc/bindings.cpp",
    "csrc/gram_fwd.cu",
    "csrc/gram_bwd.cu",
    "csrc/cross_fwd.cu",
    "csrc/cross_bwd.cu",
]
CPU_EXT_NAME = "guidance_kernels._cpu"
CPU_SOURCES = ["csrc/cpu/module.cpp", "csrc/cpu/gram_shifted.cpp", "csrc/cpu/gram_avx512.cpp", "csrc/cpu/gram_avx2.cpp", "csrc/cpu/cross_shifted.cpp", "csrc/cpu/gram_stats.cpp", "csrc/cpu/pool.cpp"]
DEFAULT_ARCHS = "80+PTX;90a"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"[guidance_kernels setup] {msg}", file=sys.stderr)


def _toolkit_of(nvcc: str) -> str | None:
    """The toolkit folder (the one holding bin/nvcc and include/cuda.h) behind ``nvcc``, which
    may be a symlink or a small wrapper script that execs the real nvcc."""
    nvcc = os.path.realpath(nvcc)
    cand = os.path.dirname(os.path.dirname(nvcc))
    if os.path.isfile(os.path.join(cand, "include", "cuda.h")):
        return cand
    try:  # a shell wrapper: look for an absolute path to another nvcc inside it
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(b"#!"):
        for m in re.finditer(rb"(/[^\s\"'$;|&]+/bin/nvcc)\b", head):
            real = m.group(1).decode()
            if os.path.realpath(real) != nvcc and os.path.isfile(real):
                return _toolkit_of(real)
    return None


def _find_cuda_home() -> str | None:
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and os.path.isfile(os.path.join(env, "bin", "nvcc")):
        return _toolkit_of(os.path.join(env, "bin", "nvcc")) or env
    nvcc = shutil.which("nvcc")
    if nvcc:
        return _toolkit_of(nvcc)
    for guess in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if os.path.isfile(os.path.join(guess, "bin", "nvcc")):
            return _toolkit_of(os.path.join(guess, "bin", "nvcc"))
    return None


def _arch_flags(spec: str) -> list[str]:
    flags: list[str] = []
    for raw in re.split(r"[;,\s]+", spec.strip()):
        if not raw:
            continue
        item = raw.lower()
        ptx = item.endswith("+ptx")
        item = item[:-4] if ptx else item
        item = item.removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", item):
            raise SystemExit(f"GUIDANCE_KERNELS_CUDA_ARCHS: cannot parse {raw!r} (use e.g. 80;90a;100+PTX)")
        if int(re.match(r"\d+", item).group()) < 80:
            raise SystemExit(
                f"GUIDANCE_KERNELS_CUDA_ARCHS: {raw!r} is below sm_80; the kernels use bf16/tf32 "
                "tensor cores (Ampere or newer)"
            )
        flags.append(f"-gencode=arch=compute_{item},code=sm_{item}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{item},code=compute_{item}")
    if not flags:
        raise SystemExit("GUIDANCE_KERNELS_CUDA_ARCHS is empty")
    return flags


def _extra_include_dirs() -> list[str]:
    """Headers that torch's ATen/cuda includes pull in (cusparse.h, cublas_v2.h) are missing from
    some toolkit installs but ship in the ``nvidia`` pip packages that come with torch
    (``site-packages/nvidia/cu13/include``, or ``nvidia/cublas/include`` etc. for CUDA 12).
    They are searched *after* the toolkit (``-idirafter``) so they never shadow its headers."""
    dirs: list[str] = []
    for sp in sys.path:
        base = os.path.join(sp, "nvidia")
        if not os.path.isdir(base):
            continue
        for d in sorted(glob.glob(os.path.join(base, "*", "include"))):
            has = any(os.path.isfile(os.path.join(d, h)) for h in ("cusparse.h", "cublas_v2.h"))
            if has and d not in dirs:
                dirs.append(d)
    return dirs


def _cuda_extension():
    """Returns (ext_modules, cmdclass) for the CUDA build, or ([], {}) with a reason logged."""
    if _flag("GUIDANCE_KERNELS_SKIP_CUDA_BUILD"):
        _log("GUIDANCE_KERNELS_SKIP_CUDA_BUILD set: installing without the CUDA extension")
        return [], {}
    force = _flag("GUIDANCE_KERNELS_FORCE_BUILD")

    def skip(why: str):
        if force:
            raise SystemExit(f"GUIDANCE_KERNELS_FORCE_BUILD is set but the CUDA extension cannot be built: {why}")
        _log(f"not building the CUDA extension: {why}")
        return [], {}

    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return skip("no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset)")
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it to the real toolkit.
    os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as e:
        return skip(
            f"torch is not importable at build time ({e}); install torch first and build with "
            "`pip install --no-build-isolation`"
        )
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")

    arch_flags = _arch_flags(os.environ.get("GUIDANCE_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS))
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *arch_flags]
    if os.environ.get("NVCC_THREADS"):
        nvcc_flags += ["--threads", os.environ["NVCC_THREADS"]]
    _log(f"building {EXT_NAME} with CUDA_HOME={cuda_home}, torch {torch.__version__} "
         f"(CUDA {torch.version.cuda}), {' '.join(arch_flags)}")
    after = [f for d in _extra_include_dirs() for f in ("-idirafter", d)]
    ext = CUDAExtension(
        name=EXT_NAME,
        sources=SOURCES,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-g0", *after], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _cpu_extension():
    """The CPU extension ``guidance_kernels._cpu`` (C++ files in ``csrc/cpu``, built whenever torch imports at
    build time; its AVX-512 / AVX2 code is chosen at run time, so it builds on any CPU)."""
    if _flag("GUIDANCE_KERNELS_SKIP_CPU_BUILD"):
        _log("GUIDANCE_KERNELS_SKIP_CPU_BUILD set: installing without the CPU extension")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:
        if _flag("GUIDANCE_KERNELS_FORCE_BUILD"):
            raise SystemExit(f"GUIDANCE_KERNELS_FORCE_BUILD is set but torch is not importable: {e}")
        _log(f"not building the CPU extension: torch is not importable at build time ({e})")
        return [], {}
    # OpenMP: at::parallel_for is serial without it; no contraction: cpu_stats' bit-identity
    flags = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off"]
    ext = CppExtension(name=CPU_EXT_NAME, sources=CPU_SOURCES, extra_compile_args={"cxx": flags}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


cuda_modules, cmdclass = _cuda_extension()
cpu_modules, cpu_cmdclass = _cpu_extension()
setup(ext_modules=cuda_modules + cpu_modules, cmdclass={**cpu_cmdclass, **cmdclass})
