"""GGUF block packers and uniform-grid -> GGUF type mappings, in vectorized NumPy.

Two layers live here:

* **Packers** (``pack_q2_k``, ``pack_q3_k``, ``pack_q4_k``, ``pack_q4_0``, ``pack_q8_0``) take the
  integer codes and fp16 scales of a block format exactly as they are and lay them out byte for byte
  as ggml does (``block_q2_K`` etc. in ggml-common.h). ``gguf.quants.dequantize`` is the independent
  oracle they are tested against. A ``kquant``-grid checkpoint (DESIGN.md 3) goes through them with
  zero weight error.
* **Mappings** (``map_uniform``) turn a ``uniform``-grid checkpoint (asymmetric, group size G,
  ``W = s * (q - z)``) into the fields of a GGUF type. Exact targets (Q4_0 for 2/3-bit codes, Q8_0 up
  to 4-bit codes, F32) reproduce the weight bit for bit; k-quant targets (Q2_K, Q3_K, Q4_K) keep the
  codes (Q3_K: reflected per sub-block, see :func:`uniform_to_q3_k`) and re-quantize the scales by
  minimizing the weight error given the codes. Every mapping returns the weight it will decode to,
  so the caller can measure and report the error (never silently lossy).

Exactness arguments (float32 on both sides, one rounding at most and the same one):

* Q2_K ``d*sc*q - dmin*m``: ``d*sc`` (11+4 bit mantissa) and ``(d*sc)*q`` are exact in float32, so
  is ``dmin*m``; the one subtraction rounds identically in gguf's dequantizer and in DESIGN.md 3.
* Q3_K ``d*S*(c-4)``: 11+6+3 bits, every product exact.
* Q4_0 for uniform codes with b <= 3 bits: ``q - z`` lies in -7..7, inside Q4_0's -8..7, the group
  scale is the block's fp16 ``d`` (G a multiple of 32), and ``d*(q-z)`` is one exact product.
  Q8_0 does the same for b <= 4 (``q - z`` in -15..15). Q4_1 is *not* exact: its fp16 ``m = -s*z``
  needs up to 14 mantissa bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from rqat_deploy.ggml_types import Q2_0_BYTES, QK2_0  # also teaches gguf the Q2_0 type

from rqat_deploy.errors import ConfigError, ShapeError

# block sizes from gguf's own constants table (weights per block, bytes per block)
QK_K = GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K][0]  # k-quant super-block: 256
QK4_0 = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0][0]  # 32
QK8_0 = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]  # 32

__all__ = [
    "QK_K",
    "MappedTensor",
    "pack_q2_k",
    "pack_q3_k",
    "pack_q4_k",
    "pack_q4_0",
    "pack_q8_0",
    "pack_q2_0",
    "dequant_q2_k_fields",
    "dequant_q3_k_fields",
    "dequant_q4_k_fields",
    "uniform_to_q2_k",
    "uniform_to_q3_k",
    "uniform_to_q4_k",
    "uniform_to_q4_0",
    "uniform_to_q8_0",
    "uniform_reference",
    "map_uniform",
    "NATIVE_PACKERS",
    "pack_native",
    "map_float",
    "uniform_type_choices",
    "UNIFORM_DEFAULT_TYPE",
    "block_bytes",
]

# Default GGUF type for a uniform-grid checkpoint of a given bit width.
UNIFORM_DEFAULT_TYPE: dict[int, str] = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K"}


def block_bytes(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """Return ``(weights per block, bytes per block)`` of a ggml type."""
    return GGML_QUANT_SIZES[qtype]


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _as_2d(name: str, arr: np.ndarray, dtype: type, shape: tuple[int, int]) -> np.ndarray:
    """Check an input array's dtype and shape; return it as a C-contiguous array."""
    arr = np.asarray(arr)
    if arr.dtype != np.dtype(dtype):
        raise ShapeError(f"{name}: expected dtype {np.dtype(dtype)}, got {arr.dtype}; convert it first")
    if arr.shape != shape:
        raise ShapeError(f"{name}: expected shape {shape}, got {arr.shape}")
    return np.ascontiguousarray(arr)


def _check_range(name: str, arr: np.ndarray, lo: int, hi: int) -> None:
    """Raise ShapeError if an integer array has values outside ``[lo, hi]``."""
    if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
        raise ShapeError(
            f"{name}: values must lie in {lo}..{hi}, found {int(arr.min())}..{int(arr.max())}"
        )


def _rows_blocks(qcodes: np.ndarray, block: int, type_name: str) -> tuple[int, int, int]:
    """Return ``(rows, n, blocks per row)`` for a 2-D code array, checking divisibility."""
    if qcodes.ndim != 2:
        raise ShapeError(f"{type_name}: qcodes must be 2-D [rows, n], got shape {qcodes.shape}")
    rows, n = qcodes.shape
    if n % block:
        raise ShapeError(
            f"{type_name}: row length {n} is not a multiple of the block size {block}; "
            "use a type with a smaller block (Q4_0/Q8_0) or F32 for this tensor"
        )
    return rows, n, n // block


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """fp16 array [..., k] -> its little-endian bytes [..., 2k]."""
    x = np.ascontiguousarray(x.astype("<f2", copy=False))
    return x.view(np.uint8).reshape(*x.shape[:-1], x.shape[-1] * 2)


