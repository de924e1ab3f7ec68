"""The reference quantizer: pure PyTorch, the one source of truth for the math.

Every grid reduces to one element-wise form over *groups* of ``gs`` consecutive input columns,
each group with an effective scale ``s``, an integer zero point ``z`` and an offset ``o``::

    t  = round((w + o) / s) + z            # round half to even (torch.round, Triton rint)
    q  = clamp(t, 0, qmax)                 # the stored code
    w' = s * (q - z) - o                   # the dequantized weight

| grid            | gs  | s                      | z          | o                 | qmax |
|-----------------|-----|------------------------|------------|-------------------|------|
| uniform         | G   | fp16(scale)            | zero point | 0                 | 2^b-1|
| kquant Q2_K     | 16  | fp16(d) * sub_scale    | 0          | fp16(dmin) * min  | 3    |
| kquant Q3_K     | 16  | fp16(d) * sub_scale    | 4          | 0                 | 7    |

With ``o = 0`` and ``z = 0`` the extra terms are exact no-ops in IEEE arithmetic (``x + 0 == x``,
``x - 0 == x``), so the single form reproduces each grid's checkpoint formula (DESIGN.md 3) bit for
bit. A group whose ``s`` is 0 (a k-quant sub-scale of 0) decodes to ``-o`` whatever its codes; the
forward then sets its codes to ``z`` so that the stored codes are the ones the forward used.

Two autograd functions implement the two training forms; the Triton kernels in
``rqat_deploy.kernels`` are their fused twins and must match them exactly in fp32:

- :class:`FakeQuantFn` (stage 1, latent weights train): straight-through rounding, LSQ-style
  gradients. Inside the clamp range ``dw'/dw = 1``, ``dw'/ds = round(u) - u`` (``u = (w+o)/s``),
  ``dw'/dz = 0``, ``dw'/do = 0``; outside ``dw'/dw = 0``, ``dw'/ds = q - z``, ``dw'/dz = -s``,
  ``dw'/do = -1``.
- :class:`DequantFn` (stage 2, codes frozen): ``W = s*(q - z) - o``, ``dW/ds = q - z``, ``dW/do = -1``.

Per-group gradient sums use :func:`group_sum`, a fixed halving tree, so that a kernel doing the
same additions in the same order gives the same bits.
"""

from __future__ import annotations

import torch

from rqat_deploy.errors import ShapeError

MIN_SCALE = 2.0**-24  # smallest positive fp16 (subnormal); uniform scales are clamped to it
FP16_MAX = 65504.0  # largest finite fp16; trained fp16 scales are clamped to it


# ---------------------------------------------------------------------------------------------
# small straight-through helpers
# ---------------------------------------------------------------------------------------------


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


class _Fp16STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward, identity gradient in the backward."""
    return _RoundSTE.apply(x)


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (kept in ``x``'s dtype), identity gradient."""
    return _Fp16STE.apply(x)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round a float tensor to fp16 precision and return float32 (no autograd)."""
    return x.detach().to(torch.float16).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# group layout
# ---------------------------------------------------------------------------------------------


def expand_groups(p: torch.Tensor, gs: int) -> torch.Tensor:
    """Repeat per-group values along the last dim: ``[R, K/gs] -> [R, K]``."""
    return p.repeat_interleave(gs, dim=-1)


def group_sum(x: torch.Tensor, gs: int) -> torch.Tensor:
    """Sum each group of ``gs`` consecutive values along the last dim with a fixed halving tree.

    ``x[..., :h] + x[..., h:]`` is applied until one value per group is left; ``gs`` must be a
    power of two. The Triton kernels add in the same order, so results match bit for bit.

    Args:
        x: ``[..., K]`` with ``K % gs == 0``.
        gs: group size, a power of two.

    Returns:
        ``[..., K/gs]``.
    """
    if gs & (gs - 1):
        raise ShapeError(f"group_sum needs a power-of-two group size, got {gs}")
    y = x.reshape(*x.shape[:-1], x.shape[-1] // gs, gs)  # [..., K/gs, gs]
    while y.shape[-1] > 1:
        h = y.shape[-1] // 2
        y = y[..., :h] + y[..., h:]
    return y[..., 0]


def _check_groups(w: torch.Tensor, p: torch.Tensor, gs: int, what: str) -> None:
    if w.dim() != 2 or p.shape != (w.shape[0], w.shape[1] // gs) or w.shape[1] % gs:
        raise ShapeError(
            f"{what}: expected weight [R, K] with K % {gs} == 0 and group tensor [R, K/{gs}], "
            f"got {tuple(w.shape)} and {tuple(p.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# the element-wise form (no autograd): codes, fake-quant, dequant
# ---------------------------------------------------------------------------------------------


def _ratio(w: torch.Tensor, s: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``u = (w + o) / s`` with a safe divisor, and the mask of groups whose ``s`` is non-zero."""
    live = s != 0
    u = (w + o) / torch.where(live, s, torch.ones_like(s))
    return u, live


