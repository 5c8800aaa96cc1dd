"""The demo command runs end to end (one seed, shortened for CI time) and writes its outputs."""

import json

from typer.testing import CliRunner

from guidance_kernels.cli import app
from guidance_kernels.train.demo import ARMS, judge


def test_quick_demo_end_to_end(tmp_path):
    # --quick is one seed; --steps 40 keeps this under ~90 s on 2 busy cores
    r = CliRunner().invoke(app, ["demo", "--quick", "--steps", "40", "--out", str(tmp_path), "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["final_acc"]) == set(ARMS)
    assert all(len(v) == 1 for v in res["final_acc"].values())
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert {v["claim"] for v in res["verdicts"]} >= {"a", "b", "c_trained", "c_untrained"}
    for arm in ARMS:  # rich may shorten long names to the terminal width
        assert arm[:12] in r.output
    assert "(a)" in r.output and "(b)" in r.output and "(c)" in r.output


def test_judge_reports_failures_plainly():
    acc = {a: [0.1, 0.11, 0.1] for a in ARMS}
    v = {x["claim"]: x for x in judge(acc, 3)}
    assert v["a"]["holds"] is False and "NOT clearly above" in v["a"]["text"]
    assert v["c_trained"]["holds"] is None  # no continuous gain: not judged
    acc.update(guided_trained=[0.9, 0.92, 0.91], guided_untrained=[0.5, 0.52, 0.55],
               warmup_trained=[0.8, 0.82, 0.81], warmup_untrained=[0.12, 0.1, 0.11])
    v = {x["claim"]: x for x in judge(acc, 3)}
    assert v["a"]["holds"] and v["b"]["holds"]
    assert v["c_trained"]["holds"] and v["c_untrained"]["holds"] is False
