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
  division, an exact half-to-even :func:`_rint`, kernels launched with ``enable_fp_fusion=False`` so
  that no multiply-add is contracted into an FMA on the GPU);
- per-group sums use :func:`_group_sum`, the same halving tree as
  :func:`rqat_deploy.quant.reference.group_sum`.

Weights may be float32, bfloat16 or float16; the math is float32 inside the kernel and only the
result is cast back to the weight's dtype. Group parameters are float32.

This module imports ``triton`` at import time: the core imports it lazily, only when the Triton
backend is selected.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rqat_deploy.errors import BackendError, ShapeError

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the platform
    raise BackendError(
        "the Triton backend needs the `triton` package (Linux x86_64 with CUDA): pip install triton, "
        "or use the 'reference' backend"
    ) from exc

__all__ = [
    "FakeQuantTritonFn",
    "fake_quant_bwd",
    "fake_quant_codes",
    "fake_quant_fwd",
]

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_GS, _MAX_GS = 16, 1024
_MAX_GRID_Y = 65535  # CUDA limit of the second grid dimension

# ---------------------------------------------------------------------------------------------
# shared @triton.jit helpers (also used by rqat_deploy.kernels.dequant)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rint(x):
    """Round half to even, bit-exact (sign of zero included) in the interpreter and on the GPU.

    Equivalent torch math: ``torch.round(x)``.

    For ``|x| < 2**23`` the float32 sum ``|x| + 2**23`` has unit spacing, so IEEE round-to-nearest-even
    addition rounds ``|x|`` to the nearest integer with ties to even; subtracting ``2**23`` is then
    exact. Larger magnitudes (and inf/nan) are already integral. The sign bit of ``x`` is put back so
    that ``rint(-0.3) == -0.0`` like ``torch.round``. (Triton's interpreter cannot run libdevice's
    ``rint``; this form runs everywhere and compiles to two ``add.rn.f32``.)
    """
    a = tl.abs(x)
    r = (a + 8388608.0) - 8388608.0
    r = tl.where(a < 8388608.0, r, a)
    bits = r.to(tl.int32, bitcast=True) | (x.to(tl.int32, bitcast=True) & -2147483648)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _group_sum(x, BLOCK_R: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr, LOG2_GS: tl.constexpr):
    """Sum the last dim of a ``[BLOCK_R, NG, GS]`` tile with a fixed halving tree -> ``[BLOCK_R, NG]``.

    Equivalent torch math (:func:`rqat_deploy.quant.reference.group_sum`)::

        while x.shape[-1] > 1:
            h = x.shape[-1] // 2
            x = x[..., :h] + x[..., h:]
    """
    for i in tl.static_range(LOG2_GS):
        # [BLOCK_R, NG, 2, h] -> [BLOCK_R, NG, h, 2] -> two [BLOCK_R, NG, h] halves
        halves = tl.permute(tl.reshape(x, (BLOCK_R, NG, 2, GS >> (i + 1))), (0, 1, 3, 2))
        lo, hi = tl.split(halves)
        x = lo + hi
    return tl.reshape(x, (BLOCK_R, NG))


