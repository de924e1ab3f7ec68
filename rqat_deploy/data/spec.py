"""The data SPEC grammar, one for every command (``train --calib`` / ``--train-data``, ``bench --dataset``).

A SPEC is a comma-separated list of ``source[:weight]`` (DESIGN.md 9)::

    open-thoughts/OpenThoughts3-1.2M:0.8,HuggingFaceFW/fineweb-edu:0.2   # Hub ids
    ./traces.jsonl:3,./web.parquet:1,./book.txt                          # local files (weight 1)
    openai/gsm8k#main@test,math500                                       # config, split, alias

A source is one of

- a local file: ``.jsonl`` / ``.json`` (JSON lines or a JSON list, optionally ``.gz``),
  ``.parquet``, or plain text (``.txt``, ``.text``, ``.md``); see :data:`LOCAL_FORMATS`;
- a Hugging Face Hub dataset id ``org/name[#config][@split]``;
- a local dataset directory ``path[#config][@split]``, read like the Hub dataset it could be a
  snapshot of (``datasets.load_dataset(path)``: splits from the file names, configs from its
  ``README.md``). Its data files must share one format;
- a short name of :data:`HUB_ALIASES` (``gsm8k``, ``math500``, ``aime24``...), which stands for its
  Hub id and takes ``#config`` / ``@split`` like one.

A name is local when :func:`rqat_deploy.files.is_local_path` says so with the suffixes of
:data:`LOCAL_FORMATS` (it exists, starts with ``.``, ``/`` or ``~``, has more than one ``/``, or
ends with a data-file suffix); a local name that names nothing is an error, never a Hub lookup.

A dataset source written without ``@split`` reads the command's default split, recorded in the
parsed :class:`Source` as a :class:`DefaultSplit`: :data:`TRAIN_SPLIT` (``train``) for training
data, :data:`EVAL_SPLIT` (``test``, or the dataset's only split) for evaluation sets. ``@`` always
names a split; the configuration is written with ``#`` (``openai/gsm8k#main``, not the old
``openai/gsm8k@main``).

Weights are relative (default 1); a command shares its sample count between the sources by
:func:`allocate`. The word ``builtin`` (:data:`BUILTIN`) names the built-in data of a command; the
command expands it (:func:`rqat_deploy.builtin.synth.resolve_spec`) before parsing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rqat_deploy.errors import DataError
from rqat_deploy.files import is_local_path

__all__ = [
    "BUILTIN",
    "EVAL_SPLIT",
    "HUB_ALIASES",
    "LOCAL_FORMATS",
    "TRAIN_SPLIT",
    "DefaultSplit",
    "Source",
    "allocate",
    "local_format",
    "parse_spec",
]

#: Local file suffix -> ``datasets`` builder that reads it.
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

#: Short names of the usual evaluation sets: the Hub source each stands for.
HUB_ALIASES: dict[str, str] = {
    "gsm8k": "openai/gsm8k#main",
    "math500": "HuggingFaceH4/MATH-500",
    "math-500": "HuggingFaceH4/MATH-500",
    "aime24": "HuggingFaceH4/aime_2024",
    "aime2024": "HuggingFaceH4/aime_2024",
}

#: The SPEC word that names a command's built-in data (``--calib builtin``, ``--dataset builtin``).
BUILTIN = "builtin"

_DATASET_CARD = "readme.md"  # a dataset directory's card, not data


@dataclass(frozen=True)
class DefaultSplit:
    """The split a command reads from a dataset source written without ``@split``.

    Attributes:
        name: the split.
        or_only: a dataset without split ``name`` but with exactly one split is read from that one.
    """

    name: str
    or_only: bool = False


#: Training data (``--calib``, ``--train-data``): the ``train`` split.
TRAIN_SPLIT = DefaultSplit("train")
#: Evaluation sets (``bench --dataset``): the ``test`` split, or the dataset's only split.
EVAL_SPLIT = DefaultSplit("test", or_only=True)


@dataclass(frozen=True)
class Source:
    """One parsed ``source[:weight]`` entry of a SPEC.

    Attributes:
        name: the source as written (without its weight).
        weight: its relative weight (> 0).
        kind: ``"hub"``, or the ``datasets`` builder of local data: ``"json"``, ``"parquet"``, ``"text"``.
        location: the Hub id (aliases expanded), or the local file or directory.
        files: the local data files (one for a file, all of a directory's; empty for the Hub).
        config: the dataset configuration (``#config``), or ``None``.
        split: the split written (``@split``), the command's :class:`DefaultSplit` when none was
            written, or ``None`` for a local file (a file is its own single split).
        directory: ``location`` is a local dataset directory.
    """

    name: str
    weight: float
    kind: str
    location: str
    files: tuple[str, ...] = ()
    config: str | None = None
    split: str | DefaultSplit | None = None
    directory: bool = False


def local_format(path: str | Path) -> str | None:
    """The ``datasets`` builder of a local file from its suffix (:data:`LOCAL_FORMATS`), or ``None``."""
    name = Path(path).name.lower()
    return next((LOCAL_FORMATS[s] for s in sorted(LOCAL_FORMATS, key=len, reverse=True) if name.endswith(s)), None)


def _is_local(name: str) -> bool:
    return is_local_path(name, suffixes=LOCAL_FORMATS)


def _split_suffixes(name: str) -> tuple[str, str | None, str | None]:
    """``base#config@split`` -> ``(base, config, split)`` (empty parts count as absent)."""
    base, _, split = name.rpartition("@") if "@" in name else (name, "", "")
    base, _, config = base.partition("#")
    return base, config or None, split or None


def _local_file(name: str, weight: float, path: Path) -> Source:
    kind = local_format(path)
    if kind is None:
        raise DataError(f"cannot tell the format of {name!r} from its suffix: use one of {sorted(LOCAL_FORMATS)}")
    return Source(name=name, weight=weight, kind=kind, location=str(path), files=(str(path),))


def _local_directory(name: str, weight: float, path: Path, config: str | None, split: str | DefaultSplit) -> Source:
    files = sorted(
        f for f in path.rglob("*") if f.is_file() and f.name.lower() != _DATASET_CARD and local_format(f) is not None
    )
    if not files:
        raise DataError(
            f"data directory {name!r} holds no {sorted(LOCAL_FORMATS)} files: point the spec at a data file"
        )
    kinds = sorted({local_format(f) or "" for f in files})
    if len(kinds) > 1:
        raise DataError(f"data directory {name!r} mixes file formats {kinds}: list the files as separate sources")
    return Source(
        name=name, weight=weight, kind=kinds[0], location=str(path), files=tuple(map(str, files)),
        config=config, split=split, directory=True,
    )


def _hub(name: str, weight: float, repo: str, config: str | None, split: str | DefaultSplit) -> Source:
    if repo.count("/") != 1 or not all(repo.split("/")):
        aliases = ", ".join(HUB_ALIASES)
        raise DataError(
            f"{name!r} is neither an existing local file nor a Hub dataset id of the form "
            f"'org/name[#config][@split]' nor one of the short names {aliases}"
        )
    return Source(name=name, weight=weight, kind="hub", location=repo, config=config, split=split)


def _source(name: str, weight: float, default_split: DefaultSplit) -> Source:
    """Parse one source (its weight already split off)."""
    if name.lower() == BUILTIN:
        raise DataError(
            f"{BUILTIN!r} names a command's built-in data: pass it to rqat-deploy train / bench, or expand it "
            "with rqat_deploy.builtin.synth.resolve_spec(spec, kind) before loading"
        )
    whole = Path(name).expanduser()
    if whole.is_file():
        return _local_file(name, weight, whole)
    if whole.is_dir():
        return _local_directory(name, weight, whole, None, default_split)
    base, config, split = _split_suffixes(name)
    chosen: str | DefaultSplit = split or default_split
    if base.lower() in HUB_ALIASES:
        repo, alias_config, _ = _split_suffixes(HUB_ALIASES[base.lower()])
        return _hub(name, weight, repo, config or alias_config, chosen)
    if not (_is_local(name) or _is_local(base)):
        return _hub(name, weight, base, config, chosen)
    path = Path(base).expanduser()
    if path.is_dir():
        return _local_directory(name, weight, path, config, chosen)
    if path.is_file():
        raise DataError(
            f"{name!r}: a local file has no configurations or splits; write it as {base!r} (no '#' or '@')"
        )
    raise DataError(
        f"cannot load dataset {name!r}: {path} does not exist. Pass an existing JSONL/Parquet/text file or "
        "dataset directory, or a Hub dataset id 'org/name[#config][@split]'"
    )


def _weighted(entry: str) -> tuple[str, float]:
    """``source[:weight]`` -> ``(source, weight)``; a ``:`` inside an existing path is no weight."""
    head, sep, tail = entry.rpartition(":")
    if not sep or Path(entry).expanduser().exists():
        return entry, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return entry, 1.0  # a ':' inside the name, no weight
    if not math.isfinite(weight) or weight <= 0:
        raise DataError(f"weight of {head.strip()!r} in data spec must be a positive number, got {tail!r}")
    return head.strip(), weight


def parse_spec(spec: str, default_split: DefaultSplit = TRAIN_SPLIT) -> list[Source]:
    """Parse a data SPEC ``source[:weight],...`` into :class:`Source` entries (module docstring).

    Args:
        spec: comma-separated sources, each optionally followed by ``:weight`` (a positive number;
            default 1).
        default_split: the command's split for dataset sources written without ``@split``
            (:data:`TRAIN_SPLIT` or :data:`EVAL_SPLIT`).

    Returns:
        The sources in SPEC order, weights as written (not normalised).

    Raises:
        DataError: an empty SPEC or entry, a weight that is not a positive number, a local path that
            does not exist, a directory mixing file formats, ``builtin`` not expanded, or an entry
            that is neither a local path, a Hub id nor an alias.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("the data spec is empty: give 'source[:weight],...' (Hub ids or local files)")
    sources = []
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            raise DataError(f"empty entry in data spec {spec!r}: remove the stray comma")
        sources.append(_source(*_weighted(entry), default_split))
    return sources


def allocate(weights: Sequence[float], n: int) -> list[int]:
    """Split ``n`` samples across sources in proportion to ``weights`` (largest-remainder rounding).

    Args:
        weights: positive relative weights.
        n: total number of samples.

    Returns:
        Integer counts summing to ``n``; ties in the remainders go to the earlier source.
    """
    top = max(weights)
    scaled = [w / top for w in weights]  # in (0, 1]: the sum cannot overflow, whatever the weights
    total = sum(scaled)
    exact = [w / total * n for w in scaled]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts
