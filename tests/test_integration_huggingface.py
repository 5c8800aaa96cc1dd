"""Hugging Face Trainer integration: a tiny GPT-2 from config guided per token by an LSTM, a few
steps on random ids with padding: finite loss, padding excluded from the CKA, per-pair CKA in the
Trainer's logs, schedule by state.global_step, guide untouched."""

import importlib.util
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="the 'hf' extra is not installed")
pytest.importorskip("accelerate", reason="the 'hf' extra is not installed (accelerate)")

from reference_math import cka as cka_ref  # noqa: E402
from tolerance import bound, score_bound  # noqa: E402

from guidance_kernels.train import FirstK  # noqa: E402

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "hf_gpt2_per_token.py"


def example():
    spec = importlib.util.spec_from_file_location("hf_gpt2_per_token", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    mod.hf_logging.set_verbosity_error()
    return mod


def setup(tmp_path, steps=3, alpha=1.0, seq=12, **kw):
    ex = example()
    torch.manual_seed(0)
    model, guide = ex.build(seq=seq)
    ds = ex.RandomText(4 * steps, seq, 64)
    return ex, model, guide, ds, ex.make_trainer(model, guide, ds, steps=steps, batch=4, out=str(tmp_path),
                                                 alpha=alpha, **kw)


def batch(ds, idx=range(4)):
    items = [ds[i] for i in idx]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_train_logs_per_pair_cka_and_leaves_guide_untouched(tmp_path):
    ex, model, guide, ds, trainer = setup(tmp_path)
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3
    for e in logs:
        assert torch.isfinite(torch.tensor(e["loss"]))
        for key in ("guidance/cka/transformer.h.0~lstm1", "guidance/cka/transformer.h.1~lstm2"):
            assert 0.0 <= e[key] <= 1.0
        assert e["guidance/alpha"] == 1.0 and e["guidance/loss"] > 0
    assert all(torch.equal(before[k], v) for k, v in guide.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in guide.parameters())
    assert not any(k.startswith("guide") for k in model.state_dict())


def _loss(trainer, model, inputs):
    model.train()
    torch.manual_seed(5)  # the same dropout masks in both forwards
    return trainer.compute_loss(model, dict(inputs))


def test_padding_excluded_from_guidance(tmp_path):
    ex, model, guide, ds, trainer = setup(tmp_path)
    inputs = batch(ds)
    pad = inputs["attention_mask"] == 0
    assert pad.any()
    changed = dict(inputs, input_ids=torch.where(pad, (inputs["input_ids"] * 7 + 3) % 64, inputs["input_ids"]))
    with torch.no_grad():
        a, b = _loss(trainer, model, inputs), _loss(trainer, model, changed)
    # padded tokens change the target's and the guide's activations there, not the loss
    assert abs(float(a) - float(b)) <= 4 * score_bound("cka", torch.float32, pad.numel(), 32)
    # ...whereas without the mask they do
    trainer.mask_key = None
    with torch.no_grad():
        c, d = _loss(trainer, model, inputs), _loss(trainer, model, changed)
    assert abs(float(c) - float(d)) > 1e-3


def test_guidance_term_matches_reference_on_kept_tokens(tmp_path):
    ex, model, guide, ds, trainer = setup(tmp_path, alpha=0.5)
    inputs = batch(ds)
    keep = inputs["attention_mask"].reshape(-1).bool()
    model.eval()  # dropout off: the same activations in both forwards
    seen = {}
    handles = [model.transformer.h[i].register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(i, o[0] if isinstance(o, tuple) else o)) for i in range(2)]
    with torch.no_grad(), trainer.guidance.record():
        model(**inputs)
    for h in handles:
        h.remove()
    got = trainer.guidance.loss(inputs["input_ids"], 0, mask=inputs["attention_mask"])
    with torch.no_grad():
        g1, _ = guide.lstm1(guide.emb(inputs["input_ids"]))
        g2, _ = guide.lstm2(g1)
    rows = lambda t: t.reshape(-1, t.shape[-1])[keep]  # noqa: E731
    want = 0.5 * ((1 - cka_ref(rows(seen[0]), rows(g1))) + (1 - cka_ref(rows(seen[1]), rows(g2))))
    assert abs(float(got) - float(want)) <= 2 * score_bound("cka", torch.float32, int(keep.sum()), 32)


def test_schedule_follows_global_step(tmp_path):
    ex = example()
    torch.manual_seed(0)
    model, guide = ex.build(seq=12)
    trainer = ex.make_trainer(model, guide, ex.RandomText(16, 12, 64), steps=4, batch=4, out=str(tmp_path))
    trainer.guidance.schedule = FirstK(k=2, value=1.0)
    trainer.train()
    alphas = [e.get("guidance/alpha") for e in trainer.state.log_history if "loss" in e]
    assert alphas == [1.0, 1.0, None, None]  # steps 0, 1 guided; then the guide is not run


def test_gradient_accumulation_scaling(tmp_path):
    """When the model normalises the task loss over the accumulated batch (num_items_in_batch),
    the guidance term is divided by the accumulation steps; otherwise the Trainer divides."""
    ex, model, guide, ds, trainer = setup(tmp_path)
    assert trainer.model_accepts_loss_kwargs
    inputs = batch(ds)
    items = int((inputs["labels"][:, 1:] != -100).sum())  # the tokens the shifted LM loss averages
    trainer.current_gradient_accumulation_steps = 2
    with torch.no_grad():
        unscaled = _loss(trainer, model, inputs)
        torch.manual_seed(5)
        scaled = trainer.compute_loss(model, dict(inputs), num_items_in_batch=torch.tensor(items))
        torch.manual_seed(5)
        task = model(**inputs).loss
    g = unscaled - task
    assert float(g) > 0
    # the two task losses differ by the rounding of an `items`-term sum (sum / n vs mean)
    assert abs(float(scaled) - float(task + g / 2)) <= bound(torch.float32, k=items) * float(task + g)


def test_torchrun_two_cpu_processes_global_gather(tmp_path):
    """The example under torchrun (2 CPU processes, gloo, Accelerate's DDP), gather='global'."""
    import os
    import subprocess

    torchrun = pathlib.Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not next to the interpreter")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(EXAMPLE), "--steps", "2",
         "--batch", "4", "--seq", "8", "--gather", "global", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "'guidance/cka/transformer.h.1~lstm2'" in proc.stdout and "'step': 2" in proc.stdout


def test_bad_arguments_are_named(tmp_path):
    ex = example()
    model, guide = ex.build(seq=8)
    with pytest.raises(TypeError, match="guide must be an nn.Module"):
        ex.make_trainer(model, "lstm", ex.RandomText(4, 8, 64), steps=1, batch=4, out=str(tmp_path))
    trainer = ex.make_trainer(model, guide, ex.RandomText(4, 8, 64), steps=1, batch=4, out=str(tmp_path))
    trainer.guide_input = "pixel_values"
    with pytest.raises(KeyError, match="guide_input 'pixel_values' is not in the batch"):
        _loss(trainer, model, batch(ex.RandomText(4, 8, 64)))
