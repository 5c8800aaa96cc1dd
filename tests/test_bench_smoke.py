"""CI smoke test of the bench suite: ``guidance-kernels bench --quick --device cpu --out r.json``
end to end in a subprocess (as a user runs it), then the JSON, CSV and PNG are checked."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest

from guidance_kernels.bench.workloads import WORKLOADS

MUST_BE_TIMED = ("gk:reference", "eager", "torch.compile", "paper")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "guidance_kernels", "bench", "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads(out.read_text()), proc.stdout, wall


def test_every_workload_and_implementation_is_reported(quick_run):
    _, result, _, _ = quick_run
    impls = [i["name"] for i in result["meta"]["implementations"]]
    assert {"gk:reference", "eager", "torch.compile", "paper", "ckatorch", "pytorch-cka", "torch-cka"} <= set(impls)
    seen = {(r["workload"], r["impl"], r["mode"]) for r in result["records"]}
    for w in WORKLOADS:
        for name in impls:
            for mode in ("fwd", "fwd+bwd"):
                assert (w, name, mode) in seen, (w, name, mode)
    for r in result["records"]:
        assert r["status"] in ("ok", "skipped", "n/a", "wrong", "error"), r
        if r["status"] != "ok":
            assert r.get("reason"), r  # every row that is not timed says why


def test_timed_rows_passed_their_check(quick_run):
    _, result, _, _ = quick_run
    timed = [r for r in result["records"] if r["status"] == "ok"]
    assert timed
    for r in timed:
        assert r["check"]["ok"] is True, r
        assert r["check"]["loss_abs_err"] <= r["check"]["loss_tol"], r
        if r["mode"] == "fwd+bwd":
            assert r["check"]["grad_rel_err"] <= r["check"]["grad_tol"], r
        assert r["median_s"] > 0 and r["p20_s"] <= r["median_s"] <= r["p80_s"], r
        assert 0 < r["pct_floor"] and r["floor_s"] > 0, r
        assert r["gbps"] > 0 and r["tflops"] > 0, r
    # Our reference and the baselines must be correct and timed on every workload, both modes.
    for w in WORKLOADS:
        for name in MUST_BE_TIMED:
            for mode in ("fwd", "fwd+bwd"):
                rows = [r for r in result["records"] if (r["workload"], r["impl"], r["mode"]) == (w, name, mode)]
                if name == "paper" and rows and rows[0]["status"] == "skipped":
                    assert "estimated" in rows[0]["reason"]  # n^3 formulation skipped only for cost
                    continue
                assert rows and rows[0]["status"] == "ok", rows
                assert rows[0]["speedup_vs_eager"] > 0


def test_ceilings_e2e_and_files(quick_run):
    out, result, stdout, wall = quick_run
    c = result["ceilings"]
    assert c["copy_bytes_per_s"] > 1e8 and c["matmul_flops_per_s"] > 1e8
    e2e = {r["variant"]: r for r in result["e2e"]}
    assert set(e2e) == {"none", "gk", "paper"}
    assert e2e["none"]["status"] == "ok"
    for name in ("gk", "paper"):
        assert e2e[name]["status"] == "ok", e2e[name]
        assert e2e[name]["check"]["ok"]
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert len(rows) == len(result["records"]) + len(result["e2e"])
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "resnet18_b256" in stdout and "% floor" in stdout  # the table was printed
    print(f"quick bench wall time: {wall:.1f}s (in-run {result['meta']['wall_s']:.1f}s)")


def test_time_limit_records_skipped_rows_and_still_writes_files(tmp_path, monkeypatch):
    """``--time-limit``: rows not started in time are ``skipped`` with the reason, the e2e table
    too, and the JSON / CSV / PNG are still written (the PNG with no timed row at all)."""
    from guidance_kernels.bench import report, runner
    from guidance_kernels.bench.ceilings import Ceilings

    fake = Ceilings(1e10, 1e11, "bfloat16", {"bfloat16": 1e11, "float32": 1e11, "float64": 1e10}, 1 << 20, 64)
    monkeypatch.setattr(runner, "measure_ceilings", lambda *a, **k: fake)
    cfg = runner.BenchConfig(device="cpu", quick=True, workloads=["W5", "W1"], impls=["eager", "gk:reference"],
                             time_limit_s=0)
    result = runner.run_bench(cfg, log=lambda s: None)
    assert {(r["workload"], r["impl"], r["mode"]) for r in result["records"]} == {
        (w, i, m) for w in ("many_small", "resnet18_b256") for i in ("eager", "gk:reference") for m in ("fwd", "fwd+bwd")
    }
    for r in result["records"]:
        assert r["status"] == "skipped" and "time limit" in r["reason"] and r["floor_s"] > 0, r
    assert [e["status"] for e in result["e2e"]] == ["skipped"]
    paths = report.write_all(result, tmp_path / "r.json")
    assert json.loads(paths[0].read_text())["meta"]["config"]["time_limit_s"] == 0
    assert len(list(csv.DictReader(paths[1].open()))) == len(result["records"]) + 1
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_part_quick(tmp_path):
    """``bench --part scaling --quick``: 3 axes x 5 points x 2 calls timed against the GEMM floor
    measured in the run, exponents fitted, JSON and PNG written."""
    out = tmp_path / "scaling.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "guidance_kernels", "bench", "--part", "scaling", "--quick", "--device", "cpu",
         "--dtype", "fp32", "--budget", "0.01", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["meta"]["gemm_fp32_flops_per_s"] > 1e8 and result["meta"]["blas"]
    for axis in ("n", "p", "L"):
        for call in ("loss fwd+bwd", "cka_matrix"):
            rows = [r for r in result["rows"] if r["axis"] == axis and r["call"] == call]
            assert len(rows) >= 5 and len({r[axis] for r in rows}) == len(rows)
            assert all(r["median_s"] > 0 and r["pct_floor"] > 0 and r["floor_s"] > 0 for r in rows)
            assert isinstance(result["fits"][f"{call} vs {axis}"], float)
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_part_rejects_unknown_part():
    proc = subprocess.run([sys.executable, "-m", "guidance_kernels", "bench", "--part", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--part" in proc.stderr
