"""llama.cpp's k-quant grids, Q2_K (2 bits) and Q3_K (3 bits): exact in GGUF.

Super-blocks of ``QK_K = 256`` input weights, each of 16 sub-blocks of ``K_SUB = 16``::

    Q2_K:  w = fp16(d) * sc_j * q - fp16(dmin) * m_j      q in 0..3, sc_j, m_j in 0..15
    Q3_K:  w = fp16(d) * S_j * (c - 4)                     c in 0..7, S_j in -32..31

| grid         | tensor         | dtype   | shape          | range     | stored bits |
|--------------|----------------|---------|----------------|-----------|-------------|
| Q2_K / Q3_K  | ``qcodes``     | uint8   | ``[out, in]``    | 0..3 / 0..7 | 2 / 3     |
| Q2_K / Q3_K  | ``d``          | float16 | ``[out, in/256]``|           | 16          |
| Q2_K         | ``dmin``       | float16 | ``[out, in/256]``|           | 16          |
| Q2_K         | ``sub_scales`` | uint8   | ``[out, in/16]`` | 0..15     | 4           |
| Q2_K         | ``sub_mins``   | uint8   | ``[out, in/16]`` | 0..15     | 4           |
| Q3_K         | ``sub_scales`` | int8    | ``[out, in/16]`` | -32..31   | 6           |

In the unified form of :mod:`rqat_deploy.quant.reference` every sub-block is a group of 16 with
``s = d*sc`` and ``o = dmin*m`` (Q2_K, ``z = 0``) or ``s = d*S`` and ``z = 4`` (Q3_K). Initial
parameters come from our search (:mod:`rqat_deploy.quant.grids.kquant_search`), which starts from a
faithful port of ggml's own quantizer (:mod:`rqat_deploy.quant.grids.kquant_ggml`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rqat_deploy.errors import ConfigError, ShapeError
from rqat_deploy.quant.grids.base import Grid, GridQuantizer, GroupParams, TensorSpec, register
from rqat_deploy.quant.reference import FP16_MAX, dequant, expand_groups, fp16_ste, quantize_codes, round_ste

QK_K = 256  # weights per super-block (llama.cpp's QK_K)
K_SUB = 16  # weights per sub-block
N_SUB = QK_K // K_SUB  # sub-blocks per super-block
_F32 = torch.float32


# ---------------------------------------------------------------------------------------------
# the formulas (DESIGN.md 3)
# ---------------------------------------------------------------------------------------------


def q2_k_effective(
    d: torch.Tensor, dmin: torch.Tensor, sub_scales: torch.Tensor, sub_mins: torch.Tensor
) -> GroupParams:
    """Per-16 ``(s, z, o)`` of Q2_K: ``s = d*sc``, ``z = 0``, ``o = dmin*m`` (float32, ``[R, in/16]``)."""
    s = expand_groups(d.float(), N_SUB) * sub_scales.float()
    o = expand_groups(dmin.float(), N_SUB) * sub_mins.float()
    return s, torch.zeros_like(s), o


def q3_k_effective(d: torch.Tensor, sub_scales: torch.Tensor) -> GroupParams:
    """Per-16 ``(s, z, o)`` of Q3_K: ``s = d*sc``, ``z = 4``, ``o = 0`` (float32, ``[R, in/16]``)."""
    s = expand_groups(d.float(), N_SUB) * sub_scales.float()
    return s, torch.full_like(s, 4.0), torch.zeros_like(s)


def dequantize_q2_k(
    qcodes: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sub_scales: torch.Tensor, sub_mins: torch.Tensor
) -> torch.Tensor:
    """``W = d*sub_scales*q - dmin*sub_mins`` in float32 (Q2_K, DESIGN.md 3)."""
    s, z, o = q2_k_effective(d, dmin, sub_scales, sub_mins)
    return dequant(qcodes.float(), s, z, o, K_SUB)


def dequantize_q3_k(qcodes: torch.Tensor, d: torch.Tensor, sub_scales: torch.Tensor) -> torch.Tensor:
    """``W = d*sub_scales*(qcodes - 4)`` in float32 (Q3_K, DESIGN.md 3)."""
    s, z, o = q3_k_effective(d, sub_scales)
    return dequant(qcodes.float(), s, z, o, K_SUB)


def q2_k_codes(
    w: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sub_scales: torch.Tensor, sub_mins: torch.Tensor
) -> torch.Tensor:
    """The Q2_K codes the forward uses for weight ``w`` (uint8 ``[out, in]``, 0..3)."""
    s, z, o = q2_k_effective(d, dmin, sub_scales, sub_mins)
    return quantize_codes(w.float(), s, z, o, 3, K_SUB).to(torch.uint8)


def q3_k_codes(w: torch.Tensor, d: torch.Tensor, sub_scales: torch.Tensor) -> torch.Tensor:
    """The Q3_K codes (``q + 4``) the forward uses for weight ``w`` (uint8 ``[out, in]``, 0..7)."""
    s, z, o = q3_k_effective(d, sub_scales)
    return quantize_codes(w.float(), s, z, o, 7, K_SUB).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# parameters of one matrix (what the port and the search return)
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
        """Check bit width, dtypes and shapes against the grid's layout (not value ranges, which
        would cost a full pass).

        Raises:
            ConfigError: ``bits`` is not 2 or 3.
            ShapeError: a tensor has the wrong dtype or shape, or ``dmin``/``sub_mins`` are
                missing for Q2_K or present for Q3_K.
        """
        if self.bits not in KQUANT_GRIDS:
            raise ConfigError(f"k-quant bits must be 2 (Q2_K) or 3 (Q3_K), got {self.bits}")
        if self.qcodes.dim() != 2 or self.qcodes.shape[1] % QK_K:
            raise ShapeError(f"qcodes must be [out, in] with in % {QK_K} == 0, got {tuple(self.qcodes.shape)}")
        want = KQUANT_GRIDS[self.bits].layout(*self.qcodes.shape)
        got = {"qcodes": self.qcodes, "d": self.d, "dmin": self.dmin, "sub_scales": self.sub_scales,
               "sub_mins": self.sub_mins}
        for name, t in got.items():
            spec = want.get(name)
            if spec is None and t is not None:
                raise ShapeError(f"Q{self.bits}_K parameters have no {name}; pass None")
            if spec is not None and (t is None or t.dtype != spec.dtype or tuple(t.shape) != spec.shape):
                shown = None if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise ShapeError(f"Q{self.bits}_K {name} must be {spec.dtype} {spec.shape}, got {shown}")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors, by name (DESIGN.md 3)."""
        t = {"qcodes": self.qcodes, "d": self.d, "dmin": self.dmin, "sub_scales": self.sub_scales,
             "sub_mins": self.sub_mins}
        return {k: v for k, v in t.items() if v is not None}

    def dequantize(self) -> torch.Tensor:
        """The dequantized weight, float32 ``[out, in]`` (the grid's formula, DESIGN.md 3)."""
        return KQUANT_GRIDS[self.bits].dequantize(self.tensors())


