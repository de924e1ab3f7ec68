"""Shared plumbing of the safetensors exporters: the export report, a streaming sharded writer,
staged (temporary-sibling-then-rename) output directories, and reading the written files back.

The writer follows Hugging Face's layout: one ``model.safetensors`` when everything fits in one
shard, else ``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}``), which transformers and
vLLM both read.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rqat_deploy.quant.checkpoint import staged_output_dir
from rqat_deploy.errors import ExportError

if TYPE_CHECKING:
    from rqat_deploy.quant.checkpoint import QuantizedCheckpoint

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
REPORT_FILE = "rqat_export.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # transformers' default "5GB"


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


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage size of a tensor in bytes."""
    return t.numel() * t.element_size()


class ShardedWriter:
    """Stream tensors into safetensors shards of at most ``max_shard_bytes`` each.

    Tensors are buffered until the next one would overflow the shard, then the shard is written, so
    at most one shard is held in memory. A tensor larger than the limit gets a shard of its own.
    :meth:`finish` names the shards (``model.safetensors`` when there is one) and writes the index.

    Args:
        out_dir: an existing directory to write into.
        max_shard_bytes: shard size limit in bytes.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes <= 0:
            raise ExportError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (stored contiguous, as given).

        Raises:
            ExportError: the name was added before.
        """
        if name in self._buf or any(name in names for _, names in self._shards):
            raise ExportError(f"tensor {name!r} written twice")
        size = tensor_bytes(tensor)
        if self._buf and self._buf_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buf[name] = tensor.detach().cpu().contiguous()
        self._buf_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._buf, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give the shards their final names and write the index.

        Returns:
            The file names written (shards, then the index if any).
        """
        if self._buf or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self.out_dir / WEIGHTS_FILE)
            return [WEIGHTS_FILE]
        weight_map: dict[str, str] = {}
        files = []
        for i, (path, names) in enumerate(self._shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / fname)
            files.append(fname)
            weight_map.update({name: fname for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files + [INDEX_FILE]


class SafetensorsDir:
    """Lazy read access to the tensors of a (possibly sharded) safetensors directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.exists():
            wm = json.loads(index.read_text())["weight_map"]
            self.where = {name: self.path / f for name, f in wm.items()}
        else:
            single = self.path / WEIGHTS_FILE
            with safe_open(str(single), framework="pt") as f:
                self.where = {name: single for name in f.keys()}

    def names(self) -> list[str]:
        """Every tensor name."""
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, as stored."""
        with safe_open(str(self.where[name]), framework="pt") as f:
            return f.get_tensor(name)


#: write into a temporary sibling directory, renamed into place on success (the core's helper)
staged_output = staged_output_dir


def check_out_dir(ckpt_path: Path, out_dir: str | os.PathLike[str]) -> Path:
    """Refuse an output directory that is the checkpoint itself or lies inside it.

    Raises:
        ExportError: naming the clash.
    """
    out = Path(out_dir).resolve()
    src = ckpt_path.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise ExportError(f"--out {out_dir} overlaps the checkpoint directory {ckpt_path}: choose a separate directory")
    return Path(out_dir)


def list_files(out_dir: Path) -> tuple[list[str], int]:
    """The files under ``out_dir`` (relative, sorted) and their total size in bytes."""
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    return files, sum((out_dir / f).stat().st_size for f in files)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON with a trailing newline."""
    path.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# the export driver shared by the compressed-tensors and GPTQ exporters
# ---------------------------------------------------------------------------------------------


def open_uniform_checkpoint(ckpt_dir: str | os.PathLike[str], fmt: str) -> "QuantizedCheckpoint":
    """Open (and validate) a checkpoint that a safetensors format can hold exactly.

    Raises:
        CheckpointError: the checkpoint is missing, corrupted or inconsistent.
        ExportError: the checkpoint uses the ``kquant`` grid.
    """
    from rqat_deploy.quant.checkpoint import read_checkpoint

    ckpt = read_checkpoint(ckpt_dir)
    if ckpt.meta.grid != "uniform":
        kind = {2: "Q2_K", 3: "Q3_K"}.get(ckpt.meta.bits, "k-quant")
        raise ExportError(
            f"{ckpt.path} uses the kquant grid ({kind} super-blocks with integer sub-scales), which the {fmt} "
            f"layout (one fp16 scale and one integer zero point per group) cannot hold exactly. Export it with "
            f"`--format gguf` instead (bit-exact, and vLLM loads GGUF {kind} too), or train with --grid uniform."
        )
    return ckpt


def linear_module_names(config_dir: Path) -> list[str]:
    """Names of every ``nn.Linear`` in the model that ``config_dir/config.json`` describes.

    The model is built on the meta device, so no memory is used for weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
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
    write_json(tmp / "config.json", config)
    for fname, content in (extra_json or {}).items():
        write_json(tmp / fname, content)
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
