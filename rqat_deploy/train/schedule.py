"""The learning-rate schedule of every trainer here: linear warm-up, then cosine, linear or constant.

One function, :func:`lr_at`, in the style of nanoGPT's ``get_lr``: a pure function of the step, with
no optimizer or scheduler object, so stage 1 (per parameter group, no warm-up), stage 2 (as the
multiplier of a :class:`torch.optim.lr_scheduler.LambdaLR`, ``peak=1``) and the built-in teacher's
build (:mod:`rqat_deploy.builtin.tiny_reasoner`) all use it.

transformers' ``get_cosine_schedule_with_warmup`` is not used: its warm-up is ``step / warmup`` (the
first step trains at lr 0, ours at ``peak / warmup``) and it has no floor, so it would move every
number trained so far.
"""

from __future__ import annotations

import math

from rqat_deploy.errors import ConfigError

SHAPES = ("cosine", "linear", "constant")


def lr_at(
    step: int,
    *,
    peak: float,
    total: int,
    warmup: int = 0,
    floor: float = 0.0,
    shape: str = "cosine",
    pi_first: bool = False,
) -> float:
    """The learning rate of ``step`` (0-based).

    Steps ``0 .. warmup-1`` rise linearly to ``peak`` (``peak * (step + 1) / warmup``); the decay
    then runs over ``span = max(total - warmup, 1)`` steps from ``peak`` to ``floor`` and stays there:
    ``floor + (peak - floor) * 0.5 * (1 + cos(pi * progress))`` (cosine),
    ``floor + (peak - floor) * (1 - progress)`` (linear) or ``peak`` (constant), with
    ``progress = min((step - warmup) / span, 1)``.

    Args:
        step: the optimizer step, from 0.
        peak: learning rate at the end of the warm-up (``1.0`` gives a multiplier).
        total: steps of the whole run, warm-up included.
        warmup: steps of linear warm-up.
        floor: learning rate at the end of the decay.
        shape: ``"cosine"``, ``"linear"`` or ``"constant"`` after the warm-up.
        pi_first: round the cosine angle as ``(pi * (step - warmup)) / span`` instead of
            ``pi * ((step - warmup) / span)``: the same real number, rounded differently. Stage 1
            has always rounded it this way; it keeps doing so, so that its results stay bit-identical.

    Returns:
        The learning rate (a plain float).

    Raises:
        ConfigError: an unknown ``shape``.
    """
    if shape not in SHAPES:
        raise ConfigError(f"learning-rate schedule must be one of {SHAPES}, got {shape!r}")
    if step < warmup:
        return peak * (step + 1) / warmup
    if shape == "constant":
        return peak
    done, span = step - warmup, max(total - warmup, 1)
    if shape == "linear":
        return floor + (peak - floor) * (1.0 - min(done / span, 1.0))
    angle = math.pi * min(done, span) / span if pi_first else math.pi * min(done / span, 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(angle))
