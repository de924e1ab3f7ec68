"""Thinking-token length, truncation and self-verification restarts of reasoning responses.

Definitions (DESIGN.md 7):

- **Thinking span**: the text (or tokens) after the first ``<think>`` up to the first ``</think>``
  that follows it; the tags themselves are not counted. A ``<think>`` that is never closed spans to
  the end of the response. A response with only ``</think>`` started thinking inside the prompt
  (templates such as DeepSeek-R1's end the prompt with ``<think>``): its span is everything before
  ``</think>``. With neither tag there is no thinking span, unless the caller says the prompt opened
  one (``starts_in_thinking``), in which case the whole response is thinking. Everything after the
  closing tag is the answer part. A literal ``<think>`` inside the span is ordinary thinking text.
- **Thinking tokens**: the number of generated token ids inside the span when ids are given; else
  the length of the span's text encoded with a tokenizer (no special tokens added); else, with no
  tokenizer, the number of *words and punctuation marks* in it (matches of ``\\w+|[^\\w\\s]``), a
  tokenizer-free unit that is stable across models (``"regex-words"``).
- **Truncated**: the runtime stopped at the token limit (``finish_reason == "length"``), or when
  that is unknown, the completion has ``max_tokens`` tokens, or (last resort) a thinking span that
  never closed.
- **Restarts**: occurrences of self-verification phrases (:data:`DEFAULT_RESTART_PATTERNS`,
  configurable; case-sensitive, whole words, longest phrase first, no overlaps) in the thinking span
  (the whole response when there is none).
- **Thinking units**: the sequence the thinking tokens count: the span's token ids, or its text
  encoded with the tokenizer, or its words and punctuation marks (same order of evidence as above).
- **Loop**: some run of ``ngram`` consecutive thinking units (default
  :data:`DEFAULT_LOOP_NGRAM` = 24) occurs ``repeats`` times (default :data:`DEFAULT_LOOP_REPEATS`
  = 3) in the thinking span, occurrences allowed to overlap (a unit repeated 26 times is a loop).
  :class:`LoopDetector` decides it one unit at a time; the bench's ``loop_fraction`` and the
  decode-time loop breaker (``rqat_deploy.serve.guards``) use it with the same settings, so a
  response the breaker cut is also counted as a loop. ``loop_at`` is the number of thinking units
  up to and including the one that completed the ``repeats``-th occurrence.
- **Unclosed thinking**: a thinking span that never closes (``has_thinking and not closed``).
- **Answer seen, then lost**: the response is graded wrong, yet a *candidate answer* inside its
  thinking span equals the gold answer by the normalizing comparison (the ``fallback`` grader:
  normalized strings, exact rationals; fast on traces with hundreds of steps, while math-verify
  costs ~10-40 ms a comparison; the two agree on plain numbers, symbolic equalities are not seen). Candidates
  (:func:`rqat_deploy.data.grading.candidate_answers`) are every complete ``\\boxed{}``, every
  ``answer is X`` / ``Answer: X``, and the right-hand side of every ``=`` up to the end of its
  clause (at most 64 characters): what a step concluded. A response without a thinking span never
  counts.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

from rqat_deploy.data.grading import candidate_answers, fallback_equiv

__all__ = [
    "DEFAULT_LOOP_NGRAM",
    "DEFAULT_LOOP_REPEATS",
    "DEFAULT_RESTART_PATTERNS",
    "REGEX_UNIT",
    "LoopDetector",
    "ThinkingStats",
    "analyze_response",
    "answer_seen_then_lost",
    "count_restarts",
    "count_text_tokens",
    "find_loop",
    "is_truncated",
    "split_thinking",
    "thinking_span_ids",
]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
#: The token unit used when no tokenizer is given.
REGEX_UNIT = "regex-words"
_WORD_RE = re.compile(r"\w+|[^\w\s]")
#: Loop detection: a run of this many thinking units...
DEFAULT_LOOP_NGRAM = 24
#: ...seen this many times in one thinking span is a loop.
DEFAULT_LOOP_REPEATS = 3

#: Phrases that start a self-verification pass in reasoning traces.
DEFAULT_RESTART_PATTERNS: tuple[str, ...] = (
    "Wait",
    "But wait",
    "Let me check",
    "Let me double-check",
    "Let me double check",
    "Let me verify",
    "Let me recheck",
    "Let me re-check",
    "Let me confirm",
)


@dataclass(frozen=True)
class ThinkingSplit:
    """A response split into its thinking span and answer part.

    Attributes:
        thinking: the thinking text (None when the response has no thinking span).
        answer: the text after the closing tag (the whole response when there is no span).
        closed: False when a thinking span runs to the end of the response.
    """

    thinking: str | None
    answer: str
    closed: bool


@dataclass(frozen=True)
class ThinkingStats:
    """Thinking measurements of one response.

    Attributes:
        thinking_tokens: tokens in the thinking span (0 without one).
        has_thinking: whether there is a thinking span.
        closed: whether the span was closed (True when there is none).
        restarts: self-verification restarts counted (see the module docstring).
        unit: how tokens were counted: ``"ids"``, ``"tokenizer"`` or ``"regex-words"``.
        loop_at: thinking units up to the detection of a loop (None: no loop; see the module docstring).
    """

    thinking_tokens: int
    has_thinking: bool
    closed: bool
    restarts: int
    unit: str
    loop_at: int | None = None

    @property
    def loop(self) -> bool:
        """Whether the thinking span loops."""
        return self.loop_at is not None

    @property
    def unclosed(self) -> bool:
        """Whether a thinking span opened and never closed."""
        return self.has_thinking and not self.closed


def split_thinking(
    text: str,
    *,
    starts_in_thinking: bool = False,
    open_tag: str = THINK_OPEN,
    close_tag: str = THINK_CLOSE,
) -> ThinkingSplit:
    """Split a response into thinking span and answer part (see the module docstring).

    Args:
        text: the generated text.
        starts_in_thinking: the prompt ended inside an opened thinking span.
        open_tag: the opening tag.
        close_tag: the closing tag.

    Returns:
        The :class:`ThinkingSplit`.
    """
    open_at = text.find(open_tag)
    close_at = text.find(close_tag)
    if open_at >= 0 and (close_at < 0 or close_at > open_at):
        start = open_at + len(open_tag)
        end = text.find(close_tag, start)
        if end < 0:
            return ThinkingSplit(text[start:], "", False)
        return ThinkingSplit(text[start:end], text[end + len(close_tag) :], True)
    if close_at >= 0:  # closed without being opened: the prompt opened it
        return ThinkingSplit(text[:close_at], text[close_at + len(close_tag) :], True)
    if starts_in_thinking:
        return ThinkingSplit(text, "", False)
    return ThinkingSplit(None, text, True)


def thinking_span_ids(
    ids: Sequence[int], open_id: int, close_id: int, *, starts_in_thinking: bool = False
) -> tuple[int, bool, bool]:
    """Thinking span of generated token ids, by the same rules as :func:`split_thinking`.

    Args:
        ids: generated token ids (prompt excluded).
        open_id: the id of the ``<think>`` token.
        close_id: the id of the ``</think>`` token.
        starts_in_thinking: the prompt ended inside an opened thinking span.

    Returns:
        ``(thinking_tokens, has_thinking, closed)``.
    """
    span, has, closed = _span_of_ids(list(ids), open_id, close_id, starts_in_thinking)
    return len(span), has, closed


def _span_of_ids(ids: list[int], open_id: int, close_id: int, starts_in_thinking: bool) -> tuple[list[int], bool, bool]:
    """``(span ids, has_thinking, closed)`` by the rules of :func:`split_thinking`."""
    open_at = ids.index(open_id) if open_id in ids else -1
    close_at = ids.index(close_id) if close_id in ids else -1
    if open_at >= 0 and (close_at < 0 or close_at > open_at):
        rest = ids[open_at + 1 :]
        if close_id in rest:
            return rest[: rest.index(close_id)], True, True
        return rest, True, False
    if close_at >= 0:
        return ids[:close_at], True, True
    if starts_in_thinking:
        return ids, True, False
    return [], False, True


def count_text_tokens(text: str, tokenizer: Any | None = None) -> int:
    """Count tokens of a text.

    Args:
        text: the text.
        tokenizer: a Hugging Face tokenizer (``encode(text, add_special_tokens=False)``), or None for
            the tokenizer-free unit (words and punctuation marks).

    Returns:
        The count.
    """
    return len(_text_units(text, tokenizer))


def _text_units(text: str, tokenizer: Any | None) -> list[Any]:
    """The thinking units of a text: tokenizer ids, or words and punctuation marks without one."""
    if not text:
        return []
    if tokenizer is None:
        return _WORD_RE.findall(text)
    return list(tokenizer.encode(text, add_special_tokens=False))


class LoopDetector:
    """Decides, one thinking unit at a time, whether a span loops (see the module docstring).

    Args:
        ngram: length of the repeated run, in units.
        repeats: occurrences of one run that make a loop.

    Attributes:
        loop_at: units seen when the loop was detected (None until then).
    """

    def __init__(self, ngram: int = DEFAULT_LOOP_NGRAM, repeats: int = DEFAULT_LOOP_REPEATS) -> None:
        if ngram < 1 or repeats < 2:
            raise ValueError(f"a loop needs ngram >= 1 and repeats >= 2, got ngram={ngram}, repeats={repeats}")
        self.ngram, self.repeats = ngram, repeats
        self.loop_at: int | None = None
        self._window: deque[Any] = deque(maxlen=ngram)
        self._counts: dict[tuple[Any, ...], int] = {}
        self._seen = 0

    def add(self, unit: Any) -> bool:
        """Add the next unit; True exactly once, when it completes the first loop."""
        self._seen += 1
        self._window.append(unit)
        if len(self._window) < self.ngram or self.loop_at is not None:
            return False
        key = tuple(self._window)
        self._counts[key] = count = self._counts.get(key, 0) + 1
        if count >= self.repeats:
            self.loop_at = self._seen
            return True
        return False


def find_loop(units: Sequence[Any], ngram: int = DEFAULT_LOOP_NGRAM, repeats: int = DEFAULT_LOOP_REPEATS) -> int | None:
    """Where a sequence of thinking units first loops (see the module docstring).

    Args:
        units: the thinking span's units (token ids, or words).
        ngram: length of the repeated run.
        repeats: occurrences that make a loop.

    Returns:
        The number of units up to the detection, or None when it never loops.
    """
    detector = LoopDetector(ngram, repeats)
    for unit in units:
        if detector.add(unit):
            break
    return detector.loop_at


def answer_seen_then_lost(thinking: str | None, gold: str | None, correct: bool | None) -> bool | None:
    """Whether a wrong response reached the gold answer inside its thinking (see the module docstring).

    Args:
        thinking: the thinking span's text (None: no span).
        gold: the gold answer (None: ungraded).
        correct: the response's grade, by whichever grader (None: ungraded).

    Returns:
        None when ungraded; False when correct or no candidate matches; True otherwise.
    """
    if gold is None or correct is None:
        return None
    if correct or not thinking:
        return False
    return any(fallback_equiv(c, gold) for c in dict.fromkeys(candidate_answers(thinking)))


@functools.lru_cache(maxsize=64)
def _restart_regex(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    alternatives = sorted({p for p in patterns if p}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(p) for p in alternatives) + r")(?!\w)")


def count_restarts(text: str, patterns: Sequence[str] = DEFAULT_RESTART_PATTERNS) -> int:
    """Count self-verification restarts in a text.

    Args:
        text: the text (usually the thinking span).
        patterns: literal phrases, matched case-sensitively as whole words, longest first.

    Returns:
        The number of non-overlapping matches.
    """
    regex = _restart_regex(tuple(patterns))
    return 0 if regex is None or not text else len(regex.findall(text))


def is_truncated(
    *,
    finish_reason: str | None = None,
    n_completion_tokens: int | None = None,
    max_tokens: int | None = None,
    closed: bool = True,
) -> bool:
    """Whether a response hit the token limit (see the module docstring for the order of evidence).

    Args:
        finish_reason: the runtime's finish reason (``"length"`` means the limit was hit).
        n_completion_tokens: tokens generated.
        max_tokens: the limit.
        closed: whether the thinking span closed.

    Returns:
        True when truncated.
    """
    if finish_reason is not None:
        return finish_reason == "length"
    if n_completion_tokens is not None and max_tokens is not None:
        return n_completion_tokens >= max_tokens
    return not closed


def analyze_response(
    text: str,
    *,
    token_ids: Sequence[int] | None = None,
    think_ids: tuple[int, int] | None = None,
    tokenizer: Any | None = None,
    restart_patterns: Sequence[str] = DEFAULT_RESTART_PATTERNS,
    starts_in_thinking: bool = False,
    loop_ngram: int = DEFAULT_LOOP_NGRAM,
    loop_repeats: int = DEFAULT_LOOP_REPEATS,
) -> ThinkingStats:
    """Measure the thinking of one response.

    Args:
        text: the generated text (special tokens kept, so the tags are visible).
        token_ids: the generated ids, when known; used with ``think_ids`` for an exact count.
        think_ids: ``(open_id, close_id)`` of the ``<think>`` / ``</think>`` tokens.
        tokenizer: a Hugging Face tokenizer for counting text, when ids are not usable.
        restart_patterns: phrases counted as self-verification restarts.
        starts_in_thinking: the prompt ended inside an opened thinking span.
        loop_ngram: run length of a loop, in thinking units.
        loop_repeats: occurrences of a run that make a loop.

    Returns:
        The :class:`ThinkingStats`.
    """
    split = split_thinking(text, starts_in_thinking=starts_in_thinking)
    restarts = count_restarts(split.thinking if split.thinking is not None else text, restart_patterns)
    if token_ids is not None and think_ids is not None:
        units, has, closed = _span_of_ids(list(token_ids), *think_ids, starts_in_thinking)
        unit = "ids"
    else:
        units, has, closed = _text_units(split.thinking or "", tokenizer), split.thinking is not None, split.closed
        unit = REGEX_UNIT if tokenizer is None else "tokenizer"
    return ThinkingStats(len(units), has, closed, restarts, unit, find_loop(units, loop_ngram, loop_repeats))
