"""The CUDA extension's own argument checks (``csrc/bindings.cpp``): they run before any CUDA
call, so CPU tensors reach each of them and this runs wherever the extension is built, GPU or
not."""

from __future__ import annotations

import pytest
import torch

from guidance_kernels.backends import cuda as cb

needs_ext = pytest.mark.skipif(cb._C is None, reason=f"extension not importable: {cb._IMPORT_ERROR}")


@needs_ext
class TestHostApiChecks:
    """The extension's own argument checks; they run before any CUDA call, so CPU tensors reach
    each of them (the device check comes last)."""

    def test_empty_lists(self):
        assert cb._C.gram([]) == []
        assert cb._C.gram_backward([], []) == []
        assert cb._C.cross([], []) == ([], [], [], [], [])
        assert cb._C.cross_backward([], [], [], [], []) == []

    def test_cpu_tensor(self):
        with pytest.raises(RuntimeError, match=r"gram: xs\[0\] must be a CUDA tensor, got device cpu"):
            cb._C.gram([torch.randn(4, 8)])
        with pytest.raises(RuntimeError, match=r"cross: xs\[0\] must be a CUDA tensor"):
            cb._C.cross([torch.randn(4, 8)], [torch.randn(4, 3)])
        with pytest.raises(RuntimeError, match=r"gram_backward: xs\[0\] must be a CUDA tensor"):
            cb._C.gram_backward([torch.randn(4, 4)], [torch.randn(4, 8)])
        with pytest.raises(RuntimeError, match=r"cross_backward: xs\[0\] must be a CUDA tensor"):
            cb._C.cross_backward(
                [torch.randn(4, 8)], [torch.randn(8, 8)], [torch.randn(4, 3)], [torch.randn(3, 8)], [torch.randn(8)]
            )

    @pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.bool, torch.complex64], ids=str)
    def test_bad_dtype(self, dtype):
        x = torch.zeros(4, 8, dtype=dtype)
        with pytest.raises(RuntimeError, match=r"xs\[0\] has dtype .*float32, float16 or bfloat16"):
            cb._C.gram([x])

    def test_mixed_dtypes_in_one_call(self):
        xs = [torch.randn(4, 8), torch.randn(4, 8).half()]
        with pytest.raises(RuntimeError, match=r"xs\[1\] has dtype Half but the first tensor .* Float"):
            cb._C.gram(xs)
        with pytest.raises(RuntimeError, match=r"ys\[0\] has dtype BFloat16"):
            cb._C.cross([torch.randn(4, 8)], [torch.randn(4, 8).bfloat16()])

    @pytest.mark.parametrize("shape", [(8,), (2, 3, 4), ()])
    def test_bad_rank(self, shape):
        with pytest.raises(RuntimeError, match=r"xs\[0\] must be 2-D"):
            cb._C.gram([torch.zeros(shape)])

    def test_bad_strides(self):
        x = torch.randn(8, 6).T  # (6, 8) with column stride 6
        with pytest.raises(RuntimeError, match=r"xs\[0\] must have unit stride along its last dimension"):
            cb._C.gram([x])
        y = torch.randn(1, 8).expand(4, 8)  # rows overlap (row stride 0)
        with pytest.raises(RuntimeError, match=r"xs\[0\] has overlapping rows"):
            cb._C.gram([y])

    def test_list_lengths(self):
        with pytest.raises(RuntimeError, match=r"ms and xs must have the same length, got 2 and 1"):
            cb._C.gram_backward([torch.randn(4, 4)] * 2, [torch.randn(4, 8)])
        with pytest.raises(RuntimeError, match=r"xs and ys must have the same length"):
            cb._C.cross([torch.randn(4, 8)], [])
        with pytest.raises(RuntimeError, match=r"xs and vs must have the same length"):
            cb._C.cross_backward(
                [torch.randn(4, 8)], [torch.randn(8, 8)], [torch.randn(4, 3)], [torch.randn(3, 8)], []
            )

    def test_gram_backward_factor(self):
        x = torch.randn(4, 8)
        with pytest.raises(RuntimeError, match=r"ms\[0\] must have shape \[4, 4\], got \[4, 5\]"):
            cb._C.gram_backward([torch.randn(4, 5)], [x])
        with pytest.raises(RuntimeError, match=r"ms\[0\] must be float32, got Double"):
            cb._C.gram_backward([torch.randn(4, 4, dtype=torch.float64)], [x])
        with pytest.raises(RuntimeError, match=r"ms\[0\] must be contiguous"):
            cb._C.gram_backward([torch.randn(8, 4)[::2]], [x])

    def test_cross_shapes(self):
        with pytest.raises(RuntimeError, match=r"xs\[0\] and ys\[0\] must have the same number of rows"):
            cb._C.cross([torch.randn(4, 8)], [torch.randn(5, 3)])
        x, y = torch.randn(4, 8), torch.randn(4, 3)
        m, n, v = torch.randn(8, 8), torch.randn(3, 8), torch.randn(8)
        with pytest.raises(RuntimeError, match=r"ns\[0\] must have shape \[3, 8\], got \[8, 3\]"):
            cb._C.cross_backward([x], [m], [y], [n.T.contiguous()], [v])
        with pytest.raises(RuntimeError, match=r"vs\[0\] must have shape \[8\]"):
            cb._C.cross_backward([x], [m], [y], [n], [torch.randn(3)])
        with pytest.raises(RuntimeError, match=r"ms\[0\] must have shape \[8, 8\]"):
            cb._C.cross_backward([x], [torch.randn(3, 3)], [y], [n], [v])
