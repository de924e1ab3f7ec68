"""The stage-2 teacher: live (the full-precision model runs beside the student) or cached on disk.

Both give :class:`rqat_deploy.train.losses.TeacherTargets` for the completion tokens of a micro-batch,
in the order the student selects them (sample by sample, positions ascending)::

    teacher.targets(indices, input_ids, attention_mask, labels) -> TeacherTargets

:class:`LiveTeacher` runs the teacher on each sample *alone*, trimmed to its own length (no padding),
and computes log-softmax / top-k ``chunk_size`` tokens at a time. :meth:`CachedTeacher.build` runs
exactly that computation once over a whole :class:`rqat_deploy.data.sft.SFTSet` and stores, for every
completion token, the top-k ids (int32), their log-probabilities and the label's log-probability
(float32, or float16 to halve the disk) as ``.npy`` files read back through memory maps. With
float32 storage a cached teacher therefore returns bit-identical targets to the live one (and
stage 2 bit-identical results); float16 storage rounds each log-probability to 11 significant bits
(relative error <= 2^-11 of ``|log p|``).

Cache layout (a directory)::

    meta.json            format, top_k, dtype, n_samples, n_tokens, data fingerprint, vocab, done
    offsets.npy          int64 [n_samples + 1]: sample i's tokens are rows offsets[i]:offsets[i+1]
    topk_ids.npy         int32 [n_tokens, top_k]
    topk_logprobs.npy    float32|float16 [n_tokens, top_k]
    label_logprobs.npy   float32|float16 [n_tokens]

Building is resumable: ``done`` counts the samples written; a rebuild into the same directory with
the same data continues from there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rqat_deploy.data.sft import IGNORE_INDEX, SFTSet
from rqat_deploy.errors import ConfigError, DataError, ShapeError
from rqat_deploy.files import atomic_write_json, read_json
from rqat_deploy.train.losses import TeacherTargets

CACHE_FORMAT = 1
META_FILE = "meta.json"
_FLUSH_EVERY = 64


class Teacher(Protocol):
    """What stage 2 needs from a teacher."""

    top_k: int

    def targets(
        self,
        indices: Sequence[int],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        *,
        with_hidden: bool = False,
    ) -> TeacherTargets: ...

    def check(self, data: SFTSet, *, top_k: int, full_vocab: bool) -> None: ...


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The base model that returns final (normed) hidden states, and the output head.

    Raises:
        ConfigError: the model exposes no base model or no output embeddings.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if head is None or base is None or base is model:
        raise ConfigError(
            f"{type(model).__name__} exposes no base model / output head: stage 2 needs a Hugging Face causal LM"
        )
    return base, head


def completion_positions(attention_mask: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Per sample, the positions ``p`` whose next token ``p+1`` is a label (ascending), ``[n_i]`` each.

    Raises:
        DataError: a sample that is not right-padded (attention mask not a prefix of ones).
    """
    lengths = attention_mask.sum(dim=1)  # [B]
    ar = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), ar[None, :] < lengths[:, None]):
        raise DataError("stage-2 samples must be right-padded (attention mask = ones then zeros)")
    pred = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]
    return [pred[b].nonzero()[:, 0] for b in range(labels.shape[0])]


