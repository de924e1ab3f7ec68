"""ONNX export for ONNX Runtime (``rqat-deploy export --format onnx``), verified in ONNX Runtime.

How the export works (DESIGN.md 6):

1. The uniform-grid checkpoint is rewritten as a temporary GPTQ directory that the
   onnxruntime-genai model builder reads correctly: codes packed along K (``qweight`` int32
   ``[K*b/32, N]``), ``scales`` ``[K/G, N]``, ``g_idx``, and zero points in the *legacy v1*
   encoding ``(z - 1) & (2^b - 1)`` packed along N, because the builder's GPTQ reader undoes v1
   as ``(stored + 1) & (2^b - 1)`` (which round-trips every z, 0 included). 3-bit codes and zero
   points are written into a 4-bit container (the values stay 0..7, so the trained integers are
   kept exactly): the builder and ORT's ``MatMulNBits`` take 2, 4 and 8 bits only.
2. onnxruntime-genai's builder (``create_model``, CPU target, ``int4`` precision, ``lm_head``
   excluded from its own re-quantization) writes ``model.onnx`` + ``model.onnx.data`` +
   ``genai_config.json`` + tokenizer files: a decoder with ``GroupQueryAttention`` (KV cache
   inputs ``past_key_values.N.key/value``, outputs ``present.N.key/value``, ``attention_mask``;
   positions come from the mask) and one ``com.microsoft.MatMulNBits`` per quantized Linear
   (q/k/v fused into ``qkv_proj``) at ``bits`` 2 or 4. Embeddings, norms and ``lm_head`` stay fp32.
3. Verify on write: every ``MatMulNBits`` initializer is decoded by :func:`decode_matmulnbits`
   (written from ORT's operator schema, not from the builder) and must equal
   ``ckpt.dequantized_weight`` exactly; then ONNX Runtime runs the model on a prompt with every
   ``MatMulNBits`` at ``accuracy_level=0`` (fp32 activations) and the logits must agree with the
   checkpoint's PyTorch model within 1e-2 relative (``max|d| / max|ref|``); the figure at the
   written accuracy level (4 = int8 activations, ORT's fast CPU path) is measured and reported.

Facts checked on onnxruntime 1.32 (CPU) with onnxruntime-genai 0.18: ``MatMulNBits`` accepts bits
2, 4, 8 (3 is refused at session creation), ``block_size`` a power of two >= 16; ``B`` is uint8
``[N, K/bs, bs*b/8]``, codes LSB-first along K; zero points uint8 packed LSB-first per row
(``[N * ceil(K/bs*b/8)]``), default ``2^(b-1)``.

Running an export (generation with the KV cache, the bench runtime) is serve's job:
:mod:`rqat_deploy.serve.runtime_onnx`. The verification here runs ONNX Runtime directly, with one
forward pass of its own, so the exporter never imports serve.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from rqat_deploy.errors import BackendError, ConfigError, ExportError
from rqat_deploy.exporters.safetensors_io import refuse_non_uniform

if TYPE_CHECKING:
    from rqat_deploy.quant.checkpoint import QuantizedCheckpoint

__all__ = [
    "ACCURACY_LEVELS",
    "ExportReport",
    "decode_matmulnbits",
    "export_onnx",
    "export_onnx_dense",
    "measure_logits_error",
    "onnx_available",
]

FORMAT = "onnx"
ONNX_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
REPORT_FILE = "rqat_export.json"
#: ``MatMulNBits.accuracy_level``: the precision ORT may lower activations to inside the matmul.
ACCURACY_LEVELS: dict[int, str] = {0: "unset (fp32)", 1: "fp32", 2: "fp16", 3: "bf16", 4: "int8"}
#: the default: int8 activations, ORT's fast CPU path (its own builder's CPU default too)
DEFAULT_ACCURACY_LEVEL = 4
#: verify-on-write bound on ``max|logits_ort - logits_torch| / max|logits_torch|`` at level 0
LOGITS_RTOL = 1e-2
#: widths ORT's MatMulNBits runs, and the container each checkpoint width is stored in
CONTAINER_BITS: dict[int, int] = {2: 2, 3: 4, 4: 4}
#: oldest onnxruntime that loads the export, by container width (checked on CPU wheels: 1.20 refuses
#: opset 22, 1.21-1.22 the builder's 12-input GroupQueryAttention, 1.23 MatMulNBits bits=2)
MIN_ORT: dict[int, str] = {2: "1.24", 4: "1.23"}
#: architectures tested end to end (the builder knows more; others are refused until tested)
SUPPORTED_ARCHS: tuple[str, ...] = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
#: builder names of fused projections -> the Hugging Face modules they concatenate (rows)
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_NODE_RE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMulNBits$")
_DECODER_FLOAT_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
_VERIFY_PROMPT = "Alice buys 12 red apples and gives 5 to Bob. How many apples does she have left? Let me check: 12 - 5 = 7."


def onnx_available() -> tuple[bool, str]:
    """Whether the ONNX export can run here.

    Returns:
        ``(ok, reason)``: ``reason`` names the missing packages and the install command.
    """
    mods = {"onnx": "onnx", "onnxruntime": "onnxruntime", "onnx_ir": "onnx-ir", "onnxruntime_genai": "onnxruntime-genai"}
    missing = [pkg for mod, pkg in mods.items() if not _importable(mod)]
    if missing:
        return False, f"missing {', '.join(missing)}: pip install 'rqat-deploy[onnx]'"
    return True, ""


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means unavailable
        return False
    return True


def _require(*modules: str) -> None:
    for mod in modules:
        try:
            __import__(mod)
        except ImportError as e:
            raise BackendError(
                f"the ONNX export needs the Python package {mod!r} ({e}): pip install 'rqat-deploy[onnx]' "
                "(onnx, onnxruntime, onnxruntime-genai, onnx-ir)"
            ) from e


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how exact it is.

    Attributes:
        format: ``"onnx"``.
        out_dir: the export directory.
        bits: the checkpoint's code width.
        container_bits: the ``MatMulNBits`` width the codes are stored at (3-bit -> 4).
        group_size: quantization group = ``MatMulNBits.block_size``.
        accuracy_level: the ``MatMulNBits.accuracy_level`` written (see :data:`ACCURACY_LEVELS`).
        modules: quantized Linear modules of the checkpoint.
        matmulnbits_nodes: ``MatMulNBits`` nodes written (fewer than ``modules`` when q/k/v fuse).
        files: files written, relative to ``out_dir``.
        total_bytes: their total size (``rqat_export.json`` itself not counted).
        quant_weight_bytes: bytes of the packed codes (``B`` inputs) of all ``MatMulNBits``.
        container_overhead_bytes: what the container costs over dense ``bits``-wide codes
            (``quant_weight_bytes * (1 - bits/container_bits)``; 0 at 2 and 4 bits).
        verified: the export was read back and checked.
        max_abs_weight_error: largest ``|decoded - checkpoint|`` over all quantized weights (0.0 = exact).
        logits_rel_error: ``{accuracy_level: max|ort - torch| / max|torch|}`` on the verify prompt.
        argmax_agreement: ``{accuracy_level: fraction of positions whose argmax agrees}``.
        verify_tokens: length of the verify prompt.
        onnxruntime_version, genai_version: versions used to build and check.
        min_onnxruntime: the oldest onnxruntime that runs this export's ``MatMulNBits`` width.
        seconds: wall time of the export (verification included).
        notes: human-readable remarks.
    """

    format: str
    out_dir: str
    bits: int
    container_bits: int
    group_size: int
    accuracy_level: int
    modules: int
    matmulnbits_nodes: int = 0
    files: list[str] = field(default_factory=list)
    total_bytes: int = 0
    quant_weight_bytes: int = 0
    container_overhead_bytes: int = 0
    verified: bool = False
    max_abs_weight_error: float | None = None
    logits_rel_error: dict[int, float] = field(default_factory=dict)
    argmax_agreement: dict[int, float] = field(default_factory=dict)
    verify_tokens: int = 0
    onnxruntime_version: str = ""
    genai_version: str = ""
    min_onnxruntime: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)

    def summary(self) -> str:
        """One line for the command line."""
        if self.verified:
            errs = ", ".join(f"level {k}: {v:.2g}" for k, v in sorted(self.logits_rel_error.items()))
            err = f"weights exact (max |error| {self.max_abs_weight_error:.3g}), logits rel. error {errs}"
        else:
            err = "not verified"
        box = f" in a {self.container_bits}-bit container" if self.container_bits != self.bits else ""
        return (
            f"onnx export: {self.modules} quantized modules at {self.bits} bits{box} (G={self.group_size}, "
            f"accuracy_level {self.accuracy_level}), {self.total_bytes / 1e6:.1f} MB, {err} -> {self.out_dir}"
        )


