"""Export a uniform-grid quantized checkpoint in the GPTQ safetensors layout (GPTQModel's).

For each quantized Linear ``<m>`` with weight ``[N, K]`` (K = in_features), group size G and
b-bit codes (DESIGN.md 6; GPTQModel's ``PackableQuantLinear``):

| tensor | dtype | shape | content |
|---|---|---|---|
| ``<m>.qweight`` | int32 | ``[K*b/32, N]`` | codes, a dense little-endian bit stream along K per column |
| ``<m>.qzeros`` | int32 | ``[K/G, N*b/32]`` | zero points, a bit stream along N per row |
| ``<m>.scales`` | float16 | ``[K/G, N]`` | the checkpoint's fp16 scales, transposed |
| ``<m>.g_idx`` | int32 | ``[K]`` | ``k // G`` (no activation reordering) |

``W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])``. These are the transposes of the
compressed-tensors tensors for the same codes (``qweight = weight_packed.T``,
``qzeros = weight_zero_point.T``, ``scales = weight_scale.T``) whenever ``K*b`` and ``N*b`` are multiples
of 32, which the GPTQ export requires (each line is then a whole number of words).

Zero points: ``checkpoint_format: gptq_v2`` (default) stores ``z`` itself. Legacy ``gptq`` (v1)
stores ``z - 1``; readers disagree on how to undo that when ``z = 0`` (the packed field would
borrow from its neighbour), so the v1 export refuses any checkpoint with a zero point of 0.
vLLM's ``--quantization humming`` (checked in vLLM 0.31-0.33 with humming-kernels 0.1.16-0.1.19)
reads ``qzeros`` as ``z`` directly, i.e. the v2 convention, whatever ``checkpoint_format`` says.

:func:`decode_gptq` is a reader written against GPTQModel's published layout (bytes to a bit
array, not the shift-and-mask packer of :mod:`rqat_deploy.exporters.packing`); verification decodes
the written files with it and requires the checkpoint's weights bit for bit.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch

from rqat_deploy import __version__
from rqat_deploy.errors import ConfigError, ExportError, ShapeError
from rqat_deploy.exporters.packing import pack_bits
from rqat_deploy.exporters.safetensors_io import (
    REPORT_FILE,
    ExportReport,
    check_out_dir,
    linear_module_names,
    list_files,
    open_uniform_checkpoint,
    verify_float_tensors,
    write_export,
)
from rqat_deploy.files import atomic_write_json, staged_dir
from rqat_deploy.shards import DEFAULT_MAX_SHARD_BYTES, SafetensorsDir

FORMAT = "gptq"
CHECKPOINT_FORMATS = {"v2": "gptq_v2", "v1": "gptq"}
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
QUANTIZE_CONFIG_FILE = "quantize_config.json"


def quantization_config(
    bits: int, group_size: int, checkpoint_format: str, lm_head: bool, unquantized: list[str]
) -> dict[str, Any]:
    """The GPTQ ``quantization_config`` (also written as ``quantize_config.json`` for GPTQModel).

    Args:
        bits: code width.
        group_size: G.
        checkpoint_format: ``"gptq_v2"`` or ``"gptq"``.
        lm_head: whether ``lm_head`` is quantized.
        unquantized: Linear modules (other than ``lm_head``) left in floating point; they become
            GPTQModel ``dynamic`` negative matches (``"-:^name$"``), which vLLM also honours.
    """
    config: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": False,
        "static_groups": False,
        "true_sequential": True,
        "lm_head": lm_head,
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"rqat-deploy:{__version__}"]},
    }
    skip = [m for m in unquantized if m != "lm_head"]
    if skip:
        config["dynamic"] = {f"-:^{re.escape(m)}$": {} for m in skip}
    return config


def gptq_module(t: dict[str, torch.Tensor], bits: int, group_size: int, zero_point: str = "v2") -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one module from its uniform-grid checkpoint tensors.

    Args:
        t: ``{"qcodes": uint8 [N, K], "scales": fp16 [N, K/G], "zeros": uint8 [N, K/G]}``.
        bits: code width.
        group_size: G.
        zero_point: ``"v2"`` stores z, ``"v1"`` stores z - 1.

    Returns:
        ``{"qweight", "qzeros", "scales", "g_idx"}``.

    Raises:
        ExportError: ``zero_point="v1"`` and a zero point is 0.
    """
    q, z = t["qcodes"], t["zeros"]  # [N, K], [N, K/G]
    k = q.shape[1]
    if zero_point == "v1":
        if bool((z == 0).any()):
            raise ExportError(_v1_refusal(int((z == 0).sum())))
        z = z - 1
    return {
        "qweight": pack_bits(q.t(), bits, dim=0),  # [K*b/32, N]
        "qzeros": pack_bits(z.t(), bits, dim=1),  # [K/G, N*b/32]
        "scales": t["scales"].to(torch.float16).t().contiguous(),  # [K/G, N]
        "g_idx": (torch.arange(k, dtype=torch.int32) // group_size).to(torch.int32),  # [K]
    }


def _v1_refusal(count: int, where: str = "") -> str:
    return (
        f"{count} zero points{where} are 0, which the legacy GPTQ v1 format (stores z-1) cannot hold "
        "unambiguously (vLLM, ORT-GenAI and GPTQModel undo it differently). Export with the default "
        "zero_point='v2' (checkpoint_format gptq_v2), or use --format compressed-tensors."
    )


def _unpack_stream(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes of each row of ``words`` [R, W] read as one little-endian bit stream: uint8 [R, n]."""
    rows = words.shape[0]
    raw = np.ascontiguousarray(words.numpy().astype("<i4")).view(np.uint8).reshape(rows, -1)  # [R, 4W] bytes
    stream = np.unpackbits(raw, axis=1, bitorder="little")[:, : n * bits]  # [R, n*b]: bit p of the stream
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)  # bit j of a code is worth 2**j
    codes = (stream.reshape(rows, n, bits).astype(np.uint16) * weights).sum(-1)  # [R, n]
    return torch.from_numpy(codes.astype(np.uint8))


def decode_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq_v2",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize one GPTQ Linear to ``[N, K]`` (the PyTorch weight orientation).

    Args:
        qweight: int32 ``[K*b/32, N]``.
        qzeros: int32 ``[K/G, N*b/32]``.
        scales: ``[K/G, N]``.
        g_idx: int ``[K]``, the group of each input column.
        bits: code width (2, 3, 4 or 8).
        checkpoint_format: ``"gptq_v2"`` (zero points stored as is) or ``"gptq"`` (stored minus one).
        dtype: the dtype the dequantization computes in (float32: exact for fp16 scales).

    Returns:
        The weight ``[N, K]`` in ``dtype``.

    Raises:
        ShapeError: inconsistent shapes.
    """
    if checkpoint_format not in ("gptq_v2", "gptq"):
        raise ShapeError(f"checkpoint_format must be 'gptq_v2' or 'gptq', got {checkpoint_format!r}")
    k, n = g_idx.shape[0], scales.shape[1]
    if qweight.shape != (k * bits // 32, n) or qzeros.shape != (scales.shape[0], n * bits // 32):
        raise ShapeError(
            f"GPTQ shapes do not fit K={k}, N={n}, {bits} bits: qweight {list(qweight.shape)}, "
            f"qzeros {list(qzeros.shape)}, scales {list(scales.shape)}"
        )
    q = _unpack_stream(qweight.t().contiguous(), bits, k).t()  # [K, N]: column n is a stream along K
    z = _unpack_stream(qzeros, bits, n)  # [K/G, N]
    zf = z.to(dtype) + (1 if checkpoint_format == "gptq" else 0)
    gi = g_idx.long()
    w = scales.to(dtype)[gi] * (q.to(dtype) - zf[gi])  # [K, N]
    return w.t().contiguous()


def verify_export(ckpt: Any, out_dir: Any, bits: int, checkpoint_format: str) -> dict[str, float]:
    """Decode every quantized weight of a written GPTQ export with :func:`decode_gptq`.

    Returns:
        ``{"max_abs_error": float32 decode, "runtime_max_abs_error", "runtime_max_rel_error": fp16 decode}``.

    Raises:
        ExportError: a decoded weight differs from the checkpoint's, or a tensor is missing/extra.
    """
    out = SafetensorsDir(out_dir)
    verify_float_tensors(ckpt, out, {f"{m}.{s}" for m in ckpt.meta.modules for s in SUFFIXES})
    worst16, worst_rel = 0.0, 0.0
    for m in ckpt.meta.modules:
        t = {s: out.get(f"{m}.{s}") for s in SUFFIXES}
        ref = ckpt.dequantized_weight(m)  # [N, K]
        got = decode_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, checkpoint_format)
        if got.shape != ref.shape or not torch.equal(got, ref):
            err = float((got - ref).abs().max()) if got.shape == ref.shape else float("inf")
            raise ExportError(f"verify: {m} decoded from the GPTQ tensors differs from the checkpoint by up to {err:.3g}")
        half = decode_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, checkpoint_format, torch.float16)
        diff = (half.float() - ref).abs()
        worst16 = max(worst16, float(diff.max()))
        nz = ref != 0
        if nz.any():
            worst_rel = max(worst_rel, float((diff[nz] / ref[nz].abs()).max()))
    return {"max_abs_error": 0.0, "runtime_max_abs_error": worst16, "runtime_max_rel_error": worst_rel}


def export_gptq(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    zero_point: str = "v2",
    verify: bool = True,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportReport:
    """Write a uniform-grid checkpoint as a GPTQ model directory (GPTQModel / vLLM ``--quantization humming``).

    Written into a temporary sibling directory and renamed into place only after verification.

    Args:
        ckpt_dir: the quantized checkpoint (DESIGN.md 3), ``uniform`` grid.
        out_dir: the export directory to create.
        zero_point: ``"v2"`` (``checkpoint_format: gptq_v2``, stores z; default) or ``"v1"``
            (legacy ``gptq``, stores z - 1; refused when any zero point is 0).
        verify: decode the written files with :func:`decode_gptq` and require the checkpoint's
            weights bit for bit.
        force: replace an existing ``out_dir``.
        max_shard_bytes: safetensors shard size limit.

    Returns:
        The :class:`ExportReport` (also stored as ``rqat_export.json`` in the export).

    Raises:
        CheckpointError: the checkpoint is missing, corrupted or inconsistent.
        ConfigError: ``zero_point`` is neither ``"v1"`` nor ``"v2"``.
        ExportError: a ``kquant`` checkpoint, v1 with a zero point of 0, an output overlapping the
            checkpoint, K or N not fitting the packing, or a failed verification.
        OutputExistsError: ``out_dir`` exists and ``force`` is false.
    """
    if zero_point not in CHECKPOINT_FORMATS:
        raise ConfigError(f"zero_point must be 'v2' or 'v1', got {zero_point!r}")
    ckpt = open_uniform_checkpoint(ckpt_dir, FORMAT)
    out = check_out_dir(ckpt.path, out_dir)
    bits, group = ckpt.meta.bits, ckpt.meta.group_size
    _check_shapes(ckpt, bits, zero_point)
    quantized = set(ckpt.meta.modules)
    unquantized = [n for n in linear_module_names(ckpt.path) if n not in quantized]
    fmt = CHECKPOINT_FORMATS[zero_point]
    qconfig = quantization_config(bits, group, fmt, "lm_head" in quantized, unquantized)
    with staged_dir(out, force) as tmp:
        shards = write_export(
            ckpt, tmp, lambda _m, t: gptq_module(t, bits, group, zero_point), qconfig, max_shard_bytes,
            extra_json={QUANTIZE_CONFIG_FILE: {k: v for k, v in qconfig.items() if k != "quant_method"}},
        )
        report = ExportReport(
            format=FORMAT, out_dir=str(out), bits=bits, group_size=group, modules=len(quantized), ignored=unquantized,
            details={
                "checkpoint_format": fmt,
                "scale_dtype": "float16",
                "shards": sum(f.endswith(".safetensors") for f in shards),
            },
            notes=_notes(quantized, unquantized),
        )
        if verify:
            errors = verify_export(ckpt, tmp, bits, fmt)
            report.verified = True
            report.max_abs_error = errors["max_abs_error"]
            report.runtime_max_abs_error = errors["runtime_max_abs_error"]
            report.runtime_max_rel_error = errors["runtime_max_rel_error"]
        files, size = list_files(tmp)
        report.files, report.total_bytes = files + [REPORT_FILE], size
        atomic_write_json(tmp / REPORT_FILE, report.to_json())
    return report


def _check_shapes(ckpt: Any, bits: int, zero_point: str) -> None:
    """Refuse, before writing anything, what the GPTQ layout cannot hold.

    Raises:
        ExportError: ``K*b`` or ``N*b`` not a multiple of 32 (GPTQ packs whole words), or v1 with a zero point 0.
    """
    zeros_at_0 = {}
    for m in ckpt.meta.modules:
        z = ckpt.tensor(f"{m}.zeros")  # [N, K/G]
        n = z.shape[0]
        k = ckpt.meta.group_size * z.shape[1]
        if (k * bits) % 32 or (n * bits) % 32:
            raise ExportError(
                f"{m} has weight [{n}, {k}]: the GPTQ layout packs whole 32-bit words along both dimensions, "
                f"so in_features*{bits} and out_features*{bits} must be multiples of 32; use --format compressed-tensors"
            )
        if zero_point == "v1" and bool((z == 0).any()):
            zeros_at_0[m] = int((z == 0).sum())
    if zeros_at_0:
        first = next(iter(zeros_at_0))
        raise ExportError(_v1_refusal(sum(zeros_at_0.values()), f" (in {len(zeros_at_0)} modules, e.g. {first})"))


def _notes(quantized: set[str], unquantized: list[str]) -> list[str]:
    notes = [
        "vLLM: serve with --quantization humming (its default GPTQ kernels take only 4/8-bit symmetric); "
        "humming reads qzeros as z (gptq_v2 convention)",
        "vLLM loads the fp16 scales in the model dtype: serve with --dtype float16 to keep them exact",
    ]
    if "lm_head" in quantized:
        notes.append("lm_head is quantized: vLLM's humming GPTQ path always keeps lm_head unquantized and cannot load it")
    if [m for m in unquantized if m != "lm_head"]:
        notes.append("some decoder Linears stay in floating point (GPTQModel 'dynamic' skips); vLLM fuses q/k/v and gate/up, so a fused group must be all quantized or all not")
    return notes
