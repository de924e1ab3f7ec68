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
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "DEFAULT_RESTART_PATTERNS",
    "REGEX_UNIT",
    "ThinkingStats",
    "analyze_response",
    "count_restarts",
    "count_text_tokens",
    "is_truncated",
    "split_thinking",
    "thinking_span_ids",
]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
#: The token unit used when no tokenizer is given.
REGEX_UNIT = "regex-words"
_WORD_RE = re.compile(r"\w+|[^\w\s]")

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
    """

    thinking_tokens: int
    has_thinking: bool
    closed: bool
    restarts: int
    unit: str


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
    ids = list(ids)
    open_at = ids.index(open_id) if open_id in ids else -1
    close_at = ids.index(close_id) if close_id in ids else -1
    if open_at >= 0 and (close_at < 0 or close_at > open_at):
        rest = ids[open_at + 1 :]
        if close_id in rest:
            return rest.index(close_id), True, True
        return len(rest), True, False
    if close_at >= 0:
        return close_at, True, True
    if starts_in_thinking:
        return len(ids), True, False
    return 0, False, True


def count_text_tokens(text: str, tokenizer: Any | None = None) -> int:
    """Count tokens of a text.

    Args:
        text: the text.
        tokenizer: a Hugging Face tokenizer (``encode(text, add_special_tokens=False)``), or None for
            the tokenizer-free unit (words and punctuation marks).

    Returns:
        The count.
    """
    if not text:
        return 0
    if tokenizer is None:
        return len(_WORD_RE.findall(text))
    return len(tokenizer.encode(text, add_special_tokens=False))


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
) -> ThinkingStats:
    """Measure the thinking of one response.

    Args:
        text: the generated text (special tokens kept, so the tags are visible).
        token_ids: the generated ids, when known; used with ``think_ids`` for an exact count.
        think_ids: ``(open_id, close_id)`` of the ``<think>`` / ``</think>`` tokens.
        tokenizer: a Hugging Face tokenizer for counting text, when ids are not usable.
        restart_patterns: phrases counted as self-verification restarts.
        starts_in_thinking: the prompt ended inside an opened thinking span.

    Returns:
        The :class:`ThinkingStats`.
    """
    split = split_thinking(text, starts_in_thinking=starts_in_thinking)
    restarts = count_restarts(split.thinking if split.thinking is not None else text, restart_patterns)
    if token_ids is not None and think_ids is not None:
        n, has, closed = thinking_span_ids(token_ids, *think_ids, starts_in_thinking=starts_in_thinking)
        return ThinkingStats(n, has, closed, restarts, "ids")
    n = count_text_tokens(split.thinking or "", tokenizer)
    unit = REGEX_UNIT if tokenizer is None else "tokenizer"
    return ThinkingStats(n, split.thinking is not None, split.closed, restarts, unit)
