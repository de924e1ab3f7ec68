"""Dispatch between the Triton kernels and the pure-PyTorch reference.

``auto`` (the default) picks Triton for CUDA tensors when Triton is importable and the reference
everywhere else. ``RQAT_BACKEND=reference|triton|auto`` or the ``backend=`` argument overrides it;
``triton`` on CPU tensors works only under ``TRITON_INTERPRET=1`` (the kernel tests use that).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from rqat_deploy.quant import reference
from rqat_deploy.errors import BackendError, ConfigError

BACKENDS = ("auto", "triton", "reference")


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """Return ``"triton"`` or ``"reference"`` for computations on tensor ``x``.

    Args:
        x: a tensor of the computation (its device decides ``auto``).
        backend: ``auto``, ``triton`` or ``reference``; ``None`` reads ``RQAT_BACKEND`` (default auto).

    Raises:
        ConfigError: an unknown backend name.
        BackendError: ``triton`` requested where it cannot run.
    """
    name = backend or os.environ.get("RQAT_BACKEND", "auto")
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if name == "auto":
        return "triton" if x.is_cuda and triton_available() else "reference"
    if name == "triton":
        if not triton_available():
            raise BackendError("backend 'triton' requested but triton is not installed: pip install triton")
        if not x.is_cuda and not interpret:
            raise BackendError(
                "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (slow, for tests); "
                "use --device cuda or the 'reference' backend"
            )
    return name


def fake_quant(
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    o: torch.Tensor,
    qmax: int,
    gs: int,
    backend: str | None = None,
) -> torch.Tensor:
    """Stage-1 fake quantization with straight-through gradients (see :mod:`rqat_deploy.quant.reference`).

    Args:
        w: latent weight ``[R, K]``.
        s, z, o: per-group effective scale, zero point, offset ``[R, K/gs]`` float32.
        qmax: largest code.
        gs: group size.
        backend: see :func:`resolve_backend`.

    Returns:
        The fake-quantized weight ``[R, K]`` in ``w``'s dtype (computed in float32).
    """
    if resolve_backend(w, backend) == "triton":
        from rqat_deploy.kernels.fake_quant import FakeQuantTritonFn

        return FakeQuantTritonFn.apply(w.contiguous(), s.contiguous(), z.contiguous(), o.contiguous(), qmax, gs)
    return reference.FakeQuantFn.apply(w.float(), s, z, o, qmax, gs).to(w.dtype)


def dequant(
    q: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    o: torch.Tensor,
    gs: int,
    backend: str | None = None,
) -> torch.Tensor:
    """Stage-2 dequantization ``W = s*(q - z) - o`` from frozen codes, gradients for ``s`` and ``o``.

    Args:
        q: codes ``[R, K]`` (uint8).
        s, z, o: per-group ``[R, K/gs]`` float32.
        gs: group size.
        backend: see :func:`resolve_backend`.

    Returns:
        ``W`` float32 ``[R, K]``.
    """
    if resolve_backend(s, backend) == "triton":
        from rqat_deploy.kernels.dequant import DequantTritonFn

        return DequantTritonFn.apply(q.contiguous(), s.contiguous(), z.contiguous(), o.contiguous(), gs)
    return reference.DequantFn.apply(q.float(), s, z, o, gs)
