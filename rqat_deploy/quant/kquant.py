"""Initial parameters of llama.cpp's k-quant grids (Q2_K, Q3_K), in pure PyTorch.

Two families of functions:

- :func:`llamacpp_q2_k`, :func:`llamacpp_q3_k`: vectorized ports of ggml's reference quantizers
  ``quantize_row_q2_K_ref`` / ``quantize_row_q3_K_ref`` (ggml/src/ggml-quants.c, no importance
  matrix). They repeat ggml's float32 arithmetic step by step (same operation order, sequential
  sums over the 16 weights of a sub-block, ``nearest_int``'s ``12582912`` trick, fp16 rounding of
  ``d``/``dmin``), so ``d``, ``dmin`` and the sub-scales/sub-mins equal ggml's bytes. The codes are
  re-derived with the training forward's rounding (:func:`rqat_deploy.quant.reference.q2_k_codes`); they
  equal ggml's wherever a sub-scale is non-zero (ggml keeps stale codes in a zero-scale sub-block,
  which decodes to the same value whatever its codes).
- :func:`init_q2_k`, :func:`init_q3_k`: our search. Starting from the port, refine per-sub-block
  scales by least squares, search ``d``/``dmin`` on a grid, pick integer sub-scales under an exact
  quadratic error model, refit ``d``/``dmin`` in closed form, re-round, iterate; every candidate is
  scored by exact weight MSE after fp16 rounding and the best one is kept *per super-block*, the
  port's result included, so the search is never worse than llama.cpp on any 256-weight block.

Everything is vectorized over all (sub-)blocks of the matrix; the only Python loops run over the
16 positions of a sub-block (ggml's sequential sums and coordinate descent) or over a few
candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from rqat_deploy.quant import reference
from rqat_deploy.errors import ConfigError, ShapeError

QK_K = reference.QK_K  # 256 weights per super-block
K_SUB = reference.K_SUB  # 16 weights per sub-block
N_SUB = QK_K // K_SUB  # 16 sub-blocks per super-block
FP16_MAX = reference.FP16_MAX
_GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml's GROUP_MAX_EPS (1e-15f)
_F32 = torch.float32

__all__ = [
    "KQuantParams",
    "llamacpp_q2_k",
    "llamacpp_q3_k",
    "init_q2_k",
    "init_q3_k",
    "superblock_sse",
]


# ---------------------------------------------------------------------------------------------
# result type
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KQuantParams:
    """Quantized parameters of one weight matrix in a k-quant grid (DESIGN.md 3).

    Attributes:
        bits: 2 (Q2_K) or 3 (Q3_K).
        qcodes: uint8 ``[out, in]``; 0..3 (Q2_K) or 0..7 meaning ``q - 4`` (Q3_K).
        d: float16 ``[out, in/256]`` super-block scale.
        dmin: float16 ``[out, in/256]`` super-block min scale (Q2_K), ``None`` for Q3_K.
        sub_scales: ``[out, in/16]``; uint8 0..15 (Q2_K) or int8 -32..31 (Q3_K).
        sub_mins: uint8 ``[out, in/16]`` 0..15 (Q2_K), ``None`` for Q3_K.
    """

    bits: int
    qcodes: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor | None
    sub_scales: torch.Tensor
    sub_mins: torch.Tensor | None

    def __post_init__(self) -> None:
        """Check bit width, dtypes and shapes (not value ranges, which would cost a full pass).

        Raises:
            ConfigError: ``bits`` is not 2 or 3.
            ShapeError: a tensor has the wrong dtype or shape, or ``dmin``/``sub_mins`` are
                missing for Q2_K or present for Q3_K.
        """
        if self.bits not in (2, 3):
            raise ConfigError(f"k-quant bits must be 2 (Q2_K) or 3 (Q3_K), got {self.bits}")
        if self.qcodes.dim() != 2 or self.qcodes.shape[1] % QK_K:
            raise ShapeError(f"qcodes must be [out, in] with in % {QK_K} == 0, got {tuple(self.qcodes.shape)}")
        out, k = self.qcodes.shape
        q2 = self.bits == 2
        expect = {
            "qcodes": (self.qcodes, torch.uint8, (out, k)),
            "d": (self.d, torch.float16, (out, k // QK_K)),
            "sub_scales": (self.sub_scales, torch.uint8 if q2 else torch.int8, (out, k // K_SUB)),
        }
        if q2:
            expect["dmin"] = (self.dmin, torch.float16, (out, k // QK_K))
            expect["sub_mins"] = (self.sub_mins, torch.uint8, (out, k // K_SUB))
        elif self.dmin is not None or self.sub_mins is not None:
            raise ShapeError("Q3_K parameters have no dmin / sub_mins; pass None")
        for name, (t, dtype, shape) in expect.items():
            if t is None or t.dtype != dtype or tuple(t.shape) != shape:
                got = None if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise ShapeError(f"Q{self.bits}_K {name} must be {dtype} {shape}, got {got}")

    def dequantize(self) -> torch.Tensor:
        """The dequantized weight, float32 ``[out, in]`` (the reference formula, DESIGN.md 3)."""
        if self.bits == 2:
            assert self.dmin is not None and self.sub_mins is not None  # checked in __post_init__
            return reference.dequantize_q2_k(self.qcodes, self.d, self.dmin, self.sub_scales, self.sub_mins)
        return reference.dequantize_q3_k(self.qcodes, self.d, self.sub_scales)


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def _check_weight(w: torch.Tensor, grid: str) -> torch.Tensor:
    """Validate ``w`` ``[out, in]`` for a k-quant grid and return it detached in float32."""
    if w.dim() != 2:
        raise ShapeError(f"{grid} needs a 2-D weight [out, in], got shape {tuple(w.shape)}")
    k = w.shape[1]
    if k == 0 or k % QK_K:
        raise ShapeError(
            f"{grid} packs the input dimension in super-blocks of {QK_K}, but in_features is {k} "
            f"(not a multiple of {QK_K}); use the uniform grid (--grid uniform) for this module "
            "or leave it unquantized"
        )
    return w.detach().to(_F32).contiguous()


def _nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: ``bits(f + 12582912.f) & 0x7fffff - 0x400000`` (int32).

    Round half to even for ``|f| <= 4194303``; outside that range it reproduces ggml's
    (meaningless but deterministic) result bit for bit.
    """
    return ((f + 12582912.0).view(torch.int32) & 0x007FFFFF) - 0x00400000


