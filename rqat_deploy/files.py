"""Writing outputs without losing anything: one home for staged files and directories.

Every file or directory rqat-deploy produces is written under a temporary sibling name and renamed
into place once complete, so a reader never sees half a file and a failure (or Ctrl-C) leaves the
old output untouched:

    with staged_file(path) as tmp:     # write tmp; renamed over path on success, removed on failure
        torch.save(state, tmp)
    atomic_write_text(path, text)      # the same for a string (bytes, JSON likewise)
    with staged_dir(out, force) as tmp:   # a whole directory (checkpoints, exports)
        ...

Nothing here imports torch, so the CLI can use it before any heavy import.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from rqat_deploy.errors import OutputExistsError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output",
    "is_local_path",
    "staged_dir",
    "staged_file",
]


def is_local_path(name: str, suffixes: Iterable[str] = ()) -> bool:
    """Whether ``name`` names a local path rather than a Hub id (``org/name``).

    Local: it exists, starts with ``.``, ``/`` or ``~``, has more than one ``/``, or ends with one
    of ``suffixes`` (case-insensitive). Data SPECs pass their file suffixes (``.jsonl``,
    ``.parquet``...), so a missing ``data/x.jsonl`` is reported as a missing file, not looked up on
    the Hub: no Hub id ends with a data-file suffix.
    """
    return (
        name.startswith((".", "/", "~"))
        or Path(name).expanduser().exists()
        or name.count("/") > 1
        or name.lower().endswith(tuple(suffixes))
    )


def check_output(out: str | os.PathLike[str], force: bool) -> Path:
    """Refuse to overwrite ``out`` without ``force``.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is false.
    """
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists: choose another --out or pass --force to overwrite it")
    return out


@contextlib.contextmanager
def staged_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it over ``path`` on success.

    On any exception (Ctrl-C included) the temporary file is removed and ``path`` is left as it was.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a flushed and synced temporary file and a rename.

    Returns:
        The destination path.
    """
    with staged_file(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 variant of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2) -> Path:
    """``data`` as JSON (one trailing newline) through :func:`atomic_write_text`."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


def _fresh_dir(out: Path) -> Path:
    """A new temporary sibling directory of ``out``, with normal directory permissions."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other directory
    return tmp


def _commit_dir(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` (an old ``out`` is removed last)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike[str], force: bool) -> Iterator[Path]:
    """Write a directory into a temporary sibling of ``out``, renamed into place on success.

    An existing ``out`` (with ``force``) is replaced only once the new directory is complete; on any
    exception the temporary directory is removed.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is false (before anything is written).
    """
    out = check_output(out, force)
    tmp = _fresh_dir(out)
    try:
        yield tmp
        _commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
