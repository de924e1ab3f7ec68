"""Offline synthetic data: small reasoning problems with ``<think>`` traces, and general English text.

Everything here is deterministic and needs neither the Hub nor a network, so the toolkit can
demonstrate itself on a laptop (the built-in teacher :mod:`rqat_deploy.builtin.tiny_reasoner` is trained
on it, and :func:`default_data` feeds ``rqat-deploy train`` / ``bench`` when no data is given).

**Reasoning problems** (:func:`make_problem`, :func:`generate_problems`) are chains of integer
operations whose values all stay in ``1 .. VALUE_MAX``; ``level`` is the number of operations
(1 .. 4). Three surface forms ("families") share one computation model:

- ``chain``: "Start with 7. Add 5, then multiply by 3. What is the result?"
- ``expr``: "Compute 9 + 4 * 6." (usual precedence: products and quotients first)
- ``word``: "Alice has 7 apples. She buys 5 more apples. ... How many apples does Alice have now?"

The assistant turn is ``<think>\\n<trace>\\n</think>\\n\\nThe answer is \\boxed{N}.``. The trace
does one operation per line and keeps every line *local* (what it needs is on the line before or
quoted on the line itself), which a tiny model can learn: chains and stories restate each
instruction or sentence, then compute it (``Multiply by 3: 12 * 3 = 36.``); expressions compute one
operation, then rewrite the expression (``9 + 4 * 6`` / ``4 * 6 = 24.`` / ... / ``= 9 + 24``). Every
step is *checked*: the next line undoes it and compares with the left operand (``Check: 36 / 3 =
12 vs 12, ok.``). The teacher's training data adds *slips* (``slip_rate``): a wrong result, masked out of
the loss (:attr:`Problem.masked`), whose check fails (``Check: 39 / 3 = 13 vs 12, wrong.``) and which is
redone (``Wait, redo: 12 * 3 = 36.``). Every pass ends with a *recheck*, each operation read again
from the question and the result compared (``Recheck: 7 + 5 = 12, 12 * 3 = 36. 36 vs 36, ok.``); the
training data also *misreads* (``misread_rate``): a pass restates one instruction wrong (masked),
computes that wrong problem, fails its recheck and starts over (``Wait, start over.``). A model that
computes or reads worse therefore checks, hesitates, redoes and restarts more, and thinks longer; the
thinking length measures how well it works. A problem's *key* is its
computation (``7+5=12;12*3=36``): the train / held-out split is a hash of the key
(:func:`split_of`), so a held-out computation never appears in training, in any surface form.

**General text** (:func:`general_texts`): the docstrings of the running Python's standard library,
read from the source files with :mod:`ast` (no module is imported), in sorted file order, with
doctest examples and code-like lines removed. The text therefore depends on the Python version;
when the standard library sources are missing it falls back to generated English sentences.

Writers produce the formats the rest of the package reads: ``messages`` chat records and ``text``
records for :mod:`rqat_deploy.data.records` (``--calib`` / ``--train-data``), and ``question`` /
``answer`` records for :mod:`rqat_deploy.data.evalset` (``rqat-deploy bench --dataset``).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from rqat_deploy.data.spec import BUILTIN
from rqat_deploy.errors import ConfigError, DataError
from rqat_deploy.files import staged_file

__all__ = [
    "FAMILIES",
    "HELDOUT_PERCENT",
    "INSTRUCTION",
    "LEVELS",
    "VALUE_MAX",
    "Problem",
    "default_data",
    "default_data_dir",
    "default_model_dir",
    "general_texts",
    "generate_problems",
    "make_problem",
    "problem_messages",
    "resolve_spec",
    "split_of",
    "write_eval_jsonl",
    "write_reasoning_jsonl",
    "write_text_jsonl",
]

#: Appended to each question on its own line; the same text as
#: ``rqat_deploy.serve.runtimes.DEFAULT_INSTRUCTION`` (Qwen's math prompt), so the model is trained
#: on exactly the prompt ``rqat-deploy bench`` shows it.
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

#: Difficulty levels: the number of operations of a problem.
LEVELS: tuple[int, ...] = (1, 2, 3, 4)
#: Surface forms of a problem.
FAMILIES: tuple[str, ...] = ("chain", "expr", "word")
#: Every value (operands, intermediate and final results) lies in ``1 .. VALUE_MAX``.
VALUE_MAX = 99
#: Operands of ``+`` / ``-`` lie in ``1 .. ADD_MAX``; factors and divisors in ``2 .. MUL_MAX``.
ADD_MAX = 9
MUL_MAX = 5
#: Start values (chains, stories, an expression's first number) lie in ``2 .. START_MAX``.
START_MAX = 30
#: Percentage of computations (by key hash) reserved for evaluation.
HELDOUT_PERCENT = 10

Split = Literal["train", "heldout", "any"]
_SPLITS = ("train", "heldout", "any")
#: Bumped whenever generated data changes, so cached files are regenerated.
DATA_VERSION = 3

# --------------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------------

Step = tuple[int, str, int, int]  # (left, op, right, result)


@dataclass(frozen=True)
class Problem:
    """One reasoning problem with its worked solution.

    Attributes:
        question: the question text (without :data:`INSTRUCTION`).
        answer: the final answer (an integer, as a string).
        thinking: the reasoning trace (the text between ``<think>`` and ``</think>``, no tags).
        response: the visible answer after ``</think>`` (``The answer is \\boxed{N}.``).
        level: number of operations (1 .. 4).
        family: ``chain``, ``expr`` or ``word``.
        key: the computation, ``"a+b=c;c*d=e"``; the train / held-out split hashes it.
        split: ``train`` or ``heldout`` (:func:`split_of` of ``key``).
        masked: character spans of :attr:`completion` a trainer must not learn from: the wrong
            results of the trace's slips (empty unless drawn with ``slip_rate`` > 0).
    """

    question: str
    answer: str
    thinking: str
    response: str
    level: int
    family: str
    key: str
    split: str
    masked: tuple[tuple[int, int], ...] = ()

    @property
    def completion(self) -> str:
        """The assistant content: ``<think>\\n{thinking}\\n</think>\\n\\n{response}``."""
        return f"<think>\n{self.thinking}\n</think>\n\n{self.response}"


def split_of(key: str) -> str:
    """The split of a computation key: ``heldout`` for :data:`HELDOUT_PERCENT` % of keys, else ``train``.

    Args:
        key: a :attr:`Problem.key`.

    Returns:
        ``"heldout"`` or ``"train"``, a fixed function of ``key`` (SHA-256, not Python's ``hash``).
    """
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def _apply(left: int, op: str, right: int) -> int | None:
    """``left op right`` when it is an integer in ``1 .. VALUE_MAX``, else None."""
    if op == "+":
        out = left + right
    elif op == "-":
        out = left - right
    elif op == "*":
        out = left * right
    elif right and left % right == 0:
        out = left // right
    else:
        return None
    return out if 1 <= out <= VALUE_MAX else None


def _random_step(rng: random.Random, value: int) -> tuple[str, int]:
    """A random operation and operand that keep ``value`` in range (any value in range has one)."""
    choices: list[tuple[str, list[int]]] = []
    if value < VALUE_MAX:
        choices.append(("+", list(range(1, min(ADD_MAX, VALUE_MAX - value) + 1))))
    if value > 1:
        choices.append(("-", list(range(1, min(ADD_MAX, value - 1) + 1))))
    factors = [b for b in range(2, MUL_MAX + 1) if value * b <= VALUE_MAX]
    if factors:
        choices.append(("*", factors))
    divisors = [b for b in range(2, MUL_MAX + 1) if value % b == 0 and value // b >= 1]
    if divisors:
        choices.append(("/", divisors))
    op, operands = rng.choice(choices)
    return op, rng.choice(operands)


def _chain_steps(rng: random.Random, level: int) -> list[Step]:
    value = rng.randint(2, START_MAX)
    steps = []
    for _ in range(level):
        op, b = _random_step(rng, value)
        result = _apply(value, op, b)
        assert result is not None  # _random_step only offers operations that stay in range
        steps.append((value, op, b, result))
        value = result
    return steps


def _key(steps: Sequence[Step]) -> str:
    return ";".join(f"{a}{op}{b}={r}" for a, op, b, r in steps)


def _step_line(step: Step) -> str:
    a, op, b, r = step
    return f"{a} {op} {b} = {r}."


def _response(answer: int) -> str:
    return f"The answer is \\boxed{{{answer}}}."


# -- checked steps and rechecked passes -------------------------------------------------------------
#
# Every computed step is followed by a check line that undoes it and compares with the left operand
# (restated next to the check's result, so the comparison is of two adjacent numbers):
#
#     Multiply by 3: 12 * 3 = 36.
#     Check: 36 / 3 = 12 vs 12, ok.
#
# A *slip* (only in the teacher's training data, ``slip_rate`` > 0) writes a wrong result; its check
# then disagrees with the left operand and the step is redone:
#
#     Multiply by 3: 12 * 3 = 39.          <- the slipped value: masked out of the training loss
#     Check: 39 / 3 = 13 vs 12, wrong.
#     Wait, redo: 12 * 3 = 36.
#     Check: 36 / 3 = 12 vs 12, ok.
#
# A whole pass over the problem ends with a *recheck*: every operation read again from the question,
# on one line, and its result compared with the pass's. A *misread* (``misread_rate`` > 0) restates
# one instruction, sentence or rewritten expression wrong (masked), so the pass computes, correctly,
# the wrong problem; the recheck disagrees and the trace starts over:
#
#     Start with 7.
#     Add 6: 7 + 6 = 13.                   <- "Add 6" misreads "Add 5": masked
#     Check: 13 - 6 = 7 vs 7, ok.
#     Recheck: 7 + 5 = 12. 12 vs 13, wrong.
#     Wait, start over.
#     Start with 7.
#     Add 5: 7 + 5 = 12.
#     Check: 12 - 5 = 7 vs 7, ok.
#     Recheck: 7 + 5 = 12. 12 vs 12, ok.
#
# A model that computes or reads worse therefore checks, says "Wait", redoes and starts over more:
# its thinking is longer.

#: The check of each operation: the inverse operation, applied to the result and the right operand.
_INVERSE = {"+": "-", "-": "+", "*": "/", "/": "*"}
#: At most this many slips in a row on one step (the next redo is right).
MAX_SLIPS_PER_STEP = 2
#: At most this many misread passes in a row (the next pass reads right).
MAX_RESTARTS = 2


@dataclass(frozen=True)
class _Slips:
    """The errors drawn into a training trace (none when ``rng`` is None)."""

    rng: random.Random | None = None
    slip_rate: float = 0.0  # per attempt at a step: a wrong result
    misread_rate: float = 0.0  # per pass: one instruction read wrong

    def draw(self, rate: float) -> bool:
        return self.rng is not None and rate > 0 and self.rng.random() < rate


@dataclass
class _Trace:
    """Trace lines under construction, with the character spans not to learn (slips, misreads)."""

    lines: list[str] = field(default_factory=list)
    masked: list[tuple[int, int, int]] = field(default_factory=list)  # (line index, start, end)

    def add(self, text: str, *masks: tuple[int, int]) -> None:
        """Append a line; each of ``masks`` is a (start, end) character span within it."""
        self.masked.extend((len(self.lines), a, b) for a, b in masks)
        self.lines.append(text)

    def spans(self, offset: int) -> tuple[tuple[int, int], ...]:
        """Masked spans as character offsets into ``"\n".join(lines)``, shifted by ``offset``."""
        starts, pos = [], 0
        for line in self.lines:
            starts.append(pos)
            pos += len(line) + 1
        return tuple((offset + starts[i] + a, offset + starts[i] + b) for i, a, b in self.masked)


def _slip(rng: random.Random, step: Step) -> int | None:
    """A plausible wrong result of ``step`` whose check is a whole number in range, or None."""
    a, op, b, r = step
    deltas = (b, -b) if op == "*" else (1, -1, 2, -2, 10, -10)
    options = []
    for d in deltas:
        wrong = r + d
        undone = _apply(wrong, _INVERSE[op], b)
        if 1 <= wrong <= VALUE_MAX and undone is not None and undone != a:
            options.append(wrong)
    return rng.choice(options) if options else None


def _checked_step(trace: _Trace, head: str, step: Step, slips: _Slips, head_misread: bool = False) -> None:
    """Append ``{head}{a} {op} {b} = {r}.`` and its check, with slips and redos when drawn.

    ``head_misread``: the head (less its ``": "``) restates the question wrong; it is masked.
    """
    a, op, b, r = step
    inv = _INVERSE[op]
    for attempt in range(MAX_SLIPS_PER_STEP + 1):
        prefix = head if attempt == 0 else "Wait, redo: "
        masks = [(0, len(head) - 2)] if attempt == 0 and head_misread else []
        wrong = _slip(slips.rng, step) if attempt < MAX_SLIPS_PER_STEP and slips.draw(slips.slip_rate) else None
        if wrong is None:
            trace.add(f"{prefix}{_step_line(step)}", *masks)
            trace.add(f"Check: {r} {inv} {b} = {a} vs {a}, ok.")
            return
        line = f"{prefix}{a} {op} {b} = "
        trace.add(f"{line}{wrong}.", *masks, (len(line), len(line) + len(str(wrong))))
        trace.add(f"Check: {wrong} {inv} {b} = {_apply(wrong, inv, b)} vs {a}, wrong.")


def _rechecked_passes(trace: _Trace, steps: Sequence[Step], slips: _Slips,
                      render: Callable[[_Trace, bool], int]) -> None:
    """Passes of ``render(trace, misread) -> result`` until the recheck agrees (see above)."""
    truth = steps[-1][3]
    recheck = ", ".join(f"{a} {op} {b} = {r}" for a, op, b, r in steps)
    for attempt in range(MAX_RESTARTS + 1):
        result = render(trace, attempt < MAX_RESTARTS and slips.draw(slips.misread_rate))
        trace.add(f"Recheck: {recheck}. {truth} vs {result}, {'ok' if result == truth else 'wrong'}.")
        if result == truth:
            return
        trace.add("Wait, start over.")
    raise AssertionError("the last pass reads right")  # pragma: no cover


def _misread_chain(rng: random.Random | None, steps: Sequence[Step]) -> tuple[int, list[Step]] | None:
    """One operation of a chain read wrong (another operation or operand), the rest applied as
    written: ``(index, steps as read)``, or None when no nearby misreading keeps every value in range
    and changes the result."""
    if rng is None:
        return None
    for _ in range(8):
        i = rng.randrange(len(steps))
        a, op, b, _r = steps[i]
        op2, b2 = _random_step(rng, a)
        if (op2, b2) == (op, b):
            continue
        read, value = list(steps[:i]), a
        for o, bb in [(op2, b2)] + [(o, bb) for _, o, bb, _ in steps[i + 1 :]]:
            out = _apply(value, o, bb)
            if out is None:
                break
            read.append((value, o, bb, out))
            value = out
        else:
            if value != steps[-1][3]:  # the recheck catches it
                return i, read
    return None


# -- chain ------------------------------------------------------------------------------------------

_CHAIN_VERBS = {"+": "add {b}", "-": "subtract {b}", "*": "multiply by {b}", "/": "divide by {b}"}
_CHAIN_OPENERS = ("Start with {a}.", "Take the number {a}.", "Begin with {a}.")
_CHAIN_QUESTIONS = ("What is the result?", "What number do you get?", "What is the final number?")


def _verb(step: Step) -> str:
    text = _CHAIN_VERBS[step[1]].format(b=step[2])
    return text[0].upper() + text[1:]


def _chain(rng: random.Random, level: int, slips: _Slips) -> tuple[str, list[Step], _Trace]:
    steps = _chain_steps(rng, level)
    verbs = [_CHAIN_VERBS[op].format(b=b) for _, op, b, _ in steps]
    if rng.random() < 0.5:
        body = " ".join(v[0].upper() + v[1:] + "." for v in verbs)
    else:
        body = ", then ".join(verbs)
        body = body[0].upper() + body[1:] + "."
    opener = rng.choice(_CHAIN_OPENERS).format(a=steps[0][0])
    question = f"{opener} {body} {rng.choice(_CHAIN_QUESTIONS)}"

    def render(trace: _Trace, misread: bool) -> int:
        # Each line restates one instruction, then computes it from the previous line's result.
        drawn = _misread_chain(slips.rng, steps) if misread else None
        bad, read = drawn if drawn is not None else (None, list(steps))
        trace.add(opener)
        for i, step in enumerate(read):
            _checked_step(trace, f"{_verb(step)}: ", step, slips, head_misread=i == bad)
        return read[-1][3]

    trace = _Trace()
    _rechecked_passes(trace, steps, slips, render)
    return question, steps, trace


# -- expr -------------------------------------------------------------------------------------------


def _expr_terms(rng: random.Random, level: int) -> tuple[list[str], list[list[int | str]]] | None:
    """Random ``+``/``-`` separated terms, each a number or a product / quotient chain, ``level`` ops."""
    n_mul = rng.randint(0, min(level, 2))
    n_add = level - n_mul
    terms: list[list[int | str]] = [[] for _ in range(n_add + 1)]
    for _ in range(n_mul):  # attach each * or / to a random term
        terms[rng.randrange(len(terms))].append(rng.choice("*/"))
    built: list[list[int | str]] = []
    for ops in terms:
        if not ops:
            built.append([rng.randint(2, START_MAX) if not built else rng.randint(1, ADD_MAX)])
            continue
        # Build the term left to right so every partial product / quotient stays in range.
        value = rng.randint(2, MUL_MAX) if ops[0] == "*" else rng.randint(1, MUL_MAX) * rng.randint(2, MUL_MAX)
        term: list[int | str] = [value]
        for op in ops:
            if op == "*":
                options = [b for b in range(2, MUL_MAX + 1) if value * b <= VALUE_MAX]
            else:
                options = [b for b in range(2, MUL_MAX + 1) if value % b == 0]
            if not options:
                return None
            b = rng.choice(options)
            term += [op, b]
            value = _apply(value, str(op), b)  # type: ignore[assignment]
        built.append(term)
    signs = [rng.choice("+-") for _ in range(n_add)]
    return signs, built


def _reduce_once(tokens: list[int | str]) -> tuple[list[int | str], Step] | None:
    """Apply the first operation by precedence (``*`` and ``/`` first, then ``+``/``-``, left to right)."""
    ops = [i for i in range(1, len(tokens), 2) if tokens[i] in ("*", "/")] or list(range(1, len(tokens), 2))
    i = ops[0]
    a, op, b = int(tokens[i - 1]), str(tokens[i]), int(tokens[i + 1])
    result = _apply(a, op, b)
    if result is None:
        return None
    return tokens[: i - 1] + [result] + tokens[i + 2 :], (a, op, b, result)


def _reductions(tokens: list[int | str]) -> list[tuple[Step, list[int | str]]] | None:
    """Every step of an expression with the expression after it, or None when a value leaves the range."""
    out = []
    while len(tokens) > 1:
        reduced = _reduce_once(tokens)
        if reduced is None:
            return None
        tokens, step = reduced
        out.append((step, tokens))
    return out


def _misread_expr(rng: random.Random | None, tokens: list[int | str],
                  reductions: list[tuple[Step, list[int | str]]]) -> tuple[int, int, list[int | str]] | None:
    """One number of the written or a rewritten expression read wrong: ``(line, token index, tokens
    as read)``, line 0 the first, ``k`` the rewrite after step ``k``; None when no nearby misreading
    keeps every value in range and changes the result."""
    if rng is None:
        return None
    lines = [tokens] + [rest for _, rest in reductions[:-1]]  # every line with an operation left
    for _ in range(8):
        line = rng.randrange(len(lines))
        shown = list(lines[line])
        k = rng.randrange(0, len(shown), 2)
        value = int(shown[k]) + rng.choice((1, -1, 2, -2, 10, -10))
        if not 1 <= value <= VALUE_MAX:
            continue
        shown[k] = value
        reduced = _reductions(shown)
        if reduced is not None and reduced[-1][0][3] != reductions[-1][0][3]:  # the recheck catches it
            return line, k, shown
    return None


def _expr_line(tokens: Sequence[int | str], prefix: str, k: int | None = None) -> tuple[str, tuple[tuple[int, int], ...]]:
    """``prefix`` + the expression, and the character spans to mask: token ``k``'s, or none."""
    parts = [str(x) for x in tokens]
    line = prefix + " ".join(parts)
    if k is None:
        return line, ()
    start = len(prefix) + sum(len(x) + 1 for x in parts[:k])
    return line, ((start, start + len(parts[k])),)


def _expr(rng: random.Random, level: int, slips: _Slips) -> tuple[str, list[Step], _Trace] | None:
    drawn = _expr_terms(rng, level)
    if drawn is None:
        return None
    signs, terms = drawn
    tokens: list[int | str] = list(terms[0])
    for sign, term in zip(signs, terms[1:]):
        tokens += [sign] + term
    reductions = _reductions(tokens)
    if reductions is None:
        return None
    question = rng.choice(("Compute {e}.", "What is {e}?", "Evaluate {e}.", "Calculate {e}.")).format(
        e=" ".join(str(x) for x in tokens))

    def render(trace: _Trace, misread: bool) -> int:
        # One operation at a time, checked, then the expression rewritten:
        # "9 + 4 * 6", "4 * 6 = 24.", "Check: 24 / 6 = 4 vs 4, ok.", "= 9 + 24", ... "= 33".
        drawn = _misread_expr(slips.rng, tokens, reductions) if misread else None
        bad_line, bad_k, bad_tokens = drawn if drawn is not None else (-1, None, tokens)
        current = bad_tokens if bad_line == 0 else tokens
        shown, masks = _expr_line(current, "", bad_k if bad_line == 0 else None)
        trace.add(shown, *masks)
        n = 0
        while len(current) > 1:
            current, step = _reduce_once(current)  # type: ignore[misc]  # valid: checked by _reductions
            n += 1
            _checked_step(trace, "", step, slips)
            if bad_line == n:
                current = bad_tokens
            line, masks = _expr_line(current, "= ", bad_k if bad_line == n else None)
            trace.add(line, *masks)
        return int(current[0])

    steps = [st for st, _ in reductions]
    trace = _Trace()
    _rechecked_passes(trace, steps, slips, render)
    return question, steps, trace


# -- word -------------------------------------------------------------------------------------------

_PEOPLE = (
    ("Alice", "she", "her"), ("Bob", "he", "his"), ("Carol", "she", "her"), ("David", "he", "his"),
    ("Emma", "she", "her"), ("Frank", "he", "his"), ("Grace", "she", "her"), ("Henry", "he", "his"),
    ("Iris", "she", "her"), ("Jack", "he", "his"), ("Kate", "she", "her"), ("Liam", "he", "his"),
    ("Maria", "she", "her"), ("Noah", "he", "his"), ("Olivia", "she", "her"), ("Peter", "he", "his"),
)
_ITEMS = (
    "apples", "books", "marbles", "coins", "stamps", "cards", "pencils", "stickers", "shells",
    "cookies", "flowers", "balloons", "eggs", "tickets", "candles", "buttons",
)
_MULTIPLY_WORDS = {2: "doubles", 3: "triples"}
_FRACTION_WORDS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}


