"""Calibration and stage-2 training data: source specs, record rendering, deterministic mixing.

A *spec* is a comma-separated list of ``source[:weight]`` (DESIGN.md 9)::

    open-thoughts/OpenThoughts3-1.2M:0.8,HuggingFaceFW/fineweb-edu:0.2   # Hub ids (streamed)
    ./traces.jsonl:3,./web.parquet:1,./book.txt                          # local files (weight 1)

A source is a Hugging Face Hub dataset id (``org/name``, optionally ``org/name#config@split``), or
a local JSONL / JSON / Parquet / plain-text file or a directory of such files. Every source is read
through ``datasets``: Hub sources are streamed (the datasets are large), local files are loaded
(an exact shuffle) unless ``streaming=True``. Weights are relative and are normalised to sum to 1.

Records are recognised by their fields (names configurable with :class:`FieldMap`):

| record kind      | fields (defaults)                                       | rendered as                   |
|------------------|---------------------------------------------------------|-------------------------------|
| ShareGPT         | ``conversations``: ``[{from, value}]``                  | the tokenizer's chat template |
| OpenAI           | ``messages``: ``[{role, content}]``                     | the tokenizer's chat template |
| prompt/response  | ``prompt`` / ``question`` / ``problem`` / ``instruction`` + ``response`` / ``completion`` / ``output`` (+ optional ``system``, ``reasoning_content`` / ``reasoning`` / ``thinking``) | chat template, one user turn + one assistant turn |
| plain text       | ``text``                                                | raw text (pre-training data)  |

A reasoning trace given separately (``reasoning_content`` of a message, or a ``reasoning`` field) is
put inline as ``<think>\\n...\\n</think>\\n\\n`` before the answer, so that every chat template keeps it.

- **Calibration** (:func:`build_calibration`, stage 1): each record is rendered to its full text
  (conversations through the chat template; plain text followed by the EOS token as document
  separator); each source's documents are tokenized, concatenated in their shuffled order and cut
  into consecutive sequences of exactly ``seq_len`` tokens (the tail that does not fill a sequence
  is dropped). Every sequence therefore holds ``seq_len`` tokens and the domain mix holds for
  sequences and tokens alike.
- **Stage-2 training** (:func:`build_sft`): one record per sample. The prompt is the chat template
  applied to every message but the last assistant turn, with the generation prompt
  (``add_generation_prompt=True``); the completion is the rest of the fully rendered conversation
  (the ``<think>`` trace, the answer and the end-of-turn token). Labels are ``-100`` on the prompt
  and on padding, so only the final assistant completion is trained (earlier turns of a multi-turn
  conversation are context). Samples longer than ``seq_len`` are truncated (counted in the report);
  a sample whose prompt leaves no completion token within ``seq_len`` is skipped. Plain-text records
  are trained entirely (no prompt).

Sampling is deterministic: each source is shuffled with ``seed`` (``datasets``' exact shuffle for
local files, its seeded buffer shuffle for streams), per-source sample counts are the
largest-remainder rounding of ``weight * n_samples``, and the sources' samples are interleaved by a
seeded permutation. The same inputs and seed give the same tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from rqat_deploy.data.chat import Rendered, split_conversation
from rqat_deploy.errors import DataError

#: The paper's calibration mix (DESIGN.md 5): 80 % reasoning traces, 20 % pre-training text.
DEFAULT_CALIB_SPEC = "open-thoughts/OpenThoughts3-1.2M:0.8,HuggingFaceFW/fineweb-edu:0.2"
#: Stage-2 training data: reasoning traces only.
DEFAULT_TRAIN_SPEC = "open-thoughts/OpenThoughts3-1.2M"
DEFAULT_CALIB_SAMPLES = 4096
DEFAULT_CALIB_SEQ_LEN = 2048
DEFAULT_TRAIN_SAMPLES = 32768
DEFAULT_TRAIN_SEQ_LEN = 4096
IGNORE_INDEX = -100

#: local file suffix -> ``datasets`` builder
LOCAL_FORMATS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
_ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
_STREAM_SHUFFLE_BUFFER = 10_000
_MAX_CONSECUTIVE_SKIPS = 10_000
_TOKENIZE_BATCH = 64


# ---------------------------------------------------------------------------------------------
# specs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One parsed ``source[:weight]`` entry of a spec.

    Attributes:
        name: the source as written (without its weight).
        weight: its relative weight (> 0).
        kind: ``"hub"``, or the ``datasets`` builder of local files: ``"json"``, ``"parquet"``, ``"text"``.
        location: the Hub id, or the local path.
        files: the local data files (empty for the Hub).
        config: Hub dataset configuration (``#config``), or ``None``.
        split: the split to read (``@split``; default ``train``).
    """

    name: str
    weight: float
    kind: str
    location: str
    files: tuple[str, ...] = ()
    config: str | None = None
    split: str = "train"


