"""Per-weight quantizers: the trainable parameters of each grid and their effective group form.

A quantizer owns the quantization parameters of one ``[out, in]`` weight and turns them into the
per-group ``(s, z, o)`` of the unified form (:mod:`rqat_deploy.quant.reference`), with straight-through
fp16 rounding of scales and straight-through rounding of integer parameters:

| grid    | trainable parameters (fp32 latents)                | checkpoint tensors (DESIGN.md 3)           |
|---------|----------------------------------------------------|--------------------------------------------|
| uniform | ``scale [out,in/G]``, ``zero [out,in/G]``          | ``scales`` fp16, ``zeros`` uint8            |
| Q2_K    | ``d``, ``dmin [out,in/256]``; ``sub_scales``, ``sub_mins [out,in/16]`` | ``d``/``dmin`` fp16, ``sub_*`` uint8 |
| Q3_K    | ``d [out,in/256]``; ``sub_scales [out,in/16]``     | ``d`` fp16, ``sub_scales`` int8             |
"""

from __future__ import annotations

import torch
from torch import nn

from rqat_deploy.quant import reference
from rqat_deploy.errors import CheckpointError
from rqat_deploy.quant.reference import FP16_MAX, K_SUB, MIN_SCALE, QK_K, expand_groups, fp16_ste, round_ste
from rqat_deploy.quant.spec import QuantSpec

GroupParams = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class GridQuantizer(nn.Module):
    """Base class: ``group_params()`` gives ``(s, z, o)`` ``[out, in/gs]`` of the unified form."""

    gs: int
    qmax: int
    #: names of parameters that stay trainable in stage 2 (codes frozen) by default
    stage2_trainable: tuple[str, ...] = ()

    def group_params(self) -> GroupParams:  # pragma: no cover - abstract
        raise NotImplementedError

    def checkpoint_tensors(self, qcodes: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def set_stage2(self, train_sub_scales: bool = False) -> None:
        """Freeze everything but the stage-2 scales (optionally the integer sub-scales too)."""
        extra = ("sub_scales", "sub_mins") if train_sub_scales else ()
        for name, p in self.named_parameters():
            p.requires_grad_(name in self.stage2_trainable or name in extra)


class UniformQuantizer(GridQuantizer):
    """Asymmetric uniform grid: fp16 ``scale`` and integer ``zero`` per group of ``G`` inputs."""

    stage2_trainable = ("scale",)

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.float().clone())  # [out, in/G]
        self.zero = nn.Parameter(zero.float().clone())  # [out, in/G]
        self.gs, self.qmax = group_size, 2**bits - 1

    @classmethod
    def from_weight(cls, w: torch.Tensor, spec: QuantSpec) -> "UniformQuantizer":
        """Round-to-nearest min-max initialisation (:func:`reference.rtn_uniform_init`)."""
        scale, zero = reference.rtn_uniform_init(w, spec.bits, spec.group_size)
        return cls(scale, zero, spec.bits, spec.group_size)

    def group_params(self) -> GroupParams:
        s = fp16_ste(self.scale.clamp(MIN_SCALE, FP16_MAX))  # [out, in/G]
        z = round_ste(self.zero).clamp(0, self.qmax)
        return s, z, torch.zeros_like(s)

    def checkpoint_tensors(self, qcodes: torch.Tensor) -> dict[str, torch.Tensor]:
        s, z, _ = (t.detach() for t in self.group_params())
        return {"qcodes": qcodes.to(torch.uint8), "scales": s.half(), "zeros": z.to(torch.uint8)}

    @classmethod
    def from_checkpoint(cls, t: dict[str, torch.Tensor], spec: QuantSpec) -> "UniformQuantizer":
        return cls(t["scales"].float(), t["zeros"].float(), spec.bits, spec.group_size)


class Q2KQuantizer(GridQuantizer):
    """llama.cpp Q2_K: ``w = fp16(d)*sc*q - fp16(dmin)*m`` with integer ``sc, m`` in 0..15, q in 0..3."""

    gs, qmax = K_SUB, 3
    stage2_trainable = ("d", "dmin")

    def __init__(self, d: torch.Tensor, dmin: torch.Tensor, sub_scales: torch.Tensor, sub_mins: torch.Tensor) -> None:
        super().__init__()
        self.d = nn.Parameter(d.float().clone())  # [out, in/256]
        self.dmin = nn.Parameter(dmin.float().clone())  # [out, in/256]
        self.sub_scales = nn.Parameter(sub_scales.float().clone())  # [out, in/16]
        self.sub_mins = nn.Parameter(sub_mins.float().clone())  # [out, in/16]

    @classmethod
    def from_weight(cls, w: torch.Tensor, spec: QuantSpec) -> "Q2KQuantizer":
        """Initialise with the k-quant search (:func:`rqat_deploy.quant.kquant.init_q2_k`)."""
        from rqat_deploy.quant.kquant import init_q2_k

        p = init_q2_k(w.detach().float())
        return cls(p.d, p.dmin, p.sub_scales, p.sub_mins)

    def group_params(self) -> GroupParams:
        per = QK_K // K_SUB
        d = expand_groups(fp16_ste(self.d.clamp(-FP16_MAX, FP16_MAX)), per)  # [out, in/16]
        dmin = expand_groups(fp16_ste(self.dmin.clamp(-FP16_MAX, FP16_MAX)), per)
        s = d * round_ste(self.sub_scales).clamp(0, 15)
        o = dmin * round_ste(self.sub_mins).clamp(0, 15)
        return s, torch.zeros_like(s), o

    def checkpoint_tensors(self, qcodes: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "qcodes": qcodes.to(torch.uint8),
            "d": self.d.detach().clamp(-FP16_MAX, FP16_MAX).half(),
            "dmin": self.dmin.detach().clamp(-FP16_MAX, FP16_MAX).half(),
            "sub_scales": torch.round(self.sub_scales.detach()).clamp(0, 15).to(torch.uint8),
            "sub_mins": torch.round(self.sub_mins.detach()).clamp(0, 15).to(torch.uint8),
        }

    @classmethod
    def from_checkpoint(cls, t: dict[str, torch.Tensor], spec: QuantSpec) -> "Q2KQuantizer":
        return cls(t["d"], t["dmin"], t["sub_scales"], t["sub_mins"])


