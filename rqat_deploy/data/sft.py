"""Stage-2 training data (:func:`build_sft`): one record per sample, the prompt masked.

The prompt is the chat template applied to every message but the last assistant turn, with the
generation prompt (``add_generation_prompt=True``); the completion is the rest of the fully
rendered conversation (the ``<think>`` trace, the answer and the end-of-turn token). Labels are
``-100`` on the prompt and on padding, so only the final assistant completion is trained (earlier
turns of a multi-turn conversation are context). Samples are kept whole up to ``seq_len`` (stage 2
passes the model's context length unless capped): the paper trains whole traces, and cutting one
drops its ``</think>``, its answer and its end-of-turn token. Longer samples are truncated (the
report counts them, ``truncated``, and the tokens dropped, ``truncated_tokens``); a sample whose
prompt leaves no completion token within ``seq_len`` is skipped. Plain-text records are trained
entirely (no prompt). Sampling is deterministic (:mod:`rqat_deploy.data.mixing`).

An :class:`SFTSet` stores its samples unpadded (one flat token tensor and offsets), so whole traces
of very different lengths cost their own tokens only; a micro-batch is padded to its longest
sample when it is taken (:meth:`SFTSet.subset`).
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
    "MATH_TRAIN_SPEC",
    "SFTSet",
    "build_sft",
]

#: Stage-2 training data: reasoning traces only.
DEFAULT_TRAIN_SPEC = "open-thoughts/OpenThoughts3-1.2M"
#: Reasoning-QAT's KD data (math traces; DESIGN.md 5).
MATH_TRAIN_SPEC = "open-r1/OpenR1-Math-220k"
DEFAULT_TRAIN_SAMPLES = 32768
DEFAULT_TRAIN_SEQ_LEN = 4096
#: Label of tokens that are not trained (Hugging Face convention).
IGNORE_INDEX = -100


@dataclass
class SFTSet:
    """Stage-2 training samples, stored unpadded.

    Attributes:
        tokens: ``[sum of lengths]`` int32, the samples' token ids one after another.
        offsets: ``[N + 1]`` int64, sample ``i`` is ``tokens[offsets[i]:offsets[i+1]]``.
        starts: ``[N]`` int64, the index of sample ``i``'s first completion token (0 for plain text).
        pad_id: the token id padded micro-batches are filled with.
        report: realised mix, token and completion-token counts (see :func:`build_sft`).
    """

    tokens: torch.Tensor
    offsets: torch.Tensor
    starts: torch.Tensor
    pad_id: int
    report: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.starts.shape[0]

    def lengths(self) -> torch.Tensor:
        """Tokens of each sample, ``[N]`` int64."""
        return self.offsets[1:] - self.offsets[:-1]

    def completion_tokens(self) -> torch.Tensor:
        """Number of trained (label) tokens of each sample, ``[N]`` (positions 1.. at or after the start)."""
        return (self.lengths() - self.starts.clamp(min=1)).clamp(min=0)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "SFTSet":
        """The samples at ``indices`` (in that order), still unpadded."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        parts = [self.tokens[self.offsets[i] : self.offsets[i + 1]] for i in idx.tolist()]
        lengths = torch.tensor([len(p) for p in parts], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        tokens = torch.cat(parts) if parts else self.tokens[:0]
        return SFTSet(tokens, offsets, self.starts[idx].clone(), self.pad_id, dict(self.report))

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``labels``, ``[N, T]`` int64 right-padded to the longest sample.

        Labels are the token id on completion tokens and ``-100`` on prompt and padding (Hugging Face
        convention: position ``t`` is predicted from position ``t-1``).
        """
        lengths = self.lengths()
        n, t = len(self), int(lengths.max()) if len(self) else 0
        input_ids = torch.full((n, t), self.pad_id, dtype=torch.long)
        labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, t), dtype=torch.long)
        for row in range(n):
            a, b, start = int(self.offsets[row]), int(self.offsets[row + 1]), int(self.starts[row])
            ids = self.tokens[a:b].long()
            input_ids[row, : b - a] = ids
            labels[row, start : b - a] = ids[start:]
            mask[row, : b - a] = 1
        return input_ids, mask, labels

    @property
    def input_ids(self) -> torch.Tensor:
        """``[N, T]`` padded token ids (:meth:`padded`; a whole set is materialised: small sets only)."""
        return self.padded()[0]

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[N, T]`` 1 on real tokens (a prefix of each row); see :meth:`padded`."""
        return self.padded()[1]

    @property
    def labels(self) -> torch.Tensor:
        """``[N, T]`` labels, ``-100`` on prompt and padding; see :meth:`padded`."""
        return self.padded()[2]

    def fingerprint(self) -> str:
        """SHA-256 of the tokens, sample boundaries and completion starts (ties a teacher cache to its data)."""
        h = hashlib.sha256()
        for t in (self.tokens.to(torch.int64), self.offsets, self.starts):
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
                stats.truncated_tokens += len(ids) - seq_len
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
        seq_len: maximum tokens per sample (stage 2: the model's context length unless capped);
            longer samples are truncated and counted.
        seed: shuffle and interleave seed.
        fields: record field names (:class:`FieldMap`, ``"prompt=question,..."`` or a mapping).
        streaming: see :func:`rqat_deploy.data.sources.iter_records`.

    Returns:
        An :class:`SFTSet`; ``report`` holds ``spec``, ``seed``, ``n_samples``, ``seq_len``,
        ``total_tokens``, ``completion_tokens``, ``truncated`` (samples cut), ``truncated_tokens``
        (tokens dropped) and per source ``samples``, ``requested_fraction``, ``realised_fraction``,
        ``tokens``, ``token_fraction``, ``completion_tokens``, ``truncated``, ``truncated_tokens``,
        ``records_read``, ``records_skipped``.

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
    order = [samples[i] for i in permutation(len(samples), seed)]
    lengths = torch.tensor([len(ids) for ids, _ in order], dtype=torch.long)
    data = SFTSet(
        tokens=torch.cat([ids for ids, _ in order]),
        offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        starts=torch.tensor([start for _, start in order], dtype=torch.long),
        pad_id=int(pad),
    )
    data.report = report(
        spec, seed, n_samples, seq_len, int(lengths.sum()), stats,
        completion_tokens=int(data.completion_tokens().sum()),
        truncated=sum(st.truncated for st in stats),
        truncated_tokens=sum(st.truncated_tokens for st in stats),
    )
    return data
