"""Human-readable summaries of quantized checkpoints (``rqat-deploy inspect``)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from rqat_deploy.quant.checkpoint import QuantizedCheckpoint, read_checkpoint


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def verify_checkpoint(ckpt: QuantizedCheckpoint) -> str:
    """Read and decode every tensor of a checkpoint: integer ranges, finite values, dequantization.

    Returns:
        A one-line summary.

    Raises:
        CheckpointError: naming the first tensor that fails.
    """
    for m in ckpt.meta.modules:
        ckpt.dequantized_weight(m)
    n_float = sum(1 for _ in ckpt.float_tensors())
    return f"{len(ckpt.meta.modules)} quantized modules decoded, {n_float} float tensors read: all in range and finite"


def inspect_checkpoint(path: str | os.PathLike[str], *, verify: bool = False) -> dict[str, Any]:
    """Summarize a quantized checkpoint: grid, bits, modules, parameter counts, bits per weight.

    Bits per weight count the codes at ``bits`` each plus every scale/zero tensor at its stored
    width, over the quantized weights only (what a runtime that packs the codes densely stores).

    Args:
        path: checkpoint directory.
        verify: also read and decode every tensor (:func:`verify_checkpoint`).

    Returns:
        A dict of summary fields (JSON-ready).

    Raises:
        CheckpointError: not a valid checkpoint (or, with ``verify``, a tensor out of range or not finite).
    """
    ckpt = read_checkpoint(path)
    grid = ckpt.grid
    n_quant = stored_bits = 0
    for m in ckpt.meta.modules:
        layout = grid.layout(*ckpt.shape(f"{m}.qcodes"))
        n_quant += math.prod(layout["qcodes"].shape)
        stored_bits += sum(math.prod(t.shape) * t.bits for t in layout.values())
    quant_names = {f"{m}.{n}" for m in ckpt.meta.modules for n in grid.tensor_names()}
    n_float = sum(math.prod(ckpt.shape(n)) for n in ckpt.tensor_names() if n not in quant_names)
    bpw = stored_bits / max(n_quant, 1)
    return {
        "path": str(ckpt.path),
        "base_model": ckpt.meta.base_model,
        "architecture": (ckpt.config.get("architectures") or ["?"])[0],
        "grid": grid.label,
        "bits": grid.bits,
        "group_size": ckpt.meta.group_size,
        "quantized_modules": len(ckpt.meta.modules),
        "quantized_weights": n_quant,
        "float_parameters": n_float,
        "bits_per_weight": round(bpw, 4),
        "recipe": ckpt.meta.recipe.get("name", "?"),
        "size_bytes": _dir_size(ckpt.path),
        **({"verified": verify_checkpoint(ckpt)} if verify else {}),
    }