def _word_sentence(rng: random.Random, step: Step, who: tuple[str, str, str], friend: str, items: str) -> str:
    """The question sentence of one operation (without its final period)."""
    a, op, b, r = step
    name, he, his = who
    if op == "+":
        return rng.choice((
            f"{name} buys {b} more {items}",
            f"{friend} gives {name} {b} {items}",
            f"{name} finds {b} more {items}",
        ))
    if op == "-":
        return rng.choice((
            f"{name} gives {b} {items} to {friend}",
            f"{name} loses {b} {items}",
            f"{name} sells {b} {items}",
        ))
    if op == "*":
        verb = _MULTIPLY_WORDS.get(b)
        if verb and rng.random() < 0.5:
            return f"Then {he} {verb} {his} {items}"
        return f"Then {name} ends up with {b} times as many {items}"
    if b in _FRACTION_WORDS:
        return f"{name} keeps {_FRACTION_WORDS[b]} of the {items}"
    return f"{name} splits the {items} into {b} equal groups and keeps one group"


def _word(rng: random.Random, level: int, slips: _Slips) -> tuple[str, list[Step], _Trace]:
    steps = _chain_steps(rng, level)
    who = rng.choice(_PEOPLE)
    friend = rng.choice([p[0] for p in _PEOPLE if p[0] != who[0]])
    items = rng.choice(_ITEMS)
    name = who[0]
    opener = f"{name} has {steps[0][0]} {items}."
    sentences = [_word_sentence(rng, step, who, friend, items) for step in steps]
    question = " ".join([opener] + [f"{x}." for x in sentences] + [f"How many {items} does {name} have now?"])

    def render(trace: _Trace, misread: bool) -> int:
        # Each line restates one sentence of the story, then computes it.
        drawn = _misread_chain(slips.rng, steps) if misread else None
        bad, read = drawn if drawn is not None else (None, list(steps))
        trace.add(opener)
        for i, (sentence, step) in enumerate(zip(sentences, read)):
            if i == bad:  # the story told wrong (drawn from the slip generator)
                sentence = _word_sentence(slips.rng, step, who, friend, items)  # type: ignore[arg-type]
            _checked_step(trace, f"{sentence}: ", step, slips, head_misread=i == bad)
        trace.add(f"So {name} has {read[-1][3]} {items}.")
        return read[-1][3]

    trace = _Trace()
    _rechecked_passes(trace, steps, slips, render)
    return question, steps, trace


