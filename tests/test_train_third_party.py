"""Third-party models in guided training: HF Conv1D in "auto", glob layer patterns, compiled
targets, ModelOutput / tuple layer outputs, and padding masks (exact CKA over the kept rows)."""

from collections import OrderedDict

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference_math import cka as cka_ref
from reference_math import procrustes as procrustes_ref
from tolerance import assert_within, score_bound
from torch import nn

import guidance_kernels as gk
from guidance_kernels.train import Guidance
from guidance_kernels.train.guidance import masked_center
from guidance_kernels.train.hooks import first_tensor
from guidance_kernels.train.mapping import glob_regex, select_layers, unwrap


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers", reason="the 'hf' extra is not installed")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=12,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def test_auto_selects_hf_conv1d_on_gpt2():
    m = _tiny_gpt2()
    names = select_layers(m, "auto")
    # before: only lm_head (HF Conv1D is not an nn.Linear)
    assert names[:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                         "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert len(names) == 9 and names[-1] == "lm_head"


def test_glob_patterns_select_blocks_not_submodules():
    m = _tiny_gpt2()
    assert select_layers(m, "transformer.h.*") == ["transformer.h.0", "transformer.h.1"]
    assert select_layers(m, ["transformer.h.*.mlp", "lm_head"]) == [
        "transformer.h.0.mlp", "transformer.h.1.mlp", "lm_head"]
    assert "transformer.h.1.attn.c_attn" in select_layers(m, "transformer.**.c_attn")
    with pytest.raises(ValueError, match=r"target layer pattern 'model\.layers\.\*' matches no module"):
        select_layers(m, "model.layers.*", what="target")


def test_glob_regex_components():
    rx = glob_regex("model.layers.*")
    assert rx.match("model.layers.11") and not rx.match("model.layers.1.mlp")
    assert glob_regex("a.[0-1]").match("a.1") and not glob_regex("a.[!0-1]").match("a.1")
    assert glob_regex("a.**").match("a.b.c") and not glob_regex("a.?").match("a.bc")


def test_llama_style_names_by_pattern():
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3))
    assert select_layers(model, "model.layers.*") == [f"model.layers.{i}" for i in range(3)]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))


def test_compiled_target_is_unwrapped():
    t = _mlp()
    c = torch.compile(t, backend="eager")
    assert unwrap(c) is t
    # names without the "_orig_mod." prefix (before: KeyError, only "_orig_mod.0" existed)
    assert select_layers(c, ["0", "2"]) == ["0", "2"]
    torch.manual_seed(1)
    g = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(10, 6)
    G = Guidance(c, g, target_layers=["0", "2"], guide_layers=nn.Linear)
    with G.record():
        c(x)
    got = G.loss(x)
    G.close()
    with torch.no_grad():
        h0 = t[0](x)
        h2 = t(x)
        g0 = g[0](x)
        g2 = g(x)
    want = (1 - cka_ref(h0, g0)) + (1 - cka_ref(h2, g2))
    assert abs(float(got.detach()) - float(want)) <= 2 * score_bound("cka", torch.float32, 10, 8)


class _OutputLike(OrderedDict):
    """A stand-in for HF's ModelOutput (an OrderedDict subclass)."""


class _ReturnsMapping(nn.Module):
    def __init__(self, key="last_hidden_state"):
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.key = key

    def forward(self, x):
        h = self.lin(x)
        return _OutputLike([("logits", h * 2), (self.key, h)]) if self.key else _OutputLike(note="x")


def test_first_tensor_of_model_outputs_and_tuples():
    h = torch.randn(3, 4)
    assert first_tensor(_OutputLike([("logits", h * 2), ("last_hidden_state", h)])) is h
    assert first_tensor(_OutputLike([("past", None), ("hidden_states", h)])) is h
    assert first_tensor((None, h)) is h
    assert first_tensor((h, None)) is h


def test_layer_returning_model_output_is_recorded():
    torch.manual_seed(0)
    t = nn.Sequential(_ReturnsMapping())
    wrapper = nn.Module()
    wrapper.block = t[0]
    x = torch.randn(8, 6)
    G = Guidance(wrapper, _mlp(), target_layers=["block"], guide_layers=["2"])
    with G.record():
        out = wrapper.block(x)
    assert G._target_rec.outputs["block"] is out["last_hidden_state"]
    G.close()


def test_layer_without_tensor_names_the_layer():
    m = nn.Module()
    m.odd = _ReturnsMapping(key=None)
    G = Guidance(m, _mlp(), target_layers=["odd"], guide_layers=["2"])
    with pytest.raises(TypeError, match=r"layer 'odd' returned a _OutputLike with no tensor"):
        with G.record():
            m.odd(torch.randn(2, 6))
    G.close()


# ---------------------------------------------------------------- padding masks