class Q3KQuantizer(GridQuantizer):
    """llama.cpp Q3_K: ``w = fp16(d)*S*(code - 4)`` with integer ``S`` in -32..31, codes 0..7."""

    gs, qmax = K_SUB, 7
    stage2_trainable = ("d",)

    def __init__(self, d: torch.Tensor, sub_scales: torch.Tensor) -> None:
        super().__init__()
        self.d = nn.Parameter(d.float().clone())  # [out, in/256]
        self.sub_scales = nn.Parameter(sub_scales.float().clone())  # [out, in/16]

    @classmethod
    def from_weight(cls, w: torch.Tensor, spec: QuantSpec) -> "Q3KQuantizer":
        """Initialise with the k-quant search (:func:`rqat_deploy.quant.kquant.init_q3_k`)."""
        from rqat_deploy.quant.kquant import init_q3_k

        p = init_q3_k(w.detach().float())
        return cls(p.d, p.sub_scales)

    def group_params(self) -> GroupParams:
        d = expand_groups(fp16_ste(self.d.clamp(-FP16_MAX, FP16_MAX)), QK_K // K_SUB)  # [out, in/16]
        s = d * round_ste(self.sub_scales).clamp(-32, 31)
        return s, torch.full_like(s, 4.0), torch.zeros_like(s)

    def checkpoint_tensors(self, qcodes: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "qcodes": qcodes.to(torch.uint8),
            "d": self.d.detach().clamp(-FP16_MAX, FP16_MAX).half(),
            "sub_scales": torch.round(self.sub_scales.detach()).clamp(-32, 31).to(torch.int8),
        }

    @classmethod
    def from_checkpoint(cls, t: dict[str, torch.Tensor], spec: QuantSpec) -> "Q3KQuantizer":
        return cls(t["d"], t["sub_scales"])


#: checkpoint tensor names (beside ``qcodes``) and dtypes of each grid, keyed by (grid, bits)
def checkpoint_layout(spec: QuantSpec, out_features: int, in_features: int) -> dict[str, tuple[torch.dtype, tuple[int, int]]]:
    """Expected checkpoint tensors of one quantized Linear: name -> (dtype, shape).

    Args:
        spec: the quantization spec.
        out_features, in_features: the Linear's weight shape.
    """
    layout: dict[str, tuple[torch.dtype, tuple[int, int]]] = {"qcodes": (torch.uint8, (out_features, in_features))}
    if spec.grid == "uniform":
        ng = (out_features, in_features // spec.group_size)
        layout |= {"scales": (torch.float16, ng), "zeros": (torch.uint8, ng)}
    else:
        nb, ns = (out_features, in_features // QK_K), (out_features, in_features // K_SUB)
        layout["d"] = (torch.float16, nb)
        if spec.bits == 2:
            layout |= {"dmin": (torch.float16, nb), "sub_scales": (torch.uint8, ns), "sub_mins": (torch.uint8, ns)}
        else:
            layout["sub_scales"] = (torch.int8, ns)
    return layout


def quantizer_class(spec: QuantSpec) -> type[GridQuantizer]:
    """The quantizer class for a spec's grid and bit width."""
    if spec.grid == "uniform":
        return UniformQuantizer
    return Q2KQuantizer if spec.bits == 2 else Q3KQuantizer


def dequantize_tensors(t: dict[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """The float32 weight of one quantized Linear from its checkpoint tensors (DESIGN.md 3).

    Raises:
        CheckpointError: a tensor is missing.
    """
    need = ["qcodes", "scales", "zeros"] if spec.grid == "uniform" else (
        ["qcodes", "d", "dmin", "sub_scales", "sub_mins"] if spec.bits == 2 else ["qcodes", "d", "sub_scales"]
    )
    missing = [n for n in need if n not in t]
    if missing:
        raise CheckpointError(f"missing quantization tensors {missing}")
    if spec.grid == "uniform":
        return reference.dequantize_uniform(t["qcodes"], t["scales"], t["zeros"], spec.group_size)
    if spec.bits == 2:
        return reference.dequantize_q2_k(t["qcodes"], t["d"], t["dmin"], t["sub_scales"], t["sub_mins"])
    return reference.dequantize_q3_k(t["qcodes"], t["d"], t["sub_scales"])
