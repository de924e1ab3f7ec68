"""Evaluation sets: GSM8K, MATH-500, AIME and any question/answer file, local or on the Hub.

An evaluation set is named by a SPEC (DESIGN.md 9): a comma-separated list of ``source[:weight]``.
A source is

- a local file: ``.jsonl`` / ``.json`` (one JSON object per line, or a JSON list), ``.parquet``,
  or ``.txt`` (one question per non-empty line, no gold answers: speed runs only);
- a local directory or a Hub dataset id (``openai/gsm8k``), loaded through
  :func:`datasets.load_dataset`; a Hub config may follow an ``@`` (``openai/gsm8k@main``);
- one of the short names in :data:`HUB_ALIASES` (``gsm8k``, ``math500``, ``aime24``).

Weights only matter with a ``limit``: the limit is shared between the sources in proportion to
their weights (default 1 each, largest remainder), and each source contributes its first rows, so
``--limit`` is deterministic. Without a limit every row of every source is used.

Fields are detected from the column names (first match wins, see :data:`QUESTION_FIELDS` and
:data:`ANSWER_FIELDS`) or given explicitly. Gold answers are reduced to their final form:
GSM8K's ``#### n`` tail, the last ``\\boxed{}`` of a solution, or the field as it stands.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from rqat_deploy.errors import DataError

__all__ = [
    "ANSWER_FIELDS",
    "HUB_ALIASES",
    "QUESTION_FIELDS",
    "SOLUTION_FIELDS",
    "EvalExample",
    "SourceSpec",
    "detect_fields",
    "gold_final_answer",
    "load_eval_set",
    "load_rows",
    "parse_spec",
]

#: Column names tried, in order, for the question (MATH/AIME use ``problem``; GSM8K ``question``).
QUESTION_FIELDS: tuple[str, ...] = ("problem", "question", "query", "prompt", "input", "instruction")
#: Column names tried, in order, for the gold answer.
ANSWER_FIELDS: tuple[str, ...] = ("answer", "final_answer", "gt", "target", "expected_answer", "label")
#: Column names tried, in order, for a worked solution (used as the gold answer's fallback source).
SOLUTION_FIELDS: tuple[str, ...] = ("solution", "gt_cot", "rationale")

#: Short names for the usual Hub sets: (dataset id, config, split).
HUB_ALIASES: dict[str, tuple[str, str | None, str]] = {
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test"),
    "math-500": ("HuggingFaceH4/MATH-500", None, "test"),
    "aime24": ("HuggingFaceH4/aime_2024", None, "train"),
    "aime2024": ("HuggingFaceH4/aime_2024", None, "train"),
}

_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
_WEIGHT_RE = re.compile(r"^(?P<source>.+?):(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


@dataclass(frozen=True)
class SourceSpec:
    """One ``source[:weight]`` item of a SPEC."""

    source: str
    weight: float = 1.0


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


def parse_spec(spec: str) -> list[SourceSpec]:
    """Parse a SPEC: comma-separated ``source[:weight]`` items.

    Args:
        spec: e.g. ``"gsm8k_test.jsonl"``, ``"a.jsonl:3,openai/gsm8k@main:1"``.

    Returns:
        The sources in order, weight 1.0 where none was given.

    Raises:
        DataError: on an empty SPEC, an empty item, or a weight that is not positive.
    """
    if not spec or not spec.strip():
        raise DataError("empty dataset SPEC: give one or more `source[:weight]` items, comma-separated")
    items: list[SourceSpec] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise DataError(f"empty item in dataset SPEC {spec!r}: remove the stray comma")
        match = _WEIGHT_RE.match(item)
        if match and not Path(item).exists():
            weight = float(match.group("weight"))
            if not math.isfinite(weight) or weight <= 0:
                raise DataError(f"weight of {match.group('source')!r} in SPEC must be > 0, got {weight}")
            items.append(SourceSpec(match.group("source"), weight))
        else:
            items.append(SourceSpec(item, 1.0))
    return items


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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc}); fix the file") from exc
        if not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: expected a JSON list of objects")
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not a JSON object ({exc}); fix or remove the line") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow comes with datasets
        raise DataError(f"{path}: reading Parquet needs pyarrow (`pip install pyarrow`)") from exc
    return pq.read_table(path).to_pylist()


def _read_text(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [{"question": line.strip()} for line in lines if line.strip()]


def _load_with_datasets(source: str, split: str | None) -> list[dict[str, Any]]:
    """Load a Hub id or a local dataset directory through :func:`datasets.load_dataset`."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError(f"loading {source!r} needs the `datasets` package (`pip install datasets`)") from exc
    name, config, alias_split = source, None, None
    if source.lower() in HUB_ALIASES:
        name, config, alias_split = HUB_ALIASES[source.lower()]
    elif "@" in source and not Path(source).exists():
        name, config = source.split("@", 1)
    try:
        loaded = datasets.load_dataset(name, config) if config else datasets.load_dataset(name)
    except Exception as exc:  # datasets raises many kinds (FileNotFoundError, ConnectionError...)
        raise DataError(
            f"cannot load dataset {source!r} ({type(exc).__name__}: {exc}). Give a local "
            f"JSONL/Parquet/text file, a local dataset directory, or a Hub id (with `@config` if it "
            f"has several configs); offline, download it first."
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.keys())
        chosen = split or alias_split
        if chosen is None:
            chosen = "test" if "test" in splits else (splits[0] if len(splits) == 1 else None)
        if chosen not in loaded:
            raise DataError(f"dataset {source!r} has splits {splits}; choose one with split=...")
        loaded = loaded[chosen]
    return [dict(r) for r in loaded]


