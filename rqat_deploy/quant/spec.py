"""The quantization spec: a frozen, self-checking description of *what* is quantized and *how*.

>>> QuantSpec(bits=2, grid="uniform", group_size=128)
QuantSpec(bits=2, grid='uniform', group_size=128, exclude=(), quantize_lm_head=False)

*How* is a grid of :mod:`rqat_deploy.quant.grids` (``spec.grid_def``); the spec adds *what*: which
modules are left in floating point.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Mapping

from rqat_deploy.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from rqat_deploy.quant.grids import Grid


@dataclass(frozen=True)
class QuantSpec:
    """How the weights of a model are quantized.

    Attributes:
        bits: the code width (which widths exist depends on the grid: ``grid_bits(grid)``).
        grid: a registered grid name (:func:`rqat_deploy.quant.grids.grid_names`): ``"uniform"``
            (asymmetric, per-group fp16 scale and integer zero point, the paper's), ``"kquant"``
            (llama.cpp's Q2_K / Q3_K, exact in GGUF)...
        group_size: the uniform grid's group size G along the input dimension (a power of two,
            16..1024); grids with a fixed block (k-quants) ignore it.
        exclude: ``fnmatch`` patterns of module names left in floating point
            (e.g. ``"*.mlp.down_proj"``).
        quantize_lm_head: also quantize the output projection (only for untied embeddings).

    Raises:
        ConfigError: on any invalid field, naming the field and the allowed values.
    """

    bits: int = 2
    grid: str = "uniform"
    group_size: int = 128
    exclude: tuple[str, ...] = ()
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        self.grid_def  # validates grid, bits and group size
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise ConfigError(f"exclude must be a sequence of module-name patterns, got {self.exclude!r}")

    @cached_property
    def grid_def(self) -> "Grid":
        """The grid these fields name (:func:`rqat_deploy.quant.grids.grid_for`)."""
        from rqat_deploy.quant.grids import grid_for

        return grid_for(self.grid, self.bits, self.group_size)

    @property
    def qmax(self) -> int:
        """Largest integer code, ``2**bits - 1``."""
        return 2**self.bits - 1

    @property
    def block_size(self) -> int:
        """The input-dimension block the grid needs (uniform: ``group_size``; k-quants: 256)."""
        return self.grid_def.block_size

    @property
    def gguf_type(self) -> str | None:
        """The GGUF type the grid is exact in (``Q2_K``/``Q3_K``...), ``None`` if none."""
        return self.grid_def.gguf_type

    def is_excluded(self, name: str) -> bool:
        """Whether module ``name`` matches one of the ``exclude`` patterns."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def check_module(self, name: str, in_features: int) -> None:
        """Raise :class:`~rqat_deploy.errors.ShapeError` (naming the fix) if module ``name`` with
        ``in_features`` inputs cannot be quantized on this grid."""
        self.grid_def.check_in_features(name, in_features)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantSpec":
        """Build from a mapping, rejecting unknown keys with a "did you mean" hint.

        Raises:
            ConfigError: on an unknown key or an invalid value.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                raise ConfigError(f"unknown quantization field {key!r}{did_you_mean(key, names)}; known: {names}")
        kw = dict(d)
        if "exclude" in kw:
            kw["exclude"] = tuple(kw["exclude"])
        return cls(**kw)
