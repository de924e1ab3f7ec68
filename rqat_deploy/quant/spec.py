"""The quantization spec: a frozen, self-checking description of *what* is quantized and *how*.

>>> QuantSpec(bits=2, grid="uniform", group_size=128)
QuantSpec(bits=2, grid='uniform', group_size=128, exclude=(), quantize_lm_head=False)
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any, Mapping

from rqat_deploy.errors import ConfigError, ShapeError

GRIDS = ("uniform", "kquant")
BITS = (2, 3, 4)
KQUANT_TYPES = {2: "Q2_K", 3: "Q3_K"}
QK_K = 256  # llama.cpp k-quant super-block


def did_you_mean(value: str, choices: tuple[str, ...] | list[str]) -> str:
    """A ``" (did you mean 'x'?)"`` hint for a misspelled choice, or ``""``."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class QuantSpec:
    """How the weights of a model are quantized.

    Attributes:
        bits: 2, 3 or 4.
        grid: ``"uniform"`` (asymmetric, per-group fp16 scale and integer zero point, the paper's)
            or ``"kquant"`` (llama.cpp's Q2_K for 2 bits, Q3_K for 3 bits; exact in GGUF).
        group_size: uniform grid group size G along the input dimension (a power of two, 16..1024).
            The k-quant grid has fixed 256-weight super-blocks and ignores it.
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
        if self.bits not in BITS:
            raise ConfigError(f"bits must be one of {BITS}, got {self.bits!r}")
        if self.grid not in GRIDS:
            raise ConfigError(f"grid must be one of {GRIDS}, got {self.grid!r}{did_you_mean(self.grid, GRIDS)}")
        if self.grid == "kquant" and self.bits not in KQUANT_TYPES:
            raise ConfigError(
                f"the kquant grid exists for 2 bits (Q2_K) and 3 bits (Q3_K), not {self.bits}; "
                "use --grid uniform for 4 bits"
            )
        g = self.group_size
        if not isinstance(g, int) or g < 16 or g > 1024 or g & (g - 1):
            raise ConfigError(f"group_size must be a power of two between 16 and 1024, got {g!r}")
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise ConfigError(f"exclude must be a sequence of module-name patterns, got {self.exclude!r}")

    @property
    def qmax(self) -> int:
        """Largest integer code, ``2**bits - 1``."""
        return 2**self.bits - 1

    @property
    def block_size(self) -> int:
        """The input-dimension block the grid needs: ``group_size`` (uniform) or 256 (kquant)."""
        return QK_K if self.grid == "kquant" else self.group_size

    @property
    def gguf_type(self) -> str | None:
        """The GGUF type the kquant grid is exact in (``Q2_K``/``Q3_K``), ``None`` for uniform."""
        return KQUANT_TYPES[self.bits] if self.grid == "kquant" else None

    def is_excluded(self, name: str) -> bool:
        """Whether module ``name`` matches one of the ``exclude`` patterns."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def check_module(self, name: str, in_features: int) -> None:
        """Raise :class:`ShapeError` if module ``name`` cannot be quantized on this grid.

        Args:
            name: the module's name in the model (for the message).
            in_features: its input size.

        Raises:
            ShapeError: ``in_features`` is not a multiple of the grid's block, with the fix.
        """
        b = self.block_size
        if in_features % b == 0:
            return
        if self.grid == "kquant":
            fix = "use --grid uniform with a group size that divides it"
        else:
            fits = [g for g in (1024, 512, 256, 128, 64, 32, 16) if in_features % g == 0]
            fix = f"use --group-size {fits[0]}" if fits else "no power-of-two group size divides it"
        raise ShapeError(
            f"module {name!r} has in_features={in_features}, which the {self.grid} grid cannot "
            f"divide into blocks of {b}: {fix}, or leave it unquantized with --exclude '{name}'"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        d = dataclasses.asdict(self)
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