@triton.jit
def _tile_offsets(R, K, KG, BLOCK_R: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr):
    """Offsets and masks of this program's tile: ``BLOCK_R`` rows x ``NG`` whole groups of ``GS``.

    Returns ``(eoff, emask, poff, pmask)``: element offsets/mask ``[BLOCK_R, NG, GS]`` into an
    ``[R, K]`` tensor and group offsets/mask ``[BLOCK_R, NG]`` into an ``[R, KG]`` tensor.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    grps = tl.program_id(1) * NG + tl.arange(0, NG)  # [NG]
    cols = tl.arange(0, GS)  # [GS]
    rows64 = rows.to(tl.int64)
    pmask = (rows < R)[:, None] & (grps < KG)[None, :]  # [BLOCK_R, NG]
    poff = rows64[:, None] * KG + grps[None, :]  # [BLOCK_R, NG]
    eoff = rows64[:, None, None] * K + grps[None, :, None] * GS + cols[None, None, :]  # [BLOCK_R, NG, GS]
    emask = pmask[:, :, None] & (cols < GS)[None, None, :]  # [BLOCK_R, NG, GS]
    return eoff, emask, poff, pmask


@triton.jit
def _load_groups(ptr, poff, pmask, other, BLOCK_R: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr):
    """Load a ``[BLOCK_R, NG]`` float32 group tile and broadcast it to ``[BLOCK_R, NG, GS]``."""
    p = tl.load(ptr + poff, mask=pmask, other=other)  # [BLOCK_R, NG]
    return tl.broadcast_to(p[:, :, None], (BLOCK_R, NG, GS))


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
    eoff, emask, poff, pmask = _tile_offsets(R, K, KG, BLOCK_R, NG, GS)
    w = tl.load(w_ptr + eoff, mask=emask, other=0.0).to(tl.float32)  # [BLOCK_R, NG, GS]
    s = _load_groups(s_ptr, poff, pmask, 1.0, BLOCK_R, NG, GS)
    z = _load_groups(z_ptr, poff, pmask, 0.0, BLOCK_R, NG, GS)
    o = _load_groups(o_ptr, poff, pmask, 0.0, BLOCK_R, NG, GS)
    live = s != 0.0
    u = tl.math.div_rn(w + o, tl.where(live, s, 1.0))
    q = tl.minimum(tl.maximum(_rint(u) + z, 0.0), QMAX)
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
    eoff, emask, poff, pmask = _tile_offsets(R, K, KG, BLOCK_R, NG, GS)
    g = tl.load(g_ptr + eoff, mask=emask, other=0.0).to(tl.float32)  # [BLOCK_R, NG, GS]
    w = tl.load(w_ptr + eoff, mask=emask, other=0.0).to(tl.float32)  # [BLOCK_R, NG, GS]
    s = _load_groups(s_ptr, poff, pmask, 1.0, BLOCK_R, NG, GS)
    z = _load_groups(z_ptr, poff, pmask, 0.0, BLOCK_R, NG, GS)
    o = _load_groups(o_ptr, poff, pmask, 0.0, BLOCK_R, NG, GS)
    live = s != 0.0
    u = tl.math.div_rn(w + o, tl.where(live, s, 1.0))
    r = _rint(u)
    t = r + z
    inside = (t >= 0.0) & (t <= QMAX) & live
    q = tl.where(live, tl.minimum(tl.maximum(t, 0.0), QMAX), z)
    gw = tl.where(inside, g, 0.0)
    tl.store(gw_ptr + eoff, gw.to(gw_ptr.dtype.element_ty), mask=emask)
    d_s = g * tl.where(inside, r - u, q - z)
    d_z = tl.where(inside, 0.0, g * -s)
    d_o = tl.where(inside, 0.0, -g)
    tl.store(gs_ptr + poff, _group_sum(d_s, BLOCK_R, NG, GS, LOG2_GS), mask=pmask)
    tl.store(gz_ptr + poff, _group_sum(d_z, BLOCK_R, NG, GS, LOG2_GS), mask=pmask)
    tl.store(go_ptr + poff, _group_sum(d_o, BLOCK_R, NG, GS, LOG2_GS), mask=pmask)


# ---------------------------------------------------------------------------------------------
# launch helpers (shared with rqat_deploy.kernels.dequant)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shape of one program: ``block_r`` rows x ``ng`` groups of ``gs`` columns."""

    block_r: int
    ng: int
    num_warps: int

    def grid(self, rows: int, n_groups: int) -> tuple[int, int]:
        """``(row blocks, group blocks)`` covering an ``[rows, n_groups * gs]`` tensor."""
        return triton.cdiv(rows, self.block_r), triton.cdiv(n_groups, self.ng)


def interpreting(kernel: object) -> bool:
    """Whether ``kernel`` runs in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at definition)."""
    return type(kernel).__name__ == "InterpretedFunction"


