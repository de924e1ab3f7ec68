"""Answer extraction and equivalence for math reasoning benchmarks.

Extraction (:func:`extract_answer`), applied to the text after the model's ``</think>`` when there is
one (the whole text otherwise, and as a fallback when the part after it holds no answer), in order:

1. the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces matched, ``\\boxed 5``
   accepted);
2. GSM8K's ``#### <answer>`` (the text after the last ``####``, to the end of its line);
3. ``answer is X`` / ``Answer: X`` (the rest of that line);
4. the last number in the text.

Equivalence (:func:`is_equiv`) has two backends:

- ``"fallback"``: pure Python. Both answers are normalized (:func:`normalize_answer`: ``\\left`` /
  ``\\right``, ``\\dfrac`` -> ``\\frac``, ``\\frac12`` -> ``\\frac{1}{2}``, spacing commands and spaces,
  ``\\text{}`` and friends, trailing units, ``$``, ``%``, degrees, thousands separators, trailing
  ``.0``, ``x = `` prefixes...) and compared as strings; then as exact rational numbers (integers,
  decimals, ``a/b``, ``\\frac{a}{b}``, mixed numbers); then element-wise: tuples and intervals keep
  their order and bracket types, sets ``\\{...\\}``, bare comma lists and ``\\cup`` unions do not.
- ``"math-verify"``: Hugging Face's ``math-verify`` (symbolic, through sympy) on the extracted answers,
  except where it is known to be too lenient: two plain numbers are compared as exact rationals
  (math-verify rounds to 6 decimals) and numerals in a base (``52_8``) as strings (it drops the
  subscript).

``"auto"`` (the default) is math-verify when it is importable and the fallback otherwise
(:func:`resolve_grader`): one grader decides every verdict, and :class:`GradeResult` names it, so a
score never depends silently on what is installed. The two differ at the edges: math-verify sees
symbolic equalities (``\\sqrt{2}/2`` = ``\\frac{\\sqrt{2}}{2}``) the fallback cannot, the fallback
accepts text answers math-verify does not (``east`` = ``East``).
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Literal

from rqat_deploy.errors import ConfigError

__all__ = [
    "GRADERS",
    "Backend",
    "GradeResult",
    "MAX_EQUATION_RESULT_CHARS",
    "candidate_answers",
    "extract_answer",
    "fallback_equiv",
    "grade_response",
    "is_equiv",
    "last_boxed_content",
    "math_verify_available",
    "math_verify_equiv",
    "normalize_answer",
    "resolve_grader",
]

Backend = Literal["auto", "fallback", "math-verify"]
#: The grading backends ``--grader`` accepts.
GRADERS: tuple[str, ...] = ("auto", "fallback", "math-verify")
_MATH_VERIFY_MISSING = "the math-verify grader needs `pip install math-verify` (or the `bench` extra); or grade with fallback"

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_BASE_NUMERAL_RE = re.compile(r"[0-9A-Za-z]+_\{?\d+\}?")
_ANSWER_IS_RE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*:?\s*(?P<ans>[^\n]+)", re.IGNORECASE
)


@dataclass(frozen=True)
class GradeResult:
    """The grade of one response.

    Attributes:
        correct: whether the extracted answer is equivalent to the gold answer.
        extracted: the answer found in the response (None when nothing was found).
        method: how it was found: ``boxed``, ``hash``, ``answer_is``, ``last_number`` or ``none``.
        grader: the backend that decided ``correct``: ``fallback`` or ``math-verify``.
    """

    correct: bool
    extracted: str | None
    method: str
    grader: str


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------


def _match_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``start`` (escaped ``\\{``/``\\}`` skipped), or None."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{}`` or ``\\fbox{}`` in ``text``.

    Nested braces are matched (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); ``\\boxed 5`` gives
    ``5``. A box that is never closed (a truncated response) is skipped for an earlier complete one.

    Args:
        text: any text.

    Returns:
        The content, or None when there is no complete box.
    """
    contents = _boxed_contents(text)
    return contents[-1] if contents else None


def _boxed_contents(text: str) -> list[str]:
    """Contents of every complete box in ``text``, in order (the rules of :func:`last_boxed_content`)."""
    out = []
    for match in _BOX_RE.finditer(text):
        i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _match_brace(text, i)
            if end is not None:
                out.append(text[i + 1 : end])
            continue
        tail = re.match(r"[^\s$]+", text[i:])
        if tail is not None and match.end() < i:  # `\boxed 5`: a space, then the answer
            out.append(tail.group(0))
    return out


