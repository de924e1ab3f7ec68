"""llama.cpp's Q2_0 as a training grid: 2 bits, groups of 64, ``w = d * (q - 1)``, 2.25 bits per weight.

Q2_0 (ggml type 42, :mod:`rqat_deploy.ggml_types`) is the uniform grid with group size 64 and
every zero point fixed at 1::

    q  = clamp(round(w / d) + 1, 0, 3)      # uint8 code
    w' = d * (q - 1)                         # levels {-d, 0, d, 2d}; d is fp16 and may be negative

so one checkpoint, in the uniform layout (``qcodes``, fp16 ``scales`` = d, uint8 ``zeros`` all 1),
is exact in GGUF Q2_0 *and* in compressed-tensors / GPTQ / ONNX (zero point 1, group 64). The sign
of ``d`` chooses which side gets the doubled level: ``d > 0`` covers ``[-d, 2d]``, ``d < 0``
covers ``[2d, -d]``.

llama.cpp's own Q2_0 quantizer sets ``d = max|w|`` and never uses the ``2d`` level (a ternary
quantizer). :func:`init_q2_0` searches ``d`` per group over both signs and a range of magnitudes
(llama.cpp's choice included), refits the best by least squares on its codes, and keeps the
candidate of lowest squared error: never worse than llama.cpp's on any group.
"""

from __future__ import annotations

import torch
from torch import nn

from rqat_deploy.quant.grids.base import GridQuantizer, GroupParams, TensorSpec, register
from rqat_deploy.quant.grids.uniform import UniformFamily
from rqat_deploy.quant.reference import FP16_MAX, fp16_round, fp16_ste

QK2_0 = 64  # weights per group (ggml's QK2_0)
ZERO = 1  # the fixed zero point: w = d * (q - 1)
#: candidate |d| as fractions of the group's max |w| (1.0 is llama.cpp's choice); both signs are tried
_D_FRACTIONS = tuple(i / 16 for i in range(4, 17))
_CHUNK = 1 << 14  # groups searched together (bounds the candidate tensor to ~50 MB)


def _errors(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Squared error of each group ``x`` ``[n, 64]`` under each candidate scale ``d`` ``[n, C]``."""
    live = d != 0
    safe = torch.where(live, d, torch.ones_like(d))[:, :, None]  # [n, C, 1]
    q = torch.clamp(torch.round(x[:, None, :] / safe) + ZERO, 0, 3)  # [n, C, 64]
    w = torch.where(live[:, :, None], d[:, :, None] * (q - ZERO), torch.zeros_like(q))
    return (w - x[:, None, :]).square().sum(-1)  # [n, C]


def _search(x: torch.Tensor) -> torch.Tensor:
    """Best fp16 ``d`` ``[n]`` for groups ``x`` ``[n, 64]`` (float32)."""
    amax = x.abs().amax(-1, keepdim=True)  # [n, 1]
    frac = torch.tensor(_D_FRACTIONS, dtype=x.dtype, device=x.device)
    cands = fp16_round(torch.cat([amax * frac, -amax * frac], dim=1))  # [n, 2C]
    best = cands.gather(1, _errors(x, cands).argmin(1, keepdim=True))  # [n, 1]
    # least-squares refit of d on the chosen codes, kept only where it lowers the error
    live = best != 0
    k = torch.clamp(torch.round(x / torch.where(live, best, torch.ones_like(best))) + ZERO, 0, 3) - ZERO
    num, den = (x * k).sum(-1, keepdim=True), k.square().sum(-1, keepdim=True)
    refit = fp16_round(torch.where(den > 0, num / den.clamp(min=1), best).clamp(-FP16_MAX, FP16_MAX))
    both = torch.cat([best, refit], dim=1)  # [n, 2]
    return both.gather(1, _errors(x, both).argmin(1, keepdim=True))[:, 0]


def init_q2_0(w: torch.Tensor) -> torch.Tensor:
    """Per-group Q2_0 scales ``d`` for weight ``w`` ``[out, in]``: float32 ``[out, in/64]``, fp16-exact.

    Never worse than llama.cpp's ``d = max|w|`` in squared error on any group (it is a candidate).
    """
    out, k = w.shape
    x = w.detach().float().reshape(-1, QK2_0)  # [out * in/64, 64]
    d = torch.cat([_search(x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)])
    return d.reshape(out, k // QK2_0)


class Q20Quantizer(GridQuantizer):
    """Trainable fp32 latent ``scale`` ``[out, in/64]`` (any sign); the zero point is fixed at 1."""

    gs, qmax = QK2_0, 3
    stage2_trainable = ("scale",)

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.float().clone())  # [out, in/64]

    def group_params(self) -> GroupParams:
        s = fp16_ste(self.scale.clamp(-FP16_MAX, FP16_MAX))  # [out, in/64]
        return s, torch.full_like(s, float(ZERO)), torch.zeros_like(s)

    def params(self) -> dict[str, torch.Tensor]:
        s = self.group_params()[0].detach()
        return {"scales": s.half(), "zeros": torch.full(s.shape, ZERO, dtype=torch.uint8, device=s.device)}


@register("q2_0", bits=(2,))
class Q20Grid(UniformFamily):
    """llama.cpp Q2_0: the uniform layout with G = 64 and every zero point 1; 2.25 bits per weight."""

    gguf_type = "Q2_0"

    @classmethod
    def create(cls, bits: int, group_size: int) -> "Q20Grid":
        return cls(bits, QK2_0, QK2_0, QK2_0, 3)  # group_size: fixed by the format

    def layout(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        layout = super().layout(out_features, in_features)
        layout["zeros"] = layout["zeros"]._replace(lo=ZERO, hi=ZERO, bits=0)  # fixed by the format, not stored
        return layout

    def init(self, w: torch.Tensor) -> GridQuantizer:
        return Q20Quantizer(init_q2_0(w))

    def from_checkpoint(self, t: dict[str, torch.Tensor]) -> GridQuantizer:
        return Q20Quantizer(t["scales"].float())