def check_kquant_weight(w: torch.Tensor, grid: str) -> torch.Tensor:
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


def q2_k_params(
    w: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor
) -> KQuantParams:
    """Q2_K parameters with the codes the forward uses for ``w`` (float32 ``[out, in]``)."""
    return KQuantParams(bits=2, qcodes=q2_k_codes(w, d, dmin, sc, m), d=d, dmin=dmin, sub_scales=sc, sub_mins=m)


def q3_k_params(w: torch.Tensor, d: torch.Tensor, sc: torch.Tensor) -> KQuantParams:
    """Q3_K parameters with the codes the forward uses for ``w`` (float32 ``[out, in]``)."""
    return KQuantParams(bits=3, qcodes=q3_k_codes(w, d, sc), d=d, dmin=None, sub_scales=sc, sub_mins=None)


# ---------------------------------------------------------------------------------------------
# trainable quantizers
# ---------------------------------------------------------------------------------------------


def _fp16_clamped(x: torch.Tensor) -> torch.Tensor:
    """``fp16(clamp(x, -FP16_MAX, FP16_MAX))`` with a straight-through gradient."""
    return fp16_ste(x.clamp(-FP16_MAX, FP16_MAX))


def _stored_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clamp(-FP16_MAX, FP16_MAX).half()


class _KQuantizer(GridQuantizer):
    """Shared by Q2_K / Q3_K: fp16 super-block scales times integer sub-scales."""

    gs = K_SUB
    stage2_optional = ("sub_scales", "sub_mins")

    def scale_lr_ratios(self) -> dict[str, float]:
        """``mean|d| / mean|d * sub_scale|`` (and the same for ``dmin``), at most 1.

        The effective scale of a 16-weight sub-block is ``d * sub_scale`` with an integer
        sub-scale around 10 (up to 15 / 32): the uniform grid's learning rate on ``d`` would move
        every effective scale about ten times further, relatively.
        """
        s, _, o = self.group_params()  # [out, in/16]
        ratios = {}
        for name, eff in (("d", s), ("dmin", o)):
            p = getattr(self, name, None)
            if p is None:
                continue
            denom = float(eff.detach().abs().mean())
            ratios[name] = min(float(p.detach().abs().mean()) / denom, 1.0) if denom > 0 else 1.0
        return ratios


