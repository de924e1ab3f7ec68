"""A faithful port of ggml's k-quant reference quantizers, in vectorized PyTorch.

:func:`llamacpp_q2_k` and :func:`llamacpp_q3_k` port ``quantize_row_q2_K_ref`` /
``quantize_row_q3_K_ref`` (ggml/src/ggml-quants.c, no importance matrix). They repeat ggml's
float32 arithmetic step by step (same operation order, sequential sums over the 16 weights of a
sub-block, ``nearest_int``'s ``12582912`` trick, fp16 rounding of ``d``/``dmin``), so ``d``,
``dmin`` and the sub-scales/sub-mins equal ggml's bytes (checked through ctypes in the tests). The
codes are re-derived with the training forward's rounding
(:func:`rqat_deploy.quant.grids.kquant.q2_k_codes`); they equal ggml's wherever a sub-scale is
non-zero (ggml keeps stale codes in a zero-scale sub-block, which decodes to the same value
whatever its codes).

Everything is vectorized over all sub-blocks of the matrix; the only Python loops run over the 16
positions of a sub-block (ggml's sequential sums and coordinate descent). Conditions are int32 0/1
tensors (:func:`cmp_mask`, :func:`bit_select`): bool tensors are slow in this CPU build of PyTorch.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from rqat_deploy.quant.grids.kquant import (
    K_SUB,
    N_SUB,
    QK_K,
    KQuantParams,
    check_kquant_weight,
    q2_k_params,
    q3_k_params,
)

_GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml's GROUP_MAX_EPS (1e-15f)
_F32 = torch.float32

__all__ = ["bit_select", "cmp_mask", "llamacpp_q2_k", "llamacpp_q3_k", "nearest_int", "q2_k_port", "q3_k_port"]


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: ``bits(f + 12582912.f) & 0x7fffff - 0x400000`` (int32).

    Round half to even for ``|f| <= 4194303``; outside that range it reproduces ggml's
    (meaningless but deterministic) result bit for bit.
    """
    return ((f + 12582912.0).view(torch.int32) & 0x007FFFFF) - 0x00400000


