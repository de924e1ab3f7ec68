"""Exception classes of rqat-deploy.

Every error a user can cause derives from :class:`RqatError`, so the CLI can print the message
(which names the problem and the fix) without a traceback.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping


class RqatError(Exception):
    """Base class of every error rqat-deploy raises on purpose."""


class ConfigError(RqatError, ValueError):
    """An invalid configuration value (unknown grid, bad bit width, misspelled field...)."""


class ShapeError(RqatError, ValueError):
    """A tensor or module whose shape the chosen quantization grid cannot handle."""


class CheckpointError(RqatError):
    """A quantized checkpoint that is missing, inconsistent, or of an unknown format version."""


class BackendError(RqatError):
    """A requested compute backend (e.g. Triton) that is unavailable for the given tensors."""


class ModelLoadError(RqatError):
    """A model or tokenizer that cannot be loaded from the given Hub id or directory."""


class OutputError(RqatError):
    """An output that cannot be written: inside or over an input, locked by another run, or on a
    path that is not writable."""


class OutputExistsError(OutputError, FileExistsError):
    """An output path that already exists (or appeared while it was written) and would be
    overwritten without ``--force``."""


class UnsafePathError(RqatError, ValueError):
    """A path inside a checkpoint or model directory that leads outside it (``..``, an absolute
    path, a symlink to elsewhere), or a file that is not a regular file of bounded size."""


class ExportError(RqatError):
    """An export that failed, including a verify-on-write mismatch."""


class DataError(RqatError, ValueError):
    """A dataset or data source that is missing, malformed, or lacks a required field."""


class NonFiniteError(RqatError, ArithmeticError):
    """A NaN or inf in a training loss, gradient or quantization parameter; the message names where
    (stage, block or module, step) and which saved state is the last good one."""


class DivergenceError(RqatError, ArithmeticError):
    """A training run that diverged with finite values: the loss far above its start, or scales
    pinned at the fp16 limit; the message names the step, the last good state and what to change."""


def did_you_mean(value: str, choices: tuple[str, ...] | list[str]) -> str:
    """A ``" (did you mean 'x'?)"`` hint for a misspelled choice, or ``""``."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any], *, limit: int = 3) -> str:
    """The keys whose values differ between two settings mappings, for a message; ``""`` if none.

    >>> settings_diff({"lr": 1e-3, "seed": 0}, {"lr": 3e-3, "seed": 0})
    "['lr'] (lr: 0.001 -> 0.003)"
    """
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return ""
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:limit])
    return f"{keys} ({shown})"
