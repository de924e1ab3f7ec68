"""Random checkpoint tensors of any registered grid, for the benchmarks (no training needed).

Integer tensors are uniform over their range; float tensors (scales) have magnitudes typical of a
trained 2-4-bit model, smaller where the grid multiplies them by integer sub-scales.
"""

from __future__ import annotations

import numpy as np
import torch

from rqat_deploy.quant.grids import Grid

_NP = {torch.uint8: np.uint8, torch.int8: np.int8, torch.float16: np.float16}


def random_tensors(grid: Grid, out: int, inp: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One Linear's checkpoint tensors ``{name: array}`` on ``grid`` (DESIGN.md 3 layout)."""
    layout = grid.layout(out, inp)
    mag = 0.012 / (8.0 if "sub_scales" in layout else 1.0)  # a sub-scale multiplies the scale by ~8 on average
    fields = {}
    for name, t in layout.items():
        if t.lo is not None:
            fields[name] = rng.integers(t.lo, t.hi + 1, t.shape).astype(_NP[t.dtype])
        else:
            fields[name] = rng.uniform(0.4 * mag, 1.6 * mag, t.shape).astype(_NP[t.dtype])
    return fields
