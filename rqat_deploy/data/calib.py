"""Calibration data for stage 1 (:func:`build_calibration`).

Each record is rendered to its full text (conversations through the chat template; plain text
followed by the EOS token as document separator, :mod:`rqat_deploy.data.records`); each source's
documents are tokenized, concatenated in their shuffled order and cut into consecutive sequences of
exactly ``seq_len`` tokens (the tail that does not fill a sequence is dropped). Every sequence
therefore holds ``seq_len`` tokens and the domain mix holds for sequences and tokens alike.
Sampling is deterministic (:mod:`rqat_deploy.data.mixing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from rqat_deploy.data.mixing import SourceStats, permutation, rendered_batches, report, sample_sources, shortfall
from rqat_deploy.data.records import FieldMap
from rqat_deploy.data.spec import Source

__all__ = [
    "DEFAULT_CALIB_SAMPLES", "DEFAULT_CALIB_SEQ_LEN", "DEFAULT_CALIB_SPEC", "MATH_CALIB_SPEC", "CalibSet", "build_calibration",
]

#: The paper's calibration mix (DESIGN.md 5): 80 % reasoning traces, 20 % pre-training text.
DEFAULT_CALIB_SPEC = "open-thoughts/OpenThoughts3-1.2M:0.8,HuggingFaceFW/fineweb-edu:0.2"
#: Math calibration data (problem + solution), as the GPTQ / AWQ baselines of the paper and
#: Reasoning-QAT's GPTQ start calibrate: NuminaMath-1.5 (DESIGN.md 5).
MATH_CALIB_SPEC = "AI-MO/NuminaMath-1.5"
DEFAULT_CALIB_SAMPLES = 4096
DEFAULT_CALIB_SEQ_LEN = 2048


@dataclass
class CalibSet:
    """Calibration sequences for stage 1.

    Attributes:
        input_ids: ``[N, L]`` int64 token ids, every row a full ``L``-token window.
        report: the realised domain mix and token counts (see :func:`build_calibration`).
    """

    input_ids: torch.Tensor
    report: dict[str, Any]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _pack_source(
    tokenizer: Any, source: Source, want: int, seq_len: int, seed: int, fields: FieldMap, streaming: bool | None
) -> tuple[list[torch.Tensor], SourceStats]:
    """Up to ``want`` consecutive ``seq_len`` windows of the source's concatenated documents."""
    stats = SourceStats(source)
    chunks: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []  # documents not yet cut (their total is < seq_len between cuts)
    pending_len = 0
    eos = tokenizer.eos_token_id
    if want == 0:
        return chunks, stats
    for batch in rendered_batches(tokenizer, source, seed, fields, streaming, stats):
        ids = tokenizer([r.text for r in batch], add_special_tokens=False)["input_ids"]
        for r, doc in zip(batch, ids):
            if r.kind == "text" and eos is not None:
                doc = doc + [eos]  # document separator of pre-training text
            pending.append(torch.tensor(doc, dtype=torch.long))
            pending_len += len(doc)
            if pending_len < seq_len:
                continue
            flat = torch.cat(pending)  # [pending_len]
            take = min(len(flat) // seq_len, want - len(chunks))
            chunks.extend(flat[: take * seq_len].view(take, seq_len).clone().unbind(0))
            rest = flat[take * seq_len :].clone()
            pending, pending_len = [rest], len(rest)
            if len(chunks) >= want:
                break
        if len(chunks) >= want:
            break
    stats.samples = len(chunks)
    stats.tokens = stats.samples * seq_len
    if stats.samples < want:
        raise shortfall(stats, want, "")
    return chunks, stats


def build_calibration(
    tokenizer: Any,
    spec: str = DEFAULT_CALIB_SPEC,
    n_samples: int = DEFAULT_CALIB_SAMPLES,
    seq_len: int = DEFAULT_CALIB_SEQ_LEN,
    seed: int = 0,
    *,
    fields: FieldMap | str | Mapping[str, Any] | None = None,
    streaming: bool | None = None,
) -> CalibSet:
    """Build ``n_samples`` calibration sequences of ``seq_len`` tokens from a mixed-source spec.

    Args:
        tokenizer: the model's (fast) tokenizer, with a chat template for conversation sources.
        spec: ``source[:weight],...`` (:mod:`rqat_deploy.data.spec`); default the paper's 80/20 mix.
        n_samples: number of sequences (paper: 4,096).
        seq_len: tokens per sequence (paper: 2,048).
        seed: shuffle and interleave seed; same inputs and seed give the same tensor.
        fields: record field names (:class:`FieldMap`, ``"prompt=question,..."`` or a mapping).
        streaming: see :func:`rqat_deploy.data.sources.iter_records`.

    Returns:
        A :class:`CalibSet`; ``report`` holds ``spec``, ``seed``, ``n_samples``, ``seq_len``,
        ``total_tokens`` and per source ``samples``, ``requested_fraction``, ``realised_fraction``,
        ``tokens``, ``records_read``, ``records_skipped``, ``record_kinds``.

    Raises:
        DataError: a bad spec, an unloadable source, a record without any expected field (naming
            the fields found), or a source that yields too few sequences.
    """
    rows, stats = sample_sources(
        spec, n_samples, seq_len, fields,
        lambda source, want, fmap: _pack_source(tokenizer, source, want, seq_len, seed, fmap, streaming),
    )
    input_ids = torch.stack([rows[i] for i in permutation(len(rows), seed)])  # [N, L]
    data_report = report(spec, seed, n_samples, seq_len, int(input_ids.numel()), stats)
    return CalibSet(input_ids=input_ids, report=data_report)