_MAKERS = {"chain": _chain, "expr": _expr, "word": _word}


def make_problem(
    rng: random.Random, level: int, family: str, *, slip_rng: random.Random | None = None, slip_rate: float = 0.0,
    misread_rate: float = 0.0,
) -> Problem:
    """Draw one problem.

    Args:
        rng: the random generator (advanced by the draw).
        level: number of operations, one of :data:`LEVELS`.
        family: one of :data:`FAMILIES`.
        slip_rng: generator of the trace's slips (separate from ``rng``, so slips never change
            which problems are drawn); None: no slips.
        slip_rate: probability that an attempt at a step writes a wrong result (then its check
            fails and the step is redone; see the trace format above).
        misread_rate: probability that a pass over the problem reads one instruction wrong (then
            the final recheck fails and the trace starts over).

    Returns:
        The :class:`Problem` (its ``split`` is :func:`split_of` its key, whatever it is).

    Raises:
        ConfigError: unknown level or family.
    """
    if level not in LEVELS:
        raise ConfigError(f"unknown level {level}; choose one of {list(LEVELS)}")
    if family not in _MAKERS:
        raise ConfigError(f"unknown problem family {family!r}; choose one of {list(FAMILIES)}")
    for name, rate in (("slip_rate", slip_rate), ("misread_rate", misread_rate)):
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {rate}")
    slips = _Slips(slip_rng, slip_rate, misread_rate)
    while True:  # expr draws can fail their range checks; redraw (the rng advances)
        drawn = _MAKERS[family](rng, level, slips)
        if drawn is not None:
            break
    question, steps, trace = drawn
    answer = steps[-1][3]
    key = _key(steps)
    return Problem(
        question=question,
        answer=str(answer),
        thinking="\n".join(trace.lines),
        response=_response(answer),
        level=level,
        family=family,
        key=key,
        split=split_of(key),
        masked=trace.spans(len("<think>\n")),
    )


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {list(_SPLITS)}")