def _suffix_format(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(LOCAL_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return LOCAL_FORMATS[suffix]
    return None


def _looks_local(name: str) -> bool:
    p = Path(name).expanduser()
    return (
        name.startswith((".", "/", "~"))
        or p.exists()
        or _suffix_format(p) is not None
        or name.count("/") > 1
    )


def _local_source(name: str, weight: float) -> Source:
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(f"data file {name!r} does not exist: pass an existing JSONL/Parquet/text file or a Hub dataset id")
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and _suffix_format(f) is not None)
        if not files:
            raise DataError(
                f"data directory {name!r} holds no {sorted(set(LOCAL_FORMATS))} files: point the spec at a data file"
            )
        kinds = {_suffix_format(f) for f in files}
        if len(kinds) > 1:
            raise DataError(f"data directory {name!r} mixes file formats {sorted(kinds)}: list the files as separate sources")
    else:
        files = [path]
        kinds = {_suffix_format(path)}
        if None in kinds:
            raise DataError(
                f"cannot tell the format of {name!r} from its suffix: use one of {sorted(set(LOCAL_FORMATS))}"
            )
    return Source(name=name, weight=weight, kind=kinds.pop() or "json", location=str(path), files=tuple(map(str, files)))


def _hub_source(name: str, weight: float) -> Source:
    rest, split = (name.rsplit("@", 1) + ["train"])[:2] if "@" in name else (name, "train")
    repo, config = rest.split("#", 1) if "#" in rest else (rest, None)
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise DataError(
            f"{name!r} is neither an existing local file nor a Hub dataset id of the form 'org/name' "
            "(optionally 'org/name#config@split')"
        )
    return Source(name=name, weight=weight, kind="hub", location=repo, config=config or None, split=split or "train")


def parse_spec(spec: str) -> list[Source]:
    """Parse a data spec ``source[:weight],...`` into :class:`Source` entries.

    Args:
        spec: comma-separated sources, each a Hub id (``org/name[#config][@split]``) or a local
            file/directory, optionally followed by ``:weight`` (a positive number; default 1).

    Returns:
        The sources in spec order, weights as written (not normalised).

    Raises:
        DataError: an empty spec or entry, a weight that is not a positive number, a missing local
            file, or an entry that is neither a local path nor a Hub id.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("the data spec is empty: give 'source[:weight],...' (Hub ids or local files)")
    sources = []
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            raise DataError(f"empty entry in data spec {spec!r}: remove the stray comma")
        name, weight = entry, 1.0
        if ":" in entry:
            head, tail = entry.rsplit(":", 1)
            try:
                weight = float(tail)
                name = head.strip()
            except ValueError:
                name = entry  # a ':' inside the path, no weight
        if not math.isfinite(weight) or weight <= 0:
            raise DataError(f"weight of {name!r} in data spec must be a positive number, got {tail!r}")
        sources.append(_local_source(name, weight) if _looks_local(name) else _hub_source(name, weight))
    return sources


def allocate(weights: Sequence[float], n: int) -> list[int]:
    """Split ``n`` samples across sources in proportion to ``weights`` (largest-remainder rounding).

    Args:
        weights: positive relative weights.
        n: total number of samples.

    Returns:
        Integer counts summing to ``n``; ties in the remainders go to the earlier source.
    """
    total = float(sum(weights))
    exact = [w / total * n for w in weights]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldMap:
    """Field names that identify each record kind; the first name present in a record is used.

    Attributes:
        conversations: ShareGPT list of ``{from, value}`` turns (``role``/``content`` accepted too).
        messages: OpenAI list of ``{role, content}`` messages (``from``/``value`` accepted too).
        prompt: the user prompt of a prompt/response record.
        response: the assistant answer of a prompt/response record.
        reasoning: an optional separate reasoning trace of a prompt/response record.
        system: an optional system prompt of a prompt/response record.
        text: plain (pre-training) text.
    """

    conversations: tuple[str, ...] = ("conversations",)
    messages: tuple[str, ...] = ("messages",)
    prompt: tuple[str, ...] = ("prompt", "question", "problem", "instruction")
    response: tuple[str, ...] = ("response", "completion", "output")
    reasoning: tuple[str, ...] = ("reasoning_content", "reasoning", "thinking")
    system: tuple[str, ...] = ("system",)
    text: tuple[str, ...] = ("text",)

    @classmethod
    def parse(cls, value: str | Mapping[str, str | Sequence[str]] | None) -> "FieldMap":
        """Build from ``"prompt=question,response=gt_cot"`` or a mapping (unnamed kinds keep their defaults).

        Raises:
            DataError: an unknown kind name.
        """
        if value is None or isinstance(value, FieldMap):
            return value or cls()
        if isinstance(value, str):
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise DataError(f"field map {value!r} must look like 'prompt=question,response=answer'")
            value = {k.strip(): v.strip() for k, v in pairs}
        kinds = [f.name for f in dataclasses.fields(cls)]
        kw: dict[str, tuple[str, ...]] = {}
        for k, v in value.items():
            if k not in kinds:
                raise DataError(f"unknown record field kind {k!r}; known: {kinds}")
            kw[k] = (v,) if isinstance(v, str) else tuple(v)
        return cls(**kw)

    def first(self, record: Mapping[str, Any], kind: str) -> str | None:
        """The first of ``kind``'s field names present (and not ``None``) in ``record``."""
        return next((n for n in getattr(self, kind) if record.get(n) is not None), None)


class _Skip(Exception):
    """A record that is well-formed but unusable (counted in the report under ``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def record_kind(record: Mapping[str, Any], fields: FieldMap) -> str:
    """``"conversations"``, ``"messages"``, ``"prompt_response"`` or ``"text"``.

    Raises:
        DataError: the record has none of the configured fields; the message lists the fields found.
    """
    if fields.first(record, "conversations"):
        return "conversations"
    if fields.first(record, "messages"):
        return "messages"
    if fields.first(record, "prompt") and fields.first(record, "response"):
        return "prompt_response"
    if fields.first(record, "text"):
        return "text"
    found = sorted(record)
    want = (
        f"conversations={list(fields.conversations)}, messages={list(fields.messages)}, "
        f"prompt={list(fields.prompt)} + response={list(fields.response)}, text={list(fields.text)}"
    )
    raise DataError(
        f"record has none of the expected fields ({want}); fields found: {found}. "
        "Name the fields with the field map, e.g. 'prompt=question,response=solution'"
    )


def _inline_reasoning(content: str, reasoning: Any) -> str:
    if not isinstance(reasoning, str) or not reasoning.strip() or "</think>" in content:
        return content
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"


def _turns(turns: Any) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise _Skip("empty_conversation")
    messages = []
    for t in turns:
        if not isinstance(t, Mapping):
            raise _Skip("malformed_turn")
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise _Skip("malformed_turn")
        role = _ROLE_MAP.get(role.lower(), role.lower())
        messages.append({"role": role, "content": _inline_reasoning(content, t.get("reasoning_content"))})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()  # trailing user turns have no completion to train on
    if not messages:
        raise _Skip("no_assistant_turn")
    if all(m["role"] == "assistant" for m in messages):
        raise _Skip("no_prompt_turn")
    if not messages[-1]["content"].strip():
        raise _Skip("empty_completion")
    return messages


def record_messages(record: Mapping[str, Any], fields: FieldMap, kind: str) -> list[dict[str, str]]:
    """The chat messages of a conversation or prompt/response record (reasoning inlined)."""
    if kind in ("conversations", "messages"):
        return _turns(record[fields.first(record, kind)])  # type: ignore[index]
    prompt, response = record[fields.first(record, "prompt")], record[fields.first(record, "response")]  # type: ignore[index]
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise _Skip("non_string_prompt_or_response")
    if not response.strip():
        raise _Skip("empty_completion")
    rfield, sfield = fields.first(record, "reasoning"), fields.first(record, "system")
    messages = []
    if sfield and isinstance(record[sfield], str) and record[sfield].strip():
        messages.append({"role": "system", "content": record[sfield]})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _inline_reasoning(response, record[rfield] if rfield else None)})
    return messages


def render_record(tokenizer: Any, record: Mapping[str, Any], fields: FieldMap, kind: str) -> Rendered:
    """Render one record of ``kind`` (see :func:`record_kind`) to prompt and completion text."""
    if kind == "text":
        text = record[fields.first(record, "text")]  # type: ignore[index]
        if not isinstance(text, str):
            raise _Skip("non_string_text")
        if not text.strip():
            raise _Skip("empty_text")
        return Rendered("", text, "text")
    return split_conversation(tokenizer, record_messages(record, fields, kind))


# ---------------------------------------------------------------------------------------------
# reading sources
# ---------------------------------------------------------------------------------------------


def _load(source: Source, seed: int, streaming: bool | None) -> Any:
    """The shuffled ``datasets`` (Iterable)Dataset of a source."""
    import datasets

    stream = source.kind == "hub" if streaming is None else streaming
    try:
        if source.kind == "hub":
            ds = datasets.load_dataset(source.location, source.config, split=source.split, streaming=stream)
        else:
            extra = {"sample_by": "paragraph"} if source.kind == "text" else {}
            ds = datasets.load_dataset(source.kind, data_files=list(source.files), split="train", streaming=stream, **extra)
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one clear DataError
        where = (
            "the Hugging Face Hub: check the dataset id and your network (or pre-download it and unset "
            "HF_DATASETS_OFFLINE), or pass a local JSONL/Parquet/text file instead"
            if source.kind == "hub"
            else "its local files: check that they are valid " + source.kind
        )
        raise DataError(f"could not load dataset {source.name!r} from {where}. Cause: {type(e).__name__}: {e}") from e
    if stream:
        return ds.shuffle(seed=seed, buffer_size=_STREAM_SHUFFLE_BUFFER)
    return ds.shuffle(seed=seed)


def iter_records(source: Source, seed: int, streaming: bool | None = None) -> Iterator[dict[str, Any]]:
    """Yield the records of ``source`` in a seeded shuffled order.

    Args:
        source: a parsed source.
        seed: shuffle seed.
        streaming: ``None`` streams Hub sources and loads local files; ``True``/``False`` force it.

    Raises:
        DataError: the source cannot be loaded or read.
    """
    ds = _load(source, seed, streaming)
    it = iter(ds)
    while True:
        try:
            record = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - network or parse errors while streaming
            raise DataError(f"reading dataset {source.name!r} failed: {type(e).__name__}: {e}") from e
        yield record


@dataclass
class _SourceStats:
    source: Source
    records_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    samples: int = 0
    tokens: int = 0
    completion_tokens: int = 0
    truncated: int = 0
    kinds: Counter = field(default_factory=Counter)

    def to_dict(self, total_weight: float, n_total: int, tokens_total: int) -> dict[str, Any]:
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
            "records_read": self.records_read,
            "records_skipped": dict(self.skipped),
            "record_kinds": dict(self.kinds),
        }


def _rendered_stream(
    tokenizer: Any, source: Source, seed: int, fields: FieldMap, streaming: bool | None, stats: _SourceStats
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
        except _Skip as s:
            stats.skipped[s.reason] += 1
            consecutive += 1
            if consecutive >= _MAX_CONSECUTIVE_SKIPS:
                raise DataError(
                    f"source {source.name!r}: {consecutive} records in a row are unusable "
                    f"({dict(stats.skipped)}); check its fields"
                ) from None
            continue
        consecutive = 0
        stats.kinds[kind] += 1
        yield rendered


def _batched(it: Iterator[Rendered], n: int) -> Iterator[list[Rendered]]:
    batch: list[Rendered] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _shortfall(stats: _SourceStats, want: int, what: str) -> DataError:
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


def _check_sizes(n_samples: int, seq_len: int) -> None:
    if not isinstance(n_samples, int) or n_samples < 1:
        raise DataError(f"the number of samples must be a positive integer, got {n_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"the sequence length must be an integer >= 2, got {seq_len!r}")


# ---------------------------------------------------------------------------------------------
# calibration (stage 1)
# ---------------------------------------------------------------------------------------------


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
) -> tuple[list[torch.Tensor], _SourceStats]:
    """Up to ``want`` consecutive ``seq_len`` windows of the source's concatenated documents."""
    stats = _SourceStats(source)
    chunks: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []  # documents not yet cut (their total is < seq_len between cuts)
    pending_len = 0
    eos = tokenizer.eos_token_id
    if want == 0:
        return chunks, stats
    for batch in _batched(_rendered_stream(tokenizer, source, seed, fields, streaming, stats), _TOKENIZE_BATCH):
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
        raise _shortfall(stats, want, "")
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
        spec: ``source[:weight],...`` (module docstring); default the paper's 80/20 mix.
        n_samples: number of sequences (paper: 4,096).
        seq_len: tokens per sequence (paper: 2,048).
        seed: shuffle and interleave seed; same inputs and seed give the same tensor.
        fields: record field names (:class:`FieldMap`, ``"prompt=question,..."`` or a mapping).
        streaming: see :func:`iter_records`.

    Returns:
        A :class:`CalibSet`; ``report`` holds ``spec``, ``seed``, ``n_samples``, ``seq_len``,
        ``total_tokens`` and per source ``samples``, ``requested_fraction``, ``realised_fraction``,
        ``tokens``, ``records_read``, ``records_skipped``, ``record_kinds``.

    Raises:
        DataError: a bad spec, an unloadable source, a record without any expected field (naming
            the fields found), or a source that yields too few sequences.
    """
    _check_sizes(n_samples, seq_len)
    fmap = FieldMap.parse(fields)
    sources = parse_spec(spec)
    counts = allocate([s.weight for s in sources], n_samples)
    rows: list[torch.Tensor] = []
    stats = []
    for source, want in zip(sources, counts):
        chunks, st = _pack_source(tokenizer, source, want, seq_len, seed, fmap, streaming)
        rows.extend(chunks)
        stats.append(st)
    input_ids = torch.stack([rows[i] for i in _permutation(len(rows), seed)])  # [N, L]
    total_w = sum(s.weight for s in sources)
    report = {
        "spec": spec,
        "seed": seed,
        "n_samples": n_samples,
        "seq_len": seq_len,
        "total_tokens": int(input_ids.numel()),
        "sources": [st.to_dict(total_w, n_samples, int(input_ids.numel())) for st in stats],
    }
    return CalibSet(input_ids=input_ids, report=report)


def _permutation(n: int, seed: int) -> list[int]:
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    return perm


# ---------------------------------------------------------------------------------------------
# stage-2 training data
# ---------------------------------------------------------------------------------------------


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
) -> tuple[list[tuple[torch.Tensor, int]], _SourceStats, int | None]:
    """Tokenized ``(ids, first completion index)`` samples of one source, and the shortest prompt that did not fit."""
    stats = _SourceStats(source)
    samples: list[tuple[torch.Tensor, int]] = []
    shortest_unfit: int | None = None
    if want == 0:
        return samples, stats, None
    for batch in _batched(_rendered_stream(tokenizer, source, seed, fields, streaming, stats), _TOKENIZE_BATCH):
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
        raise _shortfall(stats, want, hint)
    return samples, stats, shortest_unfit


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
        spec: ``source[:weight],...`` (module docstring).
        n_samples: number of samples (paper: 32,768).
        seq_len: maximum tokens per sample; longer samples are truncated.
        seed: shuffle and interleave seed.
        fields: record field names (:class:`FieldMap`, ``"prompt=question,..."`` or a mapping).
        streaming: see :func:`iter_records`.

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
    _check_sizes(n_samples, seq_len)
    fmap = FieldMap.parse(fields)
    sources = parse_spec(spec)
    counts = allocate([s.weight for s in sources], n_samples)
    samples: list[tuple[torch.Tensor, int]] = []
    stats = []
    for source, want in zip(sources, counts):
        part, st, _ = _sft_source(tokenizer, source, want, seq_len, seed, fmap, streaming)
        samples.extend(part)
        stats.append(st)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token to pad samples with")
    t = max(len(ids) for ids, _ in samples)
    n = len(samples)
    input_ids = torch.full((n, t), pad, dtype=torch.long)
    labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.long)
    for row, i in enumerate(_permutation(n, seed)):
        ids, start = samples[i]
        input_ids[row, : len(ids)] = ids
        labels[row, start : len(ids)] = ids[start:]
        mask[row, : len(ids)] = 1
    total_tokens = int(mask.sum())
    total_w = sum(s.weight for s in sources)
    report = {
        "spec": spec,
        "seed": seed,
        "n_samples": n_samples,
        "seq_len": seq_len,
        "total_tokens": total_tokens,
        "completion_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        "truncated": sum(st.truncated for st in stats),
        "sources": [st.to_dict(total_w, n_samples, total_tokens) for st in stats],
    }
    return SFTSet(input_ids=input_ids, attention_mask=mask, labels=labels, report=report)
