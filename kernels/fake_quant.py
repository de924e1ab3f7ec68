"""Triton kernels for the stage-1 fake-quant form (latent weights train).

The math is the unified group form of :mod:`rqat_deploy.quant.reference` (its module docstring): groups of
``gs`` consecutive input columns, each with an effective scale ``s``, an integer zero point ``z`` and an
offset ``o``::

    u  = (w + o) / s                       # IEEE round-to-nearest division
    q  = clamp(rint(u) + z, 0, qmax)       # round half to even; q = z where s == 0
    w' = s * (q - z) - o

The kernels are the fused twins of :func:`rqat_deploy.quant.reference.quantize_codes`,
:func:`~rqat_deploy.quant.reference.dequant` and :func:`~rqat_deploy.quant.reference.fake_quant_backward`, and
match them bit for bit in float32:

- every operation is the same IEEE float32 operation in the same order (``tl.math.div_rn`` for the
  division, an exact half-to-even :func:`rint`, kernels launched with ``enable_fp_fusion=False`` so
  that no multiply-add is contracted into an FMA on the GPU);
- per-group sums use :func:`group_sum`, the same halving tree as
  :func:`rqat_deploy.quant.reference.group_sum`.

Weights may be float32, bfloat16 or float16; the math is float32 inside the kernel and only the
result is cast back to the weight's dtype. Group parameters are float32.

This module imports ``triton`` at import time: the core imports it lazily, only when the Triton
backend is selected.
"""

from __future__ import annotations

import torch

from rqat_deploy.kernels.common import (  # raises BackendError when triton is missing
    check_grid,
    check_qmax,
    check_tensors,
    group_sum,
    interpreting,
    launch_config,
    load_groups,
    rint,
    run_on,
    tile_offsets,
)

import triton  # noqa: E402  (after the import above, which explains a missing triton)
import triton.language as tl  # noqa: E402

__all__ = [
    "FakeQuantTritonFn",
    "fake_quant_bwd",
    "fake_quant_codes",
    "fake_quant_fwd",
]

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fake_quant_fwd_kernel(
    w_ptr, s_ptr, z_ptr, o_ptr, out_ptr, codes_ptr,
    R, K, KG,
    QMAX: tl.constexpr, GS: tl.constexpr, BLOCK_R: tl.constexpr, NG: tl.constexpr,
    WRITE_OUT: tl.constexpr, WRITE_CODES: tl.constexpr,
):  # fmt: skip
    """Stage-1 forward: fake-quantized weight and/or codes.

    Equivalent torch math (``reference.quantize_codes`` then ``reference.dequant``), with
    ``s, z, o`` expanded to ``[R, K]`` by ``repeat_interleave(gs, -1)``::

        live = s != 0
        u = (w.float() + o) / torch.where(live, s, 1)
        q = torch.where(live, torch.clamp(torch.round(u) + z, 0, qmax), z)
        codes = q.to(torch.uint8)                       # if WRITE_CODES
        out = (s * (q - z) - o).to(w.dtype)             # if WRITE_OUT
    """
    eoff, emask, poff, pmask = tile_offsets(R, K, KG, BLOCK_R, NG, GS)
    w = tl.load(w_ptr + eoff, mask=emask, other=0.0).to(tl.float32)  # [BLOCK_R, NG, GS]
    s = load_groups(s_ptr, poff, pmask, 1.0, BLOCK_R, NG, GS)
    z = load_groups(z_ptr, poff, pmask, 0.0, BLOCK_R, NG, GS)
    o = load_groups(o_ptr, poff, pmask, 0.0, BLOCK_R, NG, GS)
    live = s != 0.0
    u = tl.math.div_rn(w + o, tl.where(live, s, 1.0))
    q = tl.minimum(tl.maximum(rint(u) + z, 0.0), QMAX)
    q = tl.where(live, q, z)
    if WRITE_CODES:
        tl.store(codes_ptr + eoff, q.to(tl.uint8), mask=emask)
    if WRITE_OUT:
        out = s * (q - z) - o
        tl.store(out_ptr + eoff, out.to(out_ptr.dtype.element_ty), mask=emask)


