"""Rewards of the GRPO stage (:mod:`rqat_deploy.train.grpo`): correctness, format, thinking length.

For one response to a prompt with a gold answer::

    reward = correct + format_weight * formatted - length_weight * overlong

- ``correct`` (0/1): the project's grader (:func:`rqat_deploy.data.grading.grade_response`:
  math-verify where installed, else the fallback; ``grader`` picks one).
- ``formatted`` (0/1, off by default): the thinking span is closed and the part after it holds a
  ``\\boxed{}`` answer (the ICLR paper's format reward of its Block + GRPO baseline).
- ``overlong`` (0..1, off by default): the length-aware penalty, thinking tokens beyond a reference
  length ``L`` as a fraction of it, capped at 1: ``min(1, max(0, n - L) / L)``. ``L`` is the
  teacher's thinking length for the same prompt (``length_reference="teacher"``: its greedy
  response, measured once per prompt), the data's trace (``"data"``) or a fixed ``length_budget``
  (``"budget"``). With ``length_weight < 1`` a correct answer, however long, still outranks a
  wrong one: the penalty only orders answers of equal correctness.
"""

from __future__ import annotations

from dataclasses import dataclass

from rqat_deploy.data.grading import GRADERS, grade_response, last_boxed_content
from rqat_deploy.data.thinking import split_thinking
from rqat_deploy.errors import ConfigError

__all__ = ["LENGTH_REFERENCES", "RewardConfig", "Scored", "overlong", "score_response"]

#: Where the length-aware reward takes its reference length from.
LENGTH_REFERENCES = ("teacher", "data", "budget")


@dataclass(frozen=True)
class RewardConfig:
    """Weights and settings of the reward (module docstring).

    Attributes:
        grader: ``auto`` | ``fallback`` | ``math-verify``.
        format_weight: weight of the format reward (0: off).
        length_weight: weight of the length-aware penalty (0: off, the default).
        length_reference: ``teacher`` | ``data`` | ``budget``.
        length_budget: the reference length of ``budget`` (thinking tokens).
    """

    grader: str = "auto"
    format_weight: float = 0.0
    length_weight: float = 0.0
    length_reference: str = "teacher"
    length_budget: int | None = None

    def __post_init__(self) -> None:
        if self.grader not in GRADERS:
            raise ConfigError(f"grader must be one of {GRADERS}, got {self.grader!r}")
        if self.length_reference not in LENGTH_REFERENCES:
            raise ConfigError(f"length_reference must be one of {LENGTH_REFERENCES}, got {self.length_reference!r}")
        for name in ("format_weight", "length_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.length_weight and self.length_reference == "budget" and not (self.length_budget or 0) >= 1:
            raise ConfigError("length_reference 'budget' needs length_budget >= 1 (thinking tokens)")


@dataclass(frozen=True)
class Scored:
    """The reward of one response and its parts."""

    reward: float
    correct: bool
    formatted: bool
    overlong: float


def overlong(thinking_tokens: int, reference: float | None) -> float:
    """``min(1, max(0, n - L) / L)``: thinking beyond the reference length, as a fraction of it (0 without one)."""
    if reference is None or reference <= 0:
        return 0.0
    return min(1.0, max(0.0, thinking_tokens - reference) / reference)


def _formatted(text: str, starts_in_thinking: bool) -> bool:
    split = split_thinking(text, starts_in_thinking=starts_in_thinking)
    return split.thinking is not None and split.closed and last_boxed_content(split.answer) is not None


def score_response(
    text: str, gold: str, thinking_tokens: int, cfg: RewardConfig, *, reference: float | None = None,
    starts_in_thinking: bool = False,
) -> Scored:
    """The reward of one response (module docstring).

    Args:
        text: the response (special tokens kept, so the thinking tags are visible).
        gold: the gold final answer.
        thinking_tokens: the response's thinking tokens.
        cfg: the reward settings.
        reference: the reference thinking length of the prompt (ignored unless ``length_weight``).
        starts_in_thinking: the prompt ended inside ``<think>``.

    Returns:
        A :class:`Scored`.
    """
    correct = bool(grade_response(text, gold, backend=cfg.grader).correct)  # type: ignore[arg-type]
    formatted = _formatted(text, starts_in_thinking)
    over = overlong(thinking_tokens, reference) if cfg.length_weight else 0.0
    reward = float(correct) + cfg.format_weight * float(formatted) - cfg.length_weight * over
    return Scored(reward, correct, formatted, over)