def generate_problems(
    n: int,
    *,
    split: Split = "train",
    seed: int = 0,
    levels: Sequence[int] = LEVELS,
    families: Sequence[str] = FAMILIES,
    unique: bool = False,
    slip_rate: float = 0.0,
    misread_rate: float = 0.0,
) -> list[Problem]:
    """Generate ``n`` problems of one split, deterministically.

    Problem ``i`` has level ``levels[i % len(levels)]`` and family ``families[(i // len(levels)) %
    len(families)]``, so every level and family is equally represented; draws whose key falls in
    the other split are discarded.

    Args:
        n: number of problems.
        split: ``train``, ``heldout`` or ``any``.
        seed: seed of the generator; same arguments, same problems.
        levels: levels to cycle through.
        families: families to cycle through.
        unique: drop draws whose key was already produced (evaluation sets).
        slip_rate, misread_rate: see :func:`make_problem` (the teacher's training data; the
            problems drawn are the same whatever the rates).

    Returns:
        ``n`` problems.

    Raises:
        ConfigError: a bad ``n``, split, level or family, or ``unique`` asking for more distinct
            problems than can reasonably be drawn.
    """
    _check_split(split)
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    if not levels or not families:
        raise ConfigError("levels and families must not be empty")
    rng = random.Random(f"rqat-synth:{seed}:{split}")
    slip_rng = random.Random(f"rqat-synth-slips:{seed}:{split}") if slip_rate or misread_rate else None
    out: list[Problem] = []
    seen: set[str] = set()
    misses = 0
    while len(out) < n:
        i = len(out)
        level = levels[i % len(levels)]
        family = families[(i // len(levels)) % len(families)]
        p = make_problem(rng, level, family, slip_rng=slip_rng, slip_rate=slip_rate, misread_rate=misread_rate)
        if (split != "any" and p.split != split) or (unique and p.key in seen):
            misses += 1
            if misses > 1000 * (n + 10):
                raise ConfigError(f"could not draw {n} distinct {split} problems at levels {list(levels)}")
            continue
        seen.add(p.key)
        out.append(p)
    return out


def problem_messages(problem: Problem, instruction: str | None = INSTRUCTION) -> list[dict[str, str]]:
    """The chat messages of a problem: the user question (+ instruction) and the assistant answer.

    Args:
        problem: the problem.
        instruction: appended to the question on a new line (None: nothing), as the benchmark does.

    Returns:
        ``[{"role": "user", ...}, {"role": "assistant", "content": "<think>\\n...\\n</think>\\n\\n..."}]``.
    """
    user = problem.question if not instruction else f"{problem.question}\n{instruction}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": problem.completion}]


