"""Building blocks shared by the Triton kernels: @triton.jit helpers, tile layout, launch checks.

Every helper's docstring gives its torch twin; the kernels in :mod:`rqat_deploy.kernels.fake_quant`
and :mod:`rqat_deploy.kernels.dequant` are built from them. This module imports ``triton`` at import
time and raises :class:`~rqat_deploy.errors.BackendError` when it is missing.
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

MIN_GS, MAX_GS = 16, 1024
MAX_GRID_Y = 65535  # CUDA limit of the second grid dimension

# ---------------------------------------------------------------------------------------------
# shared @triton.jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def rint(x):
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
def group_sum(x, BLOCK_R: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr, LOG2_GS: tl.constexpr):
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
def tile_offsets(R, K, KG, BLOCK_R: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr):
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
def load_groups(ptr, poff, pmask, other, BLOCK_R: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr):
    """Load a ``[BLOCK_R, NG]`` float32 group tile and broadcast it to ``[BLOCK_R, NG, GS]``."""
    p = tl.load(ptr + poff, mask=pmask, other=other)  # [BLOCK_R, NG]
    return tl.broadcast_to(p[:, :, None], (BLOCK_R, NG, GS))


# ---------------------------------------------------------------------------------------------
# launch helpers
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
    if not isinstance(gs, int) or isinstance(gs, bool) or gs < MIN_GS or gs > MAX_GS or gs & (gs - 1):
        raise ShapeError(
            f"group size must be a power of two between {MIN_GS} and {MAX_GS} for the Triton kernels, "
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


def check_grid(what: str, grid: tuple[int, int], k: int) -> None:
    """Raise :class:`ShapeError` when a launch needs more column blocks than CUDA allows."""
    if grid[1] > MAX_GRID_Y:
        raise ShapeError(f"{what}: {k} columns need {grid[1]} column blocks, more than CUDA's {MAX_GRID_Y}")
