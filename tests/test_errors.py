"""Malformed input raises a clear TypeError / ValueError naming the pair and the problem."""

import pytest
import torch

import guidance_kernels as gk

X = torch.randn(8, 5)
Y = torch.randn(8, 3)


@pytest.mark.parametrize(
    "targets,guides,kwargs,exc,pattern",
    [
        ([X, X], [Y, torch.randn(7, 3)], {}, ValueError, r"pair 1: .*different numbers of samples \(8 vs 7\)"),
        ([X[:1]], [Y[:1]], {}, ValueError, r"pair 0 \(target\): needs at least 2 samples, got n = 1"),
        ([X[:3]], [Y[:3]], {"metric": "debiased_cka"}, ValueError, r"pair 0 \(target\): needs at least 4 samples"),
        ([torch.randn(8)], [Y], {}, ValueError, r"pair 0 \(target\): expected shape \(n, features...\) with at least 2 dims, got \(8,\)"),
        ([X], [torch.tensor(1.0)], {}, ValueError, r"pair 0 \(guide\): expected shape .* got \(\)"),
        ([X, torch.randint(0, 3, (8, 4))], [Y, Y], {}, TypeError, r"pair 1 \(target\): expected a floating-point tensor, got dtype torch.int64"),
        ([X], [torch.randn(8, 3, dtype=torch.complex64)], {}, TypeError, r"pair 0 \(guide\): expected a floating-point.*complex64"),
        ([X], [Y.to("meta")], {}, ValueError, r"pair 0: target is on cpu but guide is on meta"),
        ([X, X.to("meta")], [Y, Y.to("meta")], {}, ValueError, r"pair 1: on meta, but pair 0 is on cpu"),
        ([X, X], [Y], {}, ValueError, r"targets and guides differ in length: 2 vs 1"),
        ([], [], {}, ValueError, r"empty"),
        ([X], [Y], {"weights": [1.0, 2.0]}, ValueError, r"weights has 2 entries for 1 layer pairs"),
        ([X], [Y], {"weights": torch.ones(3)}, ValueError, r"weights must have shape \(1,\)"),
        ([X], [torch.randn(8, 0)], {}, ValueError, r"pair 0 \(guide\): has no features"),
        (X, [Y], {}, TypeError, r"targets must be a list or tuple of tensors"),
        ([X], ["not a tensor"], {}, TypeError, r"pair 0 \(guide\): expected a torch.Tensor, got str"),
        ([X], [Y], {"metric": "cosine"}, ValueError, r"unknown metric 'cosine'"),
        ([X], [Y], {"reduction": "max"}, ValueError, r"unknown reduction 'max'"),
        ([X], [Y], {"metric": "procrustes", "form": "feature"}, ValueError, r"form='feature' supports metrics 'cka' and 'debiased_cka' only"),
    ],
)
def test_malformed_input_is_named(targets, guides, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        gk.guidance_loss(targets, guides, **kwargs)


def test_cka_matrix_errors():
    with pytest.raises(ValueError, match=r"xs\[1\] has n = 7 but xs\[0\] has n = 8"):
        gk.cka_matrix([X, torch.randn(7, 2)])
    with pytest.raises(ValueError, match=r"xs have n = 8 samples but ys have n = 5"):
        gk.cka_matrix([X], [torch.randn(5, 2)])
    with pytest.raises(ValueError, match=r"xs\[0\]: needs at least 4 samples"):
        gk.cka_matrix([X[:3]], debiased=True)


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run on cpu"):
        gk.cka(X, Y, backend="cuda")
