"""Export a uniform-grid quantized checkpoint as compressed-tensors ``pack-quantized`` safetensors.

The layout (DESIGN.md 6; the names are those of the ``compressed-tensors`` package's
``PackedQuantizationCompressor`` and of vLLM's ``CompressedTensorsWNA16`` scheme), for each
quantized Linear ``<m>`` with weight ``[N, K]``, group size G and b-bit codes:

| tensor | dtype | shape | content |
|---|---|---|---|
| ``<m>.weight_packed`` | int32 | ``[N, ceil(K*b/32)]`` | codes ``q`` as a dense little-endian bit stream along K |
| ``<m>.weight_scale`` | float16 | ``[N, K/G]`` | the checkpoint's fp16 scales, unchanged |
| ``<m>.weight_zero_point`` | int32 | ``[ceil(N*b/32), K/G]`` | zero points ``z``, packed along N |
| ``<m>.weight_shape`` | int64 | ``[2]`` | ``[N, K]`` |

The weight is ``W = weight_scale * (q - z)``. compressed-tensors stores codes as signed values
offset by ``2**(b-1)``; the offset cancels in ``q - z``, so the unsigned checkpoint codes are
stored as they are. The config is ``quant_method: compressed-tensors``, ``format: pack-quantized``,
one group targeting ``Linear`` with ``num_bits: b, type: int, symmetric: false, strategy: group,
group_size: G``, and ``ignore`` listing every Linear left in floating point (``lm_head``...).

Verification decodes the written files with the ``compressed-tensors`` package's own
decompressor: once with the scales cast to float32 (must equal the checkpoint's weight bit for bit)
and once in the stored fp16 (what a runtime dequantizing in the scales' dtype gets; its error is
reported, never hidden).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rqat_deploy.errors import ExportError
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

FORMAT = "compressed-tensors"
PACK_FORMAT = "pack-quantized"
#: the compressed-tensors release from which 3-bit codes are packed densely (older ones pad words)
LAYOUT_VERSION = "0.18.0"
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def quantization_config(bits: int, group_size: int, ignore: list[str]) -> dict[str, Any]:
    """The ``config.json["quantization_config"]`` of a pack-quantized export.

    The keys are those ``compressed_tensors.ModelCompressor.update_config`` writes; the weight
    arguments are the ones ``QuantizationArgs`` serializes (vLLM validates them with the package).

    Args:
        bits: code width.
        group_size: G.
        ignore: Linear modules that stay in floating point.
    """
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": False,
        "group_size": group_size,
        "strategy": "group",
        "dynamic": False,
    }
    return {
        "version": LAYOUT_VERSION,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": PACK_FORMAT,
            }
        },
        "kv_cache_scheme": None,
        "format": PACK_FORMAT,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(ignore),
    }


def pack_module(t: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one module from its uniform-grid checkpoint tensors.

    Args:
        t: ``{"qcodes": uint8 [N, K], "scales": fp16 [N, K/G], "zeros": uint8 [N, K/G]}``.
        bits: code width.

    Returns:
        ``{"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}``.
    """
    q = t["qcodes"]  # [N, K]
    return {
        "weight_packed": pack_bits(q, bits, dim=1),  # [N, ceil(K*b/32)]
        "weight_scale": t["scales"].to(torch.float16).contiguous(),  # [N, K/G]
        "weight_zero_point": pack_bits(t["zeros"], bits, dim=0),  # [ceil(N*b/32), K/G]
        "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64),  # [2]
    }


def hf_quantization_config() -> Any:
    """The ``quantization_config`` argument that makes transformers load a pack-quantized export on CPU.

    With transformers 5.23 + compressed-tensors 0.20, ``from_pretrained`` of an asymmetric
    pack-quantized checkpoint fails by default (size mismatch on ``weight_zero_point``: the
    compressed skeleton expects it unpacked). Dequantizing on load works: pass
    ``AutoModelForCausalLM.from_pretrained(path, quantization_config=hf_quantization_config())``.
    The weights are then decompressed in the scales' dtype (fp16: relative error <= 2**-11 per
    weight, see the export report's ``runtime_max_rel_error``) and cast to the model dtype.

    Returns:
        ``CompressedTensorsConfig(dequantize=True)``, or ``run_compressed=False`` on transformers
        versions without the ``dequantize`` option.
    """
    import inspect

    from transformers import CompressedTensorsConfig

    if "dequantize" in inspect.signature(CompressedTensorsConfig.__init__).parameters:
        return CompressedTensorsConfig(dequantize=True)
    return CompressedTensorsConfig(run_compressed=False)


def _decompressor(qconfig: dict[str, Any]) -> tuple[Any, Any]:
    """The compressed-tensors compressor class and scheme, built by the package from our config."""
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as e:
        raise ExportError(
            "verifying a compressed-tensors export needs the compressed-tensors package (>= 0.18): "
            "pip install 'rqat-deploy[compressed-tensors]', or pass --no-verify"
        ) from e
    parsed = QuantizationConfig.model_validate(qconfig)
    scheme = parsed.config_groups["group_0"]
    return BaseCompressor.get_value_from_registry(parsed.format), scheme