def load_rows(source: str, *, split: str | None = None) -> list[dict[str, Any]]:
    """Read the raw rows of one source.

    Args:
        source: a local file, a local dataset directory, a Hub id (optionally ``id@config``) or an
            alias of :data:`HUB_ALIASES`.
        split: the split to take from a Hub / directory dataset (default ``test``, or the only one).

    Returns:
        The rows as dicts.

    Raises:
        DataError: when the source cannot be found or read.
    """
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return _read_jsonl(path)
        if suffix == ".parquet":
            return _read_parquet(path)
        if suffix == ".txt":
            return _read_text(path)
        raise DataError(f"{path}: unknown file type {suffix!r}; use one of {list(_LOCAL_SUFFIXES)}")
    if path.suffix.lower() in _LOCAL_SUFFIXES and not path.exists():
        raise DataError(f"dataset file {path} does not exist: check the path")
    return _load_with_datasets(source, split)


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


def _share_limit(limit: int, weights: list[float], sizes: list[int]) -> list[int]:
    """Split ``limit`` rows over sources in proportion to weights (largest remainder, capped by size)."""
    total = sum(weights)
    exact = [limit * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: limit - sum(counts)]:
        counts[i] += 1
    return [min(c, n) for c, n in zip(counts, sizes)]


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
        spec: comma-separated ``source[:weight]`` (see the module docstring).
        limit: keep at most this many questions in all, shared by weight; None keeps every row.
        question_field: the question column, detected when None.
        answer_field: the gold answer column, detected when None.
        split: the split of Hub / directory datasets.

    Returns:
        The examples, ``index`` numbered 0.. in order (source by source).

    Raises:
        DataError: on a bad SPEC, an unreadable source or missing fields.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    sources = parse_spec(spec)
    per_source = [
        _rows_to_examples(load_rows(s.source, split=split), s.source, question_field=question_field, answer_field=answer_field)
        for s in sources
    ]
    if limit is not None:
        counts = _share_limit(limit, [s.weight for s in sources], [len(x) for x in per_source])
        per_source = [x[:c] for x, c in zip(per_source, counts)]
    examples = [ex for group in per_source for ex in group]
    return [
        EvalExample(i, ex.question, ex.answer, ex.source, ex.source_index, ex.solution, ex.meta)
        for i, ex in enumerate(examples)
    ]
