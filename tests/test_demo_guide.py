"""The guide's training rule: a validation carve of the training set (never the test set) and
the smallest checked step count at which the guide reaches the required accuracy."""

import dataclasses

import pytest
import torch

import guidance_kernels.train.experiments.mnist1d as m1
from guidance_kernels.train.experiments.arms import guide_checks, split_val, train_guide


def _tiny(spec, seed):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 40, generator=g)
    y = (X[:, 0] > 0).long()            # learnable: the sign of the first value
    return (X[:250], y[:250]), (X[250:], y[250:])


def _spec(**kw):
    s = m1.spec()
    s = dataclasses.replace(s, batch_size=32, sizes={**s.sizes, "channels": 4}, **kw)
    return s


def test_mnist1d_guide_rule_is_fixed():
    s = m1.spec()
    assert (s.guide_lr, s.guide_val, s.guide_min_acc) == (1e-2, 500, 0.85)
    assert guide_checks(s) == [250, 500, 1000, 2000] and s.guide_steps == 2000


def test_copy_paste_guide_rule_is_fixed():
    from guidance_kernels.train.experiments import copy_paste as cp

    s = cp.spec()
    assert (s.guide_lr, s.guide_val, s.guide_min_acc) == (None, 1000, 0.95)
    assert guide_checks(s) == [100, 200, 400]


def test_split_val_is_a_disjoint_fixed_carve_of_training_data():
    s = _spec()
    train, _ = _tiny(s, 0)
    (xt, yt), (xv, yv) = split_val(s, train)
    assert xv.shape[0] == 50 and xt.shape[0] == 200          # min(guide_val, n // 5)
    rows = {tuple(r.tolist()) for r in train[0]}
    assert {tuple(r.tolist()) for r in xv} | {tuple(r.tolist()) for r in xt} == rows
    assert not ({tuple(r.tolist()) for r in xv} & {tuple(r.tolist()) for r in xt})
    (xt2, _), (xv2, _) = split_val(s, train)
    assert torch.equal(xv, xv2) and torch.equal(xt, xt2)


@pytest.mark.parametrize("min_acc, steps", [(0.0, 2), (1.01, 6)])
def test_guide_stops_at_first_check_reaching_the_bar(monkeypatch, min_acc, steps):
    monkeypatch.setattr(m1, "data", _tiny)
    s = _spec(guide_steps=6, guide_checks=(2, 4), guide_min_acc=min_acc)

    g = train_guide(s, 0)
    assert g["steps"] == steps
    assert [e["step"] for e in g["curve"]] == [0, 2, 4, 6][: len(g["curve"])]
    assert g["curve"][-1]["val_acc"] == g["val_acc"] and 0.0 <= g["val_acc"] <= 1.0
    assert g["acc"] == g["curve"][-1]["acc"]                  # test accuracy, reported only


def test_guide_without_carve_trains_guide_steps(monkeypatch):
    monkeypatch.setattr(m1, "data", _tiny)
    g = train_guide(_spec(guide_steps=3, guide_val=0), 0)
    assert g["steps"] == 3 and g["val_acc"] is None and [e["step"] for e in g["curve"]] == [0, 3]


def test_guide_uses_its_own_learning_rate(monkeypatch):
    from guidance_kernels.train.experiments import arms

    monkeypatch.setattr(m1, "data", _tiny)
    net = m1.build_guide(_spec(), 0)
    tr = arms._trainer(_spec(guide_lr=0.5), net, _tiny(None, 0)[0], 0, "guide")
    assert tr.opt.param_groups[0]["lr"] == 0.5
    tr = arms._trainer(_spec(guide_lr=0.5), net, _tiny(None, 0)[0], 0, "alone")
    assert tr.opt.param_groups[0]["lr"] == 1e-3


def test_eta_uses_finished_runs_own_seconds():
    from guidance_kernels.train.experiments.runner import eta_seconds

    # 100 cost units took 50 s of run time: 300 units left over 2 workers -> 75 s
    assert eta_seconds(50.0, 100.0, 400.0, 2) == 75.0
    assert eta_seconds(50.0, 100.0, 100.0, 2) == 0.0 and eta_seconds(50.0, 120.0, 100.0, 1) == 0.0


def test_eta_rates_are_per_experiment():
    from guidance_kernels.train.experiments.runner import eta_parts

    # exp 1: 10 s per 100 units, 100 left; exp 2: 100 s per 100 units, 100 left; 1 worker
    assert eta_parts([(10.0, 100.0, 200.0), (100.0, 100.0, 200.0)], 1) == 110.0
    # exp 2 has no finished run: pooled rate (10 s / 100 units)
    assert eta_parts([(10.0, 100.0, 200.0), (0.0, 0.0, 100.0)], 1) == 20.0
    assert eta_parts([(0.0, 0.0, 100.0)], 2) == 0.0          # nothing finished: no estimate yet