class LiveTeacher:
    """The full-precision model, run on each sample on demand.

    Args:
        model: a Hugging Face causal LM (kept in eval mode, no gradients).
        top_k: number of teacher tokens kept per position.
        chunk_size: positions per log-softmax chunk (bounds the ``[chunk, V]`` fp32 logits).
    """

    def __init__(self, model: nn.Module, top_k: int = 20, *, chunk_size: int = 1024) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.base, self.head = decoder_and_head(model)
        self.top_k, self.chunk_size = top_k, chunk_size
        self.device = next(model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.head.weight.shape[0])

    def check(self, data: SFTSet, *, top_k: int, full_vocab: bool) -> None:
        """Raise :class:`ConfigError` when ``top_k`` exceeds what this teacher keeps."""
        if top_k > self.top_k:
            raise ConfigError(f"the loss asks for the teacher's top {top_k}, this teacher keeps {self.top_k}")

    @torch.no_grad()
    def sample_targets(self, ids: torch.Tensor, positions: torch.Tensor, *, with_hidden: bool = False) -> TeacherTargets:
        """Targets of one sample.

        Args:
            ids: ``[L]`` the sample's tokens (no padding).
            positions: ``[n]`` positions whose next token is a label.
            with_hidden: also return the hidden states (for the full-vocabulary KL).
        """
        ids = ids.to(self.device)
        positions = positions.to(self.device)
        hidden = self.base(input_ids=ids[None], use_cache=False).last_hidden_state[0]  # [L, H]
        sel = hidden[positions]  # [n, H]
        labels = ids[positions + 1]  # [n]
        k = self.top_k
        ids_out = torch.empty((len(positions), k), dtype=torch.long, device=self.device)
        lp_out = torch.empty((len(positions), k), dtype=torch.float32, device=self.device)
        lab_out = torch.empty((len(positions),), dtype=torch.float32, device=self.device)
        w, b = self.head.weight, getattr(self.head, "bias", None)
        if k > w.shape[0]:
            raise ShapeError(f"top_k={k} exceeds the teacher's vocabulary size {w.shape[0]}")
        for a in range(0, len(positions), self.chunk_size):
            e = min(a + self.chunk_size, len(positions))
            logp = F.linear(sel[a:e], w, b).float().log_softmax(-1)  # [c, V]
            vals, top = logp.topk(k, dim=-1)  # [c, k]
            ids_out[a:e], lp_out[a:e] = top, vals
            lab_out[a:e] = logp.gather(1, labels[a:e, None])[:, 0]
        if with_hidden:
            return TeacherTargets(ids_out, lp_out, lab_out, sel, w, b)
        return TeacherTargets(ids_out, lp_out, lab_out)

    def targets(
        self,
        indices: Sequence[int],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        *,
        with_hidden: bool = False,
    ) -> TeacherTargets:
        """Targets of a right-padded micro-batch ``[B, T]``, samples concatenated in batch order."""
        pos = completion_positions(attention_mask, labels)
        lengths = attention_mask.sum(dim=1).tolist()
        parts = [
            self.sample_targets(input_ids[b, : lengths[b]], pos[b], with_hidden=with_hidden) for b in range(len(pos))
        ]
        return TeacherTargets.cat(parts)


def _meta_path(path: Path) -> Path:
    return path / META_FILE


