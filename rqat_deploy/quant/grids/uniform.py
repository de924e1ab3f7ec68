"""The uniform grid (the paper's): asymmetric, one fp16 scale and one integer zero point per group.

For a group of ``G`` consecutive inputs of one output row::

    q  = clamp(round(w / s) + z, 0, 2^b - 1)      # uint8 code
    w' = s * (q - z)                               # s fp16, z integer in 0..2^b-1

| checkpoint tensor | dtype   | shape         | range      |
|-------------------|---------|---------------|------------|
| ``qcodes``        | uint8   | ``[out, in]``   | 0..2^b-1   |
| ``scales``        | float16 | ``[out, in/G]`` |            |
| ``zeros``         | uint8   | ``[out, in/G]`` | 0..2^b-1   |

Exact in compressed-tensors ``pack-quantized``, GPTQ and ONNX ``MatMulNBits`` layouts (one scale
and one zero point per group), and in GGUF Q4_0 / Q8_0 containers; the GGUF k-quants re-fit its
scales (lossy, measured by the exporter).
"""

from __future__ import annotations

import torch
from torch import nn

from rqat_deploy.errors import ConfigError, ShapeError
from rqat_deploy.quant import reference
from rqat_deploy.quant.grids.base import Grid, GridQuantizer, GroupParams, TensorSpec, register
from rqat_deploy.quant.reference import FP16_MAX, MIN_SCALE, fp16_round, fp16_ste, round_ste

GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)


def rtn_uniform_init(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max round-to-nearest parameters of the asymmetric uniform grid.

    ``scale = fp16(max(max - min, eps) / qmax)`` per group (min/max include 0, so zero is exact),
    ``zero = clamp(round(-min / scale), 0, qmax)``.

    Args:
        w: weight ``[out, in]``.
        bits: code width.
        group_size: G, dividing ``in``.

    Returns:
        ``scales`` float32 (fp16-representable) and ``zeros`` float32 integers, both ``[out, in/G]``.
    """
    out, k = w.shape
    if k % group_size:
        raise ShapeError(f"in_features {k} is not a multiple of group size {group_size}")
    qmax = 2**bits - 1
    g = w.detach().float().reshape(out, k // group_size, group_size)  # [out, in/G, G]
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    scale = fp16_round(((hi - lo) / qmax).clamp(min=MIN_SCALE)).clamp(min=MIN_SCALE)  # [out, in/G]
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


def dequantize_uniform(
    qcodes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``W[o,i] = scales[o,i//G] * (qcodes[o,i] - zeros[o,i//G])`` in float32."""
    s = scales.float()
    return reference.dequant(qcodes.float(), s, zeros.float(), torch.zeros_like(s), group_size)


class UniformQuantizer(GridQuantizer):
    """Trainable fp32 latents of the uniform grid: ``scale`` and ``zero`` ``[out, in/G]``.

    The forward uses ``fp16(clamp(scale))`` and ``clamp(round(zero))`` (straight-through), the
    values the checkpoint stores.
    """

    stage2_trainable = ("scale",)

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.float().clone())  # [out, in/G]
        self.zero = nn.Parameter(zero.float().clone())  # [out, in/G]
        self.gs, self.qmax = group_size, 2**bits - 1

    def group_params(self) -> GroupParams:
        s = fp16_ste(self.scale.clamp(MIN_SCALE, FP16_MAX))  # [out, in/G]
        z = round_ste(self.zero).clamp(0, self.qmax)
        return s, z, torch.zeros_like(s)

    def params(self) -> dict[str, torch.Tensor]:
        s, z, _ = (t.detach() for t in self.group_params())
        return {"scales": s.half(), "zeros": z.to(torch.uint8)}


class UniformFamily(Grid):
    """Grids stored in the uniform layout (``qcodes``, fp16 ``scales``, uint8 ``zeros`` per group)."""

    uniform_layout = True

    def layout(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        ng = (out_features, in_features // self.group_size)
        return {
            "qcodes": TensorSpec(torch.uint8, (out_features, in_features), 0, self.qmax, self.bits),
            "scales": TensorSpec(torch.float16, ng),
            "zeros": TensorSpec(torch.uint8, ng, 0, self.qmax, self.bits),
        }

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_uniform(t["qcodes"], t["scales"], t["zeros"], self.group_size)

    def from_checkpoint(self, t: dict[str, torch.Tensor]) -> GridQuantizer:
        return UniformQuantizer(t["scales"].float(), t["zeros"].float(), self.bits, self.group_size)


@register("uniform", bits=(2, 3, 4))
class UniformGrid(UniformFamily):
    """The paper's grid: asymmetric, group size G (a power of two, 16..1024) along the input."""

    @classmethod
    def create(cls, bits: int, group_size: int) -> "UniformGrid":
        if not isinstance(group_size, int) or group_size not in GROUP_SIZES:
            raise ConfigError(f"group_size must be a power of two between 16 and 1024, got {group_size!r}")
        return cls(bits, group_size, group_size, group_size, 2**bits - 1)

    def input_size_fix(self, in_features: int) -> str:
        fits = [g for g in reversed(GROUP_SIZES) if in_features % g == 0]
        return f"use --group-size {fits[0]}" if fits else "no power-of-two group size divides it"

    def init(self, w: torch.Tensor) -> GridQuantizer:
        scale, zero = rtn_uniform_init(w, self.bits, self.group_size)
        return UniformQuantizer(scale, zero, self.bits, self.group_size)
