"""The main job end to end on tiny configurations, its data generators and its CLI errors."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from guidance_kernels.cli import app
from guidance_kernels.data import copy_paste_tensors, mnist1d_tensors
from guidance_kernels.train.experiments.main import make_specs, run_demo


def _raise_constant(tok):
    raise ValueError(f"non-strict JSON token {tok}")


def test_copy_paste_deterministic_and_well_formed():
    X, y = copy_paste_tensors(50, length=5, symbols=4, seed=3)
    X2, y2 = copy_paste_tensors(50, length=5, symbols=4, seed=3)
    assert torch.equal(X, X2) and torch.equal(y, y2)
    assert not torch.equal(y, copy_paste_tensors(50, length=5, symbols=4, seed=4)[1])
    assert X.shape == (50, 11, 6) and y.shape == (50, 5) and X.dtype == torch.float32
    tok = X.argmax(-1)
    assert torch.equal(tok[:, :5], y)                 # the tokens to copy come first
    assert (tok[:, 5] == 5).all() and (tok[:, 6:] == 4).all()   # marker, then blanks
    with pytest.raises(ValueError, match="length"):
        copy_paste_tensors(5, length=0)


def test_mnist1d_generated_without_network(monkeypatch):
    import socket
    import urllib.request

    def no_net(*a, **k):
        raise AssertionError("the network was reached")

    monkeypatch.setattr(socket, "socket", no_net)
    monkeypatch.setattr(socket, "create_connection", no_net)
    monkeypatch.setattr(urllib.request, "urlopen", no_net)
    import requests

    monkeypatch.setattr(requests, "get", no_net)
    monkeypatch.setattr(requests.Session, "request", no_net)
    (xtr, ytr), (xte, yte) = mnist1d_tensors(seed=7, num_samples=200)
    assert xtr.shape == (160, 40) and xte.shape == (40, 40) and ytr.dtype == torch.int64
    assert 0 <= int(ytr.min()) and int(ytr.max()) < 10 and torch.isfinite(xtr).all()
    (xtr2, _), _ = mnist1d_tensors(seed=7, num_samples=200)
    assert torch.equal(xtr, xtr2)


def test_tiny_demo_end_to_end(tmp_path, monkeypatch):
    import guidance_kernels.train.experiments.mnist1d as m1
    import guidance_kernels.train.experiments.copy_paste as cp

    # tiny data and models: this tests the plumbing, not the claims
    monkeypatch.setattr(m1, "data", lambda spec, seed: _tiny_mnist())
    real_cp_spec, real_m1_spec = cp.spec, m1.spec

    def small_cp():
        s = real_cp_spec()
        s.sizes.update(n_train=256, n_test=64, length=4, hidden=16, d=16)
        return s

    def small_m1():
        s = real_m1_spec()
        s.sizes.update(depth=3, width=16, channels=8)
        s.batch_size = 64   # the guide trains on the training set minus its validation carve
        return s

    monkeypatch.setattr(cp, "spec", small_cp)
    monkeypatch.setattr(m1, "spec", small_m1)
    summaries = run_demo(["mnist1d", "copy_paste"], seeds=2, steps=3, out=str(tmp_path), workers=1)
    text = (tmp_path / "results.json").read_text()
    res = json.loads(text, parse_constant=_raise_constant)
    assert set(res["experiments"]) == {"mnist1d", "copy_paste"}
    for s in summaries:
        exp = res["experiments"][s["experiment"]]
        assert set(exp["final_acc"]) == set(s["spec"]["arms"])
        assert all(len(v) == 2 for v in exp["final_acc"].values())
        assert {v["claim"] for v in exp["verdicts"]} == {"a", "b", "c"}
        for v in exp["verdicts"]:
            assert "nan" not in v["text"].lower()
        assert (tmp_path / f"{s['experiment']}.png").stat().st_size > 10_000
    md = (tmp_path / "summary.md").read_text()
    assert "| alone |" in md and "(b)" in md and "nan" not in md.lower()
    assert "| trained guide itself (" in md and "| trained guide, validation carve |" in md


def _tiny_mnist():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 40, generator=g)
    y = torch.randint(0, 10, (300,), generator=g)
    return (X[:256], y[:256]), (X[256:], y[256:])


def test_one_seed_is_not_judged_and_json_is_strict(tmp_path):
    from guidance_kernels.files import write_json
    from guidance_kernels.train.experiments.report import markdown, summarise
    from guidance_kernels.train.experiments.spec import ExperimentSpec, standard_claims

    spec = ExperimentSpec("t", "t", ("alone", "guided_trained", "guided_untrained", "kd_untrained",
                                     "warmup_trained"), 1, 1, 8, claims=standard_claims("trained"))
    runs = [{"arm": a, "seed": 0, "final_acc": 0.5, "curve": [], "seconds": 1.0} for a in spec.arms]
    s = summarise(spec, {"runs": runs, "guides": [{"seed": 0, "acc": 0.9}]})
    assert all(v["holds"] is None and "not judged: 1 seed" in v["text"] for v in s["verdicts"])
    write_json(tmp_path / "r.json", s)
    json.loads((tmp_path / "r.json").read_text(), parse_constant=_raise_constant)
    assert "nan" not in markdown([s], 1.0).lower()
    assert math.isnan(s["mean_sd"]["alone"]["sd"])


def test_quick_and_steps_options_size_the_specs():
    full = make_specs(["mnist1d", "copy_paste"])
    quick = make_specs(["mnist1d", "copy_paste"], quick=True)
    assert [q.steps * 2 for q in quick] == [f.steps for f in full]
    s = make_specs(["copy_paste"], steps=7)[0]
    assert s.steps == 7 and s.guide_steps <= 7 and s.warmup_steps <= 7


@pytest.mark.parametrize("args, needle", [
    (["--seeds", "0"], "--seeds"),
    (["--steps", "0"], "--steps"),
    (["--workers", "0"], "--workers"),
    (["--experiment", "mnist"], "--experiment"),
])
def test_demo_option_errors_exit_2(args, needle):
    r = CliRunner().invoke(app, ["demo", *args])
    assert r.exit_code == 2, r.output
    assert needle in r.output


def test_digits_experiment_runs_an_arm():
    import dataclasses

    from guidance_kernels.train.experiments.arms import run_arm, task

    spec = dataclasses.replace(task("digits").spec(), steps=2, warmup_steps=2, eval_every=1,
                               sizes={"depth": 4, "width": 16})
    r = run_arm(spec, "warmup_untrained", 0, None)
    assert r["arm"] == "warmup_untrained" and 0.0 <= r["final_acc"] <= 1.0
    assert [e["step"] for e in r["curve"]] == [0, 2, 3, 4]
    with pytest.raises(ValueError, match="trained guide"):
        run_arm(spec, "guided_trained", 0, None)
    with pytest.raises(ValueError, match="unknown experiment"):
        task("mnist")
