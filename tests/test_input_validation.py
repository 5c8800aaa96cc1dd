"""Malformed input gets a clear error naming the pair or argument: sparse / mkldnn / nested
representations, bad weights, and raw backward ops whose group sizes or shapes disagree."""

from __future__ import annotations

import math

import pytest
import torch

import guidance_kernels as gk
import guidance_kernels.ops  # noqa: F401  (registers the torch.library ops)

torch.manual_seed(0)
X = torch.randn(8, 5)
Y = torch.randn(8, 3)


def _layouts():
    out = [("sparse_coo", lambda t: t.to_sparse(), "sparse_coo"), ("sparse_csr", lambda t: t.to_sparse_csr(), "sparse_csr")]
    if torch.backends.mkldnn.is_available():
        out.append(("mkldnn", lambda t: t.to_mkldnn(), "mkldnn"))
    return out


@pytest.mark.parametrize("name,conv,word", _layouts(), ids=[c[0] for c in _layouts()])
@pytest.mark.parametrize("side", ["target", "guide"])
def test_non_dense_layouts_raise_type_error_naming_the_pair(name, conv, word, side):
    x, y = (conv(X), Y) if side == "target" else (X, conv(Y))
    with pytest.raises(TypeError, match=rf"pair 1 \({side}\).*{word}.*to_dense"):
        gk.guidance_loss([X, x], [Y, y])


def test_nested_tensor_raises_type_error_naming_the_pair():
    nt = torch.nested.nested_tensor([torch.randn(5), torch.randn(4)])
    with pytest.raises(TypeError, match=r"pair 0 \(target\): nested"):
        gk.cka(nt, Y[:2])


def test_non_dense_members_of_cka_matrix():
    with pytest.raises(TypeError, match=r"xs\[1\].*sparse_coo"):
        gk.cka_matrix([X, X.to_sparse()])
    with pytest.raises(TypeError, match=r"x\[0\].*sparse_csr"):
        gk.centered_gram(X.to_sparse_csr())


@pytest.mark.parametrize(
    "weights,exc,pattern",
    [
        ([1.0, -1.0], ValueError, r"weights\[1\] \(pair 1\) = -1.0: .*non-negative"),
        ([1.0, math.nan], ValueError, r"weights\[1\] \(pair 1\) = nan: .*finite"),
        ([math.inf, 1.0], ValueError, r"weights\[0\] \(pair 0\) = inf"),
        ([1.0, 1 + 1j], TypeError, r"weights\[1\] \(pair 1\) must be a real number, got complex"),
        (["a", 1.0], TypeError, r"weights\[0\] \(pair 0\) must be a real number, got str"),
        ([None, 1.0], TypeError, r"weights\[0\] \(pair 0\) must be a real number, got NoneType"),
        ([True, 1.0], TypeError, r"weights\[0\].*bool"),
        ("ab", TypeError, r"weights must be a list or tuple of numbers, got str"),
        (torch.tensor([1.0, -0.5]), ValueError, r"weights\[1\] \(pair 1\) = -0.5"),
        (torch.tensor([1.0, math.nan]), ValueError, r"weights\[1\].*finite"),
        (torch.tensor([1.0 + 0j, 1.0]), TypeError, r"weights must be real.*complex"),
        (torch.tensor([True, False]), TypeError, r"weights must be real.*bool"),
        (torch.ones(2, device="meta"), ValueError, r"weights is a meta tensor"),
        (torch.ones(2).to_sparse(), TypeError, r"weights must be a dense tensor"),
        ([torch.tensor(1.0), torch.ones(2)], TypeError, r"weights\[1\] \(pair 1\) must be a real number, got a tensor \(2,\)"),
    ],
)
def test_bad_weights_raise_clear_errors(weights, exc, pattern):
    with pytest.raises(exc, match=pattern):
        gk.guidance_loss([X, X], [Y, Y], weights=weights)


def test_good_weights_in_every_form_give_the_weighted_sum():
    terms = gk.guidance_loss([X, X * 2], [Y, Y], reduction="none")
    want = 0.5 * terms[0] + 2 * terms[1]
    for w in ([0.5, 2], (0.5, 2.0), [torch.tensor(0.5), 2], torch.tensor([0.5, 2.0]), torch.tensor([1, 4]) / 2):
        got = gk.guidance_loss([X, X * 2], [Y, Y], weights=w)
        torch.testing.assert_close(got, want)
    assert float(gk.guidance_loss([X], [Y], weights=[0.0])) == 0.0  # zero is allowed