def _answer_part(response: str) -> str:
    """The text after the last ``</think>``, or the whole response when there is none."""
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    return response


def _extract_from(text: str) -> tuple[str | None, str]:
    boxed = last_boxed_content(text)
    if boxed is not None:
        return boxed.strip(), "boxed"
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
        if tail:
            return tail, "hash"
    matches = list(_ANSWER_IS_RE.finditer(text))
    if matches:
        ans = _clean_answer_is(matches[-1].group("ans"))
        if ans:
            return ans, "answer_is"
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return numbers[-1], "last_number"
    return None, "none"


def _clean_answer_is(ans: str) -> str:
    """The answer of an ``answer is X`` match: surrounding ``$``, ``\\(``/``\\)`` and a final period removed."""
    ans = re.sub(r"^\$+|\$+$", "", ans.strip().rstrip(" .")).strip()
    return re.sub(r"^\\\(|\\\)$", "", ans).strip()


#: Longest right-hand side of an ``=`` that :func:`candidate_answers` keeps.
MAX_EQUATION_RESULT_CHARS = 64
_CLAUSE_END_RE = re.compile(r"[.,;:]\s")


def candidate_answers(text: str) -> list[str]:
    """Every answer a reasoning text states along the way (``answer_seen_then_lost``, DESIGN.md 9).

    In order of kind: the content of every complete ``\\boxed{}`` / ``\\fbox{}``; every
    ``answer is X`` / ``Answer: X`` (the rest of its line); the right-hand side of every ``=`` (what
    a computation step concluded), up to the next ``=``, the end of the line or the end of the
    clause (a ``.``, ``,``, ``;`` or ``:`` followed by a space), stripped of spaces, ``$`` and final
    punctuation, when it has at most :data:`MAX_EQUATION_RESULT_CHARS` characters.

    Args:
        text: usually a thinking span.

    Returns:
        The candidates (duplicates kept).
    """
    found = [c.strip() for c in _boxed_contents(text)]
    found += [_clean_answer_is(m.group("ans")) for m in _ANSWER_IS_RE.finditer(text)]
    for line in text.splitlines():
        for rhs in line.split("=")[1:]:
            rhs = _CLAUSE_END_RE.split(rhs, 1)[0].strip().rstrip(".,;:").strip().strip("$").strip()
            if 0 < len(rhs) <= MAX_EQUATION_RESULT_CHARS:
                found.append(rhs)
    return [c for c in found if c]


def extract_answer(response: str) -> tuple[str | None, str]:
    """Find the final answer in a model response.

    Args:
        response: the model's full text (thinking included).

    Returns:
        ``(answer or None, method)``, method one of ``boxed``, ``hash``, ``answer_is``,
        ``last_number``, ``none``.
    """
    ans, method = _extract_from(_answer_part(response))
    if ans is None and "</think>" in response:
        ans, method = _extract_from(response)
    return ans, method


# --------------------------------------------------------------------------------------------------
# Normalization (fallback backend)
# --------------------------------------------------------------------------------------------------

_TEXT_COMMANDS = ("text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mathit", "mbox", "operatorname", "bf")
_UNIT_WORDS = (
    "units?|dollars?|cents?|degrees?|inches|inch|feet|foot|ft|yards?|miles?|meters?|metres?|cm|mm|km|m|"
    "seconds?|minutes?|hours?|days?|weeks?|months?|years?|sq|square|cubic|mph|pounds?|lbs?|ounces?|oz|"
    "grams?|kg|g|liters?|litres?|ml|gallons?|cups?|people|students?|points?|ways?|marbles?|eggs?|"
    "apples?|books?|pages?|percent|%"
)
_TRAILING_UNIT_RE = re.compile(rf"^(?P<num>-?[\d.,/]+)(?:\s+(?:{_UNIT_WORDS})(?:\^?[23])?)+$", re.IGNORECASE)
_TEXT_UNIT_RE = re.compile(r"^(?P<head>.*\S)\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z ]*\}\s*(?:\^\{?[23]\}?)?$")


