"""Triton kernels for the stage-2 form (codes frozen, only scale parameters train).

``W = s * (q - z) - o`` per group of ``gs`` input columns (see :mod:`rqat_deploy.quant.reference`), with
``dW/ds = q - z`` and ``dW/do = -1``. The backward reads ``g`` and ``q`` once and reduces each group
inside the kernel with the same halving tree as :func:`rqat_deploy.quant.reference.group_sum`: no
``[R, K]`` product tensor is ever written, only the ``[R, K/gs]`` gradients.

Bit-identical in float32 to :func:`rqat_deploy.quant.reference.dequant` and
:func:`rqat_deploy.quant.reference.dequant_backward` (same IEEE operations in the same order, no FMA
contraction: kernels are launched with ``enable_fp_fusion=False``).

This module imports ``triton`` at import time: the core imports it lazily, only when the Triton
backend is selected.
"""

from __future__ import annotations

import torch

from rqat_deploy.errors import BackendError
from rqat_deploy.kernels.common import (  # raises BackendError when triton is missing
    LaunchConfig,
    check_grid,
    check_tensors,
    group_sum,
    interpreting,
    launch_config,
    load_groups,
    run_on,
    tile_offsets,
)

import triton  # noqa: E402  (after the import above, which explains a missing triton)
import triton.language as tl  # noqa: E402

__all__ = ["DequantTritonFn", "dequant_bwd", "dequant_fwd"]

_CODE_DTYPES = (torch.uint8, torch.float32)
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _dequant_fwd_kernel(
    q_ptr, s_ptr, z_ptr, o_ptr, out_ptr,
    R, K, KG,
    GS: tl.constexpr, BLOCK_R: tl.constexpr, NG: tl.constexpr,
):  # fmt: skip
    """Stage-2 forward: dequantize frozen codes.

    Equivalent torch math (``reference.dequant``; ``s, z, o`` expanded to ``[R, K]`` by
    ``repeat_interleave(gs, -1)``)::

        out = (s * (q.float() - z) - o).to(out_dtype)
    """
    eoff, emask, poff, pmask = tile_offsets(R, K, KG, BLOCK_R, NG, GS)
    q = tl.load(q_ptr + eoff, mask=emask, other=0).to(tl.float32)  # [BLOCK_R, NG, GS]
    s = load_groups(s_ptr, poff, pmask, 0.0, BLOCK_R, NG, GS)
    z = load_groups(z_ptr, poff, pmask, 0.0, BLOCK_R, NG, GS)
    o = load_groups(o_ptr, poff, pmask, 0.0, BLOCK_R, NG, GS)
    out = s * (q - z) - o
    tl.store(out_ptr + eoff, out.to(out_ptr.dtype.element_ty), mask=emask)


@triton.jit
def _dequant_bwd_kernel(
    g_ptr, q_ptr, z_ptr, gs_ptr, go_ptr,
    R, K, KG,
    GS: tl.constexpr, LOG2_GS: tl.constexpr, BLOCK_R: tl.constexpr, NG: tl.constexpr,
):  # fmt: skip
    """Stage-2 backward: per-group scale and offset gradients, reduced in registers.

    Equivalent torch math (``reference.dequant_backward``; ``z`` expanded to ``[R, K]``)::

        grad_s = group_sum(g.float() * (q.float() - z), gs)   # [R, K/gs]
        grad_o = group_sum(-g.float(), gs)                    # [R, K/gs]
    """
    eoff, emask, poff, pmask = tile_offsets(R, K, KG, BLOCK_R, NG, GS)
    g = tl.load(g_ptr + eoff, mask=emask, other=0.0).to(tl.float32)  # [BLOCK_R, NG, GS]
    q = tl.load(q_ptr + eoff, mask=emask, other=0).to(tl.float32)  # [BLOCK_R, NG, GS]
    z = load_groups(z_ptr, poff, pmask, 0.0, BLOCK_R, NG, GS)
    tl.store(gs_ptr + poff, group_sum(g * (q - z), BLOCK_R, NG, GS, LOG2_GS), mask=pmask)
    tl.store(go_ptr + poff, group_sum(-g, BLOCK_R, NG, GS, LOG2_GS), mask=pmask)


