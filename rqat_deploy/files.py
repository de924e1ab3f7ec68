"""Writing outputs without losing anything, reading inputs without leaving them: one home.

Every file or directory rqat-deploy produces is written under a temporary sibling name and renamed
into place once complete, so a reader never sees half a file and a failure (or Ctrl-C, or SIGTERM)
leaves the old output untouched:

    with staged_file(path) as tmp:     # internal state: tmp renamed over path on success
        torch.save(state, tmp)
    atomic_write_text(path, text)      # the same for a string (bytes, JSON likewise)
    with staged_dir(out, force, inputs={ckpt: "checkpoint"}) as tmp:   # a user's output directory
        ...
    with staged_output_file(out, force) as tmp:                        # a user's output file
        ...

A user's output (:func:`staged_dir`, :func:`staged_output_file`) is also

- refused when it lies inside or over one of the command's inputs, or contains the current directory;
- locked (:func:`output_lock`) for as long as it is written, so a second writer is told at once;
- created exclusively at rename time: a path that appeared meanwhile (or, with ``force``, changed
  meanwhile) is never replaced;
- preceded by the removal of temporaries that killed runs left beside it (their names carry the
  writer's pid; only those of dead processes are touched, and an output moved aside is restored).

Reading an untrusted directory goes through :func:`inside` (paths stay in the directory, symlinks
do not lead out) and :func:`read_json` (regular files of bounded size, parse errors named).

Nothing here imports torch, so the CLI can use it before any heavy import.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import itertools
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from rqat_deploy.errors import OutputError, OutputExistsError, RqatError, UnsafePathError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS: no locks
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MAX_JSON_BYTES",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_no_overlap",
    "check_output",
    "clean_stale",
    "inside",
    "is_local_path",
    "normal_permissions",
    "output_lock",
    "read_json",
    "staged_dir",
    "staged_file",
    "staged_output_file",
]

log = logging.getLogger(__name__)

#: the largest JSON file read from a checkpoint or model directory (tokenizers are ~10 MB)
MAX_JSON_BYTES = 256 * 2**20
_LOCK, _TMP, _OLD = ".lock", ".tmp-", ".old-"

PathLike = str | os.PathLike[str]


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


# ---------------------------------------------------------------------------------------------
# reading untrusted directories
# ---------------------------------------------------------------------------------------------


def _allowed_roots(root: Path) -> list[Path]:
    """``root`` resolved, plus the ``blobs`` folder of a Hugging Face cache snapshot (whose files
    are symlinks into it)."""
    real = Path(os.path.realpath(root))
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def inside(root: PathLike, name: PathLike, *, error: type[RqatError] = UnsafePathError) -> Path:
    """``root / name``, refused unless it stays inside ``root``.

    ``name`` must be relative without ``..``; the path, symlinks followed, must lie in ``root``
    (or, for a Hugging Face cache snapshot, in its repository's ``blobs``).

    Raises:
        UnsafePathError (or ``error``): naming the path and where it leads.
    """
    rel = Path(name)
    root = Path(root)
    if rel.is_absolute() or ".." in rel.parts:
        raise error(f"{root}: the path {str(name)!r} leads outside the directory (absolute or with '..'); "
                    "rqat-deploy reads only files inside it")
    path = root / rel
    real = Path(os.path.realpath(path))
    if not any(real == r or r in real.parents for r in _allowed_roots(root)):
        raise error(f"{path} is a link to {real}, outside {root}: rqat-deploy reads only files inside the "
                    "directory; copy the file in instead of linking it")
    return path


def _regular_file(path: Path, limit: int, error: type[RqatError]) -> int:
    """The size of ``path``, refused unless it is a regular file of at most ``limit`` bytes."""
    try:
        st = path.stat()
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path} is not a regular file")
    if st.st_size > limit:
        raise error(f"{path} is {st.st_size / 2**20:.0f} MiB, more than the {limit / 2**20:.0f} MiB read for such a file")
    return st.st_size


def read_json(path: PathLike, *, error: type[RqatError] = RqatError, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file of bounded size.

    Raises:
        ``error``: not a regular file, too large, not UTF-8 or not valid JSON (naming the file and the fix).
    """
    p = Path(path)
    _regular_file(p, limit, error)
    try:
        return json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{p} is not valid JSON ({e}): restore it from its source") from e


# ---------------------------------------------------------------------------------------------
# outputs: overlap, existence, locks, stale temporaries
# ---------------------------------------------------------------------------------------------


def _absolute(path: PathLike) -> Path:
    return Path(os.path.abspath(os.fspath(path)))


def check_output(out: PathLike, force: bool) -> Path:
    """Refuse to overwrite ``out`` without ``force``.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is false.
    """
    out = Path(out)
    if os.path.lexists(out) and not force:
        raise OutputExistsError(f"{out} already exists: choose another --out or pass --force to overwrite it")
    return out


def check_no_overlap(
    out: PathLike, inputs: Mapping[PathLike, str] | None, *, error: type[RqatError] = OutputError
) -> Path:
    """Refuse an output that is one of ``inputs``, lies inside one, or contains one.

    Args:
        out: the output path.
        inputs: ``{path: what it is}`` (``"checkpoint directory"``, ``"base model"``...); paths that
            do not exist are ignored.
        error: the exception class to raise.

    Raises:
        ``error``: naming the output, the input and the fix.
    """
    real_out = Path(os.path.realpath(out))
    for path, what in (inputs or {}).items():
        if not os.path.exists(path):
            continue
        src = Path(os.path.realpath(path))
        if real_out == src or src in real_out.parents or real_out in src.parents:
            raise error(f"--out {out} overlaps the {what} {path}: an output must lie outside its inputs, "
                        "choose a separate path")
    return Path(out)


def _pid_of(entry: Path, marker: str) -> int | None:
    """The writer's pid in a temporary's name ``.NAME{marker}PID[-...]``, or None."""
    tail = entry.name.rsplit(marker, 1)[-1].split("-", 1)[0]
    return int(tail) if tail.isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(path: PathLike) -> list[Path]:
    """Remove the temporaries that killed runs (SIGKILL, power loss) left beside ``path``.

    Temporaries are named ``.NAME.tmp-PID...``; an output moved aside while being replaced is
    ``.NAME.old-PID``. Only those of processes that no longer run are touched: temporaries are
    removed, and an old output is put back when ``path`` is missing (else removed). Each is logged.

    Returns:
        The entries removed or restored.
    """
    p = _absolute(path)
    if not p.parent.is_dir():
        return []
    done = []
    for entry in sorted(p.parent.glob(f".{glob.escape(p.name)}.*-*")):
        for marker in (_TMP, _OLD):
            if not entry.name.startswith(f".{p.name}{marker}"):
                continue
            pid = _pid_of(entry, marker)
            if pid is None or _alive(pid):
                continue
            if marker == _OLD and not os.path.lexists(p):
                entry.rename(p)
                log.warning("restored %s from %s, left by a killed run (pid %d)", p, entry.name, pid)
            else:
                _remove(entry)
                log.warning("removed %s, a temporary left by a killed run (pid %d)", entry, pid)
            done.append(entry)
    return done


_HELD: dict[str, tuple[int, int, int]] = {}  # lock file -> (thread, depth, fd)
_SERIAL = itertools.count()  # temporary file names: unique within the process


def _lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}{_LOCK}")


