"""What an experiment is: its arms, the claims judged on them, and its sizes.

An :class:`ExperimentSpec` is plain data (picklable, JSON-able) so worker processes receive it.
Arm names follow one grammar: ``alone``; ``guided_<guide>``; ``kd_<guide>``;
``warmup_<guide>`` (noise warm-up, guidance only, then task only); ``firstk_<guide>``
(guidance for the first ``first_k`` task steps only), with ``<guide>`` in {trained, untrained}.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ExperimentSpec:
    name: str                       # "mnist1d", "copy_paste", "digits"
    title: str
    arms: tuple[str, ...]
    steps: int                      # task steps per arm
    guide_steps: int                # training steps of the guide (once per seed; the most, with
                                    # a stopping rule below)
    batch_size: int
    lr: float = 1e-3
    alpha: float = 1.0              # guidance weight (paper: 1, sum over pairs)
    warmup_steps: int = 150
    first_k: int = 150
    kd_temperature: float = 4.0
    grad_clip: float | None = None
    eval_every: int = 50
    chance: float = 0.1
    sizes: dict = field(default_factory=dict)  # task-specific sizes (data, widths, depths)
    # claims: ("beats", claim, label, a, b) or ("keeps", claim, warm, cont, alone)
    claims: tuple = ()
    # The guide's own training (never an arm's): learning rate (None: ``lr``) and a stopping rule
    # decided before any guided arm ran: ``guide_val`` training samples (a fixed carve, never the
    # test set) are held out of the guide's training; its accuracy on them is checked after each
    # step count in ``guide_checks`` and training stops at the first that reaches
    # ``guide_min_acc`` (else at ``guide_steps``). ``guide_val = 0``: plain ``guide_steps``.
    guide_lr: float | None = None
    guide_val: int = 0
    guide_checks: tuple[int, ...] = ()
    guide_min_acc: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def guide_of(arm: str) -> str | None:
    """``"trained"``, ``"untrained"`` or ``None`` (``alone``)."""
    if arm == "alone":
        return None
    kind, _, g = arm.partition("_")
    if kind not in ("guided", "kd", "warmup", "firstk") or g not in ("trained", "untrained"):
        raise ValueError(f"unknown arm {arm!r}")
    return g


def judge(spec: ExperimentSpec, acc: dict[str, list[float]]) -> list[dict]:
    """The verdicts of ``spec.claims`` on ``acc`` (arm -> per-seed final accuracies)."""
    from guidance_kernels.train.experiments.verdict import claim_beats, claim_keeps

    out = []
    for c in spec.claims:
        if c[0] == "beats":
            out.append(claim_beats(*c[1:], acc))
        elif c[0] == "keeps":
            out.append(claim_keeps(*c[1:], acc))
        else:
            raise ValueError(f"unknown claim kind {c[0]!r}")
    return out


def standard_claims(warmup_guide: str) -> tuple:
    """Claims (a) per guide, (b), and (c) for the warm-up with ``warmup_guide``."""
    return (
        ("beats", "a", "guided beats alone, trained guide", "guided_trained", "alone"),
        ("beats", "a", "guided beats alone, untrained guide", "guided_untrained", "alone"),
        ("beats", "b", "untrained guide: guidance beats KD", "guided_untrained", "kd_untrained"),
        ("keeps", "c", f"warmup_{warmup_guide}", f"guided_{warmup_guide}", "alone"),
    )