class CachedTeacher:
    """Teacher targets read from a cache directory built by :meth:`build` (module docstring).

    Args:
        path: the cache directory.

    Raises:
        ConfigError: a missing, foreign or incomplete cache.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta_file = _meta_path(self.path)
        if not meta_file.exists():
            raise ConfigError(f"{self.path} is not a teacher cache ({META_FILE} missing): build it with CachedTeacher.build")
        self.meta: dict[str, Any] = read_json(meta_file, error=ConfigError)
        if self.meta.get("format") != CACHE_FORMAT:
            raise ConfigError(f"{self.path}: teacher cache format {self.meta.get('format')!r} is not {CACHE_FORMAT}; rebuild it")
        if self.meta["done"] < self.meta["n_samples"]:
            raise ConfigError(
                f"{self.path}: the teacher cache is incomplete ({self.meta['done']}/{self.meta['n_samples']} samples): "
                "run CachedTeacher.build again with the same data to finish it"
            )
        self.top_k: int = int(self.meta["top_k"])
        try:
            self.offsets = np.load(self.path / "offsets.npy")
            self._ids = np.load(self.path / "topk_ids.npy", mmap_mode="r")
            self._lp = np.load(self.path / "topk_logprobs.npy", mmap_mode="r")
            self._lab = np.load(self.path / "label_logprobs.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.path}: the teacher cache is corrupt ({e}): delete the directory to rebuild it") from e

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    def check(self, data: SFTSet, *, top_k: int, full_vocab: bool) -> None:
        """Check the cache belongs to ``data`` and can serve the loss.

        Raises:
            ConfigError: another dataset, too small a top-k, or a full-vocabulary term.
        """
        if full_vocab:
            raise ConfigError(
                "the full-vocabulary KL term needs the live teacher: a cache keeps only the top-k; "
                "pass a LiveTeacher or choose top-k loss terms"
            )
        if top_k > self.top_k:
            raise ConfigError(f"the loss asks for the teacher's top {top_k}, the cache at {self.path} holds {self.top_k}")
        if data.fingerprint() != self.fingerprint:
            raise ConfigError(
                f"the teacher cache at {self.path} was built for other data (fingerprint mismatch): "
                "rebuild it for this dataset or point to the right cache"
            )

    def targets(
        self,
        indices: Sequence[int],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        *,
        with_hidden: bool = False,
    ) -> TeacherTargets:
        """Targets of the samples ``indices`` (their rows in the cached dataset), in batch order.

        Raises:
            ShapeError: a sample's completion-token count differs from the cache's (wrong data).
        """
        pos = completion_positions(attention_mask, labels)
        rows = []
        for i, p in zip(indices, pos):
            a, b = int(self.offsets[int(i)]), int(self.offsets[int(i) + 1])
            if b - a != len(p):
                raise ShapeError(f"sample {int(i)} has {len(p)} completion tokens, the teacher cache {b - a}: wrong data for this cache")
            rows.append(np.arange(a, b))
        r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return TeacherTargets(
            torch.from_numpy(np.ascontiguousarray(self._ids[r])).long(),
            torch.from_numpy(np.ascontiguousarray(self._lp[r])).float(),
            torch.from_numpy(np.ascontiguousarray(self._lab[r])).float(),
        )

    @classmethod
    def build(
        cls,
        teacher: nn.Module | LiveTeacher,
        data: SFTSet,
        path: str | os.PathLike[str],
        *,
        top_k: int = 20,
        dtype: str = "float32",
        progress: bool = True,
    ) -> "CachedTeacher":
        """Run the teacher once over ``data`` and write the cache (resuming a partial one).

        Args:
            teacher: the full-precision model, or a :class:`LiveTeacher` (its ``top_k`` wins).
            data: the stage-2 samples.
            path: cache directory (created).
            top_k: teacher tokens kept per position.
            dtype: ``"float32"`` (bit-identical to the live teacher) or ``"float16"`` (half the disk).
            progress: show a progress bar.

        Returns:
            The opened :class:`CachedTeacher`.

        Raises:
            ConfigError: an unknown dtype, or a directory holding a cache of other data or settings.
        """
        if dtype not in ("float32", "float16"):
            raise ConfigError(f"teacher cache dtype must be 'float32' or 'float16', got {dtype!r}")
        live = teacher if isinstance(teacher, LiveTeacher) else LiveTeacher(teacher, top_k)
        k = live.top_k
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        counts = data.completion_tokens().numpy().astype(np.int64)  # [N]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        meta = {
            "format": CACHE_FORMAT,
            "top_k": k,
            "dtype": dtype,
            "n_samples": len(data),
            "n_tokens": int(offsets[-1]),
            "fingerprint": data.fingerprint(),
            "vocab_size": live.vocab_size,
            "done": 0,
        }
        done = _resume_point(out, meta)
        mode = "r+" if done > 0 else "w+"
        npdt = np.float32 if dtype == "float32" else np.float16
        n_tok = max(int(offsets[-1]), 1)
        if mode == "w+":
            np.save(out / "offsets.npy", offsets)
            _meta_path(out).write_text(json.dumps(meta, indent=2))
        ids_mm = np.lib.format.open_memmap(out / "topk_ids.npy", mode=mode, dtype=np.int32, shape=(n_tok, k))
        lp_mm = np.lib.format.open_memmap(out / "topk_logprobs.npy", mode=mode, dtype=npdt, shape=(n_tok, k))
        lab_mm = np.lib.format.open_memmap(out / "label_logprobs.npy", mode=mode, dtype=npdt, shape=(n_tok,))
        bar = tqdm(total=len(data), initial=done, desc="teacher cache", disable=not progress, leave=False)
        for i in range(done, len(data)):
            ids, mask, labels = data.subset([i]).padded()  # one sample: no padding
            t = live.sample_targets(ids[0], completion_positions(mask, labels)[0])
            a, b = int(offsets[i]), int(offsets[i + 1])
            ids_mm[a:b] = t.topk_ids.cpu().numpy().astype(np.int32)
            lp_mm[a:b] = t.topk_logprobs.cpu().numpy().astype(npdt)
            lab_mm[a:b] = t.label_logprobs.cpu().numpy().astype(npdt)
            bar.update(1)
            if (i + 1) % _FLUSH_EVERY == 0 or i + 1 == len(data):
                for mm in (ids_mm, lp_mm, lab_mm):
                    mm.flush()
                meta["done"] = i + 1
                _write_meta(out, meta)
        bar.close()
        del ids_mm, lp_mm, lab_mm
        if len(data) == 0:
            meta["done"] = 0
            _write_meta(out, meta)
        return cls(out)


def _write_meta(out: Path, meta: dict[str, Any]) -> None:
    atomic_write_json(_meta_path(out), meta)


def _resume_point(out: Path, meta: dict[str, Any]) -> int:
    """Samples already written by an earlier build of the same data and settings (0 for a fresh build).

    Raises:
        ConfigError: the directory holds a cache of other data or settings.
    """
    f = _meta_path(out)
    if not f.exists():
        return 0
    old = read_json(f, error=ConfigError)
    same = all(old.get(k) == meta[k] for k in ("format", "top_k", "dtype", "n_samples", "n_tokens", "fingerprint"))
    if not same:
        raise ConfigError(
            f"{out} holds a teacher cache of other data or settings: choose another directory or delete it"
        )
    return int(old.get("done", 0))