def _acquire(lock: Path, path: Path) -> int:
    """Open and flock ``lock`` (created), retrying if another holder removed it meanwhile."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror} ({e.filename}); choose another --out") from e
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror} in {lock.parent}; choose another --out") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                f"{path} is being written by another rqat-deploy run (pid {holder}): wait for it to finish, "
                "or choose another --out / --work-dir"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the previous holder removed the file between our open and flock: retry


@contextlib.contextmanager
def output_lock(path: PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the output ``path`` while the block runs.

    The lock is ``flock`` on a sibling ``.NAME.lock`` file (removed on release; the kernel frees
    the lock of a killed process). It is re-entrant within one thread.

    Raises:
        OutputError: another process holds it (naming its pid), or the parent directory cannot be written.
    """
    p = _absolute(path)
    lock = _lock_file(p)
    key, me = os.path.realpath(lock), threading.get_ident()
    held = _HELD.get(key)
    if fcntl is None or (held is not None and held[0] == me):
        if held is not None:
            _HELD[key] = (me, held[1] + 1, held[2])
        try:
            yield
        finally:
            if held is not None:
                _HELD[key] = held
        return
    fd = _acquire(lock, p)
    _HELD[key] = (me, 1, fd)
    try:
        yield
    finally:
        del _HELD[key]
        lock.unlink(missing_ok=True)
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# staging and committing
# ---------------------------------------------------------------------------------------------