def _nint_clamp(f: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``MAX(lo, MIN(hi, nearest_int(f)))`` as float32 integers."""
    return torch.clamp(nearest_int(f), lo, hi).to(_F32)


def _full(ref: torch.Tensor, value: float) -> torch.Tensor:
    """A float32 tensor like ``ref`` filled with ``value`` (so ``c / t`` is a true IEEE division;
    ``python_scalar / tensor`` would be computed as ``reciprocal(t) * c``)."""
    return torch.full_like(ref, float(np.float32(value)), dtype=_F32)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 like ``GGML_FP32_TO_FP16`` (round to nearest even, overflow to inf)."""
    return x.to(torch.float16)


def cmp_mask(op: Callable[..., torch.Tensor], a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """``op(a, b)`` (``torch.gt``, ``torch.lt``...) as an int32 0/1 tensor.

    Bool tensors are slow in this CPU build of PyTorch (``torch.where`` costs ~30x a multiply),
    so conditions are kept as int32 and combined with ``&``, ``|``, ``^``.
    """
    shape = torch.broadcast_shapes(a.shape, b.shape if isinstance(b, torch.Tensor) else ())
    return op(a, b, out=torch.empty(shape, dtype=torch.int32, device=a.device))


def bit_select(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``where(c, a, b)`` for an int32 0/1 condition and float32 ``a``, ``b`` (bit select,
    so NaN, inf and signed zeros pass through unchanged)."""
    ai, bi = a.view(torch.int32), b.view(torch.int32)
    return (((ai ^ bi) & c.neg()) ^ bi).view(torch.float32)


# ---------------------------------------------------------------------------------------------
# llama.cpp port: Q2_K
# ---------------------------------------------------------------------------------------------


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """``s = t[0]; s += t[1]; ...`` over dim 0 in float32 (C's sequential loop order)."""
    s = t[0].clone()
    for i in range(1, t.shape[0]):
        s = s + t[i]
    return s


_NINT_SAFE = 4.0e6  # below ggml's nearest_int limit (4194303) with margin for rounding


def _round_like_nint(f: torch.Tensor, bound: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``MAX(lo, MIN(hi, nearest_int(f)))`` as float32, fast path.

    ``bound`` ``[B]`` bounds ``|f|`` per sub-block (column); where every bound is in
    ``nearest_int``'s exact range, ``torch.round`` (half to even) is identical and cheaper.
    """
    if float(bound.amax()) <= _NINT_SAFE:  # NaN fails the test
        return torch.round(f).clamp_(lo, hi)
    return _nint_clamp(f, lo, hi)


def _make_qkx2_quants(xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_qkx2_quants(16, 3, x, |x|, L, &min, Laux, -0.5f, 0.1f, 15, true)``.

    Args:
        xt: sub-blocks transposed, ``[16, B]`` (position-major, so column sums are sequential).

    Returns:
        ``(scale, the_min)``, each ``[B]`` float32.
    """
    wt = xt.abs()  # [16, B] weights = |x|
    xmin = xt.amin(0)  # [B]
    mx = xt.amax(0)
    sum_w = _seq_sum(wt)
    sum_x = _seq_sum(wt * xt)
    zero = torch.zeros_like(mx)
    one = torch.ones_like(mx)
    mn = bit_select(cmp_mask(torch.gt, xmin, 0.0), zero, xmin)
    degenerate = cmp_mask(torch.eq, mx, mn)
    live = degenerate ^ 1
    rng = bit_select(degenerate, one, mx - mn)
    iscale = torch.div(_full(rng, 3.0), rng)
    scale = torch.div(one, iscale)
    f = xt - mn
    lv = _round_like_nint(f.mul_(iscale), iscale.abs() * (mx - mn).abs(), 0, 3)  # [16, B]
    t = (lv * scale).add_(mn).sub_(xt).abs_().mul_(wt)
    best = _seq_sum(t)
    for step in range(16):
        num = np.float32(-0.5) + np.float32(0.1) * np.float32(step) + np.float32(3.0)
        span = mx - mn  # ggml divides by the *current* min, updated below
        iscale = torch.div(_full(span, float(num)), bit_select(degenerate, one, span))
        bound = iscale.abs() * torch.maximum(span.abs(), (xmin - mn).abs())
        torch.sub(xt, mn, out=f)
        la = _round_like_nint(f.mul_(iscale), bound, 0, 3)  # [16, B]
        wl = wt * la
        sum_l = _seq_sum(wl)
        sum_xl = _seq_sum(torch.mul(wl, xt, out=t))
        sum_l2 = _seq_sum(wl.mul_(la))
        dd = sum_w * sum_l2 - sum_l * sum_l
        dpos = cmp_mask(torch.gt, dd, 0.0)
        dsafe = bit_select(dpos, dd, one)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / dsafe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dsafe
        clip = cmp_mask(torch.gt, this_min, 0.0)
        this_scale = bit_select(clip, sum_xl / bit_select(cmp_mask(torch.ne, sum_l2, 0.0), sum_l2, one), this_scale)
        this_min = bit_select(clip, zero, this_min)
        torch.mul(la, this_scale, out=t)
        cur = _seq_sum(t.add_(this_min).sub_(xt).abs_().mul_(wt))
        upd = dpos & cmp_mask(torch.lt, cur, best) & live
        scale = bit_select(upd, this_scale, scale)
        mn = bit_select(upd, this_min, mn)
        best = bit_select(upd, cur, best)
    scale = bit_select(degenerate, zero, scale)
    return scale, -mn


def _by_chunks(fn: Callable[[torch.Tensor], Any], xt: torch.Tensor, chunk: int = 1 << 15) -> Any:
    """Apply ``fn`` to column chunks of ``xt`` ``[16, B]`` (cache-sized) and concatenate."""
    if xt.shape[1] <= chunk:
        return fn(xt)
    parts = [fn(xt[:, i : i + chunk].contiguous()) for i in range(0, xt.shape[1], chunk)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def q2_k_port(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run the Q2_K port on a checked float32 weight ``[out, in]``.

    Returns:
        ``d``, ``dmin`` float16 ``[out, in/256]``; ``sub_scales``, ``sub_mins`` uint8
        ``[out, in/16]``; the continuous per-sub-block ``scales``, ``mins`` float32 ``[out, in/16]``.
    """
    out, k = w.shape
    xt = w.reshape(-1, K_SUB).t().contiguous()  # [16, B]
    scales, mins = _by_chunks(_make_qkx2_quants, xt)  # [B]
    scales = scales.reshape(-1, N_SUB)  # [S, 16]
    mins = mins.reshape(-1, N_SUB)
    max_scale = scales.amax(-1).clamp(min=0)  # [S] ("if (scale > max_scale)" from 0)
    max_min = mins.amax(-1).clamp(min=0)
    has_s = max_scale > 0
    has_m = max_min > 0
    ms = torch.where(has_s, max_scale, torch.ones_like(max_scale))[:, None]  # [S, 1]
    mm = torch.where(has_m, max_min, torch.ones_like(max_min))[:, None]
    ls = nearest_int(torch.div(_full(ms, 15.0), ms) * scales)  # [S, 16] int32
    lm = nearest_int(torch.div(_full(mm, 15.0), mm) * mins)
    byte = torch.where(has_s[:, None], ls & 0xFF, torch.zeros_like(ls))  # uint8 assignment
    byte = torch.where(has_m[:, None], (byte | (lm << 4)) & 0xFF, byte)
    zero16 = torch.zeros_like(max_scale, dtype=torch.float16)
    d = torch.where(has_s, _fp16(torch.div(max_scale, _full(max_scale, 15.0))), zero16)
    dmin = torch.where(has_m, _fp16(torch.div(max_min, _full(max_min, 15.0))), zero16)
    sc = (byte & 0xF).to(torch.uint8).reshape(out, k // K_SUB)
    m = (byte >> 4).to(torch.uint8).reshape(out, k // K_SUB)
    nsb = k // QK_K
    return (
        d.reshape(out, nsb),
        dmin.reshape(out, nsb),
        sc,
        m,
        scales.reshape(out, k // K_SUB),
        mins.reshape(out, k // K_SUB),
    )


def llamacpp_q2_k(w: torch.Tensor) -> KQuantParams:
    """Q2_K parameters exactly as llama.cpp's ``quantize_row_q2_K_ref`` chooses them.

    A faithful port (no importance matrix): ``d``, ``dmin``, sub-scales and sub-mins equal the
    bytes ggml writes; ``qcodes`` are the forward's codes for those parameters (equal to ggml's
    wherever a sub-scale is non-zero). Like ggml, an fp16 overflow of ``d`` (weights beyond about
    1e6) gives ``inf``.

    Args:
        w: weight ``[out, in]`` (any float dtype), ``in % 256 == 0``.

    Returns:
        :class:`KQuantParams` with ``bits=2``.

    Raises:
        ShapeError: ``w`` is not 2-D or ``in`` is not a multiple of 256.
    """
    x = check_kquant_weight(w, "Q2_K")
    d, dmin, sc, m, _, _ = q2_k_port(x)
    return q2_k_params(x, d, dmin, sc, m)


# ---------------------------------------------------------------------------------------------
# llama.cpp port: Q3_K
# ---------------------------------------------------------------------------------------------


def _q3_pass(
    x: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, lv: torch.Tensor,
    sumlx: torch.Tensor, suml2: torch.Tensor, mask: torch.Tensor,
) -> torch.Tensor:
    """One pass of ``make_q3_quants``' coordinate descent over the 16 positions (in place).

    Args:
        x, w, wx: ``[16, A]`` values, ``x*x`` and ``x*x*x`` (ggml's ``w*x[i]``).
        lv: ``[16, A]`` current levels -4..3 (float32), updated in place.
        sumlx, suml2: ``[A]`` running sums, updated in place.
        mask: ``[A]`` int32 0/1, sub-blocks taking part.

    Returns:
        ``[A]`` int32 0/1, whether any level of the sub-block changed in this pass.
    """
    changed = torch.zeros_like(mask)
    one = torch.ones_like(sumlx)
    for i in range(x.shape[0]):
        li = lv[i]
        slx = sumlx - wx[i] * li
        pos = cmp_mask(torch.gt, slx, 0.0)
        sl2 = suml2 - (w[i] * li) * li
        new_l = _nint_clamp((x[i] * sl2) / bit_select(pos, slx, one), -4, 3)
        slx_n = slx + wx[i] * new_l
        sl2_n = sl2 + (w[i] * new_l) * new_l
        upd = (
            mask
            & pos
            & cmp_mask(torch.ne, new_l, li)
            & cmp_mask(torch.gt, sl2_n, 0.0)
            & cmp_mask(torch.gt, (slx_n * slx_n) * suml2, (sumlx * sumlx) * sl2_n)
        )
        lv[i] = bit_select(upd, new_l, li)
        sumlx.copy_(bit_select(upd, slx_n, sumlx))
        suml2.copy_(bit_select(upd, sl2_n, suml2))
        changed |= upd
    return changed


def _make_q3_quants(xt: torch.Tensor) -> torch.Tensor:
    """ggml's ``make_q3_quants(16, 4, x, L, true)``: the sub-block scale, ``[B]`` float32.

    The coordinate descent is sequential over the 16 positions (a Python loop) and vectorized
    over sub-blocks; a sub-block stops after a pass without change, as in ggml (after the first
    pass the few sub-blocks still changing are gathered and iterate alone).

    Args:
        xt: sub-blocks transposed, ``[16, B]``.
    """
    ax = xt.abs()
    idx = ax.argmax(0)  # first index of the largest |x|
    amax = ax.gather(0, idx[None])[0]  # [B]
    mx = xt.gather(0, idx[None])[0]
    one = torch.ones_like(mx)
    live = cmp_mask(torch.ge, amax, _GROUP_MAX_EPS)
    iscale = torch.div(_full(mx, -4.0), bit_select(live, mx, one))
    lv = _nint_clamp(iscale * xt, -4, 3)  # [16, B]
    wt = xt * xt
    wx = wt * xt  # [16, B] (w*x[i])
    sumlx = _seq_sum(wx * lv)
    suml2 = _seq_sum((wt * lv) * lv)
    changed = _q3_pass(xt, wt, wx, lv, sumlx, suml2, live)
    active = changed.nonzero().squeeze(1)  # sub-blocks still iterating
    for _ in range(4):
        if active.numel() == 0:
            break
        la, slx, sl2 = lv[:, active], sumlx[active], suml2[active]
        every = torch.ones_like(active, dtype=torch.int32)
        changed = _q3_pass(xt[:, active], wt[:, active], wx[:, active], la, slx, sl2, every)
        lv[:, active] = la
        sumlx[active] = slx
        suml2[active] = sl2
        active = active[changed.nonzero().squeeze(1)]
    pos = cmp_mask(torch.gt, suml2, 0.0)
    scale = bit_select(pos, sumlx / bit_select(pos, suml2, one), torch.zeros_like(sumlx))
    return bit_select(live, scale, torch.zeros_like(scale))


def q3_k_port(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the Q3_K port on a checked float32 weight ``[out, in]``.

    Returns:
        ``d`` float16 ``[out, in/256]``, ``sub_scales`` int8 ``[out, in/16]`` and the continuous
        per-sub-block scales float32 ``[out, in/16]``.
    """
    out, k = w.shape
    xt = w.reshape(-1, K_SUB).t().contiguous()  # [16, B]
    scales = _by_chunks(_make_q3_quants, xt).reshape(-1, N_SUB)  # [S, 16]
    idx = scales.abs().argmax(-1, keepdim=True)  # first largest |scale|
    max_scale = scales.gather(-1, idx)  # [S, 1]
    live = max_scale != 0
    ms = torch.where(live, max_scale, torch.ones_like(max_scale))
    iscale = torch.div(_full(ms, -32.0), ms)  # [S, 1]
    sc = torch.clamp(nearest_int(iscale * scales), -32, 31)  # [S, 16]
    sc = torch.where(live, sc, torch.full_like(sc, -32))  # zeroed bytes decode to -32
    zero16 = torch.zeros_like(ms, dtype=torch.float16)
    d = torch.where(live, _fp16(torch.div(_full(iscale, 1.0), iscale)), zero16)
    return (
        d.reshape(out, k // QK_K),
        sc.to(torch.int8).reshape(out, k // K_SUB),
        scales.reshape(out, k // K_SUB),
    )


def llamacpp_q3_k(w: torch.Tensor) -> KQuantParams:
    """Q3_K parameters exactly as llama.cpp's ``quantize_row_q3_K_ref`` chooses them.

    A faithful port (no importance matrix): ``d`` and the sub-scales equal ggml's bytes (an
    all-zero super-block gets ``d = 0`` and sub-scales ``-32``, ggml's zeroed bytes); ``qcodes``
    are the forward's codes (equal to ggml's wherever ``d * sub_scale != 0``).

    Args:
        w: weight ``[out, in]`` (any float dtype), ``in % 256 == 0``.

    Returns:
        :class:`KQuantParams` with ``bits=3``.

    Raises:
        ShapeError: ``w`` is not 2-D or ``in`` is not a multiple of 256.
    """
    x = check_kquant_weight(w, "Q3_K")
    d, sc, _ = q3_k_port(x)
    return q3_k_params(x, d, sc)
