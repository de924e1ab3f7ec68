"""Reading the raw records of a parsed :class:`~rqat_deploy.data.spec.Source`: one loader for every command.

Every source is read through :func:`datasets.load_dataset`:

- a local file with the builder of its suffix (``json``, ``parquet``, ``text``) and ``data_files``;
- a Hub id or a local dataset directory by its name, with its ``#config``; the split is then chosen
  by :func:`choose_split` (the one written after ``@``, else the command's default).

Plain text is cut into records by paragraph (training: a document per paragraph) or by line
(evaluation sets: a question per line); each record is ``{"text": ...}``.

Training reads a source in a seeded shuffled order, streaming Hub sources by default
(:func:`iter_records`); evaluation reads every row in file order, without streaming
(:func:`read_rows`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

from rqat_deploy.data.spec import TRAIN_SPLIT, Source
from rqat_deploy.errors import DataError

if TYPE_CHECKING:
    import datasets

__all__ = ["TextUnit", "choose_split", "iter_records", "open_source", "read_rows"]

#: How plain-text files are cut into records.
TextUnit = Literal["paragraph", "line"]
_STREAM_SHUFFLE_BUFFER = 10_000


def _old_form_hint(source: Source) -> str:
    """Why ``name@x`` may have failed: ``@`` now names a split, the configuration takes ``#``."""
    if not isinstance(source.split, str) or source.config is not None:
        return ""
    base = source.name.rpartition("@")[0]
    return (
        f" ('{source.name}' reads the split {source.split!r}; if {source.split!r} is a configuration, "
        f"write '{base}#{source.split}')"
    )


def choose_split(source: Source, splits: Sequence[str]) -> str:
    """The split of ``source`` to read, among the dataset's ``splits``.

    The split written after ``@`` must exist; without one the command's :class:`DefaultSplit` is
    read, or the only split where the default allows it.

    Raises:
        DataError: the split is not among ``splits``; the message lists them.
    """
    want = source.split
    splits = list(splits)
    if isinstance(want, str):
        if want in splits:
            return want
        raise DataError(
            f"dataset {source.name!r} has splits {splits}, not {want!r}: write one of them after '@'"
            + _old_form_hint(source)
        )
    default = want if want is not None else TRAIN_SPLIT  # (a local file has no split to choose)
    if default.name in splits:
        return default.name
    if default.or_only and len(splits) == 1:
        return splits[0]
    raise DataError(
        f"dataset {source.name!r} has splits {splits} and no {default.name!r} split: choose one with "
        f"'{source.name}@SPLIT'"
    )


def _load_error(source: Source, exc: Exception) -> DataError:
    if source.kind == "hub":
        where = (
            "the Hugging Face Hub: check the dataset id and your network (or pre-download it and unset "
            "HF_DATASETS_OFFLINE), or pass a local JSONL/Parquet/text file instead"
        )
    elif source.directory:
        where = f"the dataset directory {source.location}"
    else:
        where = "its local files: check that they are valid " + source.kind
    hint = _old_form_hint(source)
    return DataError(f"could not load dataset {source.name!r} from {where}{hint}. Cause: {_cause(exc)}")


def _cause(exc: BaseException) -> str:
    """``exc`` and what it wraps (``datasets`` wraps a parse error in a generic DatasetGenerationError)."""
    causes = [f"{type(exc).__name__}: {exc}"]
    while exc.__cause__ is not None and len(causes) < 3:
        exc = exc.__cause__
        causes.append(f"{type(exc).__name__}: {exc}")
    return " <- ".join(causes)


def open_source(
    source: Source, *, streaming: bool, text_unit: TextUnit = "paragraph"
) -> datasets.Dataset | datasets.IterableDataset:
    """The records of ``source`` in file order, as a ``datasets`` (Iterable)Dataset.

    Args:
        source: a parsed source.
        streaming: read lazily (an ``IterableDataset``) instead of loading (and caching) it all.
        text_unit: how plain text is cut into ``{"text": ...}`` records.

    Raises:
        DataError: the source cannot be loaded, or has no such split.
    """
    import datasets

    extra = {"sample_by": text_unit} if source.kind == "text" else {}
    empty = [f for f in source.files if os.path.isfile(f) and not _has_content(f)]
    if empty:
        raise DataError(f"dataset file {empty[0]} is empty: it holds no records; give a file with one record per line")
    try:
        if source.files and not source.directory:
            return datasets.load_dataset(
                source.kind, data_files=list(source.files), split="train", streaming=streaming, **extra
            )
        loaded = datasets.load_dataset(source.location, source.config, streaming=streaming, **extra)
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one clear DataError
        raise _load_error(source, e) from e
    return loaded[choose_split(source, list(loaded))]


def _has_content(path: str) -> bool:
    """Whether a data file holds anything but whitespace (a compressed file is assumed to)."""
    if path.endswith((".gz", ".bz2", ".xz", ".zst", ".parquet")):
        return os.path.getsize(path) > 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _records(ds: Any, source: Source) -> Iterator[dict[str, Any]]:
    """The records of an opened source; read errors (network, parse) become DataErrors."""
    it = iter(ds)
    while True:
        try:
            record = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - network or parse errors while streaming
            raise DataError(f"reading dataset {source.name!r} failed: {_cause(e)}") from e
        yield record


def iter_records(source: Source, seed: int, streaming: bool | None = None) -> Iterator[dict[str, Any]]:
    """Yield the records of ``source`` in a seeded shuffled order (training data).

    Args:
        source: a parsed source.
        seed: shuffle seed (``datasets``' exact shuffle when loaded, its seeded buffer shuffle of
            10,000 records when streamed).
        streaming: ``None`` streams Hub sources and loads local ones; ``True``/``False`` force it.

    Raises:
        DataError: the source cannot be loaded or read.
    """
    stream = source.kind == "hub" if streaming is None else streaming
    ds = open_source(source, streaming=stream, text_unit="paragraph")
    shuffled = ds.shuffle(seed=seed, buffer_size=_STREAM_SHUFFLE_BUFFER) if stream else ds.shuffle(seed=seed)
    yield from _records(shuffled, source)


def read_rows(source: Source, *, text_unit: TextUnit = "line") -> list[dict[str, Any]]:
    """Every record of ``source`` in file order (evaluation sets; Hub sources are downloaded).

    Raises:
        DataError: the source cannot be loaded or read.
    """
    return list(_records(open_source(source, streaming=False, text_unit=text_unit), source))
