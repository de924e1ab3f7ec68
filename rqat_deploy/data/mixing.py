"""What calibration (:mod:`~rqat_deploy.data.calib`) and stage-2 data (:mod:`~rqat_deploy.data.sft`) share.

Sampling is deterministic: each source is shuffled with ``seed`` (``datasets``' exact shuffle for
local files, its seeded buffer shuffle for streams; :func:`rqat_deploy.data.sources.iter_records`),
per-source sample counts are the largest-remainder rounding of ``weight * n_samples``
(:func:`rqat_deploy.data.spec.allocate`), and the sources' samples are interleaved by a seeded
:func:`permutation`. The same inputs and seed give the same tensors. Training SPECs read the
``train`` split of dataset sources written without ``@split`` (:data:`~rqat_deploy.data.spec.TRAIN_SPLIT`).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, TypeVar

from rqat_deploy.data.chat import Rendered
from rqat_deploy.data.records import FieldMap, UnusableRecord, record_kind, render_record
from rqat_deploy.data.sources import iter_records
from rqat_deploy.data.spec import TRAIN_SPLIT, Source, allocate, parse_spec
from rqat_deploy.errors import DataError

__all__ = [
    "MAX_CONSECUTIVE_SKIPS",
    "TOKENIZE_BATCH",
    "SourceStats",
    "permutation",
    "rendered_batches",
    "rendered_stream",
    "report",
    "sample_sources",
    "shortfall",
    "train_sources",
]

T = TypeVar("T")

#: Records rendered and tokenized per tokenizer call.
TOKENIZE_BATCH = 64
#: Unusable records in a row after which a source is taken to have the wrong fields.
MAX_CONSECUTIVE_SKIPS = 10_000


@dataclass
class SourceStats:
    """What one source gave a data set: records read and skipped, samples, tokens (the data report)."""

    source: Source
    records_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    samples: int = 0
    tokens: int = 0
    completion_tokens: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    kinds: Counter = field(default_factory=Counter)

    def to_dict(self, total_weight: float, n_total: int, tokens_total: int) -> dict[str, Any]:
        """The per-source entry of a data report (fractions of ``n_total`` samples, ``tokens_total`` tokens)."""
        return {
            "source": self.source.name,
            "kind": self.source.kind,
            "weight": self.source.weight,
            "requested_fraction": round(self.source.weight / total_weight, 6),
            "samples": self.samples,
            "realised_fraction": round(self.samples / n_total, 6) if n_total else 0.0,
            "tokens": self.tokens,
            "token_fraction": round(self.tokens / tokens_total, 6) if tokens_total else 0.0,
            "completion_tokens": self.completion_tokens,
            "truncated": self.truncated,
            "truncated_tokens": self.truncated_tokens,
            "records_read": self.records_read,
            "records_skipped": dict(self.skipped),
            "record_kinds": dict(self.kinds),
        }


def rendered_stream(
    tokenizer: Any, source: Source, seed: int, fields: FieldMap, streaming: bool | None, stats: SourceStats
) -> Iterator[Rendered]:
    """Rendered records of a source; checks the schema on the first record, counts skips."""
    kind = None
    consecutive = 0
    for record in iter_records(source, seed, streaming):
        stats.records_read += 1
        if kind is None:
            try:
                kind = record_kind(record, fields)
            except DataError as e:
                raise DataError(f"source {source.name!r}: {e}") from None
        try:
            rendered = render_record(tokenizer, record, fields, kind)
        except UnusableRecord as s:
            stats.skipped[s.reason] += 1
            consecutive += 1
            if consecutive >= MAX_CONSECUTIVE_SKIPS:
                raise DataError(
                    f"source {source.name!r}: {consecutive} records in a row are unusable "
                    f"({dict(stats.skipped)}); check its fields"
                ) from None
            continue
        consecutive = 0
        stats.kinds[kind] += 1
        yield rendered


def rendered_batches(
    tokenizer: Any, source: Source, seed: int, fields: FieldMap, streaming: bool | None, stats: SourceStats
) -> Iterator[list[Rendered]]:
    """:func:`rendered_stream` in lists of up to :data:`TOKENIZE_BATCH` records (one tokenizer call each)."""
    batch: list[Rendered] = []
    for rendered in rendered_stream(tokenizer, source, seed, fields, streaming, stats):
        batch.append(rendered)
        if len(batch) == TOKENIZE_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def shortfall(stats: SourceStats, want: int, what: str) -> DataError:
    """The error of a source that yields fewer than the ``want`` samples its weight asks for (``what``: a hint)."""
    if stats.samples == 0:
        return DataError(
            f"source {stats.source.name!r} yields no usable sample ({stats.records_read} records read, "
            f"skipped: {dict(stats.skipped) or 'none'}{'; ' + what if what else ''})"
        )
    return DataError(
        f"source {stats.source.name!r} yields only {stats.samples} samples of the {want} its weight asks for "
        f"({stats.records_read} records read, skipped: {dict(stats.skipped) or 'none'}): lower the sample "
        "count, add data, or give the source a smaller weight"
    )


def train_sources(spec: str) -> list[Source]:
    """Parse a training SPEC: :func:`rqat_deploy.data.spec.parse_spec` with the ``train`` default split."""
    return parse_spec(spec, TRAIN_SPLIT)


def sample_sources(
    spec: str,
    n_samples: int,
    seq_len: int,
    fields: FieldMap | str | Mapping[str, Any] | None,
    take: Callable[[Source, int, FieldMap], tuple[list[T], SourceStats]],
) -> tuple[list[T], list[SourceStats]]:
    """Check the sizes, parse the SPEC (training's default split) and take each source's share.

    Args:
        spec: the data SPEC.
        n_samples: samples in all, shared by weight (:func:`rqat_deploy.data.spec.allocate`).
        seq_len: tokens per sample (checked here).
        fields: the record field map (:meth:`FieldMap.parse`).
        take: ``(source, count, field map) -> (samples, stats)`` of one source.

    Returns:
        Every source's samples, source after source, and each source's stats.

    Raises:
        DataError: a bad size, field map or SPEC, or what ``take`` raises.
    """
    _check_sizes(n_samples, seq_len)
    fmap = FieldMap.parse(fields)
    sources = train_sources(spec)
    samples: list[T] = []
    stats: list[SourceStats] = []
    for source, want in zip(sources, allocate([s.weight for s in sources], n_samples)):
        part, st = take(source, want, fmap)
        samples.extend(part)
        stats.append(st)
    return samples, stats


def report(
    spec: str, seed: int, n_samples: int, seq_len: int, total_tokens: int, stats: list[SourceStats], **extra: Any
) -> dict[str, Any]:
    """The data report: the request, ``total_tokens``, ``extra`` totals and one entry per source."""
    total_w = sum(st.source.weight for st in stats)
    return {
        "spec": spec,
        "seed": seed,
        "n_samples": n_samples,
        "seq_len": seq_len,
        "total_tokens": total_tokens,
        **extra,
        "sources": [st.to_dict(total_w, n_samples, total_tokens) for st in stats],
    }


def _check_sizes(n_samples: int, seq_len: int) -> None:
    if not isinstance(n_samples, int) or n_samples < 1:
        raise DataError(f"the number of samples must be a positive integer, got {n_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"the sequence length must be an integer >= 2, got {seq_len!r}")


def permutation(n: int, seed: int) -> list[int]:
    """The seeded order in which the sources' samples are interleaved."""
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    return perm
