"""The examples in examples/ run with tiny settings (in-process, a few steps, CPU)."""

import importlib.util
import pathlib
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_lightning_timm_example(tmp_path, capsys):
    pytest.importorskip("lightning", reason="the 'lightning' extra is not installed")
    pytest.importorskip("timm", reason="the 'lightning' extra is not installed (timm)")
    load("lightning_timm").main(["--steps", "2", "--batch", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "guidance/cka/0~layer1" in out and "guidance/loss" in out


def test_hf_gpt2_per_token_example(tmp_path, capsys):
    pytest.importorskip("transformers", reason="the 'hf' extra is not installed")
    pytest.importorskip("accelerate", reason="the 'hf' extra is not installed (accelerate)")
    load("hf_gpt2_per_token").main(["--steps", "2", "--batch", "4", "--seq", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "guidance/cka/transformer.h.1~lstm2" in out