def _grid(
    what: str, rows: int, k: int, gs: int, kernel: object, block_r: int | None, ng: int | None
) -> tuple[LaunchConfig, tuple[int, int]]:
    cfg = launch_config(rows, k // gs, gs, interpreting(kernel), block_r, ng)
    grid = cfg.grid(rows, k // gs)
    check_grid(what, grid, k)
    return cfg, grid


def dequant_fwd(
    q: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    o: torch.Tensor,
    gs: int,
    out_dtype: torch.dtype = torch.float32,
    *,
    block_r: int | None = None,
    ng: int | None = None,
) -> torch.Tensor:
    """Dequantize frozen codes: ``W = s*(q - z) - o`` per group, computed in float32.

    Bit-identical in float32 to ``reference.dequant(q.float(), s, z, o, gs)``.

    Args:
        q: codes ``[R, K]``, uint8 or float32 (integer-valued), contiguous.
        s, z, o: per-group scale, zero point, offset ``[R, K/gs]`` float32, contiguous.
        gs: group size, a power of two 16..1024 dividing ``K``.
        out_dtype: float32 (default), bfloat16 or float16; the float32 result is cast at the end.
        block_r, ng: tile override (rows, groups per program); powers of two.

    Returns:
        ``W`` ``[R, K]`` in ``out_dtype``.

    Raises:
        ShapeError: bad shapes or group size.
        BackendError: wrong dtype / device / layout, or CPU tensors outside the interpreter.
    """
    what = "dequant_fwd"
    if out_dtype not in _OUT_DTYPES:
        raise BackendError(f"{what}: out_dtype must be one of {[str(d) for d in _OUT_DTYPES]}, got {out_dtype}")
    rows, k = check_tensors(what, _dequant_fwd_kernel, {"q": (q, _CODE_DTYPES)}, {"s": s, "z": z, "o": o}, gs)
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)  # [R, K]
    if rows == 0 or k == 0:
        return out
    cfg, grid = _grid(what, rows, k, gs, _dequant_fwd_kernel, block_r, ng)
    with run_on(q.device):
        _dequant_fwd_kernel[grid](
            q, s, z, o, out,
            rows, k, k // gs,
            GS=gs, BLOCK_R=cfg.block_r, NG=cfg.ng,
            num_warps=cfg.num_warps, enable_fp_fusion=False,
        )  # fmt: skip
    return out


def dequant_bwd(
    g: torch.Tensor,
    q: torch.Tensor,
    z: torch.Tensor,
    gs: int,
    *,
    block_r: int | None = None,
    ng: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group gradients of the stage-2 form, ``grad_s = sum g*(q - z)`` and ``grad_o = -sum g``.

    Reads ``g`` and ``q`` once and writes only ``[R, K/gs]`` outputs. Bit-identical in float32 to
    ``reference.dequant_backward(g, q.float(), z, gs)`` (for bf16/fp16 ``g`` the sums here are
    float32, like the reference's ``grad_s``).

    Args:
        g: gradient of ``W`` ``[R, K]`` (float32, bfloat16 or float16), contiguous.
        q: codes ``[R, K]``, uint8 or float32, contiguous.
        z: zero points ``[R, K/gs]`` float32, contiguous.
        gs: group size, a power of two 16..1024 dividing ``K``.
        block_r, ng: tile override (rows, groups per program); powers of two.

    Returns:
        ``grad_s``, ``grad_o`` ``[R, K/gs]`` float32.

    Raises:
        ShapeError: bad shapes or group size.
        BackendError: wrong dtype / device / layout, or CPU tensors outside the interpreter.
    """
    what = "dequant_bwd"
    rows, k = check_tensors(what, _dequant_bwd_kernel, {"g": (g, _GRAD_DTYPES), "q": (q, _CODE_DTYPES)}, {"z": z}, gs)
    grad_s = torch.empty_like(z)  # [R, K/gs]
    grad_o = torch.empty_like(z)  # [R, K/gs]
    if rows == 0 or k == 0:
        return grad_s, grad_o
    cfg, grid = _grid(what, rows, k, gs, _dequant_bwd_kernel, block_r, ng)
    with run_on(g.device):
        _dequant_bwd_kernel[grid](
            g, q, z, grad_s, grad_o,
            rows, k, k // gs,
            GS=gs, LOG2_GS=gs.bit_length() - 1, BLOCK_R=cfg.block_r, NG=cfg.ng,
            num_warps=cfg.num_warps, enable_fp_fusion=False,
        )  # fmt: skip
    return grad_s, grad_o


class DequantTritonFn(torch.autograd.Function):
    """Stage-2 form on Triton; same signature and results as ``reference.DequantFn``.

    ``DequantTritonFn.apply(q, s, z, o, gs)`` returns float32 ``W``; an optional sixth positional
    argument ``out_dtype`` (bfloat16/float16) casts the float32 result at the end. Gradients flow to
    ``s`` and ``o`` only (codes and zero points are frozen).
    """

    @staticmethod
    def forward(ctx, q, s, z, o, gs: int, out_dtype: torch.dtype | None = None):  # type: ignore[override]
        ctx.save_for_backward(q, z)
        ctx.gs = gs
        return dequant_fwd(q, s, z, o, gs, out_dtype or torch.float32)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        q, z = ctx.saved_tensors
        need_s, need_o = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        if not (need_s or need_o):
            return None, None, None, None, None, None
        grad_s, grad_o = dequant_bwd(g.contiguous(), q, z, ctx.gs)
        return None, grad_s if need_s else None, None, grad_o if need_o else None, None, None
