"""The one learning-rate schedule (rqat_deploy.train.schedule.lr_at) reproduces, float for float,
the three schedules it replaced: stage 1's ``_cosine``, stage 2's ``lr_lambda`` and the built-in
teacher build's ``_lr_at`` (copied below verbatim from commit 0d460a9, the only place they live on)."""

from __future__ import annotations

import math
from typing import Callable

import pytest

from rqat_deploy.builtin.tiny_reasoner import BuildConfig, _lr_at
from rqat_deploy.errors import ConfigError
from rqat_deploy.train.schedule import SHAPES, lr_at

# --- the old formulas, verbatim ------------------------------------------------------------------


def _old_stage1_cosine(base: float, step: int, total: int, factor: float) -> float:
    """Cosine from ``base`` at step 0 to ``base / factor`` at step ``total``."""
    lo = base / factor
    if total <= 0:
        return base
    return lo + (base - lo) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _old_stage2_lr_lambda(total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> Callable[[int], float]:
    """Learning-rate multiplier of step ``s`` (0-based): linear warm-up, then cosine/linear/constant."""

    def f(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(total_steps - warmup_steps, 1)
        progress = min((s - warmup_steps) / span, 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return f


def _old_tiny_lr_at(cfg: BuildConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.final_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --- the comparisons ------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [BuildConfig(), BuildConfig(steps=57, warmup_steps=9, lr=3e-3, final_lr_ratio=0.1)])
def test_builtin_teacher_build_schedule_is_unchanged(cfg: BuildConfig) -> None:
    """Every step of the default build (3,000 steps, 100 warm-up): the teacher stays byte-reproducible."""
    for step in range(cfg.steps):
        assert _lr_at(cfg, step) == _old_tiny_lr_at(cfg, step), step


# stage 1: the paper's run (4,032 sample-steps: 2 epochs x 2,016 batches), the tests' small runs, and
# the base rates of the parameter groups: quant 1e-4, weights 2e-5 / 1e-5, a k-quant-scaled odd rate
STAGE1_TOTALS = [*range(1, 121), 1008, 4032]
STAGE1_BASES = [1e-4, 2e-5, 1e-5, 1e-4 * 0.3137]


@pytest.mark.parametrize("factor", [20.0, 7.0, 1.0])
def test_stage1_schedule_is_unchanged(factor: float) -> None:
    for total in STAGE1_TOTALS:
        for base in STAGE1_BASES:
            for step in range(total + 1):  # the loop's steps 0..total-1, and the end point
                new = lr_at(step, peak=base, total=total, floor=base / factor, pi_first=True)
                assert new == _old_stage1_cosine(base, step, total, factor), (total, base, step)


def test_stage1_needs_its_angle_rounding() -> None:
    """Without ``pi_first`` stage 1's numbers would move (by an ulp, on about a fifth of the steps)."""
    moved = sum(
        lr_at(step, peak=1e-4, total=total, floor=1e-4 / 20, pi_first=False) != _old_stage1_cosine(1e-4, step, total, 20.0)
        for total in STAGE1_TOTALS[:120] for step in range(total)
    )
    assert moved > 0


# stage 2: small runs and the paper's (32,768 samples / 64 a step x 3 epochs = 1,536 steps), warm-up as
# Stage2Config computes it (int(warmup_ratio * total)), every shape
STAGE2_TOTALS = [*range(1, 81), 512, 1536]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("min_ratio", [0.0, 0.1, 1.0])
def test_stage2_schedule_is_unchanged(shape: str, min_ratio: float) -> None:
    for total in STAGE2_TOTALS:
        for warmup_ratio in (0.0, 0.03, 0.25):
            warmup = int(warmup_ratio * total)
            old = _old_stage2_lr_lambda(total, warmup, shape, min_ratio)
            for step in range(total + 2):  # past the end too: the schedule holds its floor
                new = lr_at(step, peak=1.0, total=total, warmup=warmup, floor=min_ratio, shape=shape)
                assert new == old(step), (total, warmup, step)


def test_shape_values_and_errors() -> None:
    assert lr_at(0, peak=2.0, total=10, warmup=4) == 0.5  # warm-up: peak * (step + 1) / warmup
    assert lr_at(4, peak=2.0, total=10, warmup=4) == 2.0  # the peak right after it
    assert lr_at(10, peak=2.0, total=10, warmup=4, floor=0.5) == 0.5  # the floor at the end
    assert lr_at(7, peak=2.0, total=10, warmup=4, shape="linear") == 1.0
    assert lr_at(9, peak=2.0, total=10, warmup=4, shape="constant") == 2.0
    with pytest.raises(ConfigError, match="one of"):
        lr_at(0, peak=1.0, total=10, shape="exp")