def test_gram_backward_checks_group_sizes_and_shapes():
    op = torch.ops.guidance_kernels.gram_backward
    with pytest.raises(ValueError, match=r"gram_backward: m has shape \(1, 8, 8\); expected \(2, 8, 8\)"):
        op(torch.randn(1, 8, 8), [X, X], "reference")
    with pytest.raises(ValueError, match=r"gram_backward: m has shape \(2, 7, 7\); expected \(2, 8, 8\)"):
        op(torch.randn(2, 7, 7), [X, X], "reference")
    with pytest.raises(ValueError, match=r"gram_backward: xs\[1\] has shape \(7, 5\)"):
        op(torch.randn(2, 8, 8), [X, X[:7]], "reference")
    with pytest.raises(ValueError, match=r"gram_backward: empty list xs"):
        op(torch.randn(0, 8, 8), [], "reference")


def test_gram_backward_fake_checks_too():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        m, x = torch.empty(1, 8, 8), torch.empty(8, 5)
        with pytest.raises(ValueError, match=r"gram_backward: m has shape \(1, 8, 8\)"):
            torch.ops.guidance_kernels.gram_backward(m, [x, x], "reference")
        out = torch.ops.guidance_kernels.gram_backward(torch.empty(2, 8, 8), [x, x], "reference")
        assert [tuple(o.shape) for o in out] == [(8, 5), (8, 5)]


def test_cross_backward_checks_group_sizes_and_shapes():
    op = torch.ops.guidance_kernels.cross_backward
    m, nm, v = torch.randn(2, 5, 5), torch.randn(2, 3, 5), torch.randn(2, 5)
    op([X, X], m, [Y, Y], nm, v, "reference")  # consistent: fine
    cases = [
        (([X, X], m[:1], [Y, Y], nm, v), r"m has shape \(1, 5, 5\); expected \(2, 5, 5\)"),
        (([X, X], m, [Y, Y], nm[:1], v), r"nm has shape \(1, 3, 5\); expected \(2, 3, 5\)"),
        (([X, X], m, [Y, Y], nm, v[:, :4]), r"v has shape \(2, 4\); expected \(2, 5\)"),
        (([X, X], m, [Y], nm, v), r"2 xs of \(8, 5\) vs 1 ys"),
        (([X, X[:, :4]], m, [Y, Y], nm, v), r"xs\[1\] has shape \(8, 4\)"),
    ]
    for args, pattern in cases:
        with pytest.raises(ValueError, match=rf"cross_backward: {pattern}"):
            op(*args, "reference")


def test_cross_backward_fake_checks_too():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, y = torch.empty(8, 5), torch.empty(8, 3)
        with pytest.raises(ValueError, match=r"cross_backward: m has shape \(1, 5, 5\)"):
            torch.ops.guidance_kernels.cross_backward(
                [x, x], torch.empty(1, 5, 5), [y, y], torch.empty(2, 3, 5), torch.empty(2, 5), "reference"
            )


@pytest.mark.parametrize("weights,exc,pattern", [
    (["a"], TypeError, r"weights\[0\] \(pair 0\) must be a real number, got str"),
    ([1.0, -2.0], ValueError, r"weights\[1\] \(pair 1\) = -2.0"),
    ([None], TypeError, r"weights\[0\].*NoneType"),
    (torch.tensor([1.0 + 1j]), TypeError, r"real tensor"),
])
def test_module_weights_are_validated_at_construction(weights, exc, pattern):
    with pytest.raises(exc, match=pattern):
        gk.GuidanceLoss(weights=weights)


def test_module_weights_accept_numbers_and_tensors():
    crit = gk.GuidanceLoss(weights=torch.tensor([0.5, 2.0]))
    assert crit.weights == (0.5, 2.0)
    torch.testing.assert_close(crit([X, X], [Y, Y]), gk.guidance_loss([X, X], [Y, Y], weights=[0.5, 2.0]))
