"""The grid registry: every quantization grid is one module here, registered by name and bit width.

    grid_for("uniform", 2, group_size=128)     # UniformGrid(bits=2, group_size=128)
    grid_for("kquant", 3)                      # Q3KGrid: llama.cpp Q3_K, exact in GGUF
    grid_for("q2_0", 2)                        # Q20Grid: llama.cpp Q2_0, exact in GGUF and safetensors
    spec.grid_def                              # the same, from a QuantSpec

See :mod:`rqat_deploy.quant.grids.base` for what a grid owns and how to add one.
"""

from __future__ import annotations

# importing a grid module registers its grids; the order is the order of `grid_names()`
from rqat_deploy.quant.grids import uniform  # noqa: F401, I001
from rqat_deploy.quant.grids import kquant  # noqa: F401, I001
from rqat_deploy.quant.grids import q2_0  # noqa: F401, I001
from rqat_deploy.quant.grids.base import Grid, GridQuantizer, TensorSpec, grid_bits, grid_for, grid_names, register

__all__ = ["Grid", "GridQuantizer", "TensorSpec", "grid_bits", "grid_for", "grid_names", "register"]
