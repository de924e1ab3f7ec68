"""Stage-2 training data (:func:`build_sft`): one record per sample, the prompt masked.

The prompt is the chat template applied to every message but the last assistant turn, with the
generation prompt (``add_generation_prompt=True``); the completion is the rest of the fully
rendered conversation (the ``<think>`` trace, the answer and the end-of-turn token). Labels are
``-100`` on the prompt and on padding, so only the final assistant completion is trained (earlier
turns of a multi-turn conversation are context). Samples longer than ``seq_len`` are truncated
(counted in the report); a sample whose prompt leaves no completion token within ``seq_len`` is
skipped. Plain-text records are trained entirely (no prompt). Sampling is deterministic
(:mod:`rqat_deploy.data.mixing`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from rqat_deploy.data.chat import Rendered
from rqat_deploy.data.mixing import SourceStats, permutation, rendered_batches, report, sample_sources, shortfall
from rqat_deploy.data.records import FieldMap
from rqat_deploy.data.spec import Source
from rqat_deploy.errors import DataError

__all__ = [
    "DEFAULT_TRAIN_SAMPLES",
    "DEFAULT_TRAIN_SEQ_LEN",
    "DEFAULT_TRAIN_SPEC",
    "IGNORE_INDEX",
    "SFTSet",
    "build_sft",
]

#: Stage-2 training data: reasoning traces only.
DEFAULT_TRAIN_SPEC = "open-thoughts/OpenThoughts3-1.2M"
DEFAULT_TRAIN_SAMPLES = 32768
DEFAULT_TRAIN_SEQ_LEN = 4096
#: Label of tokens that are not trained (Hugging Face convention).
IGNORE_INDEX = -100


@dataclass
class SFTSet:
    """Stage-2 training samples (right-padded).

    Attributes:
        input_ids: ``[N, T]`` int64, padded with the pad token (``T`` = longest sample <= ``seq_len``).
        attention_mask: ``[N, T]`` int64, 1 on real tokens (a prefix of each row).
        labels: ``[N, T]`` int64, the token id on completion tokens and ``-100`` on prompt and
            padding (Hugging Face convention: position ``t`` is predicted from position ``t-1``).
        report: realised mix, token and completion-token counts (see :func:`build_sft`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    report: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def completion_tokens(self) -> torch.Tensor:
        """Number of trained (label) tokens of each sample, ``[N]``."""
        return (self.labels[:, 1:] != IGNORE_INDEX).sum(dim=1)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "SFTSet":
        """The samples at ``indices`` (in that order), padding trimmed to their longest."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        mask = self.attention_mask[idx]
        t = int(mask.sum(dim=1).max()) if len(idx) else 0
        return SFTSet(self.input_ids[idx, :t], mask[:, :t], self.labels[idx, :t], dict(self.report))

    def fingerprint(self) -> str:
        """SHA-256 of the token ids, mask and labels (ties a teacher cache to its data)."""
        h = hashlib.sha256()
        for t in (self.input_ids, self.attention_mask, self.labels):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


def _sft_source(
    tokenizer: Any, source: Source, want: int, seq_len: int, seed: int, fields: FieldMap, streaming: bool | None
) -> tuple[list[tuple[torch.Tensor, int]], SourceStats]:
    """Tokenized ``(ids, first completion index)`` samples of one source, and its stats."""
    stats = SourceStats(source)
    samples: list[tuple[torch.Tensor, int]] = []
    shortest_unfit: int | None = None
    if want == 0:
        return samples, stats
    for batch in rendered_batches(tokenizer, source, seed, fields, streaming, stats):
        ids_list, starts = _tokenize_with_split(tokenizer, batch)
        for ids, start in zip(ids_list, starts):
            if min(len(ids), seq_len) - max(start, 1) < 1:  # no label token inside the window
                fits = len(ids) - max(start, 1) >= 1
                stats.skipped["no_completion_within_seq_len" if fits else "empty_completion"] += 1
                if fits:
                    shortest_unfit = start if shortest_unfit is None else min(shortest_unfit, start)
                continue
            if len(ids) > seq_len:
                stats.truncated += 1
                ids = ids[:seq_len]
            samples.append((torch.tensor(ids, dtype=torch.int32), start))
            stats.tokens += len(ids)
            stats.completion_tokens += len(ids) - max(start, 1)
            if len(samples) == want:
                break
        if len(samples) == want:
            break
    stats.samples = len(samples)
    if stats.samples < want:
        hint = ""
        if shortest_unfit is not None:
            hint = (
                f"the sequence length {seq_len} is too short for any completion of "
                f"{stats.skipped['no_completion_within_seq_len']} samples (shortest prompt: {shortest_unfit} "
                "tokens): raise the sequence length"
            )
        raise shortfall(stats, want, hint)
    return samples, stats


def _tokenize_with_split(tokenizer: Any, batch: list[Rendered]) -> tuple[list[list[int]], list[int]]:
    """Token ids of each rendered record and the index of its first completion token.

    A token is a completion token when it starts at or after the prompt's last character (character
    offsets of a fast tokenizer); a token straddling the boundary belongs to the prompt.
    """
    texts = [r.text for r in batch]
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        starts = []
        for r, offsets in zip(batch, enc["offset_mapping"]):
            cut = len(r.prompt)
            starts.append(next((i for i, (a, _) in enumerate(offsets) if a >= cut), len(offsets)))
        return enc["input_ids"], starts
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prompts = tokenizer([r.prompt for r in batch], add_special_tokens=False)["input_ids"]
    return ids, [len(p) for p in prompts]


def build_sft(
    tokenizer: Any,
    spec: str = DEFAULT_TRAIN_SPEC,
    n_samples: int = DEFAULT_TRAIN_SAMPLES,
    seq_len: int = DEFAULT_TRAIN_SEQ_LEN,
    seed: int = 0,
    *,
    fields: FieldMap | str | Mapping[str, Any] | None = None,
    streaming: bool | None = None,
) -> SFTSet:
    """Build ``n_samples`` stage-2 samples (prompt masked, completion trained) from a spec.

    Args:
        tokenizer: the model's (fast) tokenizer with its chat template.
        spec: ``source[:weight],...`` (:mod:`rqat_deploy.data.spec`).
        n_samples: number of samples (paper: 32,768).
        seq_len: maximum tokens per sample; longer samples are truncated.
        seed: shuffle and interleave seed.
        fields: record field names (:class:`FieldMap`, ``"prompt=question,..."`` or a mapping).
        streaming: see :func:`rqat_deploy.data.sources.iter_records`.

    Returns:
        An :class:`SFTSet`; ``report`` holds ``spec``, ``seed``, ``n_samples``, ``seq_len``,
        ``total_tokens``, ``completion_tokens``, ``truncated`` and per source ``samples``,
        ``requested_fraction``, ``realised_fraction``, ``tokens``, ``token_fraction``,
        ``completion_tokens``, ``truncated``, ``records_read``, ``records_skipped``.

    Raises:
        DataError: a bad spec, an unloadable source, a record without any expected field (naming
            the fields found), a source that yields too few samples, or a sequence length too short
            to keep any completion token.
    """
    samples, stats = sample_sources(
        spec, n_samples, seq_len, fields,
        lambda source, want, fmap: _sft_source(tokenizer, source, want, seq_len, seed, fmap, streaming),
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token to pad samples with")
    t = max(len(ids) for ids, _ in samples)
    n = len(samples)
    input_ids = torch.full((n, t), pad, dtype=torch.long)
    labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.long)
    for row, i in enumerate(permutation(n, seed)):
        ids, start = samples[i]
        input_ids[row, : len(ids)] = ids
        labels[row, start : len(ids)] = ids[start:]
        mask[row, : len(ids)] = 1
    data_report = report(
        spec, seed, n_samples, seq_len, int(mask.sum()), stats,
        completion_tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()),
        truncated=sum(st.truncated for st in stats),
    )
    return SFTSet(input_ids=input_ids, attention_mask=mask, labels=labels, report=data_report)