class Q2KQuantizer(_KQuantizer):
    """Trainable Q2_K parameters: fp32 latents of ``d``, ``dmin`` ``[out, in/256]`` and of the
    integer ``sub_scales``, ``sub_mins`` ``[out, in/16]`` (rounded straight-through)."""

    qmax = 3
    stage2_trainable = ("d", "dmin")

    def __init__(self, d: torch.Tensor, dmin: torch.Tensor, sub_scales: torch.Tensor, sub_mins: torch.Tensor) -> None:
        super().__init__()
        self.d = nn.Parameter(d.float().clone())  # [out, in/256]
        self.dmin = nn.Parameter(dmin.float().clone())  # [out, in/256]
        self.sub_scales = nn.Parameter(sub_scales.float().clone())  # [out, in/16]
        self.sub_mins = nn.Parameter(sub_mins.float().clone())  # [out, in/16]

    def group_params(self) -> GroupParams:
        d = expand_groups(_fp16_clamped(self.d), N_SUB)  # [out, in/16]
        dmin = expand_groups(_fp16_clamped(self.dmin), N_SUB)
        s = d * round_ste(self.sub_scales).clamp(0, 15)
        o = dmin * round_ste(self.sub_mins).clamp(0, 15)
        return s, torch.zeros_like(s), o

    def params(self) -> dict[str, torch.Tensor]:
        return {
            "d": _stored_fp16(self.d),
            "dmin": _stored_fp16(self.dmin),
            "sub_scales": torch.round(self.sub_scales.detach()).clamp(0, 15).to(torch.uint8),
            "sub_mins": torch.round(self.sub_mins.detach()).clamp(0, 15).to(torch.uint8),
        }


class Q3KQuantizer(_KQuantizer):
    """Trainable Q3_K parameters: fp32 latents of ``d`` ``[out, in/256]`` and of the integer
    ``sub_scales`` ``[out, in/16]`` (rounded straight-through)."""

    qmax = 7
    stage2_trainable = ("d",)

    def __init__(self, d: torch.Tensor, sub_scales: torch.Tensor) -> None:
        super().__init__()
        self.d = nn.Parameter(d.float().clone())  # [out, in/256]
        self.sub_scales = nn.Parameter(sub_scales.float().clone())  # [out, in/16]

    def group_params(self) -> GroupParams:
        d = expand_groups(_fp16_clamped(self.d), N_SUB)  # [out, in/16]
        s = d * round_ste(self.sub_scales).clamp(-32, 31)
        return s, torch.full_like(s, 4.0), torch.zeros_like(s)

    def params(self) -> dict[str, torch.Tensor]:
        return {
            "d": _stored_fp16(self.d),
            "sub_scales": torch.round(self.sub_scales.detach()).clamp(-32, 31).to(torch.int8),
        }


# ---------------------------------------------------------------------------------------------
# the grids
# ---------------------------------------------------------------------------------------------


class _KQuantGrid(Grid):
    """A k-quant grid: fixed 256-weight super-blocks, 16-weight groups in the unified form."""

    @classmethod
    def create(cls, bits: int, group_size: int) -> "_KQuantGrid":
        return cls(bits, QK_K, QK_K, K_SUB, 2**bits - 1)  # group_size: fixed by the format


@register("kquant", bits=(2,))
class Q2KGrid(_KQuantGrid):
    """llama.cpp Q2_K, 2.625 bits per weight."""

    gguf_type = "Q2_K"

    def layout(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        nb, ns = (out_features, in_features // QK_K), (out_features, in_features // K_SUB)
        return {
            "qcodes": TensorSpec(torch.uint8, (out_features, in_features), 0, 3, 2),
            "d": TensorSpec(torch.float16, nb),
            "dmin": TensorSpec(torch.float16, nb),
            "sub_scales": TensorSpec(torch.uint8, ns, 0, 15, 4),
            "sub_mins": TensorSpec(torch.uint8, ns, 0, 15, 4),
        }

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_q2_k(t["qcodes"], t["d"], t["dmin"], t["sub_scales"], t["sub_mins"])

    def init(self, w: torch.Tensor) -> GridQuantizer:
        from rqat_deploy.quant.grids.kquant_search import init_q2_k

        p = init_q2_k(w.detach().float())
        assert p.dmin is not None and p.sub_mins is not None  # Q2_K parameters always have them
        return Q2KQuantizer(p.d, p.dmin, p.sub_scales, p.sub_mins)

    def from_checkpoint(self, t: dict[str, torch.Tensor]) -> GridQuantizer:
        return Q2KQuantizer(t["d"], t["dmin"], t["sub_scales"], t["sub_mins"])


@register("kquant", bits=(3,))
class Q3KGrid(_KQuantGrid):
    """llama.cpp Q3_K, 3.4375 bits per weight."""

    gguf_type = "Q3_K"

    def layout(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        return {
            "qcodes": TensorSpec(torch.uint8, (out_features, in_features), 0, 7, 3),
            "d": TensorSpec(torch.float16, (out_features, in_features // QK_K)),
            "sub_scales": TensorSpec(torch.int8, (out_features, in_features // K_SUB), -32, 31, 6),
        }

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_q3_k(t["qcodes"], t["d"], t["sub_scales"])

    def init(self, w: torch.Tensor) -> GridQuantizer:
        from rqat_deploy.quant.grids.kquant_search import init_q3_k

        p = init_q3_k(w.detach().float())
        return Q3KQuantizer(p.d, p.sub_scales)

    def from_checkpoint(self, t: dict[str, torch.Tensor]) -> GridQuantizer:
        return Q3KQuantizer(t["d"], t["sub_scales"])


KQUANT_GRIDS: dict[int, _KQuantGrid] = {2: Q2KGrid.create(2, QK_K), 3: Q3KGrid.create(3, QK_K)}
