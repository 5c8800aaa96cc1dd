"""Lightning integration: the guidance term reaches the target's gradients (checked against a
float64 computation), is logged, leaves the guide untouched and out of optimizer and checkpoint,
follows trainer.global_step across a resume, and works under DDP on 2 CPU processes."""

import copy
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lightning", reason="the 'lightning' extra is not installed")

import lightning as L  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning_models import Classifier, data, loader, make_guide  # noqa: E402
from reference_math import cka as cka_ref  # noqa: E402
from tolerance import bound, rel  # noqa: E402

from guidance_kernels.files import load_torch  # noqa: E402
from guidance_kernels.train import AlphaDecay  # noqa: E402

HERE = pathlib.Path(__file__).parent


def trainer(tmp_path, max_steps, **kw):
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, **kw,
    )


def guide_snapshot(guide):
    return {k: v.clone() for k, v in guide.state_dict().items()}


def reference_grads(net, guide, x, y, alpha):
    """Gradients of CE + alpha * Σ (1 - CKA) in float64 from the textbook CKA."""
    net = copy.deepcopy(net).double()
    guide = copy.deepcopy(guide).double().eval()
    x = x.double()
    h0 = net[0](x)
    logits = net[3](net[2](net[1](h0)))
    with torch.no_grad():
        g0 = guide[0](x)
        g4 = guide(x)
    loss = F.cross_entropy(logits, y) + alpha * ((1 - cka_ref(h0, g0)) + (1 - cka_ref(logits, g4)))
    return torch.autograd.grad(loss, list(net.parameters()))


def test_single_process_grads_logs_guide_untouched(tmp_path):
    guide = make_guide()
    before = guide_snapshot(guide)
    model = Classifier(guide, alpha=0.7)
    net0 = copy.deepcopy(model.net)
    # the guide is not a sub-module: not optimised, not in state_dict
    assert all(not k.startswith("_gk") for k in model.state_dict())
    assert {id(p) for p in model.parameters()}.isdisjoint(id(p) for p in guide.parameters())
    t = trainer(tmp_path, 2, enable_checkpointing=True)
    t.fit(model, loader())
    # gradients of the first step include the guidance term (float64 reference)
    x, y = data()
    want = reference_grads(net0, guide, x[:8], y[:8], 0.7)
    got = model.grads[0]
    without = torch.autograd.grad(F.cross_entropy(net0(x[:8]), y[:8]), list(net0.parameters()))
    tol = bound(torch.float32, k=8 * 36 * 9)
    for g, w in zip(got, want):
        assert rel(g, w) <= tol
    flat = lambda gs: torch.cat([g.reshape(-1).double() for g in gs])  # noqa: E731
    # the guidance term is not negligible here (biases feel none: CKA centres them away)
    assert rel(flat(without), flat(want)) > 100 * tol
    # logged per pair, through the logger
    logged = t.logged_metrics
    assert {"guidance/loss", "guidance/alpha", "guidance/cka/0~0", "guidance/cka/3~4"} <= set(logged)
    assert 0.0 <= float(logged["guidance/cka/0~0"]) <= 1.0
    assert float(logged["guidance/alpha"]) == pytest.approx(0.7)
    # guide untouched: same weights and BN statistics, no grads, still frozen and in eval mode
    after = guide.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in guide.parameters())
    assert not guide.training
    # not in the checkpoint
    ckpt = next(pathlib.Path(tmp_path).rglob("*.ckpt"))
    state = load_torch(ckpt)
    assert "guidance_guide_state_dict" not in state
    assert all(k.startswith("net.") for k in state["state_dict"])


def test_resume_reproduces_schedule_alpha(tmp_path):
    sched = AlphaDecay(value=1.0, steps=8, final=0.0)
    model = Classifier(make_guide(), alpha=sched)
    trainer(tmp_path / "a", 3).fit(model, loader(n=24))
    ckpt = next(pathlib.Path(tmp_path / "a").rglob("*.ckpt"))
    resumed = Classifier(make_guide(), alpha=sched)
    trainer(tmp_path / "b", 6).fit(resumed, loader(n=24), ckpt_path=str(ckpt))
    assert [s for s, _ in model.seen] == [0, 1, 2]
    assert [s for s, _ in resumed.seen] == [3, 4, 5]
    for s, a in model.seen + resumed.seen:
        assert a == sched.alpha(s)


def test_save_guide_opt_in(tmp_path):
    model = Classifier(make_guide(), save_guide=True)
    trainer(tmp_path, 1).fit(model, loader())
    state = load_torch(next(pathlib.Path(tmp_path).rglob("*.ckpt")))
    assert set(state["guidance_guide_state_dict"]) == set(make_guide().state_dict())
    assert all(k.startswith("net.") for k in state["state_dict"])


def test_configure_errors():
    with pytest.raises(KeyError, match="unknown target layer .nope."):
        Classifier(make_guide(), mapping={"nope": "0"})

    class Bare(Classifier):
        def __init__(self):
            L.LightningModule.__init__(self)

    with pytest.raises(RuntimeError, match="configure_guidance"):
        Bare().guidance_loss(torch.zeros(2, 1, 8, 8))


def test_ddp_two_cpu_processes(tmp_path):
    """strategy='ddp' on 2 CPU processes (gloo), gather='global': each rank logs the guidance
    loss of the global batch, which matches the single-process value at step 0."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(HERE / "_lightning_ddp_worker.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    want = out[0]["single_process_step0"]
    for r in range(2):
        assert out[r]["guide_unchanged"] and out[r]["no_guide_grads"]
        assert "guidance/cka/0~0" in out[r]["logged"]
        assert abs(out[r]["step0_guidance_loss"] - want) <= bound(torch.float32, k=16 * 36 * 9) * max(abs(want), 1.0)
    assert out[0]["params"] == out[1]["params"]  # DDP kept the replicas equal


def test_module_pickles_for_ddp_spawn(tmp_path):
    import pickle

    model = Classifier(make_guide())
    clone = pickle.loads(pickle.dumps(model))  # what strategy="ddp_spawn" does
    x, y = data(8)
    with clone.guidance_recording():
        clone.net(x)
    assert float(clone.guidance_loss(x).detach()) > 0
    assert clone.guide is not model.guide and not clone.guide.training
    trainer(tmp_path, 1).fit(model, loader())
    pickle.dumps(model)  # hooks are removed at fit end