def launch_config(
    rows: int, n_groups: int, gs: int, interpret: bool, block_r: int | None = None, ng: int | None = None
) -> LaunchConfig:
    """Pick a tile for an ``[rows, n_groups * gs]`` tensor.

    On the GPU a tile holds about 4096 elements (``ng * gs`` columns of at least 256 where the row
    allows) with 4 warps (8 for 8192+). The interpreter gets larger tiles (fewer programs, each
    a few numpy calls). ``block_r`` / ``ng`` override the choice (powers of two; tests use them to
    force several programs per dimension).
    """
    target = 16384 if interpret else 4096
    if ng is None:
        ng = max(1, min(256 // gs, triton.next_power_of_2(max(n_groups, 1))))
    if block_r is None:
        block_r = max(1, min(target // (ng * gs), triton.next_power_of_2(max(rows, 1))))
    for name, v in (("block_r", block_r), ("ng", ng)):
        if v < 1 or v & (v - 1):
            raise ShapeError(f"{name} must be a power of two >= 1, got {v}")
    num_warps = 8 if block_r * ng * gs >= 8192 else 4
    return LaunchConfig(block_r=block_r, ng=ng, num_warps=num_warps)


def check_gs(gs: int) -> None:
    """Raise :class:`ShapeError` unless ``gs`` is a power of two in 16..1024."""
    if not isinstance(gs, int) or isinstance(gs, bool) or gs < _MIN_GS or gs > _MAX_GS or gs & (gs - 1):
        raise ShapeError(
            f"group size must be a power of two between {_MIN_GS} and {_MAX_GS} for the Triton kernels, "
            f"got {gs!r}; use the 'reference' backend for other group sizes"
        )


def check_tensors(
    what: str,
    kernel: object,
    full: dict[str, tuple[torch.Tensor, tuple[torch.dtype, ...]]],
    groups: dict[str, torch.Tensor],
    gs: int,
) -> tuple[int, int]:
    """Validate the inputs of a launcher; return ``(R, K)``.

    Args:
        what: the launcher's name, for messages.
        kernel: the kernel to be launched (decides whether CPU tensors are allowed).
        full: ``name -> (tensor [R, K], allowed dtypes)``; the first one defines ``R, K``.
        groups: ``name -> float32 tensor [R, K/gs]``.
        gs: group size.

    Raises:
        ShapeError: a bad group size, rank or shape.
        BackendError: a wrong dtype, device or memory layout.
    """
    check_gs(gs)
    tensors = {**{k: v[0] for k, v in full.items()}, **groups}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise BackendError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    first_name, (first, _) = next(iter(full.items()))
    if first.dim() != 2:
        raise ShapeError(f"{what}: {first_name} must be 2-D [R, K], got shape {tuple(first.shape)}")
    rows, k = first.shape
    if k % gs:
        raise ShapeError(
            f"{what}: {first_name} has {k} columns, not a multiple of the group size {gs}; "
            "pick a group size that divides the input size or leave the module unquantized"
        )
    for name, (t, dtypes) in full.items():
        if tuple(t.shape) != (rows, k):
            raise ShapeError(f"{what}: {name} must have shape {(rows, k)}, got {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise BackendError(f"{what}: {name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    for name, t in groups.items():
        if tuple(t.shape) != (rows, k // gs):
            raise ShapeError(
                f"{what}: {name} must have shape [R, K/gs] = {(rows, k // gs)} for {first_name} "
                f"{(rows, k)} and gs={gs}, got {tuple(t.shape)}"
            )
        if t.dtype != torch.float32:
            raise BackendError(f"{what}: group parameter {name} must be float32, got {t.dtype}; call .float()")
    device = first.device
    for name, t in tensors.items():
        if t.device != device:
            raise BackendError(f"{what}: {name} is on {t.device} but {first_name} is on {device}; move them together")
        if not t.is_contiguous():
            raise BackendError(f"{what}: {name} must be contiguous; call .contiguous() first")
    if device.type != "cuda" and not interpreting(kernel):
        raise BackendError(
            f"{what}: the Triton kernels need CUDA tensors, got {device}; use the 'reference' backend "
            "(or set TRITON_INTERPRET=1 before importing triton, for tests)"
        )
    return rows, k


def check_qmax(what: str, qmax: int) -> None:
    """Raise :class:`ShapeError` unless ``qmax`` is an integer code range 1..255."""
    if not isinstance(qmax, int) or isinstance(qmax, bool) or not 1 <= qmax <= 255:
        raise ShapeError(f"{what}: qmax must be an integer in 1..255 (2**bits - 1), got {qmax!r}")


def run_on(device: torch.device) -> contextlib.AbstractContextManager:
    """Context manager making ``device`` current for the launch (a no-op off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


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
    if grid[1] > _MAX_GRID_Y:
        raise ShapeError(f"{what}: {k} columns need {grid[1]} column blocks, more than CUDA's {_MAX_GRID_Y}")
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
    if grid[1] > _MAX_GRID_Y:
        raise ShapeError(f"{what}: {k} columns need {grid[1]} column blocks, more than CUDA's {_MAX_GRID_Y}")
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