def _unwrap_commands(s: str, names: tuple[str, ...]) -> str:
    """Replace ``\\name{content}`` by ``content`` for each command in ``names`` (nested allowed)."""
    pattern = re.compile(r"\\(?:" + "|".join(names) + r")\s*\{")
    while True:
        match = pattern.search(s)
        if match is None:
            return s
        open_at = match.end() - 1
        close_at = _match_brace(s, open_at)
        if close_at is None:
            return s[: match.start()] + s[open_at + 1 :]
        s = s[: match.start()] + s[open_at + 1 : close_at] + s[close_at + 1 :]


def _brace_arg(s: str, i: int) -> tuple[str, int] | None:
    """Argument of a LaTeX command starting at ``i``: ``{...}`` or one character; (arg, next index)."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        end = _match_brace(s, i)
        if end is None:
            return None
        return s[i + 1 : end], end + 1
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        if m:
            return m.group(0), i + len(m.group(0))
    return s[i], i + 1


def _fix_fracs_and_sqrts(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac 59`` -> ``\\frac{5}{9}``, ``\\sqrt2`` -> ``\\sqrt{2}``."""
    out = []
    i = 0
    while i < len(s):
        m = re.match(r"\\(frac|sqrt)(?![a-zA-Z])", s[i:])
        if m is None:
            out.append(s[i])
            i += 1
            continue
        cmd = m.group(1)
        j = i + len(m.group(0))
        if cmd == "sqrt" and j < len(s) and s[j] == "[":  # \sqrt[3]{x}: keep the index
            close = s.find("]", j)
            if close < 0:
                out.append(s[i:])
                break
            out.append(s[i : close + 1])
            i = close + 1
            arg = _brace_arg(s, i)
            if arg is None:
                break
            out.append("{" + _fix_fracs_and_sqrts(arg[0]) + "}")
            i = arg[1]
            continue
        nargs = 2 if cmd == "frac" else 1
        args = []
        for _ in range(nargs):
            arg = _brace_arg(s, j)
            if arg is None:
                break
            args.append(_fix_fracs_and_sqrts(arg[0]))
            j = arg[1]
        if len(args) < nargs:
            out.append(s[i:])
            break
        out.append("\\" + cmd + "".join("{" + a + "}" for a in args))
        i = j
    return "".join(out)


def _strip_trailing_zeros(s: str) -> str:
    """``18.00`` -> ``18``, ``0.50`` -> ``0.5``, ``.5`` -> ``0.5`` (only for whole decimal numbers)."""
    m = re.fullmatch(r"(-?)(\d*)\.(\d*)", s)
    if m is None:
        return s
    sign, whole, frac = m.groups()
    frac = frac.rstrip("0")
    whole = whole or "0"
    return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"


@functools.lru_cache(maxsize=65536)
def normalize_answer(answer: str) -> str:
    """Normalize a final answer for string comparison (the fallback backend).

    Args:
        answer: an extracted or gold answer (LaTeX or plain).

    Returns:
        A canonical string: no spaces, no spacing commands, ``\\frac{a}{b}`` form, units, ``$``,
        ``%`` and degree marks dropped, thousands separators removed, ``x = 5`` -> ``5``, text
        answers lower-cased.
    """
    s = answer.strip().replace("\n", " ")
    s = re.sub(r"\\(?:left|right)\.", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = s.replace("\\!", "").replace("{,}", ",")
    s = re.sub(r"\\(?:,|;|:|quad|qquad)", " ", s).replace("\\ ", " ").replace("~", " ")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\circ(?![a-zA-Z])", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:displaystyle|textstyle)(?![a-zA-Z])", "", s)
    s = s.replace("\\begin{bmatrix}", "\\begin{pmatrix}").replace("\\end{bmatrix}", "\\end{pmatrix}")
    s = s.strip().rstrip(".").strip()
    # Trailing units: `864 \mbox{ inches}^2`, `5.4 \text{ cents}`, then `18 dollars`.
    m = _TEXT_UNIT_RE.match(s)
    if m is not None:
        s = m.group("head")
    s = _unwrap_commands(s, _TEXT_COMMANDS).strip()
    m = _TRAILING_UNIT_RE.match(s)
    if m is not None:
        s = m.group("num")
    # `x = 5`, `x \in [-2,7]`: keep the right-hand side when the left is a single variable.
    m = re.fullmatch(r"\s*[a-zA-Z](?:_\{?\w+\}?)?\s*(?:=|\\in)\s*(?P<rhs>[^=]+)", s)
    if m is not None:
        s = m.group("rhs")
    s = s.strip().rstrip(".").strip()
    # Thousands separators, only when the whole answer is one number written with them.
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s.replace(" ", "")) and ", " not in s:
        s = s.replace(",", "")
    s = _fix_fracs_and_sqrts(s)
    s = s.replace(" ", "")
    s = re.sub(r"([_^])\{(\w)\}", r"\1\2", s)  # 4210_{5} -> 4210_5, x^{2} -> x^2
    s = _strip_trailing_zeros(s)
    # `(C)` -> `C`, `(113)` -> `113`: one bare item in parentheses.
    m = re.fullmatch(r"\((?P<item>[A-Za-z]|-?\d+(?:\.\d+)?)\)", s)
    if m is not None:
        s = m.group("item")
    if re.fullmatch(r"[A-Za-z]{2,}", s):  # text answers (`Evelyn`, `east`): case-insensitive
        s = s.lower()
    return s


