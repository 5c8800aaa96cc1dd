"""A small training loop for guided training. Optional: :class:`Guidance` works from any loop.

What it does: Adam (or your optimizer), bf16 autocast (``amp=True``), gradient clipping,
optional guidance (:class:`~guidance_kernels.train.guidance.Guidance`, with its schedule,
including the noise warm-up phase) and/or a KD baseline, evaluation at intervals, metrics to
JSON, a rich progress bar, and checkpoint/resume.

Determinism and resume: the data order is a pure function of ``(seed, epoch)``, noise batches of
``(seed, step)``, schedules of ``step``; the checkpoint stores model, optimizer, step, the
global RNG state and the history so far. A run resumed from a checkpoint therefore reproduces the
uninterrupted loss curve (tested to 1e-6). Checkpoints and ``metrics.json`` are written
atomically (temp file beside them, fsync, rename: a crash or a full disk keeps the previous file)
and checkpoints load with ``weights_only=True`` (a crafted file cannot run code); an unwritable
``out_dir`` fails before the first step.

Data: in-memory tensors ``(X, y)``. ``batch_size`` is the **global** batch; under
``torch.distributed`` each rank takes its contiguous slice (``batch_size`` must divide by the
world size). Steps: ``warmup_steps`` (from the guidance schedule) noise steps first, then
``steps`` task steps. Per-step losses stay on the device and are copied to the host every
``log_every`` steps (no per-step host sync).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guidance_kernels.files import (FileLoadError, FileWriteError, atomic_write, load_torch, save_torch,
                                    write_json)
from guidance_kernels.train.distributed import shard, world
from guidance_kernels.train.guidance import KD, Guidance
from guidance_kernels.train.mapping import unwrap


@dataclass
class TrainConfig:
    steps: int = 500                # task steps (a noise warm-up adds its own steps in front)
    batch_size: int = 256           # global batch
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None
    amp: bool = False               # bf16 autocast on the model's device
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    checkpoint_every: int = 0       # 0: never
    out_dir: Optional[str] = None   # metrics.json and checkpoint.pt go here
    progress: bool = True
    noise_std: float = 1.0          # noise warm-up inputs: N(0, noise_std^2), shape of X[0]

    def __post_init__(self):
        """Reject values that would fail (or silently do nothing) only after training started."""
        ints = {"steps": 0, "batch_size": 1, "log_every": 1, "eval_every": 0, "checkpoint_every": 0}
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {low}, got {v!r}")
        for name, positive in (("lr", True), ("weight_decay", False), ("noise_std", False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0 or (positive and v == 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number {'>' if positive else '>='} 0, "
                                 f"got {v!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float))
                                               and math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"TrainConfig.grad_clip must be None or a finite number > 0, got {self.grad_clip!r}")


@dataclass
class History:
    step: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    task: list = field(default_factory=list)
    guidance: list = field(default_factory=list)
    kd: list = field(default_factory=list)
    eval: list = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        train_data: tuple[Tensor, Tensor],
        config: TrainConfig,
        *,
        guidance: Optional[Guidance] = None,
        kd: Optional[KD] = None,
        eval_data: Optional[tuple[Tensor, Tensor]] = None,
        task_loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        optimizer: Optional[torch.optim.Optimizer] = None,
        callback: Optional[Callable[[int, "Trainer"], None]] = None,
        name: str = "train",
    ):
        self.model, self.cfg = model, config
        self.X, self.Y = train_data
        if self.X.shape[0] < config.batch_size:
            raise ValueError(f"{self.X.shape[0]} training samples < batch_size {config.batch_size}")
        self.guidance, self.kd = guidance, kd
        self.eval_data, self.task_loss = eval_data, task_loss
        self.opt = optimizer or torch.optim.Adam(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.callback, self.name = callback, name
        self.rank, self.world_size = world()
        if config.batch_size % self.world_size:
            raise ValueError(f"batch_size {config.batch_size} does not divide over {self.world_size} ranks")
        self.warmup = guidance.schedule.warmup_steps if guidance is not None else 0
        self.total = self.warmup + config.steps
        self.steps_per_epoch = self.X.shape[0] // config.batch_size
        self.step = 0
        self.history = History()
        self._buf: list[tuple[int, Tensor, Tensor, Tensor, Tensor]] = []
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------ data
    def _gen(self, *key: int) -> torch.Generator:
        g = torch.Generator()
        s = self.cfg.seed
        for k in key:
            s = (s * 1_000_003 + k + 1) % (2**62)
        g.manual_seed(s)
        return g

    def batch(self, step: int) -> tuple[Tensor, Optional[Tensor]]:
        """This rank's batch at global ``step`` (a pure function of seed and step)."""
        bs = self.cfg.batch_size
        if step < self.warmup:
            noise = torch.randn((bs, *self.X.shape[1:]), generator=self._gen(1, step)) * self.cfg.noise_std
            return shard(noise, self.rank, self.world_size).to(self.device, self.X.dtype), None
        u = step - self.warmup
        epoch, pos = divmod(u, self.steps_per_epoch)
        perm = torch.randperm(self.X.shape[0], generator=self._gen(2, epoch))
        idx = shard(perm[pos * bs:(pos + 1) * bs], self.rank, self.world_size)
        return self.X[idx].to(self.device), self.Y[idx].to(self.device)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if not self.cfg.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self, step: int):
        x, y = self.batch(step)
        g = self.guidance
        use_g = g is not None and g.schedule.active(step)
        zero = torch.zeros((), device=self.device)
        self.model.train()
        with self._autocast():
            with g.record() if use_g else contextlib.nullcontext():
                out = self.model(x)
            g_loss = g.loss(x, step) if use_g else zero
            if y is None:  # noise warm-up: guidance alone
                task, kd = zero, zero
            else:
                task = self.task_loss(out, y).float()
                kd = self.kd.loss(x, out, step) if self.kd is not None else zero
            loss = task + g_loss + kd
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self._buf.append((step, loss.detach(), task.detach(), g_loss.detach(), kd.detach()))

    def _flush(self):
        if not self._buf:
            return
        vals = torch.stack([torch.stack(b[1:]).float() for b in self._buf]).cpu().tolist()
        for (s, *_), (l, t, gl, k) in zip(self._buf, vals):
            h = self.history
            h.step.append(s); h.loss.append(l); h.task.append(t); h.guidance.append(gl); h.kd.append(k)
        self._buf = []

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.eval_data is None:
            return {}
        m = unwrap(self.model)
        was = m.training
        m.eval()
        X, Y = self.eval_data
        correct, total_loss = 0, 0.0
        with self._autocast():
            for s in range(0, X.shape[0], 1024):
                out = m(X[s:s + 1024].to(self.device)).float()
                y = Y[s:s + 1024].to(self.device)
                total_loss += F.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(-1) == y).sum().item()
        m.train(was)
        n = X.shape[0]
        rec = {"step": self.step, "task_step": max(0, self.step - self.warmup),
               "acc": correct / n, "loss": total_loss / n}
        self.history.eval.append(rec)
        return rec

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_path(self) -> Optional[str]:
        return os.path.join(self.cfg.out_dir, "checkpoint.pt") if self.cfg.out_dir else None

    def save_checkpoint(self, path: Optional[str] = None):
        """Write the checkpoint atomically (temp file beside it, fsync, rename): a crash or a full
        disk keeps the previous checkpoint and leaves no temporary. Raises
        :class:`~guidance_kernels.files.FileWriteError` naming the file."""
        path = path or self._ckpt_path()
        if path is None or self.rank != 0:
            return
        self._flush()
        state = {
            "step": self.step,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "history": asdict(self.history),
            "config": asdict(self.cfg),
        }
        save_torch(state, path)

    def load_checkpoint(self, path: Optional[str] = None):
        """Load a checkpoint written by :meth:`save_checkpoint` with ``weights_only=True`` (a
        crafted file cannot run code). Raises :class:`~guidance_kernels.files.FileLoadError`
        naming the file when it is empty, truncated, not a checkpoint or not this trainer's."""
        path = path or self._ckpt_path()
        if path is None:
            raise ValueError("load_checkpoint: no path given and config.out_dir is not set")
        state = load_torch(path, map_location=self.device, check=_check_checkpoint)
        try:
            unwrap(self.model).load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FileLoadError(f"{path}: a checkpoint of another model or optimizer: {first}") from e
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = state["step"]
        self.history = History(**state["history"])

    def _check_out_dir(self):
        """Fail before training when ``out_dir`` cannot be written (not after every step)."""
        if not self.cfg.out_dir or self.rank != 0:
            return
        with atomic_write(os.path.join(self.cfg.out_dir, ".write-test")) as tmp:
            tmp.write_bytes(b"")
        with contextlib.suppress(OSError):
            os.remove(os.path.join(self.cfg.out_dir, ".write-test"))

    def write_metrics(self):
        """``out_dir/metrics.json`` (strict JSON, written atomically)."""
        if not self.cfg.out_dir or self.rank != 0:
            return
        write_json(os.path.join(self.cfg.out_dir, "metrics.json"),
                   {"name": self.name, "config": asdict(self.cfg), "warmup_steps": self.warmup,
                    "history": asdict(self.history)}, indent=None)

    # ------------------------------------------------------------------ loop
    def fit(self, *, resume: bool | str | os.PathLike = False, max_steps: Optional[int] = None) -> History:
        """Train to ``warmup + steps`` (or stop after global step ``max_steps``, to simulate an
        interruption). ``resume=True`` loads ``out_dir/checkpoint.pt`` if it exists (else starts
        fresh); a path is a checkpoint that must exist (``FileLoadError`` naming it otherwise)."""
        self._check_out_dir()
        if isinstance(resume, (str, os.PathLike)):
            self.load_checkpoint(os.fspath(resume))  # an explicit path must exist
        elif resume:
            path = self._ckpt_path()
            if path and os.path.exists(path):
                self.load_checkpoint(path)
        stop = self.total if max_steps is None else min(self.total, max_steps)
        cfg = self.cfg
        show = cfg.progress and self.rank == 0
        bar = contextlib.nullcontext()
        if show:
            from rich.progress import BarColumn, Progress, TimeRemainingColumn

            bar = Progress("[bold]{task.description}", BarColumn(), "{task.completed}/{task.total}",
                           "{task.fields[info]}", TimeRemainingColumn(), transient=False)
        t0 = time.perf_counter()
        with bar as prog:
            task_id = prog.add_task(self.name, total=self.total, completed=self.step, info="") if show else None
            if self.step == 0 and not self.history.eval:
                self.evaluate()
            while self.step < stop:
                self.train_step(self.step)
                self.step += 1
                s = self.step
                if s % cfg.log_every == 0 or s == stop:
                    self._flush()
                if (cfg.eval_every and s % cfg.eval_every == 0) or s == self.total or s == self.warmup:
                    self.evaluate()
                if cfg.checkpoint_every and s % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if show:
                    info = ""
                    if self.history.loss:
                        info = f"loss {self.history.loss[-1]:.4f}"
                    if self.history.eval:
                        info += f"  acc {self.history.eval[-1]['acc']:.3f}"
                    prog.update(task_id, completed=s, info=info)
                if self.callback is not None:
                    self.callback(s, self)
        self._flush()
        self.elapsed = time.perf_counter() - t0
        try:
            self.write_metrics()
        except FileWriteError as e:  # the trained model and the history are still returned
            import warnings

            warnings.warn(f"metrics not saved: {e}", RuntimeWarning, stacklevel=2)
        return self.history


_CKPT_KEYS = ("step", "model", "optimizer", "rng", "history")


def _check_checkpoint(obj) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"not a trainer checkpoint (holds a {type(obj).__name__}, expected a dict)")
    missing = [k for k in _CKPT_KEYS if k not in obj]
    if missing:
        raise ValueError(f"not a trainer checkpoint: missing {missing}")