def _pack_2bit_planes(q: np.ndarray) -> np.ndarray:
    """Pack 2-bit values of super-blocks [R, B, 256] into ggml's k-quant ``qs`` [R, B, 64].

    Weight ``i = half*128 + s*32 + l`` sits in byte ``half*32 + l`` at bits ``2s..2s+1``.
    """
    r, b = q.shape[:2]
    q = q.reshape(r, b, 2, 4, 32).astype(np.uint8)  # [R, B, half, s, l]
    out = q[:, :, :, 0] | (q[:, :, :, 1] << 2) | (q[:, :, :, 2] << 4) | (q[:, :, :, 3] << 6)
    return out.reshape(r, b, 64)  # [R, B, 64]


# --------------------------------------------------------------------------------------------
# packers
# --------------------------------------------------------------------------------------------


def pack_q2_k(
    qcodes: np.ndarray,
    d: np.ndarray,
    dmin: np.ndarray,
    sub_scales: np.ndarray,
    sub_mins: np.ndarray,
) -> np.ndarray:
    """Pack Q2_K fields into ggml ``block_q2_K`` rows.

    Block layout (84 bytes per 256 weights): ``scales[16]`` (low nibble sub-scale, high nibble
    sub-min), ``qs[64]`` (2-bit codes), fp16 ``d``, fp16 ``dmin``. Decodes to
    ``W = d*sub_scales*q - dmin*sub_mins``.

    Args:
        qcodes: uint8 [rows, n], values 0..3, n a multiple of 256.
        d: float16 [rows, n/256] super-block scale.
        dmin: float16 [rows, n/256] super-block min scale (any sign).
        sub_scales: uint8 [rows, n/16], values 0..15.
        sub_mins: uint8 [rows, n/16], values 0..15.

    Returns:
        uint8 [rows, n/256*84].

    Raises:
        ShapeError: on a wrong dtype, shape or value range.
    """
    rows, n, nb = _rows_blocks(np.asarray(qcodes), QK_K, "Q2_K")
    q = _as_2d("qcodes", qcodes, np.uint8, (rows, n))
    d = _as_2d("d", d, np.float16, (rows, nb))
    dmin = _as_2d("dmin", dmin, np.float16, (rows, nb))
    sc = _as_2d("sub_scales", sub_scales, np.uint8, (rows, n // 16))
    mn = _as_2d("sub_mins", sub_mins, np.uint8, (rows, n // 16))
    _check_range("qcodes", q, 0, 3)
    _check_range("sub_scales", sc, 0, 15)
    _check_range("sub_mins", mn, 0, 15)
    scales = (sc | (mn << 4)).reshape(rows, nb, 16)  # [R, B, 16]
    qs = _pack_2bit_planes(q.reshape(rows, nb, QK_K))  # [R, B, 64]
    dd = _fp16_bytes(d[:, :, None])  # [R, B, 2]
    dm = _fp16_bytes(dmin[:, :, None])  # [R, B, 2]
    return np.concatenate([scales, qs, dd, dm], axis=-1).reshape(rows, nb * 84)


def pack_q3_k(qcodes: np.ndarray, d: np.ndarray, sub_scales: np.ndarray) -> np.ndarray:
    """Pack Q3_K fields into ggml ``block_q3_K`` rows.

    Block layout (110 bytes per 256 weights): ``hmask[32]`` (bit 2 of each code), ``qs[64]`` (low
    2 bits), ``scales[12]`` (16 six-bit values ``S+32``), fp16 ``d``. Decodes to
    ``W = d*sub_scales*(qcodes-4)``.

    Args:
        qcodes: uint8 [rows, n], values 0..7 meaning ``q - 4`` (i.e. q in -4..3).
        d: float16 [rows, n/256].
        sub_scales: int8 [rows, n/16], values -32..31.

    Returns:
        uint8 [rows, n/256*110].

    Raises:
        ShapeError: on a wrong dtype, shape or value range.
    """
    rows, n, nb = _rows_blocks(np.asarray(qcodes), QK_K, "Q3_K")
    q = _as_2d("qcodes", qcodes, np.uint8, (rows, n))
    d = _as_2d("d", d, np.float16, (rows, nb))
    s = _as_2d("sub_scales", sub_scales, np.int8, (rows, n // 16))
    _check_range("qcodes", q, 0, 7)
    _check_range("sub_scales", s, -32, 31)
    q = q.reshape(rows, nb, QK_K)  # [R, B, 256]
    # hmask: weight i = b*32 + l -> byte l, bit b. ggml stores the *set* bit for q >= 0 (code >= 4).
    hbit = (q >> 2).reshape(rows, nb, 8, 32)  # [R, B, b, l]
    hmask = np.zeros((rows, nb, 32), dtype=np.uint8)
    for b in range(8):  # 8 bit planes, not a loop over weights
        hmask |= hbit[:, :, b] << b
    qs = _pack_2bit_planes(q & 3)  # [R, B, 64]
    u = (s.astype(np.int16) + 32).astype(np.uint8).reshape(rows, nb, 16)  # [R, B, 16] in 0..63
    low = (u[:, :, :8] & 15) | ((u[:, :, 8:] & 15) << 4)  # [R, B, 8]
    hi = (u >> 4).reshape(rows, nb, 4, 4)  # [R, B, s, b]: scale k = s*4 + b
    high = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [R, B, 4]
    dd = _fp16_bytes(d[:, :, None])  # [R, B, 2]
    return np.concatenate([hmask, qs, low, high, dd], axis=-1).reshape(rows, nb * 110)


def pack_q4_k(
    qcodes: np.ndarray,
    d: np.ndarray,
    dmin: np.ndarray,
    sub_scales: np.ndarray,
    sub_mins: np.ndarray,
) -> np.ndarray:
    """Pack Q4_K fields into ggml ``block_q4_K`` rows.

    Block layout (144 bytes per 256 weights): fp16 ``d``, fp16 ``dmin``, ``scales[12]`` (eight
    6-bit sub-scales and eight 6-bit sub-mins, one per 32 weights), ``qs[128]`` (4-bit codes).
    Decodes to ``W = d*sub_scales*q - dmin*sub_mins``.

    Args:
        qcodes: uint8 [rows, n], values 0..15.
        d, dmin: float16 [rows, n/256].
        sub_scales, sub_mins: uint8 [rows, n/32], values 0..63.

    Returns:
        uint8 [rows, n/256*144].

    Raises:
        ShapeError: on a wrong dtype, shape or value range.
    """
    rows, n, nb = _rows_blocks(np.asarray(qcodes), QK_K, "Q4_K")
    q = _as_2d("qcodes", qcodes, np.uint8, (rows, n))
    d = _as_2d("d", d, np.float16, (rows, nb))
    dmin = _as_2d("dmin", dmin, np.float16, (rows, nb))
    sc = _as_2d("sub_scales", sub_scales, np.uint8, (rows, n // 32)).reshape(rows, nb, 8)
    mn = _as_2d("sub_mins", sub_mins, np.uint8, (rows, n // 32)).reshape(rows, nb, 8)
    _check_range("qcodes", q, 0, 15)
    _check_range("sub_scales", sc, 0, 63)
    _check_range("sub_mins", mn, 0, 63)
    b0 = (sc[:, :, :4] & 63) | ((sc[:, :, 4:] >> 4) << 6)  # [R, B, 4]
    b1 = (mn[:, :, :4] & 63) | ((mn[:, :, 4:] >> 4) << 6)  # [R, B, 4]
    b2 = (sc[:, :, 4:] & 15) | ((mn[:, :, 4:] & 15) << 4)  # [R, B, 4]
    # qs: weight i = c*64 + h*32 + l -> byte c*32 + l, nibble h.
    q4 = q.reshape(rows, nb, 4, 2, 32)  # [R, B, c, h, l]
    qs = (q4[:, :, :, 0] | (q4[:, :, :, 1] << 4)).reshape(rows, nb, 128)  # [R, B, 128]
    dd = _fp16_bytes(d[:, :, None])  # [R, B, 2]
    dm = _fp16_bytes(dmin[:, :, None])  # [R, B, 2]
    return np.concatenate([dd, dm, b0, b1, b2, qs], axis=-1).reshape(rows, nb * 144)


def pack_q4_0(qvalues: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Pack Q4_0 fields into ggml ``block_q4_0`` rows (18 bytes per 32 weights).

    Args:
        qvalues: int8 [rows, n], signed values -8..7, n a multiple of 32.
        d: float16 [rows, n/32]. Decodes to ``W = d*qvalues``.

    Returns:
        uint8 [rows, n/32*18].

    Raises:
        ShapeError: on a wrong dtype, shape or value range.
    """
    rows, n, nb = _rows_blocks(np.asarray(qvalues), QK4_0, "Q4_0")
    x = _as_2d("qvalues", qvalues, np.int8, (rows, n))
    d = _as_2d("d", d, np.float16, (rows, nb))
    _check_range("qvalues", x, -8, 7)
    nib = (x.astype(np.int16) + 8).astype(np.uint8).reshape(rows, nb, 2, 16)  # [R, B, h, l]
    qs = nib[:, :, 0] | (nib[:, :, 1] << 4)  # [R, B, 16]: weight l low nibble, l+16 high
    return np.concatenate([_fp16_bytes(d[:, :, None]), qs], axis=-1).reshape(rows, nb * 18)


def pack_q8_0(qvalues: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Pack Q8_0 fields into ggml ``block_q8_0`` rows (34 bytes per 32 weights).

    Args:
        qvalues: int8 [rows, n], values -128..127 (ggml's quantizer uses -127..127), n % 32 == 0.
        d: float16 [rows, n/32]. Decodes to ``W = d*qvalues``.

    Returns:
        uint8 [rows, n/32*34].

    Raises:
        ShapeError: on a wrong dtype or shape.
    """
    rows, n, nb = _rows_blocks(np.asarray(qvalues), QK8_0, "Q8_0")
    x = _as_2d("qvalues", qvalues, np.int8, (rows, n))
    d = _as_2d("d", d, np.float16, (rows, nb))
    qs = x.view(np.uint8).reshape(rows, nb, 32)  # [R, B, 32]
    return np.concatenate([_fp16_bytes(d[:, :, None]), qs], axis=-1).reshape(rows, nb * 34)


# --------------------------------------------------------------------------------------------
# float32 decoders of the fields (the DESIGN.md 3 formulas), used to measure mapping errors
# --------------------------------------------------------------------------------------------


def _blocks(x: np.ndarray, per: np.ndarray) -> np.ndarray:
    """View a [rows, n] array as [rows, n/b, b] blocks matching per-block values [rows, n/b]."""
    rows, nblk = per.shape
    return x.reshape(rows, nblk, x.shape[1] // nblk)


def dequant_q2_k_fields(
    qcodes: np.ndarray, d: np.ndarray, dmin: np.ndarray, sub_scales: np.ndarray, sub_mins: np.ndarray
) -> np.ndarray:
    """``W = d*sc*q - dmin*m`` in float32 [rows, n] (DESIGN.md 3, kquant bits=2; Q4_K alike)."""
    rows, n = qcodes.shape
    nsub = sub_scales.shape[1]
    per = nsub // d.shape[1]  # sub-blocks per super-block
    dsc = d.astype(np.float32)[:, :, None] * sub_scales.astype(np.float32).reshape(rows, -1, per)  # [R, B, S]
    mm = dmin.astype(np.float32)[:, :, None] * sub_mins.astype(np.float32).reshape(rows, -1, per)  # [R, B, S]
    q = qcodes.reshape(rows, nsub, n // nsub).astype(np.float32)  # [R, B*S, sub]
    return (dsc.reshape(rows, nsub, 1) * q - mm.reshape(rows, nsub, 1)).reshape(rows, n)


def dequant_q3_k_fields(qcodes: np.ndarray, d: np.ndarray, sub_scales: np.ndarray) -> np.ndarray:
    """``W = d*S*(qcodes-4)`` in float32 [rows, n] (DESIGN.md 3, kquant bits=3)."""
    rows, n = qcodes.shape
    nsub = sub_scales.shape[1]
    per = nsub // d.shape[1]
    ds = d.astype(np.float32)[:, :, None] * sub_scales.astype(np.float32).reshape(rows, -1, per)  # [R, B, S]
    q = qcodes.reshape(rows, nsub, n // nsub).astype(np.float32) - np.float32(4.0)  # [R, B*S, 16]
    return (ds.reshape(rows, nsub, 1) * q).reshape(rows, n)


def dequant_q4_k_fields(
    qcodes: np.ndarray, d: np.ndarray, dmin: np.ndarray, sub_scales: np.ndarray, sub_mins: np.ndarray
) -> np.ndarray:
    """``W = d*sc*q - dmin*m`` in float32 [rows, n] with 32-weight sub-blocks (Q4_K)."""
    return dequant_q2_k_fields(qcodes, d, dmin, sub_scales, sub_mins)


def uniform_reference(qcodes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> np.ndarray:
    """``W = s*(q - z)`` in float32 [rows, n] (DESIGN.md 3, uniform grid)."""
    rows, n = qcodes.shape
    q = qcodes.reshape(rows, n // group_size, group_size).astype(np.float32)  # [R, n/G, G]
    z = zeros.astype(np.float32)[:, :, None]
    return (scales.astype(np.float32)[:, :, None] * (q - z)).reshape(rows, n)


# --------------------------------------------------------------------------------------------
# scale fitting: fp16 scale c and integers k_u minimizing sum_u w_u (c*k_u - t_u)^2
# --------------------------------------------------------------------------------------------


def _fit_scale(
    targets: np.ndarray,
    weights: np.ndarray,
    subs_per_unit: int,
    kmin: int,
    kmax: int,
    symmetric: bool = False,
    top: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Best fp16 scale c and integers k_u minimizing ``sum_u w_u (c*k_u - t_u)^2`` per row.

    Candidate scales are ``t/k`` for each unit's (weighted mean) target and every admissible integer
    k, plus 0: each makes one unit exactly representable up to fp16 rounding. They are ranked
    cheaply at unit level (a unit = the sub-blocks sharing one uniform group inside the row, so
    their targets are equal or nearly so), the ``top`` best are scored exactly per sub-block with
    rounded, clamped integers (optimal per unit for a fixed scale: the objective is separable), and
    the winner is refined once by the weighted least-squares scale for its integers.

    Args:
        targets: [B, U] values to approximate by ``c*k_u``.
        weights: [B, U] non-negative importance of each sub-block.
        subs_per_unit: sub-blocks per unit (U must be a multiple).
        kmin, kmax: integer range of k.
        symmetric: targets may differ in sign inside a unit (Q3_K): rank units on ``|t|``.
        top: how many candidates to score exactly.

    Returns:
        (c float16 [B], k int16 [B, U]).
    """
    b, u = targets.shape
    nu = u // subs_per_unit
    t_rank = np.abs(targets) if symmetric else targets
    wu = weights.reshape(b, nu, subs_per_unit)  # [B, nu, spu]
    w_unit = wu.sum(axis=2)  # [B, nu]
    t_unit = (t_rank.reshape(b, nu, subs_per_unit) * wu).sum(axis=2) / np.where(w_unit > 0, w_unit, 1)
    kmag = np.arange(1, max(kmax, -kmin) + 1, dtype=np.float32)  # [K]
    cands = (t_unit[:, :, None] / kmag).reshape(b, -1)  # [B, nu*K]
    cands = np.concatenate([cands, np.zeros((b, 1), dtype=cands.dtype)], axis=1)  # [B, C]
    with np.errstate(over="ignore"):
        c16 = cands.astype(np.float16).astype(np.float32)  # [B, C]
    rk_lo = 0 if symmetric else kmin
    if nu < u and c16.shape[1] > top:
        err_c, _ = _eval_scale(c16, t_unit, w_unit, rk_lo, max(kmax, -kmin) if symmetric else kmax)
        pick = np.argpartition(err_c, top, axis=1)[:, :top]  # [B, top]
        c16 = np.take_along_axis(c16, pick, axis=1)  # [B, top]
    if symmetric and kmin < 0:
        c16 = np.concatenate([c16, -c16], axis=1)  # let the sign of c pick the -32 end
    err, k = _eval_scale(c16, targets, weights, kmin, kmax)  # [B, C'], [B, C', U]
    best = np.argmin(err, axis=1)  # [B]
    rows = np.arange(b)
    c_best, k_best, e_best = c16[rows, best], k[rows, best], err[rows, best]  # [B], [B, U], [B]
    num = (weights * k_best * targets).sum(axis=1)  # [B]
    den = (weights * k_best * k_best).sum(axis=1)  # [B]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        c_ls = np.where(den > 0, num / np.where(den > 0, den, 1), c_best).astype(np.float16).astype(np.float32)
    e_ls, k_ls = _eval_scale(c_ls[:, None], targets, weights, kmin, kmax)  # [B, 1], [B, 1, U]
    better = e_ls[:, 0] < e_best  # [B]
    c_out = np.where(better, c_ls, c_best)
    k_out = np.where(better[:, None], k_ls[:, 0], k_best)
    return c_out.astype(np.float16), k_out.astype(np.int16)


def _eval_scale(
    c: np.ndarray, targets: np.ndarray, weights: np.ndarray, kmin: int, kmax: int
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted error of candidate scales c [B, C] with their optimal integers k [B, C, U]."""
    finite = np.isfinite(c)  # [B, C]
    safe = np.where((c != 0) & finite, c, np.inf)  # [B, C]; c = 0 -> ratio 0 -> k = 0
    k = np.clip(np.rint(targets[:, None, :] / safe[:, :, None]), kmin, kmax)  # [B, C, U]
    cc = np.where(finite, c, 0)[:, :, None]
    err = (weights[:, None, :] * (cc * k - targets[:, None, :]) ** 2).sum(axis=2)  # [B, C]
    err = np.where(finite, err, np.inf)
    return err, k


# --------------------------------------------------------------------------------------------
# uniform grid -> GGUF types
# --------------------------------------------------------------------------------------------


@dataclass
class MappedTensor:
    """One weight mapped to a GGUF type.

    Attributes:
        qtype: the ggml type the bytes are in.
        data: uint8 [rows, row_bytes] packed blocks (or float32/float16 [rows, n] for F32/F16).
        decoded: float32 [rows, n], the weight these bytes decode to (our own float32 formula);
            None for exact mappings (it is then the checkpoint's weight, by construction).
        exact: True when the bytes decode to the checkpoint's weight bit for bit by construction.
        note: why this type was chosen when it differs from the requested one (fallback), else "".
    """

    qtype: GGMLQuantizationType
    data: np.ndarray
    decoded: np.ndarray | None
    exact: bool
    note: str = field(default="")


_CHUNK = 4096  # super-blocks per vectorized step (bounds temporary memory to ~100 MB)


def _check_uniform(qcodes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, bits: int) -> None:
    """Validate a uniform-grid triple."""
    if qcodes.ndim != 2:
        raise ShapeError(f"qcodes must be 2-D [out, in], got {qcodes.shape}")
    rows, n = qcodes.shape
    if group_size <= 0 or n % group_size:
        raise ShapeError(f"row length {n} is not a multiple of group_size {group_size}")
    _as_2d("scales", scales, np.float16, (rows, n // group_size))
    _as_2d("zeros", zeros, np.uint8, (rows, n // group_size))
    _as_2d("qcodes", qcodes, np.uint8, (rows, n))
    _check_range("qcodes", qcodes, 0, 2**bits - 1)
    _check_range("zeros", zeros, 0, 2**bits - 1)


def _per_sub(x: np.ndarray, group_size: int, sub: int) -> np.ndarray:
    """Per-group values [rows, n/G] -> per-sub-block values [rows, n/sub] (G % sub == 0)."""
    return np.repeat(x, group_size // sub, axis=1)


def _sub_stats(q: np.ndarray, sub: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and centered sum of squares of codes per sub-block: float32 [rows, n/sub] each."""
    rows, n = q.shape
    qs = q.reshape(rows, n // sub, sub).astype(np.int32)  # [R, n/sub, sub]
    s1 = qs.sum(axis=2, dtype=np.int32).astype(np.float32)  # [R, n/sub]
    s2 = (qs * qs).sum(axis=2, dtype=np.int32).astype(np.float32)
    return s1 / sub, s2 - s1 * s1 / sub


def _uniform_to_affine_k(
    qcodes: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray,
    group_size: int,
    sub: int,
    kmax: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit ``d*sc_j*q - dmin*m_j`` (Q2_K: sub=16, kmax=15; Q4_K: sub=32, kmax=63) to ``s*(q-z)``.

    Per sub-block j the error is ``sum_i (A_j q_i - B_j)^2`` with ``A_j = d*sc_j - s_j`` and
    ``B_j = dmin*m_j - s_j*z_j``. For the chosen ``A_j`` the best ``B_j`` is ``A_j * mean(q)``, so:
    first fit ``d, sc`` to ``s`` weighted by the codes' centered sum of squares, then fit ``dmin, m``
    to ``s*z + A*mean(q)`` (the min absorbs the scale error at the sub-block's mean code).

    Returns:
        (d fp16 [rows, n/256], dmin fp16 [rows, n/256], sc uint8 [rows, n/sub], m uint8 [rows, n/sub]).
    """
    rows, n = qcodes.shape
    nb = n // QK_K
    spb = QK_K // sub  # sub-blocks per super-block
    spu = max(1, min(group_size, QK_K) // sub)  # sub-blocks per unit (group ∩ super-block)
    s_b = _per_sub(scales.astype(np.float32), group_size, sub).reshape(-1, spb)  # [B, spb]
    z_b = _per_sub(zeros.astype(np.float32), group_size, sub).reshape(-1, spb)  # [B, spb]
    qmean, qvar = _sub_stats(qcodes, sub)  # [R, n/sub] each
    mean_b, var_b = qmean.reshape(-1, spb), qvar.reshape(-1, spb)  # [B, spb]
    d_out = np.empty(rows * nb, dtype=np.float16)
    m_out = np.empty(rows * nb, dtype=np.float16)
    sc_out = np.empty((rows * nb, spb), dtype=np.uint8)
    mn_out = np.empty((rows * nb, spb), dtype=np.uint8)
    for lo in range(0, rows * nb, _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        s, z, qm, qv = s_b[sl], z_b[sl], mean_b[sl], var_b[sl]
        w_d = qv + np.float32(1e-3 * sub)  # tiny floor: constant sub-blocks still prefer an accurate scale
        d, sc = _fit_scale(s, w_d, spu, 0, kmax)  # [b], [b, spb]
        a = d.astype(np.float32)[:, None] * sc - s  # [b, spb] scale error A_j
        t = s * z + a * qm  # [b, spb] target of dmin*m_j
        dm, mn = _fit_scale(t, np.full_like(t, float(sub)), spu, 0, kmax)
        d_out[sl], m_out[sl], sc_out[sl], mn_out[sl] = d, dm, sc, mn
    return (
        d_out.reshape(rows, nb),
        m_out.reshape(rows, nb),
        sc_out.reshape(rows, n // sub),
        mn_out.reshape(rows, n // sub),
    )


def _require_sub(group_size: int, sub: int, type_name: str) -> None:
    """A k-quant sub-block must lie inside one uniform group."""
    if group_size % sub:
        raise ShapeError(
            f"{type_name}: group size {group_size} is not a multiple of the {sub}-weight sub-block; "
            "choose Q8_0 or F32"
        )


def uniform_to_q2_k(
    qcodes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, bits: int = 2
) -> MappedTensor:
    """Map a 2-bit uniform-grid weight to Q2_K, keeping the codes (lossy in the scales).

    Args:
        qcodes: uint8 [out, in] 0..3; scales: float16 [out, in/G]; zeros: uint8 [out, in/G].
        group_size: G, a multiple of 16; in must be a multiple of 256.
        bits: the checkpoint's bit width (must be 2: Q2_K holds 2-bit codes).

    Returns:
        MappedTensor with qtype Q2_K.

    Raises:
        ShapeError: codes wider than 2 bits, or shapes Q2_K cannot hold.
    """
    if bits != 2:
        raise ShapeError(f"Q2_K holds 2-bit codes; this checkpoint has {bits}-bit codes (choose Q3_K/Q4_K/Q4_0)")
    _check_uniform(qcodes, scales, zeros, group_size, bits)
    _rows_blocks(qcodes, QK_K, "Q2_K")
    _require_sub(group_size, 16, "Q2_K")
    d, dmin, sc, mn = _uniform_to_affine_k(qcodes, scales, zeros, group_size, 16, 15)
    data = pack_q2_k(qcodes, d, dmin, sc, mn)
    return MappedTensor(GGMLQuantizationType.Q2_K, data, dequant_q2_k_fields(qcodes, d, dmin, sc, mn), False)


def uniform_to_q4_k(
    qcodes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, bits: int
) -> MappedTensor:
    """Map a uniform-grid weight (b <= 4) to Q4_K, keeping the codes (6-bit sub-scales and mins).

    Args:
        qcodes: uint8 [out, in]; scales: float16 [out, in/G]; zeros: uint8 [out, in/G].
        group_size: G, a multiple of 32; in a multiple of 256.
        bits: 2, 3 or 4.

    Returns:
        MappedTensor with qtype Q4_K.

    Raises:
        ShapeError: on shapes Q4_K cannot hold.
    """
    if bits > 4:
        raise ShapeError(f"Q4_K holds codes up to 4 bits; got {bits}")
    _check_uniform(qcodes, scales, zeros, group_size, bits)
    _rows_blocks(qcodes, QK_K, "Q4_K")
    _require_sub(group_size, 32, "Q4_K")
    d, dmin, sc, mn = _uniform_to_affine_k(qcodes, scales, zeros, group_size, 32, 63)
    data = pack_q4_k(qcodes, d, dmin, sc, mn)
    return MappedTensor(GGMLQuantizationType.Q4_K, data, dequant_q4_k_fields(qcodes, d, dmin, sc, mn), False)


def uniform_to_q3_k(
    qcodes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, bits: int
) -> MappedTensor:
    """Map a 2/3-bit uniform-grid weight to Q3_K (symmetric, 6-bit signed sub-scales).

    Q3_K has no zero point, so each 16-weight sub-block writes ``x = q - z`` as ``c - 4 = sigma*x``
    with a per-sub-block reflection ``sigma`` (+1 or -1, folded into the sign of the sub-scale)
    chosen to clip the fewest codes: 2-bit codes (x in -3..3) never clip; 3-bit codes clip only where
    ``x`` falls outside -4..3 (sigma=+1) or -3..4 (sigma=-1), which the clamp to the nearest
    representable code handles. The sub-block's ideal scale is then the least-squares
    ``s*sum(x*v)/sum(v*v)`` (``v = c - 4``) and ``d``, ``S_j`` are fitted to it weighted by ``sum(v*v)``.

    Args:
        qcodes: uint8 [out, in]; scales: float16 [out, in/G]; zeros: uint8 [out, in/G].
        group_size: G, a multiple of 16; in a multiple of 256.
        bits: 2 or 3.

    Returns:
        MappedTensor with qtype Q3_K.

    Raises:
        ShapeError: codes wider than 3 bits or shapes Q3_K cannot hold.
    """
    if bits > 3:
        raise ShapeError(f"Q3_K holds codes up to 3 bits; this checkpoint has {bits}-bit codes (choose Q4_K/Q8_0)")
    _check_uniform(qcodes, scales, zeros, group_size, bits)
    rows, n, nb = _rows_blocks(qcodes, QK_K, "Q3_K")
    _require_sub(group_size, 16, "Q3_K")
    x = (qcodes.astype(np.int16) - np.repeat(zeros, group_size, axis=1)).reshape(rows, n // 16, 16)  # [R, n/16, 16]
    clip_pos = ((x - np.clip(x, -4, 3)) ** 2).sum(axis=2)  # [R, n/16]
    clip_neg = ((x - np.clip(x, -3, 4)) ** 2).sum(axis=2)
    sigma = np.where(clip_neg < clip_pos, -1, 1).astype(np.int16)  # [R, n/16]
    v = np.clip(sigma[:, :, None] * x, -4, 3)  # [R, n/16, 16]
    vv = (v.astype(np.float32) ** 2).sum(axis=2)  # [R, n/16]
    xv = (x.astype(np.float32) * v).sum(axis=2)  # [R, n/16]
    s_sub = _per_sub(scales.astype(np.float32), group_size, 16)  # [R, n/16]
    ideal = np.where(vv > 0, s_sub * xv / np.where(vv > 0, vv, 1), sigma * s_sub)  # [R, n/16]
    spu = max(1, min(group_size, QK_K) // 16)
    ideal_b, w_b = ideal.reshape(-1, 16), (vv + np.float32(1e-3 * 16)).reshape(-1, 16)  # [B, 16]
    d = np.empty(rows * nb, dtype=np.float16)
    big_s = np.empty((rows * nb, 16), dtype=np.int16)
    for lo in range(0, rows * nb, _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        d[sl], big_s[sl] = _fit_scale(ideal_b[sl], w_b[sl], spu, -32, 31, symmetric=True)
    d = d.reshape(rows, nb)
    big_s = big_s.reshape(rows, n // 16).astype(np.int8)
    codes = (v + 4).astype(np.uint8).reshape(rows, n)
    data = pack_q3_k(codes, d, big_s)
    return MappedTensor(GGMLQuantizationType.Q3_K, data, dequant_q3_k_fields(codes, d, big_s), False)


def uniform_to_q4_0(
    qcodes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, bits: int
) -> MappedTensor:
    """Map a uniform-grid weight with b <= 3 exactly to Q4_0 (``d = s``, value ``q - z`` in -7..7).

    Raises:
        ShapeError: b > 3 (``q - z`` can leave -8..7) or G not a multiple of 32.
    """
    if bits > 3:
        raise ShapeError(f"Q4_0 is exact only for codes up to 3 bits; got {bits} (choose Q8_0)")
    return _uniform_to_q_0(qcodes, scales, zeros, group_size, bits, GGMLQuantizationType.Q4_0)


def uniform_to_q8_0(
    qcodes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, bits: int
) -> MappedTensor:
    """Map a uniform-grid weight with b <= 4 exactly to Q8_0 (``d = s``, value ``q - z``).

    Raises:
        ShapeError: b > 7 or G not a multiple of 32.
    """
    if bits > 7:
        raise ShapeError(f"Q8_0 is exact only for codes up to 7 bits; got {bits}")
    return _uniform_to_q_0(qcodes, scales, zeros, group_size, bits, GGMLQuantizationType.Q8_0)


def _uniform_to_q_0(
    qcodes: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray,
    group_size: int,
    bits: int,
    qtype: GGMLQuantizationType,
) -> MappedTensor:
    """Shared body of the exact Q4_0 / Q8_0 mappings."""
    _check_uniform(qcodes, scales, zeros, group_size, bits)
    if group_size % 32:
        raise ShapeError(f"{qtype.name} is exact only for group sizes that are multiples of 32; got {group_size}")
    x = (qcodes.astype(np.int16) - np.repeat(zeros, group_size, axis=1)).astype(np.int8)  # [out, in]
    d = np.repeat(scales, group_size // 32, axis=1)  # [out, in/32]
    data = pack_q4_0(x, d) if qtype == GGMLQuantizationType.Q4_0 else pack_q8_0(x, d)
    return MappedTensor(qtype, data, None, True)


def uniform_type_choices(bits: int) -> list[str]:
    """GGUF types a uniform-grid checkpoint of ``bits`` can be exported to (first = default)."""
    lossy = {2: ["Q2_K", "Q3_K", "Q4_K"], 3: ["Q3_K", "Q4_K"], 4: ["Q4_K"]}.get(bits, [])
    exact = (["Q4_0"] if bits <= 3 else []) + ["Q8_0", "F32", "F16"]
    return lossy + exact


def map_uniform(
    qcodes: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray,
    group_size: int,
    bits: int,
    gguf_type: str,
) -> MappedTensor:
    """Map one uniform-grid weight to ``gguf_type``, falling back to an exact type where needed.

    A k-quant type whose 256-weight super-block (or sub-block) the tensor cannot hold falls back,
    as llama.cpp's quantize does, to the narrowest *exact* type: Q4_0 (b <= 3), else Q8_0, else F32
    (group sizes not a multiple of 32); the fallback is recorded in ``note``.

    Args:
        qcodes, scales, zeros, group_size, bits: the uniform-grid fields (DESIGN.md 3).
        gguf_type: one of :func:`uniform_type_choices` (bits).

    Returns:
        MappedTensor.

    Raises:
        ConfigError: a type this bit width cannot be exported to.
    """
    choices = uniform_type_choices(bits)
    if gguf_type not in choices:
        raise ConfigError(
            f"--gguf-type {gguf_type} cannot hold {bits}-bit uniform codes; choose one of {', '.join(choices)}"
        )
    args = (qcodes, scales, zeros, group_size, bits)
    if gguf_type == "F32":
        w = uniform_reference(qcodes, scales, zeros, group_size)
        return MappedTensor(GGMLQuantizationType.F32, w, None, True)
    if gguf_type == "F16":
        w = uniform_reference(qcodes, scales, zeros, group_size)
        w16 = w.astype(np.float16)
        return MappedTensor(GGMLQuantizationType.F16, w16, w16.astype(np.float32), False)
    n = qcodes.shape[1]
    sub = {"Q2_K": 16, "Q3_K": 16, "Q4_K": 32}.get(gguf_type, 32)
    if gguf_type in ("Q2_K", "Q3_K", "Q4_K") and (n % QK_K or group_size % sub):
        fb = _exact_fallback(qcodes, scales, zeros, group_size, bits)
        fb.note = (
            f"{gguf_type} needs rows of a multiple of {QK_K} and groups of a multiple of {sub} "
            f"(row {n}, group {group_size}): exact {fb.qtype.name} written instead"
        )
        return fb
    if gguf_type in ("Q4_0", "Q8_0") and group_size % 32:
        w = uniform_reference(qcodes, scales, zeros, group_size)
        return MappedTensor(
            GGMLQuantizationType.F32, w, None, True,
            note=f"{gguf_type} needs groups of a multiple of 32 (group {group_size}): exact F32 written instead",
        )
    fn = {
        "Q2_K": uniform_to_q2_k,
        "Q3_K": uniform_to_q3_k,
        "Q4_K": uniform_to_q4_k,
        "Q4_0": uniform_to_q4_0,
        "Q8_0": uniform_to_q8_0,
    }[gguf_type]
    return fn(*args)


def _exact_fallback(
    qcodes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, bits: int
) -> MappedTensor:
    """Narrowest exact type for a uniform-grid weight: Q4_0 (b <= 3), Q8_0, else F32."""
    if group_size % 32 == 0:
        if bits <= 3:
            return uniform_to_q4_0(qcodes, scales, zeros, group_size, bits)
        return uniform_to_q8_0(qcodes, scales, zeros, group_size, bits)
    w = uniform_reference(qcodes, scales, zeros, group_size)
    return MappedTensor(GGMLQuantizationType.F32, w, None, True)


def pack_q2_0(qcodes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Pack codes ``uint8 [rows, n]`` (0..3) and scales ``float16 [rows, n/64]`` into Q2_0 blocks.

    Block (18 bytes, :mod:`rqat_deploy.ggml_types`)::

        d  : fp16                     bytes 0..1
        qs : 16 bytes, 4 codes each   weight j at bits 2*(j % 4) of byte 2 + j // 4

    Returns:
        ``uint8 [rows, n/64 * 18]``; decodes to ``d * (q - 1)``.
    """
    rows, n, nb = _rows_blocks(np.asarray(qcodes), QK2_0, "Q2_0")
    q = _as_2d("qcodes", qcodes, np.uint8, (rows, n))
    _check_range("qcodes", q, 0, 3)
    d = _as_2d("d", d, np.float16, (rows, nb))
    q4 = q.reshape(rows, nb, QK2_0 // 4, 4)  # [R, B, 16, 4]: weight 4*i + k
    qs = q4[..., 0] | (q4[..., 1] << 2) | (q4[..., 2] << 4) | (q4[..., 3] << 6)  # [R, B, 16]
    blocks = np.concatenate([_fp16_bytes(d[:, :, None]), qs.astype(np.uint8)], axis=2)  # [R, B, 18]
    return blocks.reshape(rows, nb * Q2_0_BYTES)


def _pack_q2_0_fields(f: dict[str, np.ndarray]) -> np.ndarray:
    """Q2_0 from a q2_0-grid checkpoint's tensors (uniform layout, every zero point 1)."""
    if f["zeros"].size and (f["zeros"].min() != 1 or f["zeros"].max() != 1):
        raise ShapeError("Q2_0 holds zero point 1 only; this module's zeros differ (not a q2_0-grid checkpoint)")
    return pack_q2_0(f["qcodes"], f["scales"])


#: packers of the GGUF types a grid is stored in natively, from the checkpoint's tensors by name
NATIVE_PACKERS: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]] = {
    "Q2_K": lambda f: pack_q2_k(f["qcodes"], f["d"], f["dmin"], f["sub_scales"], f["sub_mins"]),
    "Q3_K": lambda f: pack_q3_k(f["qcodes"], f["d"], f["sub_scales"]),
    "Q2_0": _pack_q2_0_fields,
}


def pack_native(gguf_type: str, fields: dict[str, np.ndarray]) -> MappedTensor:
    """Pack a weight whose grid *is* ``gguf_type`` (e.g. a kquant checkpoint as Q2_K): exact.

    Args:
        gguf_type: a key of :data:`NATIVE_PACKERS`.
        fields: the checkpoint's tensors of the module as NumPy arrays (DESIGN.md 3).

    Raises:
        ConfigError: ``gguf_type`` has no native packer.
    """
    if gguf_type not in NATIVE_PACKERS:
        raise ConfigError(f"{gguf_type} is not a native GGUF type of any grid; known: {', '.join(NATIVE_PACKERS)}")
    return MappedTensor(GGMLQuantizationType[gguf_type], NATIVE_PACKERS[gguf_type](fields), None, True)


def map_float(w: np.ndarray, gguf_type: str) -> MappedTensor:
    """Write a dequantized weight ``w`` float32 [rows, n] as F32 (exact) or F16 (measured).

    Raises:
        ConfigError: another type.
    """
    if gguf_type == "F32":
        return MappedTensor(GGMLQuantizationType.F32, np.ascontiguousarray(w, dtype=np.float32), None, True)
    if gguf_type == "F16":
        w16 = w.astype(np.float16)
        return MappedTensor(GGMLQuantizationType.F16, w16, w16.astype(np.float32), False)
    raise ConfigError(f"map_float writes F32 or F16, not {gguf_type}")