def _nint_clamp(f: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``MAX(lo, MIN(hi, nearest_int(f)))`` as float32 integers."""
    return torch.clamp(_nearest_int(f), lo, hi).to(_F32)


def _full(ref: torch.Tensor, value: float) -> torch.Tensor:
    """A float32 tensor like ``ref`` filled with ``value`` (so ``c / t`` is a true IEEE division;
    ``python_scalar / tensor`` would be computed as ``reciprocal(t) * c``)."""
    return torch.full_like(ref, float(np.float32(value)), dtype=_F32)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 like ``GGML_FP32_TO_FP16`` (round to nearest even, overflow to inf)."""
    return x.to(torch.float16)


def _fp16_sat(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16, saturating at +-65504 and mapping NaN to 0 (for our search only)."""
    return torch.nan_to_num(x, nan=0.0).clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def _safe_div(num: torch.Tensor, den: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den != 0`` and the result is finite, else ``fallback``."""
    ok = den != 0
    q = num / torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok & torch.isfinite(q), q, fallback)


def _cmp(op: Callable[..., torch.Tensor], a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """``op(a, b)`` (``torch.gt``, ``torch.lt``...) as an int32 0/1 tensor.

    Bool tensors are slow in this CPU build of PyTorch (``torch.where`` costs ~30x a multiply),
    so conditions are kept as int32 and combined with ``&``, ``|``, ``^``.
    """
    shape = torch.broadcast_shapes(a.shape, b.shape if isinstance(b, torch.Tensor) else ())
    return op(a, b, out=torch.empty(shape, dtype=torch.int32, device=a.device))


def _sel(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``where(c, a, b)`` for an int32 0/1 condition and float32 ``a``, ``b`` (bit select,
    so NaN, inf and signed zeros pass through unchanged)."""
    ai, bi = a.view(torch.int32), b.view(torch.int32)
    return (((ai ^ bi) & c.neg()) ^ bi).view(torch.float32)


def superblock_sse(w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """Squared error per 256-weight super-block, in float64.

    Args:
        w: weight ``[out, in]``.
        w_hat: its dequantized approximation ``[out, in]``.

    Returns:
        ``[out, in/256]`` float64 sums of ``(w_hat - w)**2``; NaN (from an fp16 overflow) is
        reported as ``inf``.
    """
    out, k = w.shape
    e = (w_hat.to(torch.float64) - w.to(torch.float64)).square()  # [out, in]
    sse = e.reshape(out, k // QK_K, QK_K).sum(-1)  # [out, in/256]
    return torch.nan_to_num(sse, nan=float("inf"))


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
    mn = _sel(_cmp(torch.gt, xmin, 0.0), zero, xmin)
    degenerate = _cmp(torch.eq, mx, mn)
    live = degenerate ^ 1
    rng = _sel(degenerate, one, mx - mn)
    iscale = torch.div(_full(rng, 3.0), rng)
    scale = torch.div(one, iscale)
    f = xt - mn
    lv = _round_like_nint(f.mul_(iscale), iscale.abs() * (mx - mn).abs(), 0, 3)  # [16, B]
    t = (lv * scale).add_(mn).sub_(xt).abs_().mul_(wt)
    best = _seq_sum(t)
    for step in range(16):
        num = np.float32(-0.5) + np.float32(0.1) * np.float32(step) + np.float32(3.0)
        span = mx - mn  # ggml divides by the *current* min, updated below
        iscale = torch.div(_full(span, float(num)), _sel(degenerate, one, span))
        bound = iscale.abs() * torch.maximum(span.abs(), (xmin - mn).abs())
        torch.sub(xt, mn, out=f)
        la = _round_like_nint(f.mul_(iscale), bound, 0, 3)  # [16, B]
        wl = wt * la
        sum_l = _seq_sum(wl)
        sum_xl = _seq_sum(torch.mul(wl, xt, out=t))
        sum_l2 = _seq_sum(wl.mul_(la))
        dd = sum_w * sum_l2 - sum_l * sum_l
        dpos = _cmp(torch.gt, dd, 0.0)
        dsafe = _sel(dpos, dd, one)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / dsafe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dsafe
        clip = _cmp(torch.gt, this_min, 0.0)
        this_scale = _sel(clip, sum_xl / _sel(_cmp(torch.ne, sum_l2, 0.0), sum_l2, one), this_scale)
        this_min = _sel(clip, zero, this_min)
        torch.mul(la, this_scale, out=t)
        cur = _seq_sum(t.add_(this_min).sub_(xt).abs_().mul_(wt))
        upd = dpos & _cmp(torch.lt, cur, best) & live
        scale = _sel(upd, this_scale, scale)
        mn = _sel(upd, this_min, mn)
        best = _sel(upd, cur, best)
    scale = _sel(degenerate, zero, scale)
    return scale, -mn


def _by_chunks(fn: Callable[[torch.Tensor], Any], xt: torch.Tensor, chunk: int = 1 << 15) -> Any:
    """Apply ``fn`` to column chunks of ``xt`` ``[16, B]`` (cache-sized) and concatenate."""
    if xt.shape[1] <= chunk:
        return fn(xt)
    parts = [fn(xt[:, i : i + chunk].contiguous()) for i in range(0, xt.shape[1], chunk)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def _q2_k_port(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
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
    ls = _nearest_int(torch.div(_full(ms, 15.0), ms) * scales)  # [S, 16] int32
    lm = _nearest_int(torch.div(_full(mm, 15.0), mm) * mins)
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


def _q2_params(
    w: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor
) -> KQuantParams:
    qcodes = reference.q2_k_codes(w, d, dmin, sc, m)
    return KQuantParams(bits=2, qcodes=qcodes, d=d, dmin=dmin, sub_scales=sc, sub_mins=m)


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
    x = _check_weight(w, "Q2_K")
    d, dmin, sc, m, _, _ = _q2_k_port(x)
    return _q2_params(x, d, dmin, sc, m)


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
        pos = _cmp(torch.gt, slx, 0.0)
        sl2 = suml2 - (w[i] * li) * li
        new_l = _nint_clamp((x[i] * sl2) / _sel(pos, slx, one), -4, 3)
        slx_n = slx + wx[i] * new_l
        sl2_n = sl2 + (w[i] * new_l) * new_l
        upd = (
            mask
            & pos
            & _cmp(torch.ne, new_l, li)
            & _cmp(torch.gt, sl2_n, 0.0)
            & _cmp(torch.gt, (slx_n * slx_n) * suml2, (sumlx * sumlx) * sl2_n)
        )
        lv[i] = _sel(upd, new_l, li)
        sumlx.copy_(_sel(upd, slx_n, sumlx))
        suml2.copy_(_sel(upd, sl2_n, suml2))
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
    live = _cmp(torch.ge, amax, _GROUP_MAX_EPS)
    iscale = torch.div(_full(mx, -4.0), _sel(live, mx, one))
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
    pos = _cmp(torch.gt, suml2, 0.0)
    scale = _sel(pos, sumlx / _sel(pos, suml2, one), torch.zeros_like(sumlx))
    return _sel(live, scale, torch.zeros_like(scale))


def _q3_k_port(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    sc = torch.clamp(_nearest_int(iscale * scales), -32, 31)  # [S, 16]
    sc = torch.where(live, sc, torch.full_like(sc, -32))  # zeroed bytes decode to -32
    zero16 = torch.zeros_like(ms, dtype=torch.float16)
    d = torch.where(live, _fp16(torch.div(_full(iscale, 1.0), iscale)), zero16)
    return (
        d.reshape(out, k // QK_K),
        sc.to(torch.int8).reshape(out, k // K_SUB),
        scales.reshape(out, k // K_SUB),
    )


def _q3_params(w: torch.Tensor, d: torch.Tensor, sc: torch.Tensor) -> KQuantParams:
    qcodes = reference.q3_k_codes(w, d, sc)
    return KQuantParams(bits=3, qcodes=qcodes, d=d, dmin=None, sub_scales=sc, sub_mins=None)


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
    x = _check_weight(w, "Q3_K")
    d, sc, _ = _q3_k_port(x)
    return _q3_params(x, d, sc)


# ---------------------------------------------------------------------------------------------
# our search: shared pieces
# ---------------------------------------------------------------------------------------------
#
# Candidate generation below is heuristic and uses plain arithmetic (masks as 0/1 floats, argmin
# over stacked candidates); only the final per-super-block choice needs exact arithmetic, and it
# scores every candidate with the forward's own codes and dequantization in float64.

_CHUNK = 4096  # super-blocks refined together (1M weights: cache-friendly, bounded memory)
_BIG = float(torch.finfo(torch.float32).max)  # error of an invalid candidate
# per-sub-block continuous search: scale multipliers of the range-based start, offsets in codes
_Q2_SCALE_GRID = (0.85, 1.0, 1.15, 1.3)
_Q2_OFFSET_GRID = (-0.25, 0.0, 0.25)
_Q3_SCALE_GRID = (0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
# super-block search: multipliers of "largest sub-block scale / largest sub-scale"
_Q2_D_GRID = (0.88, 0.94, 1.0, 1.06)
_Q2_DMIN_GRID = (0.94, 1.0, 1.06)
_Q3_D_GRID = (0.85, 0.9, 0.95, 1.0, 1.05, 1.1)
_LLOYD_STEPS = 2


def _fmask(op: Callable[..., torch.Tensor], a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """``op(a, b)`` as a float32 0/1 tensor (fast, unlike bool tensors)."""
    shape = torch.broadcast_shapes(a.shape, b.shape if isinstance(b, torch.Tensor) else ())
    return op(a, b, out=torch.empty(shape, dtype=_F32, device=a.device))


def _argmin_pick(errs: list[torch.Tensor], *cands: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Per element, the candidate of lowest error (first on ties).

    Args:
        errs: K error tensors of one shape ``E``.
        cands: lists of K tensors each, of shape ``E`` or ``E + [16]`` (broadcast along the last
            dim).

    Returns:
        ``(best_err, *best_values)``.
    """
    e = torch.stack(errs)  # [K, *E]
    emin = e.amin(0, keepdim=True)  # [1, *E] (argmin over a leading dim is slow on CPU)
    rank = torch.arange(len(errs), 0, -1, dtype=_F32, device=e.device)
    rank = rank.view(-1, *([1] * (e.dim() - 1)))  # [K, 1, ...]: K for the first candidate
    first = _fmask(torch.eq, e, emin).mul_(rank).amax(0, keepdim=True)  # K - index of first min
    idx = (len(errs) - first).long().clamp_(0, len(errs) - 1)  # [1, *E]
    out = [emin[0]]
    for c in cands:
        v = torch.stack(c)  # [K, *E] or [K, *E, 16]
        i = idx if v.dim() == e.dim() else idx[..., None].expand(1, *v.shape[1:])
        out.append(v.gather(0, i)[0])
    return tuple(out)


def _keep_better(err: torch.Tensor, best_err: torch.Tensor, cand: tuple, best: tuple) -> tuple:
    """Exact per-super-block choice: ``cand`` where ``err < best_err`` (``[S]``), else ``best``.

    Values are float32 tensors ``[S]`` or ``[S, 16]``; returns ``(best_err, best)``.
    """
    take = _cmp(torch.lt, err, best_err)  # [S] int32
    new = tuple(_sel(take if c.dim() == 1 else take[:, None], c, b) for c, b in zip(cand, best))
    return torch.minimum(err, best_err), new


def _sse3(xd: torch.Tensor, deq: torch.Tensor) -> torch.Tensor:
    """Float64 squared error per super-block of ``deq`` ``[S, 16, 16]`` (NaN counts as inf)."""
    e = (deq.to(torch.float64) - xd).square_().reshape(deq.shape[0], QK_K).sum(-1)  # [S]
    return torch.nan_to_num(e, nan=float("inf"))


def _chunked_refine(fn: Callable[..., tuple], x3: Tensor, *per_sb: Tensor) -> tuple[Tensor, ...]:
    """Run ``fn(x3_chunk, *per_sb_chunks)`` over chunks of super-blocks and concatenate."""
    outs = [
        fn(x3[i : i + _CHUNK], *(t[i : i + _CHUNK] for t in per_sb)) for i in range(0, x3.shape[0], _CHUNK)
    ]
    return tuple(torch.cat(p) for p in zip(*outs))


def _fp16_val(x: torch.Tensor) -> torch.Tensor:
    """Saturating fp16 rounding, kept as float32 (the value the forward uses)."""
    return _fp16_sat(x).float()


def _codes(x3: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """Forward codes ``clamp(round((x + o)/s), lo, hi)``, 0 where ``s == 0``; ``[S, 16, 16]``.

    Bit-identical to :func:`rqat_deploy.quant.reference.quantize_codes` (minus the zero point): the
    divisor ``s + (s == 0)`` equals ``where(s != 0, s, 1)`` and multiplying by the 0/1 mask
    equals the ``where``.
    """
    s3 = s[..., None]  # [S, 16, 1]
    dead = _fmask(torch.eq, s3, 0.0)
    u = x3 if o is None else x3 + o[..., None]
    return torch.round(u / (s3 + dead)).clamp_(lo, hi).mul_(1.0 - dead)


# ---------------------------------------------------------------------------------------------
# our search: Q2_K
# ---------------------------------------------------------------------------------------------


def _q2_stats(x3: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sub-block ``(sum q, sum q^2, sum q*x)`` ``[S, 16]`` float32."""
    return q.sum(-1), (q * q).sum(-1), (q * x3).sum(-1)


def _q2_err(st: tuple, sx: torch.Tensor, sxx: torch.Tensor, s: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Squared error of ``x ~ s*q - o`` per sub-block from code statistics."""
    sq, sqq, sqx = st
    return sxx + s * (s * sqq - 2.0 * (o * sq + sqx)) + o * (float(K_SUB) * o + 2.0 * sx)


def _q2_ls(st: tuple, sx: torch.Tensor, sxx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sub-block least squares of ``x ~ s*q - o`` (``o >= 0``) for fixed codes.

    Returns:
        ``s``, ``o``, squared error ``[S, 16]`` (``_BIG`` where the codes are all equal or
        ``s <= 0``).
    """
    sq, sqq, sqx = st
    n = float(K_SUB)
    det = n * sqq - sq * sq  # integer-valued, > 0 unless all codes are equal
    dets = det.clamp(min=1.0)
    s = (n * sqx - sq * sx) / dets
    o = (sq * sqx - sqq * sx) / dets
    neg = _fmask(torch.lt, o, 0.0)  # a positive lowest level is not representable: o = 0
    s = s + neg * (sqx / sqq.clamp(min=1.0) - s)
    o = o * (1.0 - neg)
    e = _q2_err(st, sx, sxx, s, o)
    bad = _fmask(torch.lt, det, 0.5).add_(_fmask(torch.le, s, 0.0)).clamp_(max=1.0)
    return s, o, torch.nan_to_num(e, nan=_BIG, posinf=_BIG) + bad * _BIG


def _q2_continuous(x3: torch.Tensor, s: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``(s, o)`` per sub-block by MSE: the start (llama.cpp's fit) and a grid of roundings
    of the sub-block's range (scaled about its centre, shifted), each refit by least squares,
    then Lloyd steps."""
    sx = x3.sum(-1)  # [S, 16]
    sxx = (x3 * x3).sum(-1)
    e0 = _q2_err(_q2_stats(x3, _codes(x3, s, o, 0, 3)), sx, sxx, s, o)
    errs, ss, os_ = [torch.nan_to_num(e0, nan=_BIG, posinf=_BIG)], [s], [o]
    lo = x3.amin(-1, keepdim=True).clamp(max=0)  # [S, 16, 1]
    span = x3.amax(-1, keepdim=True) - lo
    xc = (x3 - lo) / span.clamp(min=torch.finfo(_F32).tiny) - 0.5  # range mapped to [-0.5, 0.5]
    for a in _Q2_SCALE_GRID:  # codes from the range scaled by a about its centre, shifted by c
        base = xc * (3.0 * a)
        for c in _Q2_OFFSET_GRID:
            cs, co, ce = _q2_ls(_q2_stats(x3, torch.round(base + (1.5 + c)).clamp_(0, 3)), sx, sxx)
            errs.append(ce), ss.append(cs), os_.append(co)
    e, s, o = _argmin_pick(errs, ss, os_)
    for _ in range(_LLOYD_STEPS):
        cs, co, ce = _q2_ls(_q2_stats(x3, _codes(x3, s, o, 0, 3)), sx, sxx)
        e, s, o = _argmin_pick([e, ce], [s, cs], [o, co])
    return s, o


def _q2_select(
    st: tuple, sx: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best integer ``(sc, m)`` per sub-block under the quadratic error with fixed codes.

    With codes fixed, the error of ``(s, o) = (d*sc, dmin*m)`` is convex in ``m``, so the
    rounded, clamped vertex is the best ``m`` for each ``sc``; ``sc`` is scanned around the
    continuous optimum. Re-rounding the codes afterwards can only lower the error.

    Args:
        st: ``(Sq, Sqq, Sqx)`` ``[S, 16]``; sx: ``sum x`` ``[S, 16]``.
        d, dmin: float32 values of the fp16 super-block scales ``[S]``.

    Returns:
        ``sc``, ``m`` float32 integers ``[S, 16]`` and the model error (up to a constant) ``[S]``.
    """
    sq, sqq, sqx = st
    n = float(K_SUB)
    df, mf = d[:, None], dmin[:, None]  # [S, 1]
    det = (n * sqq - sq * sq).clamp(min=1.0)
    s_star = (n * sqx - sq * sx) / det  # continuous optimum of s for these codes
    inv_d = torch.nan_to_num(1.0 / df, posinf=0.0, neginf=0.0)
    inv_m = torch.nan_to_num(1.0 / (n * mf), posinf=0.0, neginf=0.0)
    base = torch.floor(s_star * inv_d) - 1.0
    zero = torch.zeros_like(sq)
    errs, scs, ms = [], [], []
    for off in range(4):
        sc = torch.nan_to_num(base + off, nan=0.0).clamp_(0, 15)
        s = df * sc
        m = torch.nan_to_num(torch.round((s * sq - sx) * inv_m), nan=0.0).clamp_(0, 15)
        errs.append(torch.nan_to_num(_q2_err(st, sx, zero, s, mf * m), nan=_BIG, posinf=_BIG))
        scs.append(sc), ms.append(m)
    e, sc, m = _argmin_pick(errs, scs, ms)
    return sc, m, e.sum(-1)


def _q2_fit_d(
    st: tuple, sx: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form least squares of ``(d, dmin)`` per super-block given integer ``sc``, ``m`` and
    codes (a 2x2 system in float64), rounded to fp16; keeps the current value of a parameter
    the system cannot determine."""
    sq, sqq, sqx = (t.double() for t in st)
    scd, md = sc.double(), m.double()
    p = (scd * scd * sqq).sum(-1)  # [S]
    qv = (scd * md * sq).sum(-1)
    r = float(K_SUB) * (md * md).sum(-1)
    u = (scd * sqx).sum(-1)
    v = (md * sx.double()).sum(-1)
    det = qv * qv - p * r
    d_old, m_old = d.double(), dmin.double()
    d_new = _safe_div(qv * v - u * r, det, d_old)
    m_new = _safe_div(p * v - qv * u, det, m_old)
    only_d = (r == 0) & (p > 0)  # all sub-mins zero: dmin is free
    only_m = (p == 0) & (r > 0)  # all sub-scales (or codes) zero: d is free
    d_new = torch.where(only_d, _safe_div(u, p, d_old), torch.where(only_m, d_old, d_new))
    m_new = torch.where(only_m, _safe_div(-v, r, m_old), torch.where(only_d, m_old, m_new))
    return _fp16_val(d_new.float()), _fp16_val(m_new.float())


def _q2_eval(
    xd: Tensor, x3: Tensor, d: Tensor, dmin: Tensor, sc: Tensor, m: Tensor
) -> tuple[Tensor, Tensor]:
    """Forward codes and exact float64 SSE per super-block of Q2_K parameters (float32 values:
    ``d``, ``dmin`` ``[S]``, integer ``sc``, ``m`` ``[S, 16]``)."""
    s = d[:, None] * sc  # [S, 16], as reference.q2_k_effective
    o = dmin[:, None] * m
    q = _codes(x3, s, o, 0, 3)
    return q, _sse3(xd, s[..., None] * q - o[..., None])


def _q2_refine(
    x3: Tensor, d0: Tensor, dmin0: Tensor, sc0: Tensor, m0: Tensor, s_port: Tensor, o_port: Tensor, iters: int
) -> tuple[Tensor, ...]:
    """Refine one chunk of super-blocks (see :func:`init_q2_k`); returns the best parameters."""
    xd = x3.double()
    sx = x3.sum(-1)  # [S, 16]
    best = (d0.float(), dmin0.float(), sc0.float(), m0.float())
    _, best_err = _q2_eval(xd, x3, *best)  # [S]
    s, o = _q2_continuous(x3, s_port, o_port)
    st = _q2_stats(x3, _codes(x3, s, o, 0, 3))
    smax = s.amax(-1).clamp(min=0)  # [S]
    omax = o.amax(-1).clamp(min=0)
    errs, ds, dms, scs, ms = [], [], [], [], []
    for kd in _Q2_D_GRID:
        d = _fp16_val(smax * (kd / 15.0))
        for km in _Q2_DMIN_GRID:
            dmin = _fp16_val(omax * (km / 15.0))
            sc, m, e = _q2_select(st, sx, d, dmin)
            errs.append(e), ds.append(d), dms.append(dmin), scs.append(sc), ms.append(m)
    _, d, dmin, sc, m = _argmin_pick(errs, ds, dms, scs, ms)
    cur = (d, dmin, sc, m)
    for it in range(iters + 1):  # exact codes -> LS (d, dmin) -> re-select (sc, m)
        q, err = _q2_eval(xd, x3, *cur)
        best_err, best = _keep_better(err, best_err, cur, best)
        if it == iters:
            break
        st = _q2_stats(x3, q)
        d, dmin = _q2_fit_d(st, sx, cur[2], cur[3], cur[0], cur[1])
        sc, m, _ = _q2_select(st, sx, d, dmin)
        cur = (d, dmin, sc, m)
    return best


def init_q2_k(w: torch.Tensor, *, iters: int = 2) -> KQuantParams:
    """Q2_K initial parameters at least as good as llama.cpp's on every super-block (weight MSE).

    Steps: the llama.cpp port's result is the first candidate. Per sub-block, the best
    continuous ``(scale, offset)`` by MSE (not ggml's ``|x|``-weighted MAD) is searched from
    ggml's fit and a grid of roundings, each refit by least squares, then polished by Lloyd
    steps. ``d``/``dmin`` are searched on a grid around ``max scale / 15`` and ``max min / 15``
    (fp16-rounded), the sub-scales/sub-mins chosen optimally for each under the quadratic error
    model; then ``iters`` rounds of exact code re-rounding, closed-form ``(d, dmin)`` least squares
    and sub-scale re-selection. Every candidate is scored by its exact float64 squared error with
    the forward's codes, and the best one is kept per super-block.

    Args:
        w: weight ``[out, in]`` (any float dtype), ``in % 256 == 0``.
        iters: alternating refinement rounds (0 keeps the grid search only).

    Returns:
        :class:`KQuantParams` with ``bits=2``; ``qcodes`` are the forward's codes.

    Raises:
        ShapeError: ``w`` is not 2-D or ``in`` is not a multiple of 256.
    """
    x = _check_weight(w, "Q2_K")
    out, k = x.shape
    d0, dmin0, sc0, m0, s_port, o_port = _q2_k_port(x)
    d, dmin, sc, m = _chunked_refine(
        lambda *a: _q2_refine(*a, iters=iters),
        x.reshape(-1, N_SUB, K_SUB),  # [S, 16, 16]
        d0.reshape(-1),
        dmin0.reshape(-1),
        sc0.reshape(-1, N_SUB),
        m0.reshape(-1, N_SUB),
        s_port.reshape(-1, N_SUB),
        o_port.reshape(-1, N_SUB),
    )
    nsb = k // QK_K
    return _q2_params(
        x,
        d.to(torch.float16).reshape(out, nsb),
        dmin.to(torch.float16).reshape(out, nsb),
        sc.to(torch.uint8).reshape(out, k // K_SUB),
        m.to(torch.uint8).reshape(out, k // K_SUB),
    )


# ---------------------------------------------------------------------------------------------
# our search: Q3_K
# ---------------------------------------------------------------------------------------------


def _q3_stats(x3: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block ``(sum q^2, sum q*x)`` ``[S, 16]`` float32 (``q`` signed, -4..3)."""
    return (q * q).sum(-1), (q * x3).sum(-1)


def _q3_ls(st: tuple, sxx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scale ``s = Sqx/Sqq`` and its squared error ``Sxx - s*Sqx`` (``_BIG`` where
    all codes are 0)."""
    sqq, sqx = st
    s = sqx / sqq.clamp(min=1.0)
    e = torch.nan_to_num(sxx - s * sqx, nan=_BIG, posinf=_BIG)
    return s, e + _fmask(torch.lt, sqq, 0.5) * _BIG


def _q3_continuous(x3: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Best signed scale per sub-block by MSE: the start (llama.cpp's fit) and a grid of scales
    mapping the largest-magnitude weight to level -4 (ggml's choice of sign), each refit by
    least squares, then Lloyd steps."""
    sxx = (x3 * x3).sum(-1)  # [S, 16]
    sqq, sqx = _q3_stats(x3, _codes(x3, s, None, -4, 3))
    e0 = torch.nan_to_num(sxx - 2.0 * s * sqx + s * s * sqq, nan=_BIG, posinf=_BIG)
    errs, ss = [e0], [s]
    idx = x3.abs().argmax(-1, keepdim=True)  # [S, 16, 1]
    mx = x3.gather(-1, idx)[..., 0]  # [S, 16] signed largest-magnitude weight
    for a in _Q3_SCALE_GRID:
        cs, ce = _q3_ls(_q3_stats(x3, _codes(x3, mx * (-a / 4.0), None, -4, 3)), sxx)
        errs.append(ce), ss.append(cs)
    e, s = _argmin_pick(errs, ss)
    for _ in range(_LLOYD_STEPS):
        cs, ce = _q3_ls(_q3_stats(x3, _codes(x3, s, None, -4, 3)), sxx)
        e, s = _argmin_pick([e, ce], [s, cs])
    return s


def _q3_select(st: tuple, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best integer sub-scale per sub-block for fixed codes: the error ``(d S)^2 Sqq - 2 d S Sqx``
    is convex in ``S``, so the rounded, clamped vertex ``Sqx / (Sqq d)`` is optimal.

    Returns:
        ``S`` float32 integers -32..31 ``[S, 16]`` and the model error (up to a constant) ``[S]``.
    """
    sqq, sqx = st
    df = d[:, None]  # [S, 1]
    inv_d = torch.nan_to_num(1.0 / df, posinf=0.0, neginf=0.0)
    sc = torch.nan_to_num(torch.round(sqx / sqq.clamp(min=1.0) * inv_d), nan=0.0).clamp_(-32, 31)
    s = df * sc
    e = torch.nan_to_num(s * (s * sqq - 2.0 * sqx), nan=_BIG, posinf=_BIG)
    return sc, e.sum(-1)


def _q3_fit_d(st: tuple, sc: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Least-squares ``d = sum S Sqx / sum S^2 Sqq`` per super-block (float64), fp16-rounded."""
    sqq, sqx = (t.double() for t in st)
    scd = sc.double()
    num = (scd * sqx).sum(-1)  # [S]
    den = (scd * scd * sqq).sum(-1)
    return _fp16_val(_safe_div(num, den, d.double()).float())


def _q3_eval(xd: Tensor, x3: Tensor, d: Tensor, sc: Tensor) -> tuple[Tensor, Tensor]:
    """Forward codes (``q - 4``, -4..3) and exact float64 SSE per super-block of Q3_K
    parameters (float32 values: ``d`` ``[S]``, integer ``sc`` ``[S, 16]``)."""
    s = d[:, None] * sc  # [S, 16], as reference.q3_k_effective
    q = _codes(x3, s, None, -4, 3)
    return q, _sse3(xd, s[..., None] * q)


def _q3_refine(x3: Tensor, d0: Tensor, sc0: Tensor, s_port: Tensor, iters: int) -> tuple[Tensor, ...]:
    """Refine one chunk of super-blocks (see :func:`init_q3_k`); returns the best parameters."""
    xd = x3.double()
    best = (d0.float(), sc0.float())
    _, best_err = _q3_eval(xd, x3, *best)  # [S]
    s = _q3_continuous(x3, s_port)
    st = _q3_stats(x3, _codes(x3, s, None, -4, 3))
    smax = s.gather(-1, s.abs().argmax(-1, keepdim=True))[:, 0]  # [S] signed largest scale
    errs, ds, scs = [], [], []
    for denom in (-32.0, 31.0):  # the largest sub-block at sub-scale -32 or +31
        for kd in _Q3_D_GRID:
            d = _fp16_val(smax * (kd / denom))
            sc, e = _q3_select(st, d)
            errs.append(e), ds.append(d), scs.append(sc)
    _, d, sc = _argmin_pick(errs, ds, scs)
    cur = (d, sc)
    for it in range(iters + 1):  # exact codes -> LS d -> re-select sub-scales
        q, err = _q3_eval(xd, x3, *cur)
        best_err, best = _keep_better(err, best_err, cur, best)
        if it == iters:
            break
        st = _q3_stats(x3, q)
        d = _q3_fit_d(st, cur[1], cur[0])
        sc, _ = _q3_select(st, d)
        cur = (d, sc)
    return best


def init_q3_k(w: torch.Tensor, *, iters: int = 2) -> KQuantParams:
    """Q3_K initial parameters at least as good as llama.cpp's on every super-block (weight MSE).

    Steps: the llama.cpp port's result is the first candidate. Per sub-block, the best
    continuous signed scale by MSE (ggml weights its fit by ``x^2``) is searched from ggml's fit
    and a grid around ``-max/4``, each refit by least squares, then polished by Lloyd steps.
    ``d`` is searched on a grid around ``largest scale / -32`` and ``/ 31`` (fp16-rounded), with
    the optimal integer sub-scales for each; then ``iters`` rounds of exact code re-rounding,
    least-squares ``d`` and sub-scale re-selection. Every candidate is scored by its exact float64
    squared error with the forward's codes, and the best one is kept per super-block.

    Args:
        w: weight ``[out, in]`` (any float dtype), ``in % 256 == 0``.
        iters: alternating refinement rounds (0 keeps the grid search only).

    Returns:
        :class:`KQuantParams` with ``bits=3``; ``qcodes`` are the forward's codes.

    Raises:
        ShapeError: ``w`` is not 2-D or ``in`` is not a multiple of 256.
    """
    x = _check_weight(w, "Q3_K")
    out, k = x.shape
    d0, sc0, s_port = _q3_k_port(x)
    d, sc = _chunked_refine(
        lambda *a: _q3_refine(*a, iters=iters),
        x.reshape(-1, N_SUB, K_SUB),  # [S, 16, 16]
        d0.reshape(-1),
        sc0.reshape(-1, N_SUB),
        s_port.reshape(-1, N_SUB),
    )
    d16 = d.to(torch.float16).reshape(out, k // QK_K)
    return _q3_params(x, d16, sc.to(torch.int8).reshape(out, k // K_SUB))