# ---------------------------------------------------------------------------------------------
# MatMulNBits layout (the independent reader)
# ---------------------------------------------------------------------------------------------


def _unpack_lsb(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 ``[..., n]`` -> uint8 ``[..., n * 8/bits]``: codes LSB-first inside each byte."""
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits  # [per]
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*packed.shape[:-1], -1)


def decode_matmulnbits(
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    *,
    n: int,
    k: int,
    bits: int,
    block_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode ``com.microsoft.MatMulNBits`` weight inputs, as ORT's operator schema defines them.

    Args:
        b: uint8 ``[N, k_blocks, block_size*bits/8]``, codes LSB-first along K.
        scales: ``[N, k_blocks]`` (or flat), float.
        zero_points: uint8 ``[N, ceil(k_blocks*bits/8)]`` (or flat) packed like ``b``, or a float
            ``[N, k_blocks]`` unpacked form, or None (default ``2^(bits-1)``).
        n, k, bits, block_size: the node's attributes.

    Returns:
        ``(weight float32 [N, K], codes uint8 [N, K], zeros float32 [N, k_blocks])`` with
        ``weight = scales * (codes - zeros)`` per block, computed in float32.

    Raises:
        ExportError: shapes that do not fit the attributes.
    """
    if bits not in (2, 4, 8):
        raise ExportError(f"MatMulNBits bits={bits}: only 2, 4 and 8 exist")
    nb = math.ceil(k / block_size)
    blob = block_size * bits // 8
    if b.dtype != np.uint8 or b.size != n * nb * blob:
        raise ExportError(f"MatMulNBits B is {b.dtype}{list(b.shape)}, expected uint8[{n}, {nb}, {blob}]")
    codes = _unpack_lsb(b.reshape(n, nb, blob), bits).reshape(n, nb * block_size)[:, :k]  # [N, K]
    s = np.asarray(scales, dtype=np.float32).reshape(n, nb)  # [N, K/G]
    if zero_points is None:
        z = np.full((n, nb), 2 ** (bits - 1), dtype=np.float32)
    elif zero_points.dtype == np.uint8:
        zrow = math.ceil(nb * bits / 8)
        if zero_points.size != n * zrow:
            raise ExportError(f"MatMulNBits zero_points has {zero_points.size} bytes, expected {n} x {zrow}")
        z = _unpack_lsb(zero_points.reshape(n, zrow), bits)[:, :nb].astype(np.float32)  # [N, K/G]
    else:
        z = np.asarray(zero_points, dtype=np.float32).reshape(n, nb)
    q = np.zeros((n, nb * block_size), np.float32)
    q[:, :k] = codes
    q = q.reshape(n, nb, block_size)  # [N, K/G, G]
    w = (s[..., None] * (q - z[..., None])).reshape(n, nb * block_size)[:, :k]  # [N, K]
    return np.ascontiguousarray(w, dtype=np.float32), codes, z


# ---------------------------------------------------------------------------------------------
# GPTQ intermediate for the onnxruntime-genai builder
# ---------------------------------------------------------------------------------------------


def _check_checkpoint(ckpt: "QuantizedCheckpoint") -> int:
    """Refuse what the ONNX path cannot hold; return the container width."""
    meta = ckpt.meta
    refuse_non_uniform(ckpt, "ONNX", "MatMulNBits (one scale and one zero point per block)")
    if meta.bits not in CONTAINER_BITS:
        raise ExportError(f"{ckpt.path}: {meta.bits}-bit checkpoints cannot be exported to ONNX (2, 3 or 4 bits)")
    g = meta.group_size
    if g < 16 or g & (g - 1):
        raise ExportError(
            f"{ckpt.path}: group_size {g} is not a power of two >= 16, which MatMulNBits.block_size must be; "
            "re-train with --group-size 32/64/128"
        )
    arch = (ckpt.config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHS:
        raise ExportError(f"{ckpt.path}: architecture {arch} is not supported by the ONNX export ({', '.join(SUPPORTED_ARCHS)})")
    partial = [n for n in _float_tensor_names(ckpt) if _DECODER_FLOAT_LINEAR.match(n)]
    if partial:
        raise ExportError(
            f"{ckpt.path}: decoder Linear layers left in floating point ({partial[:3]}...) cannot be mixed with "
            "quantized ones in the ONNX export (onnxruntime-genai's builder reads every projection of a GPTQ model "
            "as quantized); quantize every decoder Linear (no --exclude) to export to ONNX"
        )
    return CONTAINER_BITS[meta.bits]


def _float_tensor_names(ckpt: "QuantizedCheckpoint") -> list[str]:
    """Names of the checkpoint's tensors that are not codes / scales / zeros of a quantized module."""
    mods = set(ckpt.meta.modules)
    return [n for n in ckpt.tensor_names() if not (n.rsplit(".", 1)[0] in mods and n.endswith((".qcodes", ".scales", ".zeros")))]


def _gptq_tensors(t: dict[str, torch.Tensor], container_bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """One module's GPTQ tensors (legacy v1 zero points) at ``container_bits``."""
    from rqat_deploy.exporters.packing import pack_bits

    q, s, z = t["qcodes"], t["scales"], t["zeros"]  # [N, K] u8, [N, K/G] f16, [N, K/G] u8
    mask = (1 << container_bits) - 1
    z_v1 = (z.to(torch.int32) - 1) & mask  # the builder adds 1 back, modulo 2^b
    return {
        "qweight": pack_bits(q, container_bits, dim=1).t().contiguous(),  # [K*b/32, N]
        "qzeros": pack_bits(z_v1.t(), container_bits, dim=1).contiguous(),  # [K/G, N*b/32]
        "scales": s.t().contiguous(),  # [K/G, N] fp16
        "g_idx": torch.arange(q.shape[1], dtype=torch.int32) // group_size,  # [K]
    }


def _write_gptq_intermediate(ckpt: "QuantizedCheckpoint", dst: Path, container_bits: int) -> None:
    """A GPTQ (v1 zero points) model directory of ``ckpt`` that the genai builder reads exactly."""
    from safetensors.torch import save_file

    g = ckpt.meta.group_size
    state: dict[str, torch.Tensor] = {}
    for m in ckpt.meta.modules:
        for k, v in _gptq_tensors(ckpt.quant_tensors(m), container_bits, g).items():
            state[f"{m}.{k}"] = v
    for name, t in ckpt.float_tensors():
        state[name] = t.contiguous()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    ckpt.copy_model_files(dst)
    cfg = dict(ckpt.config)
    cfg["quantization_config"] = {
        "quant_method": "gptq", "bits": container_bits, "group_size": g, "desc_act": False,
        "sym": False, "checkpoint_format": "gptq",
    }
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _write_dense_intermediate(ckpt: "QuantizedCheckpoint", dst: Path) -> None:
    """A float32 Hugging Face directory of the checkpoint's dequantized model."""
    from safetensors.torch import save_file

    state = {name: t.float().contiguous() if t.is_floating_point() else t for name, t in ckpt.float_tensors()}
    for m in ckpt.meta.modules:
        state[f"{m}.weight"] = ckpt.dequantized_weight(m).contiguous()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    ckpt.copy_model_files(dst)
    cfg = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Capture the builder's prints and silence its INFO logging (kept for error messages)."""
    buf = io.StringIO()
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf
    finally:
        logging.disable(logging.NOTSET)


def _run_builder(src: Path, dst: Path, precision: str, extra: list[str], cache: Path) -> None:
    """Run onnxruntime-genai's model builder on a Hugging Face directory (CPU target)."""
    _require("onnx_ir", "onnxruntime_genai")
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    with _quiet() as log:
        try:
            opts = parse_extra_options(None, str(src), str(dst), precision, "cpu", str(cache), extra)
            create_model(None, str(src), str(dst), precision, "cpu", str(cache), **opts)
        except Exception as e:  # noqa: BLE001 - re-raised with the builder's output
            tail = log.getvalue()[-2000:]
            raise ExportError(f"onnxruntime-genai's model builder failed: {type(e).__name__}: {e}\n{tail}") from e


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _staged(out_dir: str | os.PathLike[str], ckpt_path: Path, force: bool) -> Iterator[Path]:
    """Refuse an ``out_dir`` overlapping the checkpoint, then write it through a staged temporary dir.

    Raises:
        ExportError: ``out_dir`` overlaps the checkpoint.
        OutputExistsError: ``out_dir`` exists and ``force`` is false.
    """
    from rqat_deploy.exporters.safetensors_io import check_out_dir
    from rqat_deploy.files import staged_dir

    with staged_dir(check_out_dir(ckpt_path, out_dir), force) as tmp:
        yield tmp


def _finish(tmp: Path, ckpt: "QuantizedCheckpoint") -> None:
    """Copy the checkpoint's model files the builder did not write (config.json, generation config...)."""
    from rqat_deploy.quant.checkpoint import MODEL_FILES

    for name in MODEL_FILES:
        if (ckpt.path / name).exists() and not (tmp / name).exists():
            shutil.copy2(ckpt.path / name, tmp / name)


def _versions() -> tuple[str, str]:
    import onnxruntime

    try:
        import onnxruntime_genai

        genai = onnxruntime_genai.__version__
    except Exception:  # noqa: BLE001
        genai = ""
    return onnxruntime.__version__, genai


def export_onnx(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    accuracy_level: int | None = None,
    verify: bool = True,
    force: bool = False,
) -> ExportReport:
    """Export a uniform-grid checkpoint to an ONNX Runtime model with KV cache.

    The directory (``model.onnx``, ``model.onnx.data``, ``genai_config.json``, tokenizer, chat
    template, ``config.json``, ``rqat_export.json``) runs in ``onnxruntime`` (``rqat-deploy bench
    --runtime onnxruntime``) and in ``onnxruntime-genai``. It is written into a temporary sibling and
    renamed into place after verification.

    Args:
        ckpt_dir: the quantized checkpoint (DESIGN.md 3), ``uniform`` grid, 2/3/4 bits.
        out_dir: the export directory to create.
        accuracy_level: ``MatMulNBits.accuracy_level`` (0-4, see :data:`ACCURACY_LEVELS`);
            None = 4 (int8 activations: ORT's fast CPU path; 0 keeps activations in fp32).
        verify: decode the written weights (must equal the checkpoint's exactly) and compare
            ORT logits with the checkpoint's PyTorch model (see the module docstring).
        force: replace an existing ``out_dir``.

    Returns:
        The :class:`ExportReport` (also stored as ``rqat_export.json``).

    Raises:
        CheckpointError: the checkpoint is missing, corrupted or inconsistent.
        ExportError: a ``kquant`` checkpoint, an unsupported architecture / group size, an output
            overlapping the checkpoint, a builder failure, or a failed verification.
        OutputExistsError: ``out_dir`` exists and ``force`` is false.
        BackendError: onnx / onnxruntime / onnxruntime-genai / onnx-ir are not installed.
        ConfigError: an accuracy level outside 0-4.
    """
    from rqat_deploy.quant.checkpoint import read_checkpoint

    t0 = time.perf_counter()
    level = DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    if level not in ACCURACY_LEVELS:
        raise ConfigError(f"accuracy_level must be one of {sorted(ACCURACY_LEVELS)}, got {accuracy_level!r}")
    _require("onnx", "onnxruntime", "onnx_ir", "onnxruntime_genai")
    ckpt = read_checkpoint(ckpt_dir)
    cbits = _check_checkpoint(ckpt)
    with _staged(out_dir, ckpt.path, force) as tmp:
        with tempfile.TemporaryDirectory(prefix=".gptq-", dir=tmp.parent) as scratch:
            src = Path(scratch) / "gptq"
            src.mkdir()
            _write_gptq_intermediate(ckpt, src, cbits)
            extra = [f"accuracy_level={level}", "nodes_to_exclude=/lm_head/MatMul", "shared_embeddings=false"]
            _run_builder(src, tmp, "int4", extra, Path(scratch) / "cache")
        _finish(tmp, ckpt)
        ort_v, genai_v = _versions()
        report = ExportReport(
            format=FORMAT, out_dir=str(out_dir), bits=ckpt.meta.bits, container_bits=cbits,
            group_size=ckpt.meta.group_size, accuracy_level=level, modules=len(ckpt.meta.modules),
            onnxruntime_version=ort_v, genai_version=genai_v, min_onnxruntime=MIN_ORT[cbits],
        )
        _check_weights(tmp, ckpt, report, exact=verify)
        if verify:
            _check_logits(tmp, ckpt, report)
        report.notes = _notes(report)
        if ckpt.config.get("tie_word_embeddings"):
            report.notes.append(
                "tied embeddings are stored twice in fp32 (Gather table and lm_head MatMul): the builder's "
                "shared_embeddings=true re-quantizes the table to int4 (GatherBlockQuantized), which changes the model"
            )
        report.seconds = time.perf_counter() - t0
        _write_report(tmp, report)
    return report


def _check_logits(out: Path, ckpt: "QuantizedCheckpoint", report: ExportReport) -> None:
    """Measure ORT logits at level 0 and the written level; level 0 must be within :data:`LOGITS_RTOL`."""
    ids = _prompt_ids(ckpt.path, int(ckpt.config.get("vocab_size", 1000)))
    report.verify_tokens = len(ids)
    errors = measure_logits_error(out, ckpt.path, accuracy_levels=sorted({0, report.accuracy_level}), prompt_ids=ids)
    for lv, (rel, agree) in errors.items():
        report.logits_rel_error[int(lv or 0)], report.argmax_agreement[int(lv or 0)] = rel, agree
    if report.logits_rel_error[0] > LOGITS_RTOL:
        raise ExportError(
            f"verify: ONNX Runtime logits (accuracy_level 0) differ from the checkpoint's PyTorch model by "
            f"{report.logits_rel_error[0]:.3g} relative (> {LOGITS_RTOL}): the export is wrong and was removed"
        )
    report.verified = True


def _write_report(out: Path, report: ExportReport) -> None:
    """Fill in the file list and sizes, and write ``rqat_export.json``."""
    report.files = sorted([str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()] + [REPORT_FILE])
    report.total_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())  # without the report
    (out / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n")


def export_onnx_dense(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
) -> Path:
    """Export the checkpoint's *dequantized* model as a float32 ONNX model (same graph, plain MatMul).

    The reference for speed and accuracy comparisons (``benchmarks/bench_onnx.py``).

    Args:
        ckpt_dir: the quantized checkpoint (any grid: the weights are dequantized).
        out_dir: the export directory to create.
        force: replace an existing ``out_dir``.

    Returns:
        The export directory.

    Raises:
        ExportError: unsupported architecture, overlapping output, builder failure.
        OutputExistsError: ``out_dir`` exists and ``force`` is false.
    """
    from rqat_deploy.quant.checkpoint import read_checkpoint

    _require("onnx", "onnxruntime", "onnx_ir", "onnxruntime_genai")
    ckpt = read_checkpoint(ckpt_dir)
    arch = (ckpt.config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHS:
        raise ExportError(f"{ckpt.path}: architecture {arch} is not supported by the ONNX export ({', '.join(SUPPORTED_ARCHS)})")
    with _staged(out_dir, ckpt.path, force) as tmp:
        with tempfile.TemporaryDirectory(prefix=".dense-", dir=tmp.parent) as scratch:
            src = Path(scratch) / "hf"
            src.mkdir()
            _write_dense_intermediate(ckpt, src)
            _run_builder(src, tmp, "fp32", ["shared_embeddings=false"], Path(scratch) / "cache")
        _finish(tmp, ckpt)
    return Path(out_dir)


def _notes(report: ExportReport) -> list[str]:
    notes = []
    if report.container_bits != report.bits:
        notes.append(
            f"{report.bits}-bit codes are stored in {report.container_bits}-bit MatMulNBits (ORT has no 3-bit kernel): "
            f"exact, but the packed codes take {report.container_bits / report.bits:.2f}x the dense {report.bits}-bit size "
            f"({report.container_overhead_bytes / 1e6:.2f} MB extra)"
        )
    if report.container_bits == 2:
        notes.append(
            "MatMulNBits bits=2 needs onnxruntime >= 1.24; its int8-activation path (accuracy_level 4) exists from 1.28 "
            "(1.24-1.27 run 2-bit nodes with fp32 activations whatever the level)"
        )
    if report.container_bits == 2 and report.accuracy_level != 4:
        notes.append(
            "2-bit MatMulNBits with fp32 activations (accuracy_level < 4) is ORT's slow path: ~50x slower decode than "
            "accuracy_level 4 on onnxruntime 1.32 CPU (benchmarks/bench_onnx.py); use it for accuracy checks only"
        )
    if report.accuracy_level == 4:
        notes.append(
            "accuracy_level 4 quantizes activations to int8 per block inside MatMulNBits: faster on CPU, "
            "logits move by the measured logits_rel_error[4]; export with accuracy_level=0 for fp32 activations"
        )
    return notes


# ---------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------


def _module_for_node(node_name: str) -> list[str] | None:
    """Hugging Face modules (rows concatenated) behind a builder MatMulNBits node name."""
    if node_name == "/lm_head/MatMulNBits":
        return ["lm_head"]
    m = _NODE_RE.match(node_name)
    if not m:
        return None
    layer, block, proj = m.groups()
    prefix = f"model.layers.{layer}.{'self_attn' if block == 'attn' else 'mlp'}"
    return [f"{prefix}.{p}" for p in _FUSED.get(proj, (proj,))]


def _check_weights(out: Path, ckpt: "QuantizedCheckpoint", report: ExportReport, *, exact: bool) -> None:
    """Decode every MatMulNBits of ``out`` and compare with the checkpoint (exactly when ``exact``)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(out / ONNX_FILE), load_external_data=False)  # tensors read one by one below
    inits = {t.name: t for t in model.graph.initializer}
    seen: list[str] = []
    worst = 0.0
    qbytes = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        mods = _module_for_node(node.name)
        if mods is None or any(mm not in ckpt.meta.modules for mm in mods):
            raise ExportError(f"verify: MatMulNBits node {node.name} does not map to quantized modules of the checkpoint")
        if attrs["bits"] != report.container_bits or attrs["block_size"] != report.group_size:
            raise ExportError(
                f"verify: {node.name} has bits={attrs['bits']} block_size={attrs['block_size']}, expected "
                f"{report.container_bits} / {report.group_size}"
            )
        if attrs.get("accuracy_level", 0) != report.accuracy_level:
            raise ExportError(f"verify: {node.name} has accuracy_level {attrs.get('accuracy_level', 0)}, expected {report.accuracy_level}")
        seen += mods
        qbytes += math.prod(inits[node.input[1]].dims)  # uint8 [N, K/G, G*b/8]
        if not exact:
            continue
        names = list(node.input) + [""] * 4
        b, s, z = (numpy_helper.to_array(inits[i], base_dir=str(out)) if i else None for i in names[1:4])
        w, codes, _ = decode_matmulnbits(b, s, z, n=attrs["N"], k=attrs["K"], bits=attrs["bits"], block_size=attrs["block_size"])
        if int(codes.max(initial=0)) >= 1 << report.bits:
            raise ExportError(f"verify: {node.name} holds codes above the checkpoint's {report.bits}-bit range")
        ref = torch.cat([ckpt.dequantized_weight(mm) for mm in mods], dim=0).numpy()  # [N, K]
        if ref.shape != w.shape:
            raise ExportError(f"verify: {node.name} decodes to {list(w.shape)}, the checkpoint has {list(ref.shape)}")
        worst = max(worst, float(np.abs(w - ref).max()) if ref.size else 0.0)
    missing = sorted(set(ckpt.meta.modules) - set(seen))
    if missing or len(seen) != len(set(seen)):
        raise ExportError(f"verify: quantized modules missing from (or repeated in) the ONNX graph: {missing[:5]}")
    float_lm_head = any(n.op_type == "MatMul" and n.name == "/lm_head/MatMul" for n in model.graph.node)
    if "lm_head" not in ckpt.meta.modules and not float_lm_head:
        raise ExportError("verify: lm_head is not a float MatMul in the ONNX graph (it must stay unquantized)")
    report.matmulnbits_nodes = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    report.quant_weight_bytes = qbytes
    report.container_overhead_bytes = int(qbytes * (1 - report.bits / report.container_bits))
    if exact:
        report.max_abs_weight_error = worst
        if worst != 0.0:
            raise ExportError(
                f"verify: MatMulNBits weights decode to values that differ from the checkpoint by up to {worst:.3g}: "
                "the export is wrong and was removed"
            )


def _ort_session(model_dir: Path, level: int | None, threads: int | None) -> Any:
    """An ONNX Runtime CPU session of an export, every ``MatMulNBits`` at ``level`` (None: as written).

    The graph is rewritten in memory and its weights are read from ``model_dir`` in place (ORT's
    external-initializers folder), so nothing is written beside the export.
    """
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(model_dir / ONNX_FILE), load_external_data=False)
    for node in graph.graph.node if level is not None else ():
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            node.ClearField("attribute")
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or 0
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_dir))
    return ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_logits(model_dir: Path, ids: Sequence[int], level: int | None, threads: int | None) -> np.ndarray:
    """ONNX Runtime logits ``[len(ids), vocab]`` (float32) of one forward pass with an empty KV cache."""
    session = _ort_session(model_dir, level, threads)
    head_size = int(json.loads((model_dir / GENAI_CONFIG).read_text())["model"]["decoder"]["head_size"])
    n = len(ids)
    feeds: dict[str, np.ndarray] = {"input_ids": np.asarray([ids], dtype=np.int64)}
    for inp in session.get_inputs():
        if inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, n), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(n, dtype=np.int64)[None]
        elif inp.name.startswith("past_key_values."):  # [batch, kv heads, 0 cached positions, head size]
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = np.zeros((1, int(inp.shape[1]), 0, head_size), dtype=dtype)
    return session.run(["logits"], feeds)[0][0].astype(np.float32)  # [T, V]


def _prompt_ids(ckpt_dir: Path, vocab: int) -> list[int]:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt_dir))
        ids = tok(_VERIFY_PROMPT, add_special_tokens=False)["input_ids"]
        if len(ids) >= 4:
            return [int(i) for i in ids]
    except Exception:  # noqa: BLE001 - no tokenizer: fall back to fixed ids
        pass
    return [(i * 37 + 11) % vocab for i in range(32)]


def _reference_logits(ckpt_dir: str | os.PathLike[str], prompt_ids: Sequence[int] | None) -> tuple[list[int], np.ndarray]:
    """The prompt and the checkpoint's PyTorch logits ``[T, V]`` (``load_model``, float32)."""
    from rqat_deploy.quant.checkpoint import load_model

    model, _ = load_model(ckpt_dir, dtype=torch.float32)
    ids = list(prompt_ids) if prompt_ids is not None else _prompt_ids(Path(ckpt_dir), model.config.vocab_size)
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()  # [T, V]
    return ids, ref


def measure_logits_error(
    model_dir: str | os.PathLike[str],
    ckpt_dir: str | os.PathLike[str],
    *,
    accuracy_levels: Sequence[int | None] = (None,),
    prompt_ids: Sequence[int] | None = None,
    threads: int | None = None,
) -> dict[int | None, tuple[float, float]]:
    """ORT logits of an export against the checkpoint's PyTorch model (``load_model``, float32).

    Args:
        model_dir: an ONNX export.
        ckpt_dir: the checkpoint it came from.
        accuracy_levels: run every MatMulNBits at each of these levels (None: as written).
        prompt_ids: the prompt (default: a fixed sentence through the checkpoint's tokenizer).
        threads: ORT intra-op threads.

    Returns:
        ``{level: (max|ort - torch| / max|torch|, argmax agreement fraction)}`` over the prompt's positions.
    """
    ids, ref = _reference_logits(ckpt_dir, prompt_ids)
    out: dict[int | None, tuple[float, float]] = {}
    for level in accuracy_levels:
        got = _ort_logits(Path(model_dir), ids, level, threads)  # [T, V]
        rel = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-30))
        out[level] = (rel, float((got.argmax(-1) == ref.argmax(-1)).mean()))
    return out
