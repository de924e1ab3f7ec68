"""The fake-quantized Linear, in the two training forms.

- ``stage1``: a latent float weight trains together with the quantization parameters; the forward
  fake-quantizes it (straight-through rounding, LSQ gradients).
- ``stage2``: the integer codes are frozen buffers; the forward dequantizes them
  (``W = s*(q - z) - o``) and only the scales train.

In both forms the weight the forward multiplies with is exactly the checkpoint's dequantized weight
(DESIGN.md 3) once :meth:`QuantLinear.checkpoint_tensors` has been written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rqat_deploy.quant import backend
from rqat_deploy.quant import reference
from rqat_deploy.quant.grids import GridQuantizer
from rqat_deploy.quant.spec import QuantSpec


class QuantLinear(nn.Module):
    """A Linear whose weight is quantized on ``spec``'s grid.

    Args:
        in_features, out_features: the weight shape is ``[out_features, in_features]``.
        bias: optional bias ``[out_features]`` (kept in floating point).
        quantizer: the grid's parameters for this weight.
        spec: the quantization spec.
        weight: latent weight for the ``stage1`` form, or ``None``.
        qcodes: frozen uint8 codes for the ``stage2`` form, or ``None``.
        backend: ``auto`` | ``triton`` | ``reference`` (``None``: ``RQAT_BACKEND`` or auto).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        quantizer: GridQuantizer,
        spec: QuantSpec,
        *,
        weight: torch.Tensor | None = None,
        qcodes: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if (weight is None) == (qcodes is None):
            raise ValueError("QuantLinear needs exactly one of weight (stage1) or qcodes (stage2)")
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.quantizer, self.backend = spec, quantizer, backend
        self.weight = nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.register_buffer("qcodes", qcodes.to(torch.uint8) if qcodes is not None else None)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, backend: str | None = None) -> "QuantLinear":
        """Stage-1 QuantLinear initialised from a float Linear (RTN / k-quant search)."""
        w = linear.weight.detach()
        q = spec.grid_def.init(w.float()).to(w.device)
        return cls(linear.in_features, linear.out_features, linear.bias, q, spec, weight=w, backend=backend)

    @classmethod
    def from_checkpoint(
        cls, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, spec: QuantSpec, backend: str | None = None
    ) -> "QuantLinear":
        """Stage-2 QuantLinear from one module's checkpoint tensors (``qcodes``, scales...)."""
        q = spec.grid_def.from_checkpoint(tensors)
        out_f, in_f = tensors["qcodes"].shape
        return cls(in_f, out_f, bias, q, spec, qcodes=tensors["qcodes"], backend=backend)

    @property
    def form(self) -> str:
        """``"stage1"`` (latent weight trains) or ``"stage2"`` (codes frozen)."""
        return "stage1" if self.weight is not None else "stage2"

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses ``[out, in]`` (differentiable w.r.t. the trainable parameters)."""
        s, z, o = self.quantizer.group_params()  # [out, in/gs] each
        q = self.quantizer
        if self.weight is not None:
            return backend.fake_quant(self.weight, s, z, o, q.qmax, q.gs, self.backend)
        return backend.dequant(self.qcodes, s, z, o, q.gs, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w.to(x.dtype), bias)

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The integer codes the forward uses, uint8 ``[out, in]``."""
        if self.qcodes is not None:
            return self.qcodes
        s, z, o = (t.detach() for t in self.quantizer.group_params())
        q = reference.quantize_codes(self.weight.detach().float(), s, z, o, self.quantizer.qmax, self.quantizer.gs)
        return q.to(torch.uint8)

    @torch.no_grad()
    def freeze_codes(self, train_sub_scales: bool = False) -> None:
        """Switch to the stage-2 form: store the current codes, drop the latent weight."""
        if self.weight is not None:
            self.qcodes = self.codes()
            self.weight = None
        self.quantizer.set_stage2(train_sub_scales)

    @torch.no_grad()
    def thaw_codes(self) -> None:
        """Switch to the stage-1 form: a float32 latent weight equal to the dequantized weight trains.

        The quantization parameters are frozen, so the codes the forward derives from the latent
        weight are the frozen ones until training moves the weight across a rounding boundary.
        """
        if self.weight is None:
            self.weight = nn.Parameter(self.dequantized_weight())
            self.qcodes = None
        for p in self.quantizer.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """This module's tensors in the checkpoint layout of DESIGN.md 3 (on CPU)."""
        return {k: v.cpu().contiguous() for k, v in self.quantizer.checkpoint_tensors(self.codes()).items()}

    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight ``[out, in]`` the forward multiplies with (no autograd)."""
        return self.quantized_weight().detach().float()

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={s.bits}, grid={s.grid}, form={self.form}"
        )
