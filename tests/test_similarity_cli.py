"""`guidance-kernels similarity` end to end on the bundled digits (small and fast)."""

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from guidance_kernels.cli import app

from tolerance import score_bound

runner = CliRunner()


def _run(*args):
    r = runner.invoke(app, ["similarity", *args, "--no-progress"])
    return r


def test_cli_two_models_on_digits(tmp_path):
    out = tmp_path / "o"
    r = _run("-a", "small_cnn", "-b", "deep_fcn(depth=6)", "--limit", "400", "--batch-size", "128",
             "--out", str(out))
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "cka.json").read_text())
    m = np.load(out / "cka.npy")
    assert m.shape == (4, 6) and meta["layers_a"] == ["conv1", "conv2", "fc1", "fc2"]
    assert meta["layers_b"] == ["1", "3", "5", "7", "9", "11"]
    assert np.allclose(np.array(meta["matrix"]), m, rtol=0, atol=0)
    assert meta["samples"] == 400 and meta["batches"] == 4 and meta["dropped_samples"] == 0
    # the same fp32 Grams either way: fp64 statistics, any summation order (p <= 32 * 8 * 8 features)
    tol = score_bound("debiased_cka", torch.float64, 128, 32 * 8 * 8)
    assert np.isfinite(m).all() and (m <= 1 + tol).all() and (m > -0.2).all()
    png = (out / "cka.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # the map equals the library call on the same models and data
    from guidance_kernels.similarity.capture import layer_cka
    from guidance_kernels.similarity.loading import load_inputs, load_model

    want = layer_cka(load_model("small_cnn", seed=0), load_model("deep_fcn(depth=6)", seed=0),
                     load_inputs("digits", limit=400), batch_size=128).matrix.numpy()
    assert np.abs(m - want).max() <= tol


def test_cli_self_map_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    from guidance_kernels.train.models import build_model

    model = build_model("deep_fcn", seed=3, depth=5)
    torch.save(model, tmp_path / "whole.pt")
    torch.save({"model": model.state_dict(), "step": 0}, tmp_path / "trainer_ckpt.pt")
    x = torch.randn(100, 1, 8, 8)
    torch.save({"x": x}, tmp_path / "data.pt")
    outs = []
    for spec_a, spec_b in ((str(tmp_path / "whole.pt"), str(tmp_path / "whole.pt")),
                           (f"deep_fcn(depth=5)@{tmp_path / 'trainer_ckpt.pt'}",
                            f"deep_fcn(depth=5)@{tmp_path / 'trainer_ckpt.pt'}")):
        out = tmp_path / f"o{len(outs)}"
        r = _run("-a", spec_a, "-b", spec_b, "--data", str(tmp_path / "data.pt"), "--batch-size", "25",
                 "--layers-a", "Linear", "--out", str(out), "--trust-pickle")
        assert r.exit_code == 0, r.output
        m = np.load(out / "cka.npy")
        assert m.shape == (5, 5) and np.array_equal(m, m.T) and np.array_equal(np.diag(m), np.ones(5))
        assert json.loads((out / "cka.json").read_text())["symmetric"] is True
        outs.append(m)
    # same weights either way
    assert np.abs(outs[0] - outs[1]).max() <= score_bound("debiased_cka", torch.float64, 25, 64)
    # module:callable with kwargs, seeds differ: a cross map (not symmetric)
    out = tmp_path / "o3"
    r = _run("-a", "guidance_kernels.train.models:DeepFCN(depth=3)", "-b", "deep_fcn(depth=3)",
             "--seed-b", "1", "--data", str(tmp_path / "data.pt"), "--batch-size", "50", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "cka.json").read_text())["symmetric"] is False


def test_cli_errors_are_clear(tmp_path):
    r = _run("-a", "no_such_model", "--out", str(tmp_path))
    assert r.exit_code == 2 and "unknown model 'no_such_model'" in r.output
    r = _run("-a", "small_cnn", "-b", "small_cnn", "--seed-b", "1", "--layers-b", "fc9",
             "--limit", "64", "--out", str(tmp_path))
    assert r.exit_code == 2 and "'fc9' matches no module" in r.output
    r = _run("--batch-size", "3", "--limit", "64", "--out", str(tmp_path))
    assert r.exit_code == 2 and "--batch-size" in r.output
    torch.save({"w": torch.zeros(1)}, tmp_path / "sd.pt")
    r = _run("-a", str(tmp_path / "sd.pt"), "--out", str(tmp_path))
    assert r.exit_code == 2 and "ARCH@" in r.output


def test_cli_guidability_report(tmp_path):
    out = tmp_path / "g"
    r = _run("-a", "small_cnn", "-b", "deep_fcn(depth=6)", "--layers-b", "Linear",
             "--layers-a", "Conv2d,Linear", "--guide-steps", "4", "--batch-size", "150", "--out", str(out))
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "guidability.json").read_text())
    from guidance_kernels.train.mapping import map_layers

    want = map_layers(["1", "3", "5", "7", "9", "11"], ["conv1", "conv2", "fc1", "fc2"])
    assert [(p["target"], p["guide"]) for p in rep["mapping"]] == [tuple(p) for p in want]
    before, after = np.array(rep["before"]), np.array(rep["after"])
    assert before.shape == after.shape == (4, 6)
    assert np.abs(after - before).max() > 1e-4  # training changed the target
    assert np.array_equal(np.load(out / "cka_before.npy"), before)
    assert (out / "guidability.png").read_bytes()[:4] == b"\x89PNG"
    assert rep["samples"] == 450  # digits-test