def verify_export(ckpt: Any, out_dir: Path, qconfig: dict[str, Any]) -> dict[str, float]:
    """Decode every quantized weight of a written export with the compressed-tensors package.

    Args:
        ckpt: the source :class:`~rqat_deploy.quant.checkpoint.QuantizedCheckpoint`.
        out_dir: the written export directory.
        qconfig: its quantization config.

    Returns:
        ``{"max_abs_error": float32 decode, "runtime_max_abs_error", "runtime_max_rel_error": fp16 decode}``.

    Raises:
        ExportError: a decoded weight differs from the checkpoint's, or a tensor is missing/extra.
    """
    compressor, scheme = _decompressor(qconfig)
    out = SafetensorsDir(out_dir)
    verify_float_tensors(ckpt, out, {f"{m}.{s}" for m in ckpt.meta.modules for s in SUFFIXES})
    worst, worst16, worst_rel = 0.0, 0.0, 0.0
    for m in ckpt.meta.modules:
        sd = {s: out.get(f"{m}.{s}") for s in SUFFIXES}
        ref = ckpt.dequantized_weight(m)  # [N, K] float32
        exact = compressor.decompress({**sd, "weight_scale": sd["weight_scale"].float()}, scheme)["weight"]
        if exact.shape != ref.shape or exact.dtype != torch.float32:
            raise ExportError(f"verify: {m} decodes to {exact.dtype}{list(exact.shape)}, expected float32{list(ref.shape)}")
        err = float((exact - ref).abs().max()) if ref.numel() else 0.0
        if err != 0.0:
            raise ExportError(
                f"verify: {m} decoded by compressed-tensors differs from the checkpoint by up to {err:.3g}: "
                "the export is wrong and was removed"
            )
        runtime = compressor.decompress(dict(sd), scheme)["weight"].float()  # in the scales' dtype (fp16)
        diff = (runtime - ref).abs()
        worst16 = max(worst16, float(diff.max()))
        nz = ref != 0
        if nz.any():
            worst_rel = max(worst_rel, float((diff[nz] / ref[nz].abs()).max()))
        worst = max(worst, err)
    return {"max_abs_error": worst, "runtime_max_abs_error": worst16, "runtime_max_rel_error": worst_rel}


def export_compressed_tensors(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    verify: bool = True,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportReport:
    """Write a uniform-grid checkpoint as a compressed-tensors ``pack-quantized`` model directory.

    The directory loads in vLLM (2/3-bit asymmetric: vLLM >= 0.31, Humming kernel) and in
    transformers (``AutoModelForCausalLM.from_pretrained``, dequantized to dense on load). It is
    written into a temporary sibling directory and renamed into place only after verification.

    Args:
        ckpt_dir: the quantized checkpoint (DESIGN.md 3), ``uniform`` grid.
        out_dir: the export directory to create.
        verify: decode the written files with the ``compressed-tensors`` package and require the
            checkpoint's weights bit for bit.
        force: replace an existing ``out_dir``.
        max_shard_bytes: safetensors shard size limit (an index is written when there are several).

    Returns:
        The :class:`ExportReport` (also stored as ``rqat_export.json`` in the export).

    Raises:
        CheckpointError: the checkpoint is missing, corrupted or inconsistent.
        ExportError: a ``kquant`` checkpoint, an output overlapping the checkpoint, or a failed verification.
        OutputExistsError: ``out_dir`` exists and ``force`` is false.
    """
    ckpt = open_uniform_checkpoint(ckpt_dir, FORMAT)
    out = check_out_dir(ckpt.path, out_dir)
    bits, group = ckpt.meta.bits, ckpt.meta.group_size
    quantized = set(ckpt.meta.modules)
    ignore = [n for n in linear_module_names(ckpt.path) if n not in quantized]
    qconfig = quantization_config(bits, group, ignore)
    if verify:
        _decompressor(qconfig)  # fail before writing when the verifying package is missing
    out_features: dict[str, int] = {}

    def module_tensors(m: str, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out_features[m] = t["qcodes"].shape[0]
        return pack_module(t, bits)

    with staged_dir(out, force) as tmp:
        shards = write_export(ckpt, tmp, module_tensors, qconfig, max_shard_bytes)
        report = ExportReport(
            format=FORMAT, out_dir=str(out), bits=bits, group_size=group, modules=len(quantized), ignored=ignore,
            details={"pack_format": PACK_FORMAT, "scale_dtype": "float16", "shards": sum(f.endswith(".safetensors") for f in shards)},
            notes=_notes(out_features, bits),
        )
        if verify:
            errors = verify_export(ckpt, tmp, qconfig)
            report.verified = True
            report.max_abs_error = errors["max_abs_error"]
            report.runtime_max_abs_error = errors["runtime_max_abs_error"]
            report.runtime_max_rel_error = errors["runtime_max_rel_error"]
        files, size = list_files(tmp)
        report.files, report.total_bytes = files + [REPORT_FILE], size
        atomic_write_json(tmp / REPORT_FILE, report.to_json())
    return report


def _notes(out_features: dict[str, int], bits: int) -> list[str]:
    """Runtime remarks that depend on the model (shapes the vLLM kernels need)."""
    notes = [
        "vLLM loads the fp16 scales in the model dtype: serve with --dtype float16 to keep them exact "
        "(bfloat16 rounds them to 8 significant bits)",
    ]
    if bits in (2, 3):
        notes.append("vLLM runs 2/3-bit asymmetric pack-quantized weights from version 0.31 on (Humming kernel, CUDA)")
    odd = sorted(m for m, n in out_features.items() if n % 32)
    if odd:
        notes.append(f"out_features not a multiple of 32 in {odd[:3]}: vLLM's Humming kernel may refuse these layers")
    return notes