def quantize_codes(
    w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, o: torch.Tensor, qmax: int, gs: int
) -> torch.Tensor:
    """The codes the forward uses: ``clamp(round((w + o)/s) + z, 0, qmax)`` (``z`` where ``s == 0``).

    Args:
        w: weight ``[R, K]`` float32.
        s, z, o: per-group scale, zero point, offset ``[R, K/gs]`` float32 (``z`` integer-valued).
        qmax: largest code, ``2**bits - 1``.
        gs: group size.

    Returns:
        Codes ``[R, K]`` as float32 integers in ``0..qmax``.
    """
    _check_groups(w, s, gs, "quantize_codes")
    s, z, o = (expand_groups(p, gs) for p in (s, z, o))  # [R, K]
    u, live = _ratio(w, s, o)
    q = torch.clamp(torch.round(u) + z, 0, qmax)
    return torch.where(live, q, z)


def dequant(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, o: torch.Tensor, gs: int) -> torch.Tensor:
    """``W = s * (q - z) - o`` per group (no autograd needed; see :class:`DequantFn`)."""
    _check_groups(q, s, gs, "dequant")
    return expand_groups(s, gs) * (q - expand_groups(z, gs)) - expand_groups(o, gs)


# ---------------------------------------------------------------------------------------------
# autograd functions (stage 1 and stage 2)
# ---------------------------------------------------------------------------------------------


def fake_quant_backward(
    g: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, o: torch.Tensor, qmax: int, gs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the stage-1 form (see module docstring).

    Returns:
        ``grad_w [R, K]``, ``grad_s``, ``grad_z``, ``grad_o`` ``[R, K/gs]``.
    """
    se, ze, oe = (expand_groups(p, gs) for p in (s, z, o))  # [R, K]
    u, live = _ratio(w, se, oe)
    r = torch.round(u)
    t = r + ze
    inside = (t >= 0) & (t <= qmax) & live
    q = torch.where(live, torch.clamp(t, 0, qmax), ze)
    zero = torch.zeros_like(w)
    grad_w = torch.where(inside, g, zero)
    grad_s = group_sum(g * torch.where(inside, r - u, q - ze), gs)
    grad_z = group_sum(torch.where(inside, zero, g * -se), gs)
    grad_o = group_sum(torch.where(inside, zero, -g), gs)
    return grad_w, grad_s, grad_z, grad_o


class FakeQuantFn(torch.autograd.Function):
    """Stage-1 fake quantization ``w -> s*(clamp(round((w+o)/s)+z, 0, qmax) - z) - o`` (reference)."""

    @staticmethod
    def forward(ctx, w, s, z, o, qmax: int, gs: int):  # type: ignore[override]
        q = quantize_codes(w, s, z, o, qmax, gs)
        ctx.save_for_backward(w, s, z, o)
        ctx.qmax, ctx.gs = qmax, gs
        return dequant(q, s, z, o, gs)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        w, s, z, o = ctx.saved_tensors
        gw, gs_, gz, go = fake_quant_backward(g.float().contiguous(), w, s, z, o, ctx.qmax, ctx.gs)
        return gw, gs_, gz, go, None, None


def dequant_backward(
    g: torch.Tensor, q: torch.Tensor, z: torch.Tensor, gs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the stage-2 form: ``grad_s = sum g*(q - z)``, ``grad_o = -sum g`` per group."""
    grad_s = group_sum(g * (q - expand_groups(z, gs)), gs)
    grad_o = group_sum(-g, gs)
    return grad_s, grad_o


class DequantFn(torch.autograd.Function):
    """Stage-2 form ``W = s*(q - z) - o`` with frozen codes ``q`` and zero points ``z`` (reference)."""

    @staticmethod
    def forward(ctx, q, s, z, o, gs: int):  # type: ignore[override]
        ctx.save_for_backward(q, z)
        ctx.gs = gs
        return dequant(q, s, z, o, gs)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        q, z = ctx.saved_tensors
        grad_s, grad_o = dequant_backward(g.float().contiguous(), q, z, ctx.gs)
        return None, grad_s, None, grad_o, None