# --------------------------------------------------------------------------------------------------
# general text
# --------------------------------------------------------------------------------------------------

_EXCLUDED_DIRS = frozenset({
    "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "dist-packages",
    "ensurepip", "__pycache__", "pydoc_data", "encodings", "__phello__",
})
_MIN_PARAGRAPH = 60


def _clean_paragraphs(doc: str) -> list[str]:
    """Prose paragraphs of a cleaned docstring: no doctests, no code, one line each, ASCII only."""
    paragraphs: list[str] = []
    for block in re.split(r"\n\s*\n", doc):
        lines = block.split("\n")
        if any(ln.lstrip().startswith((">>>", "...", "$ ", "%")) for ln in lines):
            continue  # doctest or shell example
        if any(ln.startswith(("    ", "\t")) for ln in lines):
            continue  # indented: code, tables or argument lists
        text = " ".join(ln.strip() for ln in lines).strip()
        if len(text) < _MIN_PARAGRAPH or not text.isascii():
            continue
        letters = sum(c.isalpha() or c == " " for c in text)
        if letters < 0.85 * len(text) or not text[0].isalpha():
            continue
        paragraphs.append(text)
    return paragraphs


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        return []
    return [
        p for p in sorted(root.rglob("*.py"))
        if not set(p.relative_to(root).parts[:-1]) & _EXCLUDED_DIRS
    ]


