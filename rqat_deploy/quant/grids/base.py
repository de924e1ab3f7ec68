"""What a quantization grid is, and the registry that holds the grids.

A grid is one registered unit (torchao style: config -> fake quantizer -> checkpoint -> export).
It owns, for one ``[out, in]`` weight:

- its parameters and their validation (bit widths, group size, which input sizes it can divide);
- its initialisation (round-to-nearest, or a search) as a :class:`GridQuantizer`, the trainable
  module whose ``group_params()`` feed the unified fake-quant form of
  :mod:`rqat_deploy.quant.reference` in both training forms (stage 1: latent weights; stage 2:
  frozen codes, trainable scales);
- its checkpoint tensors (names, dtypes, shapes, integer ranges, DESIGN.md 3) and their
  dequantization, *the* trained weight;
- the export types that hold it exactly (``gguf_type``; ``uniform_layout`` for the formats with one
  scale and one integer zero point per group: compressed-tensors, GPTQ, ONNX ``MatMulNBits``).

Everything else looks grids up with :func:`grid_for`; no other module compares grid names.
Adding a grid is one new module under ``rqat_deploy/quant/grids/`` that defines a :class:`Grid`
subclass decorated with :func:`register`, imported by the package ``__init__``, plus its tests.
"""

from __future__ import annotations

import abc
import math
from typing import Callable, ClassVar, NamedTuple

import torch
from torch import nn

from rqat_deploy.errors import CheckpointError, ConfigError, ShapeError, did_you_mean
from rqat_deploy.quant import reference

GroupParams = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class TensorSpec(NamedTuple):
    """One checkpoint tensor of a quantized Linear.

    Attributes:
        dtype: the stored dtype.
        shape: ``[out, in/…]``.
        lo, hi: the integer range of an integer tensor (``None`` for floats).
        bits: width of one value in a densely packed runtime layout (codes: the bit width; fp16
            scales: 16; Q2_K sub-scales: 4), for bits-per-weight accounting.
    """

    dtype: torch.dtype
    shape: tuple[int, int]
    lo: int | None = None
    hi: int | None = None
    bits: int = 16


