"""Bench: our layer-by-layer minibatch CKA map vs pytorch-cka, torch-cka and ckatorch.

    /tmp/venv/bin/python bench/similarity_peers.py [--quick] [--out bench/results/DATE_DEVICE_similarity_peers.json]

Workloads (activations computed once, then replayed to every peer, see
guidance_kernels.similarity.peers):

* digits_cnn_vs_fcn40: small_cnn (4 layers: conv1 1024, conv2 2048, fc1 64, fc2 10 features) vs
  deep_fcn depth 40 (40 Linear outputs of width 64 / 10), untrained, seed 0; 1792 digits images,
  batches of 256 (7 batches).
* digits_fcn40_self: deep_fcn depth 40 against itself (40 x 40, symmetric).
* offset_relu: 8 vs 8 synthetic layers (N=2048, p=512, batches of 256) of ReLU features with a
  common offset of +20 (spread of a few units), where fp32 HSIC from raw Grams cancels digits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from guidance_kernels.similarity import peers
from guidance_kernels.data import load_digits_tensors
from guidance_kernels.train.hooks import ActivationRecorder
from guidance_kernels.train.mapping import select_layers
from guidance_kernels.train.models import build_model


@torch.no_grad()
def acts_of(model, x):
    names = select_layers(model, "auto")
    rec = ActivationRecorder(model, names)
    model.eval()
    with rec.recording():
        model(x)
    out = [a.flatten(1).contiguous() for a in rec.take()]
    rec.close()
    return out


def offset_relu(N=2048, p=512, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, 16, generator=g)
    mk = lambda: [torch.relu(base @ torch.randn(16, p, generator=g) + torch.randn(N, p, generator=g)) + 20.0
                  for _ in range(L)]
    return mk(), mk()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one repeat, small fcn (depth 12)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    repeats = 1 if args.quick else args.repeats
    depth = 12 if args.quick else 40
    (xtr, _), (xte, _) = load_digits_tensors()
    x = torch.cat([xtr, xte])[:1792]
    cnn = build_model("small_cnn", seed=0)
    fcn = build_model("deep_fcn", seed=0, depth=depth)
    a_cnn, a_fcn = acts_of(cnn, x), acts_of(fcn, x)
    oa, ob = offset_relu()
    work = {
        f"digits_cnn_vs_fcn{depth}": dict(acts_a=a_cnn, acts_b=a_fcn, batch_size=256, symmetric=False),
        f"digits_fcn{depth}_self": dict(acts_a=a_fcn, acts_b=None, batch_size=256, symmetric=True),
        "offset_relu": dict(acts_a=oa, acts_b=ob, batch_size=256, symmetric=False),
    }
    load0 = os.getloadavg()
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": f"cpu, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
                  f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "python": sys.version.split()[0],
        "load_average_at_start": load0,
        "note": ("times are best of the repeats on a shared machine (see load averages): compare "
                 "them within a workload only"),
        "workloads": {},
    }
    for name, w in work.items():
        print(f"== {name}", flush=True)
        shapes_a = [tuple(t.shape) for t in w["acts_a"]]
        shapes_b = None if w["acts_b"] is None else [tuple(t.shape) for t in w["acts_b"]]
        r = peers.compare(w["acts_a"], w["acts_b"], w["batch_size"], symmetric=w["symmetric"],
                          repeats=repeats)
        r.update({"layers_a": len(shapes_a), "layers_b": len(shapes_b or shapes_a),
                  "features_a": sorted({s[1] for s in shapes_a}),
                  "features_b": sorted({s[1] for s in (shapes_b or shapes_a)}),
                  "samples": shapes_a[0][0], "batch_size": w["batch_size"], "symmetric": w["symmetric"]})
        for k, v in r["peers"].items():
            if v.get("status") == "ok":
                print(f"  {k:12s} {v['seconds_best']:8.3f} s  |diff| vs ours {v['max_abs_diff_vs_ours']:.2e}"
                      f"  vs fp64 {v['max_abs_diff_vs_fp64']:.2e}", flush=True)
            else:
                print(f"  {k:12s} {v['status']}", flush=True)
        out["workloads"][name] = r
    out["small_batch_n3"] = peers.small_batch_behaviour(3)
    out["load_average_at_end"] = os.getloadavg()
    path = args.out or os.path.join("bench", "results",
                                    f"{time.strftime('%Y-%m-%d')}_cpu-{os.cpu_count()}core_similarity_peers.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
