"""backend="auto" from measurements: shape classes, winners of a GPU bench run, the table, and
the resolution (CUDA faked: the lookup itself needs no GPU)."""

import json

import pytest
import torch

from guidance_kernels import backends, planning
from guidance_kernels.backends import dispatch
from guidance_kernels.bench import dispatch as bench_dispatch
from guidance_kernels.bench.workloads import get_workloads


def test_canonical_workloads_fall_into_their_classes():
    got = {w.name: planning.shape_class_of(w.n, w.forms(), "bf16") for w in get_workloads(None)}
    assert got == {
        "resnet18_b256": "bf16/sample:n<=256",
        "fcn_guided_b256": "bf16/sample:n<=256",
        "gpt_tokens": "bf16/feature",
        "vit_b128": "bf16/sample:n<=128",
        "many_small": "bf16/sample:n<=64",
    }


def test_shape_class_of_tensors_uses_the_form_cost_model():
    x, y = torch.randn(4096, 64), torch.randn(4096, 32)
    assert planning.shape_class([x], [y]) == "fp32/feature"
    assert planning.shape_class([x[:100].bfloat16()], [torch.randn(100, 5000)]) == "bf16/sample:n<=128"
    assert planning.shape_class_of(10_000, ["sample"], "fp16") == "fp16/sample:n>4096"


def _rec(workload, impl, t, status="ok", mode="fwd+bwd"):
    return {"workload": workload, "impl": impl, "mode": mode, "status": status, "median_s": t}


def _result(records, **meta):
    m = {"device": "cuda:0", "device_name": "Fake GPU", "quick": False, "scale": 1.0, "dtype": "bf16"}
    m.update(meta)
    return {"meta": m, "records": records}


def test_winners_sum_over_a_class_and_ignore_wrong_rows():
    res = _result([
        _rec("resnet18_b256", "gk:triton", 1.0), _rec("resnet18_b256", "gk:cuda", 2.0),
        _rec("fcn_guided_b256", "gk:triton", 3.0), _rec("fcn_guided_b256", "gk:cuda", 1.0),
        _rec("many_small", "gk:triton", 5.0), _rec("many_small", "gk:cuda", 1.0, status="wrong"),
        _rec("vit_b128", "gk:triton", 0.1, mode="fwd"), _rec("vit_b128", "gk:cuda", 9.0),
        _rec("gpt_tokens", "eager", 0.001), _rec("gpt_tokens", "gk:cuda", 1.0),
    ])
    assert bench_dispatch.winners(res) == {
        "bf16/sample:n<=256": "cuda",  # 3.0 vs 4.0 summed over W1 + W2
        "bf16/sample:n<=64": "triton",  # the faster cuda row failed its check
        "bf16/sample:n<=128": "cuda",  # only fwd+bwd rows count
        "bf16/feature": "cuda",  # baselines are not candidates
    }
    # no backend measured on both W1 and W2: the class is left to the static priorities
    res = _result([_rec("resnet18_b256", "gk:triton", 1.0), _rec("fcn_guided_b256", "gk:cuda", 0.5)], dtype="fp16")
    assert bench_dispatch.winners(res) == {}


def test_update_table_writes_the_device_entry(tmp_path):
    src, table = tmp_path / "r.json", tmp_path / "dispatch.json"
    src.write_text(json.dumps(_result([_rec("many_small", "gk:cuda", 1.0)])))
    assert bench_dispatch.update_table(str(src), str(table)) == {"bf16/sample:n<=64": "cuda"}
    entry = json.loads(table.read_text())["devices"]["Fake GPU"]
    assert entry["classes"] == {"bf16/sample:n<=64": "cuda"} and entry["dtype"] == "bf16"
    for bad in (dict(device="cpu"), dict(quick=True, scale=0.125)):
        src.write_text(json.dumps(_result([], **bad)))
        with pytest.raises(SystemExit):
            bench_dispatch.update_table(str(src), str(table))


def test_packaged_table_loads():
    assert isinstance(dispatch.load_table(), dict)


def test_auto_follows_the_measured_table_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(backends, "_why_unavailable", lambda name, device: None)
    monkeypatch.setattr(dispatch, "load_table", lambda: {"Fake GPU": {"classes": {"bf16/sample:n<=64": "cuda"}}})
    resolve = backends._resolve.__wrapped__ if hasattr(backends._resolve, "__wrapped__") else backends._resolve
    assert resolve("auto", "cuda", 0, "bf16/sample:n<=64") == "cuda"
    assert resolve("auto", "cuda", 0, "fp32/sample:n<=64") == "triton"  # another dtype: not measured
    assert resolve("auto", "cuda", 0, "bf16/feature") == "triton"  # not measured: static priority
    assert resolve("auto", "cuda", 0, None) == "triton"
    assert resolve("auto", "cpu", None, "bf16/sample:n<=64") == "reference"
    monkeypatch.setattr(backends, "_why_unavailable", lambda name, device: None if name != "cuda" else "not built")
    assert resolve("auto", "cuda", 0, "bf16/sample:n<=64") == "triton"  # measured winner unavailable