@triton.jit
def _fake_quant_bwd_kernel(
    g_ptr, w_ptr, s_ptr, z_ptr, o_ptr, gw_ptr, gs_ptr, gz_ptr, go_ptr,
    R, K, KG,
    QMAX: tl.constexpr, GS: tl.constexpr, LOG2_GS: tl.constexpr, BLOCK_R: tl.constexpr,
    NG: tl.constexpr,
):  # fmt: skip
    """Stage-1 backward: straight-through ``grad_w`` and LSQ-style per-group ``grad_s/z/o``.

    Equivalent torch math (``reference.fake_quant_backward``; ``s, z, o`` expanded to ``[R, K]``)::

        live = s != 0
        u = (w.float() + o) / torch.where(live, s, 1)
        r = torch.round(u)
        t = r + z
        inside = (t >= 0) & (t <= qmax) & live
        q = torch.where(live, torch.clamp(t, 0, qmax), z)
        grad_w = torch.where(inside, g, 0).to(w.dtype)
        grad_s = group_sum(g * torch.where(inside, r - u, q - z), gs)
        grad_z = group_sum(torch.where(inside, 0, g * -s), gs)
        grad_o = group_sum(torch.where(inside, 0, -g), gs)

    ``g`` is converted to float32 first; the per-group sums are float32 halving trees.
    """
    eoff, emask, poff, pmask = tile_offsets(R, K, KG, BLOCK_R, NG, GS)
    g = tl.load(g_ptr + eoff, mask=emask, other=0.0).to(tl.float32)  # [BLOCK_R, NG, GS]
    w = tl.load(w_ptr + eoff, mask=emask, other=0.0).to(tl.float32)  # [BLOCK_R, NG, GS]
    s = load_groups(s_ptr, poff, pmask, 1.0, BLOCK_R, NG, GS)
    z = load_groups(z_ptr, poff, pmask, 0.0, BLOCK_R, NG, GS)
    o = load_groups(o_ptr, poff, pmask, 0.0, BLOCK_R, NG, GS)
    live = s != 0.0
    u = tl.math.div_rn(w + o, tl.where(live, s, 1.0))
    r = rint(u)
    t = r + z
    inside = (t >= 0.0) & (t <= QMAX) & live
    q = tl.where(live, tl.minimum(tl.maximum(t, 0.0), QMAX), z)
    gw = tl.where(inside, g, 0.0)
    tl.store(gw_ptr + eoff, gw.to(gw_ptr.dtype.element_ty), mask=emask)
    d_s = g * tl.where(inside, r - u, q - z)
    d_z = tl.where(inside, 0.0, g * -s)
    d_o = tl.where(inside, 0.0, -g)
    tl.store(gs_ptr + poff, group_sum(d_s, BLOCK_R, NG, GS, LOG2_GS), mask=pmask)
    tl.store(gz_ptr + poff, group_sum(d_z, BLOCK_R, NG, GS, LOG2_GS), mask=pmask)
    tl.store(go_ptr + poff, group_sum(d_o, BLOCK_R, NG, GS, LOG2_GS), mask=pmask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _fwd_launch(
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    o: torch.Tensor,
    qmax: int,
    gs: int,
    want_out: bool,
    want_codes: bool,
    what: str,
    block_r: int | None,
    ng: int | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    check_qmax(what, qmax)
    rows, k = check_tensors(what, _fake_quant_fwd_kernel, {"w": (w, _WEIGHT_DTYPES)}, {"s": s, "z": z, "o": o}, gs)
    out = torch.empty_like(w) if want_out else None  # [R, K] w.dtype
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device) if want_codes else None  # [R, K]
    if rows == 0 or k == 0:
        return out, codes
    cfg = launch_config(rows, k // gs, gs, interpreting(_fake_quant_fwd_kernel), block_r, ng)
    grid = cfg.grid(rows, k // gs)
    check_grid(what, grid, k)
    with run_on(w.device):
        _fake_quant_fwd_kernel[grid](
            w, s, z, o, out if want_out else w, codes if want_codes else w,
            rows, k, k // gs,
            QMAX=float(qmax), GS=gs, BLOCK_R=cfg.block_r, NG=cfg.ng,
            WRITE_OUT=want_out, WRITE_CODES=want_codes,
            num_warps=cfg.num_warps, enable_fp_fusion=False,
        )  # fmt: skip
    return out, codes


def fake_quant_fwd(
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    o: torch.Tensor,
    qmax: int,
    gs: int,
    *,
    block_r: int | None = None,
    ng: int | None = None,
) -> torch.Tensor:
    """Fused stage-1 forward ``w' = s*(clamp(round((w+o)/s) + z, 0, qmax) - z) - o``.

    Bit-identical in float32 to ``reference.dequant(reference.quantize_codes(w, s, z, o, qmax, gs),
    s, z, o, gs)``.

    Args:
        w: latent weight ``[R, K]``, float32 / bfloat16 / float16, contiguous.
        s, z, o: per-group scale, zero point, offset ``[R, K/gs]`` float32, contiguous.
        qmax: largest code ``2**bits - 1``.
        gs: group size, a power of two 16..1024 dividing ``K``.
        block_r, ng: tile override (rows, groups per program); powers of two.

    Returns:
        The fake-quantized weight ``[R, K]`` in ``w``'s dtype (computed in float32).

    Raises:
        ShapeError: bad shapes, group size or qmax.
        BackendError: wrong dtype / device / layout, or CPU tensors outside the interpreter.
    """
    out, _ = _fwd_launch(w, s, z, o, qmax, gs, True, False, "fake_quant_fwd", block_r, ng)
    return out  # type: ignore[return-value]  # not None: want_out=True


def fake_quant_codes(
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    o: torch.Tensor,
    qmax: int,
    gs: int,
    *,
    block_r: int | None = None,
    ng: int | None = None,
) -> torch.Tensor:
    """The codes the forward uses, ``clamp(round((w+o)/s) + z, 0, qmax)`` (``z`` where ``s == 0``).

    Same arguments and errors as :func:`fake_quant_fwd`; equals ``reference.quantize_codes(...)``.

    Returns:
        Codes ``[R, K]`` uint8 in ``0..qmax``.
    """
    _, codes = _fwd_launch(w, s, z, o, qmax, gs, False, True, "fake_quant_codes", block_r, ng)
    return codes  # type: ignore[return-value]  # not None: want_codes=True


def fake_quant_bwd(
    g: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    o: torch.Tensor,
    qmax: int,
    gs: int,
    *,
    block_r: int | None = None,
    ng: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused stage-1 backward: one pass over ``g`` and ``w``, per-group sums reduced in the kernel.

    Bit-identical in float32 to ``reference.fake_quant_backward(g, w, s, z, o, qmax, gs)``.

    Args:
        g: gradient of the fake-quantized weight ``[R, K]`` (any float dtype), contiguous.
        w, s, z, o, qmax, gs, block_r, ng: as in :func:`fake_quant_fwd`.

    Returns:
        ``grad_w`` ``[R, K]`` in ``w``'s dtype, and ``grad_s``, ``grad_z``, ``grad_o`` ``[R, K/gs]``
        float32.

    Raises:
        ShapeError: bad shapes, group size or qmax.
        BackendError: wrong dtype / device / layout, or CPU tensors outside the interpreter.
    """
    what = "fake_quant_bwd"
    check_qmax(what, qmax)
    rows, k = check_tensors(
        what, _fake_quant_bwd_kernel, {"w": (w, _WEIGHT_DTYPES), "g": (g, _WEIGHT_DTYPES)}, {"s": s, "z": z, "o": o}, gs
    )
    grad_w = torch.empty_like(w)  # [R, K]
    grad_s, grad_z, grad_o = (torch.empty_like(s) for _ in range(3))  # [R, K/gs]
    if rows == 0 or k == 0:
        return grad_w, grad_s, grad_z, grad_o
    cfg = launch_config(rows, k // gs, gs, interpreting(_fake_quant_bwd_kernel), block_r, ng)
    grid = cfg.grid(rows, k // gs)
    check_grid(what, grid, k)
    with run_on(w.device):
        _fake_quant_bwd_kernel[grid](
            g, w, s, z, o, grad_w, grad_s, grad_z, grad_o,
            rows, k, k // gs,
            QMAX=float(qmax), GS=gs, LOG2_GS=gs.bit_length() - 1, BLOCK_R=cfg.block_r, NG=cfg.ng,
            num_warps=cfg.num_warps, enable_fp_fusion=False,
        )  # fmt: skip
    return grad_w, grad_s, grad_z, grad_o


class FakeQuantTritonFn(torch.autograd.Function):
    """Stage-1 fake quantization on Triton; same signature and results as ``reference.FakeQuantFn``.

    ``FakeQuantTritonFn.apply(w, s, z, o, qmax, gs)`` returns ``w'`` in ``w``'s dtype; the backward
    returns ``grad_w`` (``w``'s dtype) and float32 ``grad_s``, ``grad_z``, ``grad_o``.
    """

    @staticmethod
    def forward(ctx, w, s, z, o, qmax: int, gs: int):  # type: ignore[override]
        out = fake_quant_fwd(w, s, z, o, qmax, gs)
        ctx.save_for_backward(w, s, z, o)
        ctx.qmax, ctx.gs = qmax, gs
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        w, s, z, o = ctx.saved_tensors
        grads = fake_quant_bwd(g.contiguous(), w, s, z, o, ctx.qmax, ctx.gs)
        gw, g_s, g_z, g_o = (gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[:4]))
        return gw, g_s, g_z, g_o, None, None
