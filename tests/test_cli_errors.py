"""Every CLI mistake: one line ``error: ...`` on stderr, exit code 2, no traceback.

In-process through typer's runner (fast), plus real subprocesses for the exact user experience
(what reaches the terminal) and the debug switch that shows the traceback."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from guidance_kernels.cli import DEBUG_ENV, app

runner = CliRunner()
NO_GPU_DEVICE = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


def _assert_one_line_error(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _one_d_npy(tmp_path):
    p = tmp_path / "one_d.npy"
    np.save(p, np.arange(100, dtype=np.float32))
    return str(p)


def _existing_file(tmp_path):
    p = tmp_path / "taken"
    p.write_text("x")
    return str(p)


def _broken_factory(tmp_path):
    p = tmp_path / "mymodels.py"
    p.write_text("class Broken(Exception):\n    pass\n\n\ndef make():\n    raise Broken('factory failed')\n")
    return f"{p}:make"


CASES = {
    "similarity --device cuda (no GPU)": (["similarity", "--device", NO_GPU_DEVICE], ["--device"]),
    "check --device cuda (no GPU)": (["check", "--device", NO_GPU_DEVICE], ["--device"]),
    "bench --device cuda (no GPU)": (["bench", "--device", NO_GPU_DEVICE, "--quick"], ["--device"]),
    "similarity --backend cuda --device cpu": (["similarity", "--backend", "cuda", "--device", "cpu"],
                                               ["--backend", "cpu"]),
    "similarity --backend nope": (["similarity", "--backend", "nope", "--device", "cpu"], ["nope"]),
    "bench -w W9": (["bench", "-w", "W9", "--device", "cpu"], ["W9", "--workload"]),
    "bench -i nope": (["bench", "-i", "nope", "--device", "cpu"], ["nope", "--impl"]),
    "bench --dtype fp8": (["bench", "--dtype", "fp8"], ["--dtype"]),
    "bench -m back": (["bench", "-m", "back"], ["--mode"]),
    "check --n 1": (["check", "--n", "1"], ["--n"]),
    "similarity --limit -5": (["similarity", "--limit", "-5"], ["--limit"]),
    "similarity --batch-size 2": (["similarity", "--batch-size", "2"], ["--batch-size"]),
    "similarity --alpha nan": (["similarity", "--alpha", "nan"], ["--alpha"]),
    "similarity --lr 0": (["similarity", "--lr", "0"], ["--lr", "> 0"]),
    "similarity --ragged maybe": (["similarity", "--ragged", "maybe"], ["--ragged"]),
    "similarity unknown model": (["similarity", "-a", "no_such_model", "--device", "cpu"], ["no_such_model"]),
    "similarity missing attribute": (["similarity", "-a", "guidance_kernels.train.models:Nope",
                                      "--device", "cpu"], ["Nope"]),
    "similarity model factory raises": (["similarity", "-a", _broken_factory, "--device", "cpu"],
                                        ["Broken: factory failed", "GUIDANCE_KERNELS_DEBUG"]),
    "similarity 1-D .npy as --data": (["similarity", "--device", "cpu", "--data", _one_d_npy],
                                      ["one_d.npy", "shape (100,)"]),
    "similarity missing --data file": (["similarity", "--device", "cpu", "--data", "nope/missing.npy"],
                                       ["missing.npy"]),
    "similarity --out <existing file>": (["similarity", "--device", "cpu", "--out", _existing_file],
                                         ["--out", "taken"]),
    "demo --out <existing file>": (["demo", "--quick", "--no-progress", "--out", _existing_file], ["taken"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cli_mistake_is_one_line_exit_2(name, tmp_path):
    args, needles = CASES[name]
    args = [a(tmp_path) if callable(a) else a for a in args]
    if args[0] == "similarity":
        args = [*args, "--no-progress"] + ([] if "--out" in args else ["--out", str(tmp_path / "o")])
    _assert_one_line_error(runner.invoke(app, args), *needles)


def test_crafted_whole_module_pickle_needs_trust_pickle(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"m": Evil()}, tmp_path / "evil.pt")
    r = runner.invoke(app, ["similarity", "-a", str(tmp_path / "evil.pt"), "--device", "cpu",
                            "--out", str(tmp_path / "o"), "--no-progress"])
    _assert_one_line_error(r, "evil.pt", "--trust-pickle")
    assert not marker.exists()


def _cli(*args, env=None):
    e = dict(os.environ, **(env or {}))
    e.pop("TRITON_INTERPRET", None)
    e.pop(DEBUG_ENV, None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "guidance_kernels", *args], capture_output=True,
                          text=True, timeout=120, env=e)


def test_real_terminal_shows_one_line_and_debug_shows_traceback(tmp_path):
    # triton on CPU without the interpreter: the user's case, outside the test suite's environment
    r = _cli("similarity", "--backend", "triton", "--device", "cpu", "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: similarity:") and "triton" in lines[0]
    r = _cli("similarity", "-a", "no_such_model", "--device", "cpu", "--out", str(tmp_path / "o"),
             env={DEBUG_ENV: "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "no_such_model" in r.stderr
