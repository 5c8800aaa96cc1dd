"""Layer selection and guide→target mapping rules (guidance_kernels.train.mapping)."""

import pytest
import torch
from torch import nn

from guidance_kernels.train.mapping import map_layers, select_layers
from guidance_kernels.train.models import DeepFCN, SmallCNN, build_model


def names(k, p="t"):
    return [f"{p}{i}" for i in range(k)]


def test_even_spread_one_to_one():
    pairs = map_layers(names(40), names(4, "g"))
    assert pairs == [("t0", "g0"), ("t13", "g1"), ("t26", "g2"), ("t39", "g3")]


@pytest.mark.parametrize("G,T", [(g, t) for t in range(1, 12) for g in range(1, t + 1)])
def test_guide_shallower_is_injective_and_spans(G, T):
    pairs = map_layers(names(T), names(G, "g"))
    targets = [t for t, _ in pairs]
    assert [g for _, g in pairs] == names(G, "g")  # every guide layer used once, in order
    assert len(set(targets)) == G  # no two guide layers on one target layer
    idx = [int(t[1:]) for t in targets]
    assert idx == sorted(idx)
    if G > 1:
        assert idx[0] == 0 and idx[-1] == T - 1
    else:
        assert idx == [T - 1]  # a single guide layer aligns the deepest target layer


def test_round_half_up():
    # G=3, T=4: 1 * 3/2 = 1.5 -> 2 (half up)
    assert [t for t, _ in map_layers(names(4), names(3, "g"))] == ["t0", "t2", "t3"]


def test_guide_deeper_keeps_all_pairs():
    # the paper's code kept one guide layer per target layer (dict overwrite): we keep them all
    pairs = map_layers(names(2), names(5, "g"))
    assert [g for _, g in pairs] == names(5, "g")
    assert [t for t, _ in pairs] == ["t0", "t0", "t1", "t1", "t1"]


def test_guide_deeper_spread():
    pairs = map_layers(names(3), names(7, "g"), guide_deeper="spread")
    assert pairs == [("t0", "g0"), ("t1", "g3"), ("t2", "g6")]
    with pytest.raises(ValueError, match="guide_deeper"):
        map_layers(names(3), names(7, "g"), guide_deeper="first")


def test_explicit_mapping_and_errors():
    t, g = names(5), names(3, "g")
    assert map_layers(t, g, {"t4": "g0", "t1": "g2"}) == [("t4", "g0"), ("t1", "g2")]
    assert map_layers(t, g, [("t1", "g0"), ("t1", "g1")]) == [("t1", "g0"), ("t1", "g1")]
    with pytest.raises(KeyError, match="unknown target layer 't9'"):
        map_layers(t, g, {"t9": "g0"})
    with pytest.raises(KeyError, match="unknown guide layer 'gg1'.*did you mean"):
        map_layers(t, g, {"t0": "gg1"})
    with pytest.raises(ValueError, match="empty"):
        map_layers(t, g, {})
    with pytest.raises(ValueError, match="empty"):
        map_layers([], g)


def test_select_by_type_names_callable_auto():
    cnn = SmallCNN()
    assert select_layers(cnn, nn.Conv2d) == ["conv1", "conv2"]
    assert select_layers(cnn, (nn.Conv2d, nn.Linear)) == ["conv1", "conv2", "fc1", "fc2"]
    assert select_layers(cnn, "auto") == ["conv1", "conv2", "fc1", "fc2"]
    # names come back in registration (depth) order whatever order they are given in
    assert select_layers(cnn, ["fc2", "conv1"]) == ["conv1", "fc2"]
    assert select_layers(cnn, lambda n, m: n.startswith("fc")) == ["fc1", "fc2"]
    fcn = DeepFCN(depth=41)
    assert len(select_layers(fcn, nn.Linear)) == 41


def test_select_errors():
    cnn = SmallCNN()
    with pytest.raises(KeyError, match="unknown model layer 'conv3'.*did you mean"):
        select_layers(cnn, ["conv3"])
    with pytest.raises(ValueError, match="selection is empty"):
        select_layers(cnn, nn.LSTM)
    with pytest.raises(ValueError, match="selection is empty"):
        select_layers(cnn, lambda n, m: False)
    with pytest.raises(TypeError, match="single name"):
        select_layers(cnn, "conv1")
    with pytest.raises(ValueError, match="duplicate"):
        select_layers(cnn, ["conv1", "conv1"])


def test_select_unwraps_dataparallel():
    cnn = SmallCNN()
    assert select_layers(nn.DataParallel(cnn), nn.Conv2d) == ["conv1", "conv2"]


def test_build_model_by_name():
    a = build_model("deep_fcn", seed=3, depth=42)
    b = build_model("deep_fcn", seed=3, depth=42)
    assert sum(isinstance(m, nn.Linear) for m in a) == 42
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) for m in a.modules())
    assert build_model("small_cnn")(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(KeyError, match="unknown model"):
        build_model("resnet")