def _libc_renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _libc_renameat2()
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError if ``dst`` exists (atomically where the OS can)."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src))
    if src.is_file():
        os.link(src, dst)  # a hard link never replaces an existing name
        src.unlink()
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What ``path`` is now (device, inode, mtime), or None when it does not exist."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _commit(tmp: Path, out: Path, before: tuple[int, int, int] | None) -> None:
    """Move the finished ``tmp`` to ``out``: exclusively when ``out`` did not exist at the start,
    else replacing it only if it is still what it was then (the old one is removed last)."""
    if before is None:
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:
            raise OutputExistsError(
                f"{out} appeared while this output was being written: it was left untouched and the new output "
                "discarded; choose another --out, or remove it and run again"
            ) from None
        return
    if _identity(out) != before:
        raise OutputExistsError(
            f"{out} changed while this output was being written: it was left untouched and the new output "
            "discarded; run again to replace it"
        )
    old = out.with_name(f".{out.name}{_OLD}{os.getpid()}")
    os.rename(out, old)
    os.rename(tmp, out)
    _remove(old)


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a directory that holds the current working directory."""
    cwd = Path(os.path.realpath(os.getcwd()))
    real = Path(os.path.realpath(out))
    if real == cwd or real in cwd.parents:
        raise OutputError(f"refusing to replace {out}: it contains the current directory; choose another --out")


@contextlib.contextmanager
def _staged_output(
    out: PathLike, force: bool, inputs: Mapping[PathLike, str] | None, error: type[RqatError], directory: bool
) -> Iterator[Path]:
    path = _absolute(check_no_overlap(out, inputs, error=error))
    shown = Path(out)
    with output_lock(path):
        check_output(shown, force)
        before = _identity(path)
        if before is not None:
            _check_replaceable(path)
        clean_stale(path)
        tmp = _fresh(path, directory)
        try:
            yield tmp
            _commit(tmp, path, before)
        except BaseException:
            _remove(tmp)
            raise


def normal_permissions(path: PathLike) -> None:
    """Give ``path`` the permissions a plain ``open`` / ``mkdir`` would (0666 / 0777 less the umask).

    Some writers (``tempfile.mkdtemp``, safetensors' ``save_file``) create 0700 / 0600 entries; an
    output should look like its siblings.
    """
    umask = os.umask(0)
    os.umask(umask)
    Path(path).chmod((0o777 if Path(path).is_dir() else 0o666) & ~umask)


def _fresh(out: Path, directory: bool) -> Path:
    """A new temporary sibling of ``out`` named after this process, with normal permissions."""
    prefix = f".{out.name}{_TMP}{os.getpid()}-"
    if not directory:
        return out.with_name(f"{prefix}{next(_SERIAL)}")
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    normal_permissions(tmp)
    return tmp


@contextlib.contextmanager
def staged_dir(
    out: PathLike, force: bool, *, inputs: Mapping[PathLike, str] | None = None, error: type[RqatError] = OutputError
) -> Iterator[Path]:
    """Write a directory into a temporary sibling of ``out``, renamed into place on success.

    The output is locked while it is written; an existing ``out`` (with ``force``) is replaced only
    once the new directory is complete and only if it is unchanged; one that appeared meanwhile is
    never replaced. On any exception (Ctrl-C and SIGTERM included) the temporary directory is removed.

    Args:
        out: the directory to write.
        force: replace an existing ``out``.
        inputs: ``{path: what it is}`` of the command's inputs; ``out`` must lie outside all of them.
        error: the exception class for an overlap with an input.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is false (before anything is written), or it
            appeared / changed while the new one was written.
        OutputError: ``out`` overlaps an input, contains the current directory, is being written by
            another run, or cannot be written.
    """
    with _staged_output(out, force, inputs, error, directory=True) as tmp:
        yield tmp


@contextlib.contextmanager
def staged_output_file(
    out: PathLike, force: bool, *, inputs: Mapping[PathLike, str] | None = None, error: type[RqatError] = OutputError
) -> Iterator[Path]:
    """:func:`staged_dir` for one output file (e.g. a GGUF): ``tmp`` is a path to write, not yet created."""
    with _staged_output(out, force, inputs, error, directory=False) as tmp:
        yield tmp


@contextlib.contextmanager
def staged_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it over ``path`` on success.

    For files a run owns (its state, its report files): an existing ``path`` is replaced. On any
    exception (Ctrl-C included) the temporary file is removed and ``path`` is left as it was;
    temporaries of killed runs beside ``path`` are removed first (:func:`clean_stale`).
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    tmp = _fresh(_absolute(dest), directory=False)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a flushed and synced temporary file and a rename.

    Returns:
        The destination path.
    """
    with staged_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """UTF-8 variant of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, data: Any, *, indent: int | None = 2) -> Path:
    """``data`` as JSON (one trailing newline) through :func:`atomic_write_text`."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str) + "\n")
