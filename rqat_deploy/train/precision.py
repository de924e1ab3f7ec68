"""Mixed precision of the training forwards: the one autocast rule of stage 1 and stage 2."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager

import torch

from rqat_deploy.errors import ConfigError

AUTOCAST_DTYPES = ("bfloat16", "float16")


def autocast(device: torch.device, dtype: str | None) -> ContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on a CUDA ``device``; a no-op off CUDA or when ``dtype`` is None.

    Args:
        device: where the forward runs; only CUDA autocasts (CPU forwards stay in their own dtype).
        dtype: ``"bfloat16"``, ``"float16"`` or ``None`` (no autocast).

    Returns:
        A context manager for the forward pass.

    Raises:
        ConfigError: an unknown ``dtype``.
    """
    if dtype is not None and dtype not in AUTOCAST_DTYPES:
        raise ConfigError(f"autocast dtype must be None or one of {AUTOCAST_DTYPES}, got {dtype!r}")
    if dtype is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, dtype))
