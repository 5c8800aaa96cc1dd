"""The main job's verdict rules on fixed numbers (they were written before any full run)."""

import math

from guidance_kernels.train.experiments.spec import ExperimentSpec, judge, standard_claims
from guidance_kernels.train.experiments.verdict import MARGIN, beats, claim_beats, claim_keeps, mean_sd


def test_mean_sd():
    m, s = mean_sd([1.0, 2.0, 3.0])
    assert m == 2.0 and abs(s - 1.0) < 1e-12
    assert math.isnan(mean_sd([0.5])[1])


def test_beats_clear_gain():
    r = beats([0.80, 0.82, 0.81], [0.60, 0.62, 0.61])
    assert r["holds"] is True and abs(r["diff"] - 0.2) < 1e-9 and r["two_se"] > 0


def test_beats_zero_and_negative_gain():
    assert beats([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])["holds"] is False
    assert beats([0.4, 0.41, 0.42], [0.6, 0.61, 0.62])["holds"] is False


def test_beats_below_margin_or_noise():
    # above the margin but within 2 s.e.: not a win
    assert beats([0.9, 0.5, 0.9], [0.6, 0.62, 0.61])["holds"] is False
    # within the margin, however tight: not a win
    d = MARGIN / 2
    assert beats([0.5 + d] * 3, [0.5] * 3)["holds"] is False


def test_one_seed_or_nan_not_judged():
    r = beats([0.9], [0.1])
    assert r["holds"] is None and "1 seed" in r["note"]
    r = beats([0.9, float("nan")], [0.1, 0.2])
    assert r["holds"] is None and "non-finite" in r["note"]
    v = claim_beats("a", "x", "g", "a0", {"g": [0.9], "a0": [0.1]})
    assert v["holds"] is None and "not judged: 1 seed" in v["text"]
    assert "nan" not in v["text"].lower() and "does NOT hold" not in v["text"]


def test_keeps():
    acc = {"alone": [0.60, 0.61, 0.62], "guided_trained": [0.80, 0.81, 0.82],
           "warmup_trained": [0.75, 0.76, 0.77]}
    v = claim_keeps("c", "warmup_trained", "guided_trained", "alone", acc)
    assert v["holds"] is True and abs(v["kept"] - 0.75) < 1e-9 and "75 %" in v["text"]
    acc["warmup_trained"] = [0.62, 0.63, 0.64]
    assert claim_keeps("c", "warmup_trained", "guided_trained", "alone", acc)["holds"] is False
    # a warm-up far below alone with a small continuous gain: no absurd percentage
    acc = {"alone": [0.60, 0.60, 0.60], "guided_trained": [0.63, 0.63, 0.63],
           "warmup_trained": [0.10, 0.10, 0.10]}
    v = claim_keeps("c", "warmup_trained", "guided_trained", "alone", acc)
    assert v["holds"] is False and "none" in v["text"] and "%" not in v["text"].split("kept")[1].split("(needs")[0]
    # no continuous gain: not judged
    acc["guided_trained"] = [0.60, 0.60, 0.60]
    v = claim_keeps("c", "warmup_trained", "guided_trained", "alone", acc)
    assert v["holds"] is None and "does not beat" in v["text"] and "nan" not in v["text"].lower()
    # zero continuous gain and one seed: not judged, no nan%
    acc1 = {k: v[:1] for k, v in acc.items()}
    v = claim_keeps("c", "warmup_trained", "guided_trained", "alone", acc1)
    assert v["holds"] is None and "1 seed" in v["text"] and "nan" not in v["text"].lower()


def test_judge_standard_claims():
    spec = ExperimentSpec("t", "t", ("alone",), 1, 1, 8, claims=standard_claims("trained"))
    acc = {"alone": [0.6, 0.61, 0.62], "guided_trained": [0.8, 0.81, 0.82],
           "guided_untrained": [0.6, 0.61, 0.62], "kd_untrained": [0.7, 0.71, 0.72],
           "warmup_trained": [0.79, 0.8, 0.81]}
    v = judge(spec, acc)
    assert [x["holds"] for x in v] == [True, False, False, True]
    assert [x["claim"] for x in v] == ["a", "a", "b", "c"]