class _Tok(nn.Module):
    """(n, T) ids -> per-token features through an embedding and a Linear."""

    def __init__(self, d, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(20, d)
        self.proj = nn.Linear(d, d)

    def forward(self, ids):
        return self.proj(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("metric", ["cka", "procrustes"])
def test_mask_equals_metric_on_kept_tokens(metric):
    torch.manual_seed(3)
    n, T = 4, 7
    ids = torch.randint(0, 20, (n, T))
    mask = torch.ones(n, T, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    t, g = _Tok(8, 1), _Tok(5, 2)
    G = Guidance(t, g, target_layers=["proj"], guide_layers=["proj"], flatten="token", metric=metric)
    with G.record():
        t(ids)
    got = G.loss(ids, mask=mask)
    keep = mask.reshape(-1).bool()
    with torch.no_grad():
        x = t(ids).reshape(-1, 8)[keep]
        y = g(ids).reshape(-1, 5)[keep]
    want = 1 - cka_ref(x, y) if metric == "cka" else procrustes_ref(x, y)
    m = int(keep.sum())
    assert abs(float(got.detach()) - float(want)) <= score_bound(metric, torch.float32, m, 8)
    # without the mask the padded tokens count, and the value differs by far more than rounding
    with G.record():
        t(ids)
    assert abs(float(G.loss(ids).detach()) - float(want)) > 1e-3
    G.close()


def test_padded_activations_do_not_change_loss_or_grads():
    torch.manual_seed(4)
    n, T, D = 3, 6, 8
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    keep = mask.reshape(-1, 1).bool()
    base = torch.randn(n * T, D, dtype=torch.float64)
    y = torch.randn(n * T, 5, dtype=torch.float64)
    noise = torch.randn(n * T, D, dtype=torch.float64) * 1e3

    def run(x0):
        x = x0.clone().requires_grad_(True)
        xc = masked_center(x, keep.reshape(-1))
        yc = masked_center(y, keep.reshape(-1))
        val = cka_ref(xc, yc)
        val.backward()
        return val.detach(), x.grad

    v1, g1 = run(base)
    v2, g2 = run(torch.where(keep, base, noise))
    v3, _ = run(torch.where(keep, base, torch.full_like(base, float("inf"))))
    assert_within(v2, v1, dtype=torch.float64, k=n * T, scale=1.0)
    assert torch.equal(v3, v1) or abs(float(v3 - v1)) <= 1e-12
    assert torch.all(g1[~keep.expand_as(g1)] == 0) and torch.all(g2[~keep.expand_as(g2)] == 0)
    assert_within(g2, g1, dtype=torch.float64, k=n * T, scale=float(g1.abs().max()))


def test_masked_center_all_padded_is_zero_and_finite():
    x = torch.randn(5, 3, requires_grad=True)
    out = masked_center(x, torch.zeros(5, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(5, 3))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_mask_errors_name_the_problem():
    t, g = _Tok(8, 1), _Tok(5, 2)
    ids = torch.randint(0, 20, (2, 5))
    G = Guidance(t, g, target_layers=["proj"], guide_layers=["proj"], flatten="token", metric="debiased_cka")
    with G.record():
        t(ids)
    with pytest.raises(ValueError, match="debiased CKA estimator"):
        G.loss(ids, mask=torch.ones(2, 5))
    G.close()
    G = Guidance(t, g, target_layers=["proj"], guide_layers=["proj"], flatten="token")
    with G.record():
        t(ids)
    with pytest.raises(ValueError, match=r"pair \('proj', 'proj'\): mask of shape \(2, 4\) for 10 rows"):
        G.loss(ids, mask=torch.ones(2, 4))
    G.close()


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 4), T=st.integers(2, 6),
    tdt=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    gdt=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    log_scale=st.integers(-4, 4), seed=st.integers(0, 2**16),
)
def test_masked_cka_fuzz_mixed_dtypes_and_magnitudes(n, T, tdt, gdt, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n * T, 5, generator=g) * 10.0**log_scale).to(tdt)
    y = (torch.randn(n * T, 3, generator=g) * 10.0 ** (-log_scale // 2)).to(gdt)
    keep = torch.rand(n * T, generator=g) < 0.7
    assume(int(keep.sum()) >= 3)
    xc, yc = masked_center(x, keep), masked_center(y, keep)
    assert xc.dtype == torch.promote_types(tdt, torch.float32) and yc.dtype == torch.float32
    got = gk.guidance_loss([xc], [yc], reduction="none")[0]
    want = 1 - cka_ref(x.double()[keep], y.double()[keep])  # the same rounded inputs, fp64
    m = int(keep.sum())
    assert torch.isfinite(got)
    assert abs(float(got) - float(want)) <= score_bound("cka", torch.float32, m, 5)


def test_patterns_and_names_may_overlap_names_may_not_repeat():
    m = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert select_layers(m, ["0", "*", "1.0"]) == ["0", "1", "1.0"]
    with pytest.raises(ValueError, match="duplicate names"):
        select_layers(m, ["0", "0"])
    with pytest.raises(ValueError, match="'auto' types"):
        select_layers(nn.Sequential(nn.ReLU()), "auto", what="guide")