@functools.lru_cache(maxsize=1)
def _stdlib_documents() -> tuple[str, ...]:
    """One document per docstring of the standard library (paragraphs joined by blank lines)."""
    docs: list[str] = []
    seen: set[str] = set()
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        nodes.sort(key=lambda n: getattr(n, "lineno", 0))
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            text = "\n\n".join(_clean_paragraphs(doc))
            if text and text not in seen:
                seen.add(text)
                docs.append(text)
    return tuple(docs)


_FALLBACK_SUBJECTS = ("The function", "This module", "The method", "A reader", "The parser", "The class")
_FALLBACK_VERBS = ("returns", "reads", "writes", "checks", "builds", "stores", "formats", "compares")
_FALLBACK_OBJECTS = (
    "a list of strings", "the current value", "a new object", "the file name", "a sorted copy",
    "the number of items", "an error message", "the default settings", "a text stream",
)


def _fallback_documents(n: int = 4000, seed: int = 0) -> tuple[str, ...]:
    rng = random.Random(f"rqat-synth-text:{seed}")
    docs = []
    for _ in range(n):
        sentences = [
            f"{rng.choice(_FALLBACK_SUBJECTS)} {rng.choice(_FALLBACK_VERBS)} {rng.choice(_FALLBACK_OBJECTS)}"
            f" when {rng.choice(_FALLBACK_OBJECTS)} is given."
            for _ in range(rng.randint(2, 5))
        ]
        docs.append(" ".join(sentences))
    return tuple(docs)


