"""Our k-quant initialisation: a search that is never worse than llama.cpp per super-block.

:func:`init_q2_k`, :func:`init_q3_k` start from the port of ggml's quantizer
(:mod:`rqat_deploy.quant.grids.kquant_ggml`), refine per-sub-block scales by least squares, search
``d``/``dmin`` on a grid, pick integer sub-scales under an exact quadratic error model, refit
``d``/``dmin`` in closed form, re-round, iterate; every candidate is scored by exact weight MSE
after fp16 rounding and the best one is kept *per super-block*, the port's result included, so the
search is never worse than llama.cpp on any 256-weight block.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rqat_deploy.quant.grids.kquant import (
    K_SUB,
    N_SUB,
    QK_K,
    KQuantParams,
    check_kquant_weight,
    q2_k_params,
    q3_k_params,
)
from rqat_deploy.quant.grids.kquant_ggml import bit_select, cmp_mask, q2_k_port, q3_k_port
from rqat_deploy.quant.reference import FP16_MAX

_F32 = torch.float32

__all__ = ["init_q2_k", "init_q3_k"]


def _fp16_sat(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16, saturating at +-65504 and mapping NaN to 0 (for our search only)."""
    return torch.nan_to_num(x, nan=0.0).clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def _safe_div(num: torch.Tensor, den: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den != 0`` and the result is finite, else ``fallback``."""
    ok = den != 0
    q = num / torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok & torch.isfinite(q), q, fallback)


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
    take = cmp_mask(torch.lt, err, best_err)  # [S] int32
    new = tuple(bit_select(take if c.dim() == 1 else take[:, None], c, b) for c, b in zip(cand, best))
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
    s = d[:, None] * sc  # [S, 16], as kquant.q2_k_effective
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
    x = check_kquant_weight(w, "Q2_K")
    out, k = x.shape
    d0, dmin0, sc0, m0, s_port, o_port = q2_k_port(x)
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
    return q2_k_params(
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
    s = d[:, None] * sc  # [S, 16], as kquant.q3_k_effective
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
    x = check_kquant_weight(w, "Q3_K")
    out, k = x.shape
    d0, sc0, s_port = q3_k_port(x)
    d, sc = _chunked_refine(
        lambda *a: _q3_refine(*a, iters=iters),
        x.reshape(-1, N_SUB, K_SUB),  # [S, 16, 16]
        d0.reshape(-1),
        sc0.reshape(-1, N_SUB),
        s_port.reshape(-1, N_SUB),
    )
    d16 = d.to(torch.float16).reshape(out, k // QK_K)
    return q3_k_params(x, d16, sc.to(torch.int8).reshape(out, k // K_SUB))