class GridQuantizer(nn.Module):
    """The trainable parameters of one weight on a grid.

    ``group_params()`` gives the per-group ``(s, z, o)`` ``[out, in/gs]`` of the unified form
    ``w' = s*(clamp(round((w+o)/s)+z, 0, qmax) - z) - o`` (:mod:`rqat_deploy.quant.reference`);
    ``params()`` the checkpoint tensors (without the codes) in their stored dtypes.
    """

    gs: int
    qmax: int
    #: names of parameters that stay trainable in stage 2 (codes frozen) by default
    stage2_trainable: tuple[str, ...] = ()
    #: integer parameters that stage 2 may also train through straight-through rounding
    stage2_optional: tuple[str, ...] = ()

    @abc.abstractmethod
    def group_params(self) -> GroupParams:
        """``(s, z, o)`` of the unified form, float32 ``[out, in/gs]``, differentiable."""

    @abc.abstractmethod
    def params(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of these parameters (no ``qcodes``), in their stored dtypes."""

    def checkpoint_tensors(self, qcodes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every checkpoint tensor of the weight: ``qcodes`` (uint8) and :meth:`params`."""
        return {"qcodes": qcodes.to(torch.uint8), **self.params()}

    def set_stage2(self, train_sub_scales: bool = False) -> None:
        """Freeze everything but the stage-2 scales (optionally the integer sub-scales too)."""
        extra = self.stage2_optional if train_sub_scales else ()
        for name, p in self.named_parameters():
            p.requires_grad_(name in self.stage2_trainable or name in extra)

    def scale_lr_ratios(self) -> dict[str, float]:
        """Stage-1 learning-rate multipliers of parameters that are not a per-group scale.

        Stage 1's quantization learning rate is meant for a per-group scale; a parameter that
        multiplies integer sub-scales moves every effective scale further per step and returns a
        smaller ratio here. Default: none.
        """
        return {}


class Grid(abc.ABC):
    """A quantization grid for a given bit width (and group size where the grid has one).

    Subclasses set :attr:`name` (the ``--grid`` value and ``rqat_quant.json``'s ``grid``), and
    are registered for their bit widths with :func:`register`. Instances are cheap and immutable.

    Attributes:
        bits: code bit width.
        group_size: input weights per parameter group, as recorded in ``rqat_quant.json``
            (uniform: G; k-quants: the 256-weight super-block; q2_0: 64).
        block_size: ``in_features`` must be a multiple of it.
        gs, qmax: group size and largest code of the unified fake-quant form.
    """

    name: ClassVar[str]
    #: the GGUF type that holds this grid's weights bit for bit, if any
    gguf_type: ClassVar[str | None] = None
    #: tensors are ``qcodes``/``scales``/``zeros`` with one fp16 scale and one integer zero point per
    #: group of ``group_size``: compressed-tensors, GPTQ and ONNX MatMulNBits hold them exactly
    uniform_layout: ClassVar[bool] = False

    def __init__(self, bits: int, group_size: int, block_size: int, gs: int, qmax: int) -> None:
        self.bits, self.group_size, self.block_size, self.gs, self.qmax = bits, group_size, block_size, gs, qmax

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.bits}, group_size={self.group_size})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grid) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def key(self) -> tuple[str, int, int]:
        """What must match for two checkpoints' codes to mean the same: name, bits, group size."""
        return self.name, self.bits, self.group_size

    @property
    def label(self) -> str:
        """A short human name: ``uniform`` or ``kquant (Q2_K)``."""
        return self.name if self.gguf_type is None else f"{self.name} ({self.gguf_type})"

    @classmethod
    @abc.abstractmethod
    def create(cls, bits: int, group_size: int) -> "Grid":
        """The grid at ``bits`` bits; ``group_size`` is used where the grid has a free one.

        Raises:
            ConfigError: an invalid group size.
        """

    # -- shapes ---------------------------------------------------------------------------------

    def input_size_fix(self, in_features: int) -> str:
        """How to quantize a module whose ``in_features`` is not a multiple of :attr:`block_size`."""
        return "use --grid uniform with a group size that divides it"

    def check_in_features(self, name: str, in_features: int) -> None:
        """Raise :class:`ShapeError` (naming the fix) if ``in_features`` does not fit the grid."""
        if in_features % self.block_size == 0:
            return
        raise ShapeError(
            f"module {name!r} has in_features={in_features}, which the {self.name} grid cannot divide into "
            f"blocks of {self.block_size}: {self.input_size_fix(in_features)}, or leave it unquantized with "
            f"--exclude '{name}'"
        )

    # -- checkpoint tensors ---------------------------------------------------------------------

    @abc.abstractmethod
    def layout(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """Every checkpoint tensor of one quantized Linear ``[out, in]``, ``qcodes`` first."""

    def tensor_names(self) -> tuple[str, ...]:
        """The names of :meth:`layout` (they do not depend on the shape)."""
        return tuple(self.layout(1, self.block_size))

    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight in a dense layout: codes plus every parameter tensor."""
        rows, cols = 1, math.lcm(self.block_size, 256)
        total = sum(math.prod(t.shape) * t.bits for t in self.layout(rows, cols).values())
        return total / (rows * cols)

    def check_tensors(self, module: str, t: dict[str, torch.Tensor]) -> None:
        """Raise :class:`CheckpointError` unless ``t`` holds exactly this grid's tensors, in range and finite.

        Args:
            module: the module's name, for the message.
            t: its checkpoint tensors, by name (``qcodes``, scales...).
        """
        if "qcodes" not in t or t["qcodes"].dim() != 2:
            raise CheckpointError(f"{module}.qcodes is missing or not 2-D [out, in]")
        want = self.layout(*t["qcodes"].shape)
        if set(t) != set(want):
            raise CheckpointError(
                f"{module}: tensors {sorted(t)} do not match the {self.label} grid's {sorted(want)}"
            )
        for name, spec in want.items():
            v = t[name]
            if v.dtype != spec.dtype or tuple(v.shape) != spec.shape:
                raise CheckpointError(
                    f"{module}.{name} is {v.dtype} {list(v.shape)}, expected {spec.dtype} {list(spec.shape)}"
                )
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"{module}.{name} holds NaN or Inf values: corrupted checkpoint or diverged training")
            if spec.lo is not None and spec.hi is not None and v.numel():
                lo, hi = int(v.min()), int(v.max())
                if lo < spec.lo or hi > spec.hi:
                    raise CheckpointError(
                        f"{module}.{name} holds values {lo}..{hi} outside {spec.lo}..{spec.hi}: corrupted checkpoint"
                    )

    @abc.abstractmethod
    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 weight ``[out, in]`` of one module's checkpoint tensors (DESIGN.md 3)."""

    # -- training -------------------------------------------------------------------------------

    @abc.abstractmethod
    def init(self, w: torch.Tensor) -> GridQuantizer:
        """Initial parameters for weight ``w`` ``[out, in]`` (round-to-nearest or a search)."""

    @torch.no_grad()
    def round_to_nearest(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` ``[out, in]`` quantized with :meth:`init` (round-to-nearest or the grid's search) and
        dequantized again, float32: what the grid makes of ``w`` without data."""
        q = self.init(w.float())
        s, z, o = (t.detach() for t in q.group_params())
        return reference.dequant(reference.quantize_codes(w.float(), s, z, o, q.qmax, q.gs), s, z, o, q.gs)

    @abc.abstractmethod
    def from_checkpoint(self, t: dict[str, torch.Tensor]) -> GridQuantizer:
        """The quantizer holding one module's checkpoint parameters (``qcodes`` ignored)."""


_REGISTRY: dict[str, dict[int, type[Grid]]] = {}


def register(name: str, bits: tuple[int, ...]) -> Callable[[type[Grid]], type[Grid]]:
    """Class decorator: register a :class:`Grid` subclass as grid ``name`` for bit widths ``bits``."""

    def deco(cls: type[Grid]) -> type[Grid]:
        cls.name = name
        for b in bits:
            if b in _REGISTRY.setdefault(name, {}):
                raise ConfigError(f"grid {name!r} is registered twice for {b} bits")
            _REGISTRY[name][b] = cls
        return cls

    return deco


def grid_names() -> tuple[str, ...]:
    """The registered grid names, in registration order."""
    return tuple(_REGISTRY)


def grid_bits(name: str) -> tuple[int, ...]:
    """The bit widths grid ``name`` is registered for."""
    return tuple(_REGISTRY.get(name, {}))


def grid_for(name: str, bits: int, group_size: int = 128) -> Grid:
    """The grid ``name`` at ``bits`` bits (``group_size`` where the grid has a free one).

    Raises:
        ConfigError: an unknown grid, a bit width it does not exist for, or an invalid group size.
    """
    if name not in _REGISTRY:
        names = grid_names()
        raise ConfigError(f"grid must be one of {names}, got {name!r}{did_you_mean(name, names)}")
    cls = _REGISTRY[name].get(bits)
    if cls is None:
        widths = sorted({b for by_bits in _REGISTRY.values() for b in by_bits})
        if bits not in widths:
            raise ConfigError(f"bits must be one of {tuple(widths)}, got {bits!r}")
        other = next(n for n in _REGISTRY if bits in _REGISTRY[n])
        raise ConfigError(
            f"the {name} grid exists for {' / '.join(map(str, grid_bits(name)))} bits, not {bits}; "
            f"use --grid {other} for {bits} bits"
        )
    return cls.create(bits, group_size)