def _to_fraction(s: str) -> Fraction | None:
    """Exact value of a normalized numeric answer, or None when it is not a plain number."""
    if re.fullmatch(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", s):
        return Fraction(s)
    m = re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    if m is not None and int(m.group(3)) != 0:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return -value if m.group(1) else value
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    if m is not None and Fraction(m.group(3)) != 0:
        value = Fraction(m.group(2)) / Fraction(m.group(3))
        return -value if m.group(1) else value
    m = re.fullmatch(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)  # mixed number 1\frac{4}{5}
    if m is not None and int(m.group(4)) != 0:
        value = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
        return -value if m.group(1) else value
    return None


def _split_top_level(s: str, sep: str) -> list[str]:
    """Split on ``sep`` outside any (), [], {} nesting."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s.startswith("\\{", i) or s.startswith("\\}", i):
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        ch = s[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _unordered_match(preds: list[str], golds: list[str]) -> bool:
    if len(preds) != len(golds):
        return False
    remaining = list(golds)
    for p in preds:
        hit = next((k for k, g in enumerate(remaining) if _norm_equiv(p, g)), None)
        if hit is None:
            return False
        remaining.pop(hit)
    return True


def _norm_equiv(p: str, g: str) -> bool:
    """Equivalence of two normalized answers."""
    if p == g:
        return True
    fp, fg = _to_fraction(p), _to_fraction(g)
    if fp is not None and fg is not None:
        return fp == fg
    if "\\cup" in p or "\\cup" in g:
        return _unordered_match(_split_top_level(p, "\\cup"), _split_top_level(g, "\\cup"))
    if p.startswith("\\{") and p.endswith("\\}") and g.startswith("\\{") and g.endswith("\\}"):
        return _unordered_match(_split_top_level(p[2:-2], ","), _split_top_level(g[2:-2], ","))
    if len(p) >= 2 and len(g) >= 2 and p[0] in "([" and p[-1] in ")]" and (p[0], p[-1]) == (g[0], g[-1]):
        ps, gs = _split_top_level(p[1:-1], ","), _split_top_level(g[1:-1], ",")
        if len(ps) > 1 and len(ps) == len(gs):
            return all(_norm_equiv(a, b) for a, b in zip(ps, gs))
        return False
    ps, gs = _split_top_level(p, ","), _split_top_level(g, ",")
    if len(ps) > 1 or len(gs) > 1:
        return _unordered_match(ps, gs)
    return False


def fallback_equiv(pred: str | None, gold: str | None) -> bool:
    """Pure-Python equivalence of two answers (see the module docstring).

    Args:
        pred: the extracted answer (None means no answer: never correct).
        gold: the gold answer.

    Returns:
        True when equivalent.
    """
    if pred is None or gold is None:
        return False
    return _norm_equiv(normalize_answer(pred), normalize_answer(gold))


# --------------------------------------------------------------------------------------------------
# math-verify backend
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def math_verify_available() -> bool:
    """Whether the ``math-verify`` package can be imported."""
    try:
        import math_verify  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=65536)
def _mv_parse(answer: str, timeout: int | None) -> tuple:
    import math_verify

    return tuple(math_verify.parse("\\boxed{" + answer + "}", parsing_timeout=timeout))


def _exact_decision(p: str, g: str) -> bool | None:
    """Decide exactly where math-verify is known to be too lenient, else None.

    math-verify rounds numbers to 6 decimals (``.0000672`` = ``.0000673``) and drops base subscripts
    (``52_8`` = ``52_9``): plain numbers are compared as exact rationals, numerals in a base as
    strings.
    """
    fp, fg = _to_fraction(p), _to_fraction(g)
    if fp is not None and fg is not None:
        return fp == fg
    if _BASE_NUMERAL_RE.fullmatch(p) or _BASE_NUMERAL_RE.fullmatch(g):
        return p == g
    return None


def _mv_clean(answer: str) -> str:
    """Light clean-up math-verify needs: no trailing period, no bold, ``(073)`` -> ``073``."""
    s = _unwrap_commands(answer.strip(), ("textbf", "mathbf", "bf")).strip().rstrip(".").strip()
    s = s.replace("{,}", ",").replace("\\!", "")
    m = re.fullmatch(r"\(\s*(-?\d+(?:\.\d+)?)\s*\)", s)
    return m.group(1) if m else s


def math_verify_equiv(pred: str | None, gold: str | None, *, exact_numbers: bool = True) -> bool:
    """Equivalence through ``math-verify`` (symbolic, via sympy).

    Both answers are parsed from ``\\boxed{answer}``; math-verify's timeouts use ``signal.alarm``, so
    they are on in the main thread and off elsewhere.

    Args:
        pred: the extracted answer (None is never correct).
        gold: the gold answer.
        exact_numbers: decide plain numbers and numerals in a base exactly instead of asking
            math-verify (see :func:`_exact_decision`); False asks math-verify for everything.

    Returns:
        True when math-verify finds them equal.

    Raises:
        ConfigError: when math-verify is not installed.
    """
    if not math_verify_available():
        raise ConfigError(_MATH_VERIFY_MISSING)
    if pred is None or gold is None:
        return False
    if exact_numbers:
        exact = _exact_decision(normalize_answer(pred), normalize_answer(gold))
        if exact is not None:
            return exact
    import math_verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        g, p = _mv_parse(_mv_clean(gold), timeout), _mv_parse(_mv_clean(pred), timeout)
        if not g or not p:
            return False
        return bool(math_verify.verify(list(g), list(p), timeout_seconds=timeout))
    except Exception:  # math-verify / sympy failures mean "not shown equal"
        return False


# --------------------------------------------------------------------------------------------------
# Public grading entry points
# --------------------------------------------------------------------------------------------------


def resolve_grader(backend: str = "auto") -> str:
    """The backend that grades: ``auto`` is math-verify when importable, else the fallback.

    Args:
        backend: ``"auto"``, ``"fallback"`` or ``"math-verify"``.

    Returns:
        ``"fallback"`` or ``"math-verify"``.

    Raises:
        ConfigError: an unknown backend, or ``"math-verify"`` when it is not installed.
    """
    if backend not in GRADERS:
        raise ConfigError(f"unknown grading backend {backend!r}; choose one of {list(GRADERS)}")
    if backend == "auto":
        return "math-verify" if math_verify_available() else "fallback"
    if backend == "math-verify" and not math_verify_available():
        raise ConfigError(_MATH_VERIFY_MISSING)
    return backend


def _equiv(grader: str) -> Callable[[str | None, str | None], bool]:
    """The equivalence function of a resolved grader."""
    return math_verify_equiv if grader == "math-verify" else fallback_equiv


def is_equiv(pred: str | None, gold: str | None, *, backend: Backend = "auto") -> bool:
    """Whether an extracted answer matches the gold answer.

    Args:
        pred: extracted answer (None: no answer found).
        gold: gold final answer.
        backend: ``"auto"`` (math-verify when importable, else the fallback: see
            :func:`resolve_grader`), ``"fallback"``, or ``"math-verify"``.

    Returns:
        True when equivalent.

    Raises:
        ConfigError: on an unknown backend, or ``"math-verify"`` when it is not installed.
    """
    return _equiv(resolve_grader(backend))(pred, gold)


def grade_response(response: str, gold: str | None, *, backend: Backend = "auto") -> GradeResult:
    """Extract the answer from a response and compare it with the gold answer.

    Args:
        response: the model's full text.
        gold: the gold final answer (None: ungraded, never correct).
        backend: see :func:`is_equiv`.

    Returns:
        The :class:`GradeResult`, naming the grader that decided.

    Raises:
        ConfigError: as :func:`is_equiv`.
    """
    grader = resolve_grader(backend)
    extracted, method = extract_answer(response)
    return GradeResult(_equiv(grader)(extracted, gold), extracted, method, grader)
