"""Shared plumbing of the safetensors exporters (compressed-tensors, GPTQ): the export report, the
output-directory checks and the export driver. Shards are written and read with
:mod:`rqat_deploy.shards`, directories staged with :func:`rqat_deploy.files.staged_dir`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from rqat_deploy.errors import CheckpointError, ExportError
from rqat_deploy.files import atomic_write_json, check_no_overlap, read_json
from rqat_deploy.shards import SafetensorsDir, ShardedWriter

if TYPE_CHECKING:
    from rqat_deploy.quant.checkpoint import QuantizedCheckpoint

REPORT_FILE = "rqat_export.json"


@dataclass
class ExportReport:
    """What an export wrote and how exact it is.

    Attributes:
        format: ``"compressed-tensors"`` or ``"gptq"``.
        out_dir: the export directory.
        bits: code width.
        group_size: quantization group size along the input dimension.
        modules: number of quantized Linear modules written.
        ignored: Linear modules left in floating point (the config's ``ignore`` list).
        files: the files written, relative to ``out_dir``.
        total_bytes: their total size.
        verified: whether the written files were decoded by an independent reader and compared.
        max_abs_error: largest ``|decoded - checkpoint|`` over all quantized weights, the decoder
            computing in float32 (0.0 means bit-exact); ``None`` when not verified.
        runtime_max_abs_error: the same with the decoder computing in the dtype of the stored scales
            (what a runtime dequantizing in fp16 gets); ``None`` when not measured.
        runtime_max_rel_error: largest ``|decoded - checkpoint| / |checkpoint|`` of that decode.
        details: format-specific facts (zero-point convention, scale dtype, shard count...).
        notes: human-readable remarks (e.g. constraints of a runtime).
    """

    format: str
    out_dir: str
    bits: int
    group_size: int
    modules: int
    ignored: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    total_bytes: int = 0
    verified: bool = False
    max_abs_error: float | None = None
    runtime_max_abs_error: float | None = None
    runtime_max_rel_error: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)

    def summary(self) -> str:
        """One line for the command line."""
        err = "not verified" if not self.verified else f"max |error| {self.max_abs_error:.3g}"
        return (
            f"{self.format} export: {self.modules} quantized modules at {self.bits} bits (G={self.group_size}), "
            f"{len(self.files)} files, {self.total_bytes / 1e6:.1f} MB, {err} -> {self.out_dir}"
        )


def check_out_dir(ckpt_path: Path, out_dir: str | os.PathLike[str]) -> Path:
    """Refuse an output directory that is the checkpoint itself, lies inside it or contains it.

    Raises:
        ExportError: naming the clash.
    """
    return check_no_overlap(out_dir, {ckpt_path: "checkpoint directory"}, error=ExportError)


def list_files(out_dir: Path) -> tuple[list[str], int]:
    """The files under ``out_dir`` (relative, sorted) and their total size in bytes."""
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    return files, sum((out_dir / f).stat().st_size for f in files)


# ---------------------------------------------------------------------------------------------
# the export driver shared by the compressed-tensors and GPTQ exporters
# ---------------------------------------------------------------------------------------------


def open_uniform_checkpoint(ckpt_dir: str | os.PathLike[str], fmt: str) -> "QuantizedCheckpoint":
    """Open (and validate) a checkpoint that a safetensors format can hold exactly.

    Raises:
        CheckpointError: the checkpoint is missing, corrupted or inconsistent.
        ExportError: the checkpoint's grid is not in the uniform layout (e.g. ``kquant``).
    """
    from rqat_deploy.quant.checkpoint import read_checkpoint

    ckpt = read_checkpoint(ckpt_dir)
    refuse_non_uniform(ckpt, fmt, "layout (one fp16 scale and one integer zero point per group)")
    return ckpt


def refuse_non_uniform(ckpt: "QuantizedCheckpoint", fmt: str, holds: str) -> None:
    """Refuse a checkpoint whose grid is not in the uniform layout, pointing at its exact format.

    Raises:
        ExportError: naming the grid, what ``fmt`` holds and the format that is exact for the grid.
    """
    grid = ckpt.grid
    if grid.uniform_layout:
        return
    exact = (
        f"`--format gguf` instead (bit-exact {grid.gguf_type}, and vLLM loads GGUF {grid.gguf_type} too)"
        if grid.gguf_type else "another format"
    )
    raise ExportError(
        f"{ckpt.path} uses the {grid.label} grid, which the {fmt} {holds} cannot hold exactly. "
        f"Export it with {exact}, or train with --grid uniform."
    )


def linear_module_names(config_dir: Path) -> list[str]:
    """Names of every ``nn.Linear`` in the model that ``config_dir/config.json`` describes.

    The model is built on the meta device, so no memory is used for weights.
    """
    from rqat_deploy.quant.checkpoint import model_skeleton

    config = read_json(config_dir / "config.json", error=CheckpointError)
    model = model_skeleton(config, config_dir)
    return [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]


def write_export(
    ckpt: "QuantizedCheckpoint",
    tmp: Path,
    module_tensors: Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    quantization_config: dict[str, Any],
    max_shard_bytes: int,
    extra_json: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """Write the tensors, the model files and the config of an export into ``tmp``.

    Args:
        ckpt: the source checkpoint.
        tmp: the (empty, temporary) export directory.
        module_tensors: maps ``(module name, ckpt.quant_tensors(module))`` to the export tensors of
            that module, keyed by their suffix (``"weight_packed"``, ``"qweight"``...).
        quantization_config: stored as ``config.json["quantization_config"]``.
        max_shard_bytes: shard size limit.
        extra_json: more JSON files to write, ``{file name: content}``.

    Returns:
        The safetensors files (and index) written.
    """
    writer = ShardedWriter(tmp, max_shard_bytes)
    for name, t in ckpt.float_tensors():
        writer.add(name, t)
    for m in ckpt.meta.modules:
        for suffix, t in module_tensors(m, ckpt.quant_tensors(m)).items():
            writer.add(f"{m}.{suffix}", t)
    files = writer.finish()
    ckpt.copy_model_files(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config["quantization_config"] = quantization_config
    atomic_write_json(tmp / "config.json", config)
    for fname, content in (extra_json or {}).items():
        atomic_write_json(tmp / fname, content)
    return files


def verify_float_tensors(ckpt: "QuantizedCheckpoint", out: SafetensorsDir, expected_quant: set[str]) -> None:
    """Check that the export holds exactly the checkpoint's float tensors (bit-identical) plus ``expected_quant``.

    Raises:
        ExportError: a tensor is missing, unexpected, or differs.
    """
    names = set(out.names())
    seen = set()
    for name, t in ckpt.float_tensors():  # one tensor in memory at a time
        seen.add(name)
        if name not in names:
            continue
        got = out.get(name)
        if got.dtype != t.dtype or not torch.equal(got, t):
            raise ExportError(f"verify: tensor {name} differs from the checkpoint after writing")
    want = seen | expected_quant
    if names != want:
        extra, missing = sorted(names - want)[:5], sorted(want - names)[:5]
        raise ExportError(f"verify: the export's tensor names differ (unexpected {extra}, missing {missing})")