def general_texts(*, min_docs: int = 1000) -> list[str]:
    """General English text: the standard library's docstrings, in a fixed order.

    Args:
        min_docs: when the standard library sources yield fewer documents (stripped installs),
            generated English sentences are used instead.

    Returns:
        The documents (each one docstring's prose paragraphs), in sorted-file, source-line order;
        the list is the same on every call with the same Python installation.
    """
    docs = _stdlib_documents()
    if len(docs) < min_docs:
        docs = _fallback_documents()
    return list(docs)


def general_text_source() -> str:
    """Where :func:`general_texts` comes from, for metadata (``python-3.11.7-stdlib-docstrings``)."""
    if len(_stdlib_documents()) >= 1000:
        return f"python-{'.'.join(map(str, sys.version_info[:3]))}-stdlib-docstrings"
    return "generated-sentences"


# --------------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write records atomically (a temporary file renamed into place)."""
    path = Path(path)
    with staged_file(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def write_reasoning_jsonl(
    path: str | Path,
    n: int,
    *,
    split: Split = "train",
    seed: int = 0,
    levels: Sequence[int] = LEVELS,
    instruction: str | None = INSTRUCTION,
) -> Path:
    """Write ``n`` reasoning problems as chat records (``{"messages": [...], "level", "family", "answer"}``).

    The records are what :mod:`rqat_deploy.data.records` reads as OpenAI-style conversations: a user turn
    (question + instruction) and an assistant turn with the inline ``<think>`` trace.

    Args:
        path: the JSONL file to write (parents created; replaced atomically).
        n: number of records.
        split: which split's problems.
        seed: generator seed.
        levels: levels to cycle through.
        instruction: appended to each question (None: nothing).

    Returns:
        ``path``.

    Raises:
        ConfigError: as :func:`generate_problems`.
    """
    problems = generate_problems(n, split=split, seed=seed, levels=levels)
    return _write_jsonl(Path(path), (
        {"messages": problem_messages(p, instruction), "answer": p.answer, "level": p.level, "family": p.family}
        for p in problems
    ))


def write_text_jsonl(path: str | Path, *, n: int | None = None, seed: int = 0) -> Path:
    """Write general English text as ``{"text": ...}`` records (one docstring each), shuffled.

    Args:
        path: the JSONL file to write.
        n: number of records (None: all of :func:`general_texts`; more than that repeats none and
            raises).
        seed: shuffle seed.

    Returns:
        ``path``.

    Raises:
        DataError: ``n`` larger than the number of documents.
    """
    docs = general_texts()
    random.Random(f"rqat-synth-shuffle:{seed}").shuffle(docs)
    if n is not None:
        if n > len(docs):
            raise DataError(f"only {len(docs)} general-text documents exist; ask for n <= {len(docs)}")
        docs = docs[:n]
    return _write_jsonl(Path(path), ({"text": d} for d in docs))


def write_eval_jsonl(
    path: str | Path,
    n_per_level: int,
    *,
    seed: int = 0,
    levels: Sequence[int] = LEVELS,
) -> Path:
    """Write distinct held-out problems as ``{"question", "answer", "level", "family", "key"}`` records.

    The questions are bare (``rqat-deploy bench`` appends its instruction); rows come level by
    level, the families cycling within each level.

    Args:
        path: the JSONL file to write.
        n_per_level: problems per level.
        seed: generator seed.
        levels: the levels to include.

    Returns:
        ``path``.

    Raises:
        ConfigError: as :func:`generate_problems`.
    """
    rows = []
    for level in levels:
        for p in generate_problems(n_per_level, split="heldout", seed=seed, levels=(level,), unique=True):
            rows.append({"question": p.question, "answer": p.answer, "level": p.level, "family": p.family, "key": p.key})
    return _write_jsonl(Path(path), rows)


# --------------------------------------------------------------------------------------------------
# built-in model and data
# --------------------------------------------------------------------------------------------------

#: Sizes and seeds of the files :func:`default_data` writes.
DEFAULT_DATA_SIZES = {"reasoning": 16384, "eval_per_level": 50}
DEFAULT_DATA_SEED = 1
DataKind = Literal["calib", "train", "eval"]


def default_model_dir() -> Path:
    """The built-in teacher shipped with the package (:mod:`rqat_deploy.builtin.tiny_reasoner`).

    Returns:
        The directory holding its ``config.json``, ``model.safetensors`` and tokenizer files.

    Raises:
        ConfigError: the asset is missing (a source checkout without it, or a wheel built without
            package data); rebuild it with ``python -m rqat_deploy.builtin.tiny_reasoner build --out DIR``.
    """
    path = Path(__file__).resolve().parent / "assets" / "tiny-reasoner"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ConfigError(
            f"the built-in model is missing from {path}; rebuild it with "
            "`python -m rqat_deploy.builtin.tiny_reasoner build --out DIR` and pass --model DIR"
        )
    return path


def default_data_dir() -> Path:
    """Cache directory of the built-in data: ``$RQAT_DEPLOY_CACHE`` or ``~/.cache/rqat-deploy``, plus ``data-v{N}``."""
    base = os.environ.get("RQAT_DEPLOY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rqat-deploy")
    return Path(base) / f"data-v{DATA_VERSION}"


def default_data(kind: DataKind, out_dir: str | Path | None = None) -> str:
    """The built-in data as a SPEC of local files, generated on first use.

    - ``calib``: ``reasoning_train.jsonl:0.8,general_text.jsonl:0.2`` (the paper's 80/20 mix of
      reasoning traces and pre-training text; train-split problems only).
    - ``train``: ``reasoning_train.jsonl`` (stage-2 data: reasoning traces only).
    - ``eval``: ``eval_heldout.jsonl`` (50 distinct held-out problems per level, question/answer).

    Args:
        kind: ``calib``, ``train`` or ``eval``.
        out_dir: where the files go (default :func:`default_data_dir`); existing files are reused.

    Returns:
        The SPEC string (absolute paths).

    Raises:
        ConfigError: an unknown ``kind``.
    """
    if kind not in ("calib", "train", "eval"):
        raise ConfigError(f"unknown data kind {kind!r}; choose calib, train or eval")
    root = Path(out_dir) if out_dir is not None else default_data_dir()
    root = root.expanduser().resolve()
    reasoning = root / "reasoning_train.jsonl"
    text = root / "general_text.jsonl"
    heldout = root / "eval_heldout.jsonl"
    if kind in ("calib", "train") and not reasoning.is_file():
        write_reasoning_jsonl(reasoning, DEFAULT_DATA_SIZES["reasoning"], split="train", seed=DEFAULT_DATA_SEED)
    if kind == "calib" and not text.is_file():
        write_text_jsonl(text, seed=DEFAULT_DATA_SEED)
    if kind == "eval" and not heldout.is_file():
        write_eval_jsonl(heldout, DEFAULT_DATA_SIZES["eval_per_level"], seed=DEFAULT_DATA_SEED)
    if kind == "calib":
        return f"{reasoning}:0.8,{text}:0.2"
    return str(reasoning if kind == "train" else heldout)


def resolve_spec(spec: str | None, kind: DataKind, default: str | None = None) -> str | None:
    """``spec`` with the word ``builtin`` replaced by :func:`default_data` of ``kind``.

    Commands call this before parsing a SPEC (:func:`rqat_deploy.data.spec.parse_spec`), so the
    word (:data:`rqat_deploy.data.spec.BUILTIN`) names each command's own built-in data: the
    calibration mix, the stage-2 traces, the held-out problems.

    Args:
        spec: a data SPEC, ``"builtin"``, or None.
        kind: which built-in data ``builtin`` means here.
        default: returned when ``spec`` is None (may itself be ``"builtin"``).

    Returns:
        The SPEC to load (None when both ``spec`` and ``default`` are None).
    """
    spec = spec if spec is not None else default
    return default_data(kind) if spec is not None and spec.strip().lower() == BUILTIN else spec


def problem_record(problem: Problem) -> dict[str, Any]:
    """All fields of a problem as a JSON-ready dict (for debugging and metadata)."""
    return asdict(problem)
