"""Human-readable summaries of quantized checkpoints (``rqat-deploy inspect``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rqat_deploy.quant.checkpoint import read_checkpoint


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def inspect_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summarize a quantized checkpoint: grid, bits, modules, parameter counts, bits per weight.

    Bits per weight count the codes at ``bits`` each plus every scale/zero tensor at its stored
    width, over the quantized weights only (what a runtime that packs the codes densely stores).

    Args:
        path: checkpoint directory.

    Returns:
        A dict of summary fields (JSON-ready).

    Raises:
        CheckpointError: not a valid checkpoint.
    """
    ckpt = read_checkpoint(path)
    spec = ckpt.spec
    n_quant = n_float = side_bits = 0
    for name in ckpt.tensor_names():
        shape = ckpt.shape(name)
        numel = 1
        for d in shape:
            numel *= d
        module, _, leaf = name.rpartition(".")
        if module in ckpt.meta.modules and leaf != "bias":
            if leaf == "qcodes":
                n_quant += numel
            else:
                width = 16 if ckpt.dtype(name) == "F16" else (4 if leaf.startswith("sub_") and spec.bits == 2 else (6 if leaf.startswith("sub_") else spec.bits))
                side_bits += numel * width
        else:
            n_float += numel
    bpw = (n_quant * spec.bits + side_bits) / max(n_quant, 1)
    return {
        "path": str(ckpt.path),
        "base_model": ckpt.meta.base_model,
        "architecture": (ckpt.config.get("architectures") or ["?"])[0],
        "grid": spec.grid + (f" ({spec.gguf_type})" if spec.gguf_type else ""),
        "bits": spec.bits,
        "group_size": ckpt.meta.group_size,
        "quantized_modules": len(ckpt.meta.modules),
        "quantized_weights": n_quant,
        "float_parameters": n_float,
        "bits_per_weight": round(bpw, 4),
        "recipe": ckpt.meta.recipe.get("name", "?"),
        "size_bytes": _dir_size(ckpt.path),
    }
