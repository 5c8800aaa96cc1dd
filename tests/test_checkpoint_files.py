"""Trainer checkpoints and result files: nothing executed on load, nothing lost on a failed write.

A crafted checkpoint is refused (weights_only=True); empty / corrupt / foreign files raise an error
naming the file; a full disk (simulated) keeps the old checkpoint and leaves no temporary; an
unwritable out_dir fails before training; schedules accept numbers wherever they take one."""

import os

import pytest
import torch
from tolerance import assert_within
from torch import nn

from guidance_kernels.files import FileLoadError, FileWriteError
from guidance_kernels.train import FirstK, Guidance, NoiseWarmup, TrainConfig, Trainer
from guidance_kernels.train.models import DeepFCN, SmallCNN
from guidance_kernels.train.schedules import AlphaDecay, Continuous


def make(out_dir, steps=8, alpha=None):
    torch.manual_seed(0)
    t = DeepFCN(depth=4, width=16)
    g = SmallCNN(channels=4, hidden=8)
    G = Guidance(t, g, target_layers=nn.Linear, guide_layers=(nn.Conv2d, nn.Linear),
                 alpha=NoiseWarmup(k=2, value=1.0) if alpha is None else alpha)
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.randn(48, 1, 8, 8, generator=gen), torch.randint(0, 10, (48,), generator=gen)
    cfg = TrainConfig(steps=steps, batch_size=16, progress=False, eval_every=0, log_every=2,
                      checkpoint_every=4, out_dir=None if out_dir is None else str(out_dir))
    return Trainer(t, (X, Y), cfg, guidance=G)


class _RunsCode:
    """Unpickling this calls ``os.system``-like code: here it only writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"step": 1, "payload": _RunsCode(str(marker))}, ckpt)
    tr = make(tmp_path)
    with pytest.raises(FileLoadError, match="checkpoint.pt") as e:
        tr.load_checkpoint(str(ckpt))
    assert "weights_only" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("content, what", [(b"", "empty"), (b"\x80\x02garbage" * 10, "corrupt")], ids=["empty", "corrupt"])
def test_empty_or_corrupt_checkpoint_names_the_file(tmp_path, content, what):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(content)
    with pytest.raises(FileLoadError, match=r"checkpoint\.pt") as e:
        make(tmp_path).fit(resume=True)
    assert what in str(e.value) or "truncated" in str(e.value)


def test_truncated_checkpoint_names_the_file(tmp_path):
    tr = make(tmp_path)
    tr.fit(max_steps=4)
    ckpt = tmp_path / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileLoadError, match=r"checkpoint\.pt.*(corrupt|truncated)"):
        make(tmp_path).load_checkpoint()


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    ckpt = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, ckpt)
    with pytest.raises(FileLoadError, match=r"weights\.pt: not a trainer checkpoint"):
        make(tmp_path).load_checkpoint(str(ckpt))


def test_disk_full_keeps_old_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    tr = make(tmp_path)
    tr.fit(max_steps=4)  # checkpoint at step 4
    ckpt = tmp_path / "checkpoint.pt"
    old = ckpt.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # some bytes land, then the disk is full
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234")

    monkeypatch.setattr(torch, "save", full_disk)
    tr.step = 8
    with pytest.raises(FileWriteError, match=r"checkpoint\.pt.*unexpected pos"):
        tr.save_checkpoint()
    assert ckpt.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "metrics.json"]
    monkeypatch.undo()
    assert make(tmp_path).load_checkpoint() is None  # the old one still loads


def test_checkpoint_is_fsynced_before_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", os.path.basename(b))),
                                                     real_replace(a, b))[1])
    make(tmp_path).save_checkpoint()
    i = calls.index(("replace", "checkpoint.pt"))
    assert "fsync" in calls[:i]


def test_resume_from_safe_checkpoint_is_still_exact(tmp_path):
    full = make(tmp_path / "a").fit()
    part = make(tmp_path / "b")
    part.fit(max_steps=7)  # last checkpoint at step 4
    resumed = make(tmp_path / "b")
    h = resumed.fit(resume=True)
    assert h.step == list(range(10))
    # the same steps replayed from the checkpoint: equal up to fp32 rounding of O(1) losses
    assert_within(torch.tensor(h.loss), torch.tensor(full.loss), dtype=torch.float32)


def test_unwritable_out_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    tr = make(blocker / "run")
    with pytest.raises(FileWriteError, match="not-a-dir"):
        tr.fit()
    assert tr.step == 0 and tr.history.loss == []


def test_metrics_write_failure_keeps_the_history(tmp_path, monkeypatch):
    import guidance_kernels.train.trainer as trainer_mod

    def boom(path, obj, indent=1):
        raise FileWriteError(f"{path}: could not write: No space left on device")

    monkeypatch.setattr(trainer_mod, "write_json", boom)
    tr = make(tmp_path)
    tr.cfg.checkpoint_every = 0
    with pytest.warns(RuntimeWarning, match="metrics.json.*No space"):
        h = tr.fit()
    assert len(h.loss) == 10


def test_noise_warmup_accepts_a_number_after_the_warmup():
    s = NoiseWarmup(k=3, value=2.0, then=0.5)
    assert [s.alpha(i) for i in range(5)] == [2.0, 2.0, 2.0, 0.5, 0.5]
    tr = make(None, steps=3, alpha=NoiseWarmup(k=2, then=1.0))
    h = tr.fit()
    assert len(h.loss) == 5 and all(g > 0 for g in h.guidance)


@pytest.mark.parametrize("build, match", [
    (lambda: NoiseWarmup(k=-1), r"NoiseWarmup\.k must be >= 0"),
    (lambda: NoiseWarmup(k=2.5), r"NoiseWarmup\.k must be an integer"),
    (lambda: NoiseWarmup(k=2, then="x"), r"NoiseWarmup\.then: expected a Schedule or a number"),
    (lambda: NoiseWarmup(k=2, then=float("nan")), r"NoiseWarmup\.then must be finite"),
    (lambda: FirstK(k=3, value=float("inf")), r"FirstK\.value must be finite"),
    (lambda: Continuous("1"), r"Continuous\.value must be a number"),
    (lambda: AlphaDecay(steps=0), r"AlphaDecay\.steps must be >= 1"),
])
def test_schedule_arguments_are_validated(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


@pytest.mark.parametrize("field, value", [("log_every", 0), ("batch_size", 0), ("steps", -1),
                                          ("lr", 0.0), ("lr", float("nan")), ("grad_clip", -1.0),
                                          ("checkpoint_every", 2.5)])
def test_train_config_is_validated_before_training(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be"):
        TrainConfig(**{field: value})


def test_explicit_resume_path_must_exist(tmp_path):
    with pytest.raises(FileLoadError, match=r"nope\.pt: no such file"):
        make(tmp_path).fit(resume=str(tmp_path / "nope.pt"))
    assert make(tmp_path).fit(resume=True).step[0] == 0  # resume=True without one: a fresh start


def test_checkpoint_of_another_model_names_the_file(tmp_path):
    make(tmp_path).fit(max_steps=4)
    torch.manual_seed(0)
    other = DeepFCN(depth=3, width=8)
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.randn(48, 1, 8, 8, generator=gen), torch.randint(0, 10, (48,), generator=gen)
    tr = Trainer(other, (X, Y), TrainConfig(steps=2, batch_size=16, progress=False, out_dir=str(tmp_path)))
    with pytest.raises(FileLoadError, match=r"checkpoint\.pt: a checkpoint of another model"):
        tr.fit(resume=True)
