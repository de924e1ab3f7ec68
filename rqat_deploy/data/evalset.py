"""Evaluation sets: GSM8K, MATH-500, AIME and any question/answer file, local or on the Hub.

An evaluation set is named by a SPEC of the one grammar of :mod:`rqat_deploy.data.spec`: a
comma-separated list of ``source[:weight]``, a source being a local ``.jsonl`` / ``.json`` /
``.parquet`` file, a ``.txt`` file (one question per non-empty line, no gold answers: speed runs
only), a local dataset directory or Hub id ``org/name[#config][@split]``, or a short name of
:data:`~rqat_deploy.data.spec.HUB_ALIASES` (``gsm8k``, ``math500``, ``aime24``). A dataset written
without ``@split`` gives its ``test`` split, or its only split
(:data:`~rqat_deploy.data.spec.EVAL_SPLIT`). Rows are read in order by
:func:`rqat_deploy.data.sources.read_rows`, the loader training data uses too.

Weights only matter with a ``limit``: the limit is shared between the sources in proportion to
their weights (default 1 each, largest remainder), and each source contributes its first rows, so
``--limit`` is deterministic. Without a limit every row of every source is used.

Fields are detected from the column names (first match wins, see :data:`QUESTION_FIELDS` and
:data:`ANSWER_FIELDS`) or given explicitly. Gold answers are reduced to their final form:
GSM8K's ``#### n`` tail, the last ``\\boxed{}`` of a solution, or the field as it stands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from rqat_deploy.data.sources import read_rows
from rqat_deploy.data.spec import EVAL_SPLIT, DefaultSplit, Source, allocate, parse_spec
from rqat_deploy.errors import DataError

__all__ = [
    "ANSWER_FIELDS",
    "QUESTION_FIELDS",
    "SOLUTION_FIELDS",
    "EvalExample",
    "detect_fields",
    "eval_sources",
    "gold_final_answer",
    "load_eval_set",
    "load_rows",
]

#: Column names tried, in order, for the question (MATH/AIME use ``problem``; GSM8K ``question``).
QUESTION_FIELDS: tuple[str, ...] = ("problem", "question", "query", "prompt", "input", "instruction")
#: Column names tried, in order, for the gold answer.
ANSWER_FIELDS: tuple[str, ...] = ("answer", "final_answer", "gt", "target", "expected_answer", "label")
#: Column names tried, in order, for a worked solution (used as the gold answer's fallback source).
SOLUTION_FIELDS: tuple[str, ...] = ("solution", "gt_cot", "rationale")

@dataclass(frozen=True)
class EvalExample:
    """One evaluation question.

    Attributes:
        index: 0-based row of the combined evaluation set (the ``index`` of a responses file).
        question: the question text shown to the model.
        answer: the gold final answer (``"18"``, ``"\\frac{\\pi}{2}"``), or None when the source
            has none (a text file of prompts).
        source: the source it came from, as written in the SPEC.
        source_index: its 0-based row within that source.
        solution: a worked gold solution when the source has one (GSM8K's ``answer`` field,
            MATH's ``solution``), else None.
        meta: other scalar fields of the row (subject, level, id...).
    """

    index: int
    question: str
    answer: str | None
    source: str
    source_index: int
    solution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def eval_sources(spec: str, split: str | None = None) -> list[Source]:
    """Parse an evaluation SPEC (:func:`rqat_deploy.data.spec.parse_spec` with the evaluation default split).

    Args:
        spec: e.g. ``"gsm8k_test.jsonl"``, ``"a.jsonl:3,openai/gsm8k#main@test:1"``, ``"math500"``.
        split: the split of dataset sources written without ``@split``; ``None``:
            :data:`~rqat_deploy.data.spec.EVAL_SPLIT` (``test``, or the dataset's only split).

    Returns:
        The sources in order, weight 1.0 where none was given.

    Raises:
        DataError: as :func:`~rqat_deploy.data.spec.parse_spec`.
    """
    return parse_spec(spec, EVAL_SPLIT if split is None else DefaultSplit(split))


def gold_final_answer(value: Any) -> str | None:
    """Reduce a gold answer field to its final answer.

    GSM8K answers end with ``#### <number>`` (the text after the last ``####`` is taken); worked
    solutions carry a ``\\boxed{}`` (the last one is taken); anything else is used as it stands.

    Args:
        value: the field value (string or number).

    Returns:
        The final answer string, or None for a missing / empty value.
    """
    from rqat_deploy.data.grading import last_boxed_content

    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = value[0] if len(value) == 1 else ", ".join(str(v) for v in value)
    text = str(value).strip()
    if not text:
        return None
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    if "\\boxed" in text or "\\fbox" in text:
        boxed = last_boxed_content(text)
        if boxed is not None:
            return boxed.strip()
    return text


def detect_fields(
    columns: Iterable[str],
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    source: str = "<data>",
) -> tuple[str, str | None, str | None]:
    """Choose the question, answer and solution columns.

    Args:
        columns: the column names of the data.
        question_field: force this question column.
        answer_field: force this answer column.
        source: the source name, for error messages.

    Returns:
        ``(question_field, answer_field or None, solution_field or None)``. The answer field is None
        when only a solution field exists (its last ``\\boxed{}`` is then the gold answer) or when
        there is neither.

    Raises:
        DataError: when a forced field is missing or no question column is found.
    """
    cols = list(columns)
    for name, forced in (("question", question_field), ("answer", answer_field)):
        if forced is not None and forced not in cols:
            raise DataError(
                f"{source}: no {name} field {forced!r}; its fields are {cols}. "
                f"Pass the right name with --{name}-field."
            )
    q = question_field or next((c for c in QUESTION_FIELDS if c in cols), None)
    if q is None:
        raise DataError(
            f"{source}: cannot find a question field (tried {list(QUESTION_FIELDS)}); its fields are "
            f"{cols}. Pass the right name with --question-field."
        )
    a = answer_field or next((c for c in ANSWER_FIELDS if c in cols and c != q), None)
    s = next((c for c in SOLUTION_FIELDS if c in cols and c not in (q, a)), None)
    return q, a, s


def load_rows(source: str | Source, *, split: str | None = None) -> list[dict[str, Any]]:
    """Read the raw rows of one source, in order.

    Args:
        source: a parsed source, or one source of the SPEC grammar (a local file or dataset
            directory, a Hub id ``org/name[#config][@split]``, an alias).
        split: the split of a dataset written without ``@split`` (default ``test``, or the only one).

    Returns:
        The rows as dicts; a text file gives ``{"question": line}`` per non-empty line.

    Raises:
        DataError: when the source cannot be found or read.
    """
    if isinstance(source, str):
        parsed = eval_sources(source, split)
        if len(parsed) != 1:
            raise DataError(f"load_rows reads one source, got {len(parsed)} in {source!r}: use load_eval_set")
        source = parsed[0]
    rows = read_rows(source, text_unit="line")
    if source.kind == "text":
        return [{"question": r["text"].strip()} for r in rows if r["text"].strip()]
    return rows


def _rows_to_examples(
    rows: list[dict[str, Any]],
    source: str,
    *,
    question_field: str | None,
    answer_field: str | None,
) -> list[EvalExample]:
    if not rows:
        raise DataError(f"{source}: no rows")
    q, a, s = detect_fields(rows[0].keys(), question_field=question_field, answer_field=answer_field, source=source)
    out = []
    for i, row in enumerate(rows):
        question = row.get(q)
        if question is None or not str(question).strip():
            raise DataError(f"{source}: row {i} has an empty {q!r} field")
        raw_answer = row.get(a) if a else None
        solution = row.get(s) if s else None
        # GSM8K's `answer` is a worked solution ending in `#### n`: it is the solution as well.
        if solution is None and isinstance(raw_answer, str) and ("####" in raw_answer or "\\boxed" in raw_answer):
            solution = raw_answer
        gold = gold_final_answer(raw_answer) if a else None
        if gold is None and solution is not None:
            gold = gold_final_answer(solution)
        meta = {
            k: v for k, v in row.items() if k not in (q, a, s) and isinstance(v, (str, int, float, bool)) and k != "index"
        }
        out.append(
            EvalExample(
                index=-1,
                question=str(question),
                answer=gold,
                source=source,
                source_index=i,
                solution=str(solution) if solution is not None else None,
                meta=meta,
            )
        )
    return out


def load_eval_set(
    spec: str,
    *,
    limit: int | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    split: str | None = None,
) -> list[EvalExample]:
    """Load an evaluation set from a SPEC.

    Args:
        spec: comma-separated ``source[:weight]`` (:mod:`rqat_deploy.data.spec`).
        limit: keep at most this many questions in all, shared by weight; None keeps every row.
        question_field: the question column, detected when None.
        answer_field: the gold answer column, detected when None.
        split: the split of Hub / directory datasets written without ``@split`` (default ``test``,
            or the only split).

    Returns:
        The examples, ``index`` numbered 0.. in order (source by source).

    Raises:
        DataError: on a bad SPEC, an unreadable source or missing fields.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    sources = eval_sources(spec, split)
    per_source = [
        _rows_to_examples(load_rows(s), s.name, question_field=question_field, answer_field=answer_field)
        for s in sources
    ]
    if limit is not None:
        counts = allocate([s.weight for s in sources], limit)  # the first rows of each, capped by its size
        per_source = [x[:c] for x, c in zip(per_source, counts)]
    examples = [ex for group in per_source for ex in group]
    return [
        EvalExample(i, ex.question, ex.answer, ex.source, ex.source_index, ex.solution, ex.meta)
        for i, ex in enumerate(examples)
    ]
