"""Whole-model GGUF export of a quantized checkpoint, with verify-on-write, and GGUF inspection.

``export_gguf`` writes a file that llama.cpp (and vLLM's GGUF loader) runs: the architecture's
hyperparameters, the tokenizer (BPE vocabulary, merges, token types, pre-tokenizer name, special
tokens, chat template), every quantized Linear in its GGUF type (``exporters.gguf_quants``), norms
and biases in F32, embeddings / output in a float type of the user's choice. The file is written
under a temporary name beside the output, read back with ``gguf.GGUFReader`` and decoded with
``gguf.quants.dequantize`` (an independent decoder), compared with the checkpoint's dequantized
weights, its vocabulary loaded in llama.cpp and its tokenization compared with Hugging Face's
(``exporters.gguf_vocab``), and only then renamed to the output path. The export report (per-tensor type and relative
weight error, fallbacks, totals) is stored in the file under ``rqat.export.report``.

Library API (the CLI wires ``rqat-deploy export --format gguf`` and ``rqat-deploy inspect``)::

    export_gguf(ckpt_dir, out_path, *, gguf_type=None, embed_type="F16", tokenizer_pre=None,
                verify=True, force=False) -> ExportReport
    inspect_gguf(path) -> dict
    format_inspect(info) -> str
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from rqat_deploy.errors import CheckpointError, ConfigError, ExportError
from rqat_deploy.files import check_no_overlap, check_output, staged_output_file
from rqat_deploy.exporters import gguf_quants as gq
from rqat_deploy.exporters import gguf_vocab as gv

if TYPE_CHECKING:
    from rqat_deploy.quant.grids import Grid

__all__ = [
    "EMBED_TYPES",
    "ExportReport",
    "TensorReport",
    "export_gguf",
    "format_inspect",
    "inspect_gguf",
    "gguf_type_choices",
    "tensor_sha256",
    "verify_gguf",
    "resolve_gguf_type",
]

#: Float types offered for embeddings, the output matrix and other unquantized matrices.
EMBED_TYPES = ("F32", "F16", "BF16", "Q8_0")

REPORT_KEY = "rqat.export.report"
TOTAL_ERROR_KEY = "rqat.export.total_rel_error"

# HF model_type -> gguf architecture name (a key of gguf.MODEL_ARCH_NAMES values).
_ARCHS = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama"}

_FILE_TYPE = {  # gguf.LlamaFileType of the dominant weight type
    "F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "BF16": 32, "Q2_0": 41,
}


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


@dataclass
class TensorReport:
    """One written tensor.

    Attributes:
        name: GGUF tensor name (``blk.0.attn_q.weight``).
        source: checkpoint name (``model.layers.0.self_attn.q_proj`` for quantized modules).
        qtype: GGUF type name.
        shape: PyTorch shape ``[out, in]`` (or ``[n]``).
        rel_error: ``||W_gguf - W_ckpt|| / ||W_ckpt||`` (Frobenius; 0.0 when exact).
        exact: the stored tensor decodes bit for bit to the checkpoint's.
        quantized: a quantized module of the checkpoint (counts in the total error).
        note: fallback explanation, if any.
        sha256: of the stored tensor bytes (``inspect --verify`` checks the file against it).
    """

    name: str
    source: str
    qtype: str
    shape: list[int]
    rel_error: float
    exact: bool
    quantized: bool
    note: str = ""
    sha256: str = ""


@dataclass
class ExportReport:
    """What ``export_gguf`` wrote.

    Attributes:
        path: the output file.
        arch: GGUF architecture.
        gguf_type: the type asked for (or the default) for quantized modules.
        embed_type: the type of embeddings / output / unquantized matrices.
        bits, grid, group_size: the checkpoint's quantization.
        tensors: one entry per tensor.
        total_rel_error: relative error over all quantized modules together.
        max_rel_error: worst per-module relative error.
        fallbacks: GGUF names of tensors written in another type than ``gguf_type``, with why.
        file_size: bytes.
        bits_per_weight: file-wide bits per element of all tensors.
        verified: the file was read back and checked.
        seconds: wall time of the export (verification included).
        tokenizer_pre: the ``tokenizer.ggml.pre`` written.
        tokenizer_pre_source: how it was chosen: ``given``, ``hash`` (llama.cpp's table of
            pretrained tokenizers) or ``structure`` (the pre-tokenizer pipeline).
        tokenizer_check: what verify-on-write found when llama.cpp tokenized the probe text.
    """

    path: str
    arch: str
    gguf_type: str
    embed_type: str
    bits: int
    grid: str
    group_size: int
    tensors: list[TensorReport] = field(default_factory=list)
    total_rel_error: float = 0.0
    max_rel_error: float = 0.0
    fallbacks: dict[str, str] = field(default_factory=dict)
    file_size: int = 0
    bits_per_weight: float = 0.0
    verified: bool = False
    seconds: float = 0.0
    tokenizer_pre: str = ""
    tokenizer_pre_source: str = ""
    tokenizer_check: str = ""

    @property
    def exact(self) -> bool:
        """Every quantized module is stored bit-exactly."""
        return all(t.exact for t in self.tensors if t.quantized)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the form stored in the file, without path / size / timing)."""
        d = asdict(self)
        d["exact"] = self.exact
        return d

    def summary(self) -> str:
        """Human-readable multi-line summary (what the CLI prints)."""
        lines = [
            f"wrote {self.path} ({self.file_size / 2**20:.2f} MiB, {self.bits_per_weight:.3f} bits/weight)",
            f"architecture {self.arch}; {self.bits}-bit {self.grid} checkpoint -> {self.gguf_type}; "
            f"embeddings/output {self.embed_type}",
            f"weight error of quantized modules: total {self.total_rel_error:.3e}, max {self.max_rel_error:.3e}"
            + (" (bit-exact)" if self.exact else ""),
        ]
        for t in self.tensors:
            if t.quantized:
                lines.append(f"  {t.name:32s} {t.qtype:5s} rel.err {t.rel_error:.3e}{'  exact' if t.exact else ''}")
        for name, why in self.fallbacks.items():
            lines.append(f"  fallback {name}: {why}")
        lines.append(f"tokenizer.ggml.pre {self.tokenizer_pre} ({self.tokenizer_pre_source})")
        lines.append("verified: read back and decoded with gguf" if self.verified else "not verified (--no-verify)")
        if self.tokenizer_check:
            lines.append(f"tokenizer: {self.tokenizer_check}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# choices
# ---------------------------------------------------------------------------------------------


def gguf_type_choices(grid: Grid) -> list[str]:
    """The GGUF types a checkpoint on ``grid`` can be written in, the default first.

    The grid's native type first (exact: Q2_K / Q3_K for kquant); a grid in the uniform layout
    can also be mapped to every uniform choice (Q2_K / Q3_K / Q4_K lossy and reported; Q4_0, Q8_0,
    F32 exact); any grid can be written as F32 (exact) or F16 (measured).
    """
    native = [grid.gguf_type] if grid.gguf_type else []
    rest = gq.uniform_type_choices(grid.bits) if grid.uniform_layout else ["F32", "F16"]
    return list(dict.fromkeys(native + rest))


def resolve_gguf_type(grid: Grid, gguf_type: str | None) -> str:
    """Validate ``--gguf-type`` for a checkpoint on ``grid`` and fill in the default.

    Raises:
        ConfigError: a type the checkpoint cannot be written in, naming the valid ones.
    """
    choices = gguf_type_choices(grid)
    if gguf_type is None:
        return choices[0]
    if gguf_type.upper() not in choices:
        raise ConfigError(
            f"--gguf-type {gguf_type.upper()} is not available for a {grid.bits}-bit {grid.label} checkpoint; "
            f"choose one of {', '.join(choices)} (default {choices[0]})"
        )
    return gguf_type.upper()


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def export_gguf(
    ckpt_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    gguf_type: str | None = None,
    embed_type: str = "F16",
    tokenizer_pre: str | None = None,
    verify: bool = True,
    force: bool = False,
) -> ExportReport:
    """Write a quantized checkpoint (or a full-precision model, for comparison) as one GGUF file.

    Args:
        ckpt_dir: the quantized checkpoint directory (DESIGN.md 3), or a Hugging Face model
            directory without ``rqat_quant.json``, written with every matrix in ``embed_type``.
        out_path: the ``.gguf`` file to write.
        gguf_type: GGUF type of the quantized modules (see :func:`resolve_gguf_type`); None = the
            default for the checkpoint's grid and bit width.
        embed_type: type of the embeddings, the untied output matrix and any unquantized matrix:
            one of :data:`EMBED_TYPES`. Norms and biases are always F32.
        tokenizer_pre: llama.cpp pre-tokenizer name (one llama.cpp knows); None = detect it, by
            llama.cpp's table of probe-text hashes, else by the pre-tokenizer pipeline
            (:mod:`rqat_deploy.exporters.gguf_vocab`).
        verify: read the file back and compare every tensor with the checkpoint, and load its
            vocabulary in llama.cpp and compare its tokenization of a probe text with Hugging
            Face's (skipped with a note without llama-cpp-python) (default on).
        force: overwrite an existing ``out_path``.

    Returns:
        The :class:`ExportReport` (also stored in the file's metadata).

    Raises:
        OutputExistsError: ``out_path`` exists and ``force`` is false.
        CheckpointError: an invalid checkpoint.
        ConfigError: an unknown architecture, type, or an undetectable or unknown pre-tokenizer
            (raised before anything is written).
        ExportError: the written file does not decode to the checkpoint, or llama.cpp refuses its
            vocabulary or tokenizes differently from Hugging Face (the file is removed).
    """
    import gguf

    from rqat_deploy.quant.checkpoint import QUANT_FILE, read_checkpoint, read_float_model

    t0 = time.perf_counter()
    inputs = {ckpt_dir: "checkpoint directory"}
    out = check_output(check_no_overlap(out_path, inputs, error=ExportError), force)
    if out.exists() and out.is_dir():
        raise ExportError(f"{out} is a directory; give a file path ending in .gguf")
    embed_type = embed_type.upper()
    if embed_type not in EMBED_TYPES:
        raise ConfigError(f"embed_type {embed_type!r} is not supported; choose one of {', '.join(EMBED_TYPES)}")
    if (Path(ckpt_dir) / QUANT_FILE).exists():
        ckpt = read_checkpoint(ckpt_dir)
        qtype = resolve_gguf_type(ckpt.grid, gguf_type)
    else:  # a full-precision model (the teacher): every matrix in embed_type
        ckpt = read_float_model(ckpt_dir)
        qtype = embed_type
    meta = ckpt.meta
    arch = _arch_of(ckpt.config)
    vocab = _read_vocab(ckpt.path, ckpt.config, tokenizer_pre)
    report = ExportReport(
        path=str(out), arch=arch, gguf_type=qtype, embed_type=embed_type,
        bits=meta.bits, grid=meta.grid, group_size=meta.group_size,
        tokenizer_pre=vocab.pre.name, tokenizer_pre_source=vocab.pre.source,
    )
    with staged_output_file(out, force, inputs=inputs, error=ExportError) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch, use_temp_file=True)
        n_blocks = int(ckpt.config["num_hidden_layers"])
        name_map = gguf.get_tensor_name_map(_arch_enum(arch), n_blocks)
        sums = []
        for name, data, raw, rep, err in _tensors(ckpt, arch, qtype, embed_type, name_map, vocab.n_rows):
            rep.sha256 = tensor_sha256(data)
            writer.add_tensor(name, data, raw_dtype=raw)
            report.tensors.append(rep)
            if rep.note:
                report.fallbacks[name] = rep.note
            if err is not None:
                sums.append(err)
        _totals(report, sums)
        _write_metadata(writer, ckpt, arch, qtype, report, vocab)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if verify:
            _verify(tmp, ckpt, report, arch, name_map)
            report.tokenizer_check = gv.check_llamacpp_tokenization(tmp, vocab.hf_tokenizer, vocab.pre.name)
            report.verified = True
    report.file_size = out.stat().st_size
    report.bits_per_weight = _bits_per_weight(report, out)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _arch_of(config: dict[str, Any]) -> str:
    """GGUF architecture of a transformers config."""
    mt = config.get("model_type")
    if mt not in _ARCHS:
        raise ConfigError(
            f"model_type {mt!r} is not supported by the GGUF exporter; supported: {', '.join(_ARCHS)}"
        )
    return _ARCHS[mt]


def _arch_enum(arch: str) -> Any:
    """gguf.MODEL_ARCH member of an architecture name."""
    import gguf

    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _llama_qk_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's (non-NEOX) rope expects for a llama q/k projection.

    HF stores each head's rotary halves as ``[x_0..x_{h/2-1}, y_0..y_{h/2-1}]``; llama.cpp pairs
    adjacent rows. Returns ``idx`` such that ``W_gguf = W_hf[idx]``.
    """
    hd = n_rows // n_head
    idx = np.arange(n_rows).reshape(n_head, 2, hd // 2)  # [head, half, j]
    return idx.transpose(0, 2, 1).reshape(n_rows)  # [head, j, half]


def _row_perm(arch: str, source: str, config: dict[str, Any], n_rows: int) -> np.ndarray | None:
    """Row permutation for ``source`` (llama q_proj / k_proj), else None."""
    if arch != "llama":
        return None
    if source.endswith("self_attn.q_proj"):
        return _llama_qk_rows(n_rows, int(config["num_attention_heads"]))
    if source.endswith("self_attn.k_proj"):
        return _llama_qk_rows(n_rows, int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    return None


def _sq_error(decoded: np.ndarray, ref: np.ndarray) -> float:
    """Squared Frobenius norm of ``decoded - ref`` (float32 difference, BLAS dot)."""
    d = (decoded - ref).reshape(-1)
    return float(np.dot(d, d))


def _sq_norm(ref: np.ndarray) -> float:
    """Squared Frobenius norm."""
    r = np.ascontiguousarray(ref, dtype=np.float32).reshape(-1)
    return float(np.dot(r, r))


def _rel(se: float, sn: float) -> float:
    return math.sqrt(se / sn) if sn > 0 else math.sqrt(se)


def _float_data(w: np.ndarray, ftype: str) -> tuple[np.ndarray, Any, np.ndarray]:
    """Encode a float32 tensor as ``ftype``; returns (data, raw_dtype or None, decoded float32)."""
    import gguf

    if ftype == "F32":
        return w, None, w
    if ftype == "F16":
        d = w.astype(np.float16)
        return d, None, d.astype(np.float32)
    qt = gguf.GGMLQuantizationType[ftype]
    data = gguf.quants.quantize(w, qt)
    return data, qt, gguf.quants.dequantize(data, qt)


def _tensors(
    ckpt: Any, arch: str, qtype: str, embed_type: str, name_map: Any, n_vocab_rows: int
) -> Iterator[tuple[str, np.ndarray, Any, TensorReport, tuple[float, float] | None]]:
    """Yield ``(gguf name, data, raw_dtype, report, (squared error, squared norm) or None)``.

    The error sums are given for quantized modules (they make the total error).
    """
    import gguf

    meta, config = ckpt.meta, ckpt.config
    for module in meta.modules:
        name = _gguf_name(name_map, f"{module}.weight")
        t = ckpt.quant_tensors(module)
        ref = ckpt.grid.dequantize(t).numpy()  # [out, in] float32: the trained weight
        fields = {k: v.numpy() for k, v in t.items()}
        perm = _row_perm(arch, module, config, ref.shape[0])
        if perm is not None:
            fields, ref = {k: v[perm] for k, v in fields.items()}, ref[perm]
        mt = _map_module(ckpt.grid, fields, ref, qtype)
        if mt.exact:  # by construction (tests/test_gguf_quants.py); verify re-checks against the core
            se, sn, exact = 0.0, _sq_norm(ref), True
        else:
            se, sn = _sq_error(mt.decoded, ref), _sq_norm(ref)
            exact = se == 0.0 and bool(np.array_equal(mt.decoded, ref))
        raw = None if mt.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else mt.qtype
        rep = TensorReport(
            name=name, source=module, qtype=mt.qtype.name, shape=list(fields["qcodes"].shape),
            rel_error=_rel(se, sn), exact=exact, quantized=True,
            note=mt.note,
        )
        yield name, mt.data, raw, rep, (se, sn)
    tied = bool(config.get("tie_word_embeddings", False))
    for src, t in ckpt.float_tensors():
        if src == "lm_head.weight" and tied:
            continue
        w = t.float().numpy()
        name = _gguf_name(name_map, src)
        if src.endswith(".bias") or w.ndim == 1:
            ftype = "F32"
            module = src.rsplit(".", 1)[0]
            perm = _row_perm(arch, module, config, w.shape[0])
            if perm is not None:
                w = w[perm]
        else:
            ftype = embed_type
            perm = _row_perm(arch, src.rsplit(".", 1)[0], config, w.shape[0])
            if perm is not None:
                w = w[perm]
            if src.endswith("embed_tokens.weight") and w.shape[0] != n_vocab_rows:
                raise CheckpointError(f"{src} has {w.shape[0]} rows but the vocabulary has {n_vocab_rows}")
        note = ""
        if ftype == "Q8_0" and w.shape[-1] % 32:
            ftype, note = "F16", f"Q8_0 needs rows of a multiple of 32 (row {w.shape[-1]}): F16 written instead"
        data, raw, decoded = _float_data(np.ascontiguousarray(w, dtype=np.float32), ftype)
        se, sn = _sq_error(decoded, w), _sq_norm(w)
        rep = TensorReport(
            name=name, source=src, qtype=ftype, shape=list(w.shape),
            rel_error=_rel(se, sn),
            exact=bool(np.array_equal(decoded, w)), quantized=False, note=note,
        )
        yield name, data, raw, rep, None
    if arch == "llama":
        freqs = _llama3_rope_freqs(config)
        if freqs is not None:
            rep = TensorReport("rope_freqs.weight", "rope_parameters", "F32", list(freqs.shape), 0.0, True, False)
            yield "rope_freqs.weight", freqs, None, rep, None


def _map_module(grid: Grid, fields: dict[str, np.ndarray], ref: np.ndarray, qtype: str) -> gq.MappedTensor:
    """One quantized module in ``qtype``: the grid's native packing, a uniform mapping, or floats."""
    if qtype == grid.gguf_type:
        return gq.pack_native(qtype, fields)
    if grid.uniform_layout:
        return gq.map_uniform(fields["qcodes"], fields["scales"], fields["zeros"], grid.group_size, grid.bits, qtype)
    return gq.map_float(ref, qtype)


def _gguf_name(name_map: Any, hf_name: str) -> str:
    """GGUF tensor name of a Hugging Face tensor name."""
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ExportError(f"no GGUF name for the tensor {hf_name!r}: this architecture variant is not supported")
    return name


def _totals(report: ExportReport, sums: list[tuple[float, float]]) -> None:
    """Fill total / max error of the quantized modules from their (squared error, squared norm)."""
    se = sum(e for e, _ in sums)
    sn = sum(n for _, n in sums)
    report.total_rel_error = math.sqrt(se / sn) if sn > 0 else 0.0
    report.max_rel_error = max((t.rel_error for t in report.tensors if t.quantized), default=0.0)


# ---------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    pre: gv.TokenizerPre
    n_rows: int
    hf_tokenizer: Any


def _read_vocab(path: Path, config: dict[str, Any], tokenizer_pre: str | None) -> _Vocab:
    """Token list, token types and pre-tokenizer name of the checkpoint's tokenizer.

    Raises:
        CheckpointError: no (loadable) ``tokenizer.json``, or more tokens than embedding rows.
        ConfigError: not a BPE tokenizer, or no llama.cpp pre-tokenizer name (see
            :func:`~rqat_deploy.exporters.gguf_vocab.resolve_tokenizer_pre`).
    """
    import gguf

    tj_path = path / "tokenizer.json"
    if not tj_path.exists():
        raise CheckpointError(
            f"{path} has no tokenizer.json: the GGUF exporter needs the fast (byte-level BPE) tokenizer file"
        )
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(
            f"{tj_path}: tokenizer model {model.get('type')!r} is not supported; the GGUF exporter writes "
            "byte-level BPE (gpt2-style) tokenizers"
        )
    hf_tokenizer = gv.load_hf_tokenizer(path)
    pre = gv.resolve_tokenizer_pre(hf_tokenizer, tokenizer_pre, path)
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    cfg_added = _tokenizer_config(path).get("added_tokens_decoder", {})
    for k, a in cfg_added.items():  # tokenizer_config may mark specials tokenizer.json does not
        added.setdefault(int(k), {"id": int(k), "content": a.get("content"), "special": a.get("special", False)})
    n_tok = max([*vocab.values(), *added.keys()], default=-1) + 1
    n_rows = int(config.get("vocab_size") or n_tok)
    if n_tok > n_rows:
        raise CheckpointError(f"the tokenizer has {n_tok} tokens but the embedding only {n_rows} rows")
    tokens = [f"[PAD{i}]" for i in range(n_rows)]
    types = [int(gguf.TokenType.UNUSED)] * n_rows
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, int(gguf.TokenType.NORMAL)
    for i, a in added.items():
        content = a["content"]
        special = bool(a.get("special")) or (content.startswith("<|") and content.endswith("|>"))
        tokens[i] = content
        types[i] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    return _Vocab(tokens, types, pre, n_rows, hf_tokenizer)


def _tokenizer_config(path: Path) -> dict[str, Any]:
    f = path / "tokenizer_config.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope theta, scaling dict) from transformers 5 ``rope_parameters`` or 4.x fields."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = dict(config.get("rope_scaling") or {})
    scaling.update({k: v for k, v in params.items() if k != "rope_theta"})
    return float(theta), scaling


def _llama3_rope_freqs(config: dict[str, Any]) -> np.ndarray | None:
    """llama.cpp ``rope_freqs`` factors for Llama-3.1-style rope scaling, else None."""
    theta, sc = _rope(config)
    if (sc.get("rope_type") or sc.get("type")) != "llama3":
        return None
    dim = _head_dim(config)
    factor = float(sc.get("factor", 8.0))
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # [dim/2]
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)


def _write_metadata(writer: Any, ckpt: Any, arch: str, qtype: str, report: ExportReport, vocab: _Vocab) -> None:
    """Hyperparameters, tokenizer, general.* and the export report."""
    import gguf

    from rqat_deploy import __version__

    c, meta = ckpt.config, ckpt.meta
    name = meta.base_model or ckpt.path.name
    writer.add_name(f"{name} {meta.bits}-bit {meta.grid} ({qtype})")
    writer.add_basename(name)
    writer.add_type("model")
    writer.add_quantized_by(f"rqat-deploy {__version__}")
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, name)
    writer.add_description(
        f"full-precision {name} exported by rqat-deploy" if not meta.modules
        else f"{meta.bits}-bit {meta.grid}-grid quantization-aware-trained model exported by rqat-deploy"
    )
    writer.add_file_type(_FILE_TYPE.get(qtype, 1))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # hyperparameters
    writer.add_block_count(int(c["num_hidden_layers"]))
    writer.add_context_length(int(c.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(c["hidden_size"]))
    writer.add_feed_forward_length(int(c["intermediate_size"]))
    writer.add_head_count(int(c["num_attention_heads"]))
    writer.add_head_count_kv(int(c.get("num_key_value_heads") or c["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    theta, sc = _rope(c)
    writer.add_rope_freq_base(theta)
    hd = _head_dim(c)
    if c.get("head_dim") is not None:
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    if arch == "llama":
        writer.add_rope_dimension_count(hd)
        writer.add_vocab_size(vocab.n_rows)
    _rope_scaling(writer, sc)
    # tokenizer
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre.name)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    special = gguf.SpecialVocab(ckpt.path, load_merges=True, n_vocab=vocab.n_rows)
    if not special.merges:
        raise CheckpointError(f"{ckpt.path}: the tokenizer has no BPE merges; llama.cpp cannot tokenize without them")
    special.add_special_token.setdefault("bos", False)  # llama.cpp's BPE default would differ per version
    special.add_to_gguf(writer, quiet=True)
    # our own keys
    writer.add_uint32("rqat.bits", meta.bits)
    writer.add_string("rqat.grid", meta.grid)
    writer.add_uint32("rqat.group_size", meta.group_size)
    writer.add_string("rqat.recipe", json.dumps(meta.recipe, sort_keys=True, default=str))
    writer.add_float64(TOTAL_ERROR_KEY, report.total_rel_error)
    stored = report.to_dict()
    for k in ("path", "file_size", "bits_per_weight", "verified", "seconds", "tokenizer_check"):
        stored.pop(k)
    writer.add_string(REPORT_KEY, json.dumps(stored, sort_keys=True))


def _rope_scaling(writer: Any, sc: dict[str, Any]) -> None:
    """rope scaling keys for linear / yarn; llama3 goes through the rope_freqs tensor."""
    import gguf

    kind = sc.get("rope_type") or sc.get("type") or "default"
    if kind in ("default", "llama3"):
        return
    factor = float(sc.get("factor", 1.0))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(int(sc.get("original_max_position_embeddings", 0)))
    else:
        raise ConfigError(f"rope scaling {kind!r} is not supported by the GGUF exporter (default, linear, yarn, llama3 are)")


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------


def _verify(path: Path, ckpt: Any, report: ExportReport, arch: str, name_map: Any) -> None:
    """Read ``path`` back with gguf, decode every tensor, compare with the checkpoint.

    Raises:
        ExportError: a missing / extra tensor, a type or shape mismatch, or a decoded tensor whose
            error exceeds the reported one (or is not exact where the report says exact).
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    expected = {t.name: t for t in report.tensors}
    if set(by_name) != set(expected):
        raise ExportError(
            f"{path}: tensors differ from what was written: missing {sorted(set(expected) - set(by_name))[:5]}, "
            f"extra {sorted(set(by_name) - set(expected))[:5]}"
        )
    stored = reader.get_field(REPORT_KEY)
    if stored is None or json.loads(stored.contents())["total_rel_error"] != report.total_rel_error:
        raise ExportError(f"{path}: the stored export report is missing or differs from the computed one")
    floats = dict(ckpt.float_tensors())
    for name, rep in expected.items():
        t = by_name[name]
        if t.tensor_type.name != rep.qtype:
            raise ExportError(f"{path}: {name} is stored as {t.tensor_type.name}, expected {rep.qtype}")
        decoded = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        decoded = decoded.reshape(rep.shape)
        if not np.isfinite(decoded).all():
            raise ExportError(
                f"{path}: {name} decodes to NaN or Inf values in {rep.qtype} (a value beyond the range of that type); "
                "output removed: choose a wider --embed-type / --gguf-type (F32)"
            )
        if rep.quantized:
            ref = ckpt.dequantized_weight(rep.source).numpy()
        elif rep.source == "rope_parameters":
            ref = _llama3_rope_freqs(ckpt.config)
        else:
            ref = floats[rep.source].float().numpy()
        perm = _row_perm(arch, rep.source.removesuffix(".weight").removesuffix(".bias"), ckpt.config, ref.shape[0])
        if perm is not None:
            ref = ref[perm]
        if rep.exact:
            if not np.array_equal(decoded, ref):
                raise ExportError(f"{path}: {name} does not decode bit-exactly to the checkpoint; output removed")
            continue
        err = _rel(_sq_error(decoded, ref), _sq_norm(ref))
        if not err <= rep.rel_error * (1 + 1e-6) + 1e-12:
            raise ExportError(
                f"{path}: {name} decodes with relative error {err:.3e}, beyond the reported {rep.rel_error:.3e}; "
                "output removed"
            )


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def _bits_per_weight(report: ExportReport, path: Path) -> float:
    n = sum(math.prod(t.shape) for t in report.tensors)
    return 8.0 * path.stat().st_size / n if n else 0.0


def inspect_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a GGUF file: architecture, tensor types, bits per weight, size, stored report.

    Args:
        path: a ``.gguf`` file (any producer; the export report is present for ours).

    Returns:
        A JSON-ready dict with ``path``, ``file_size``, ``architecture``, ``name``,
        ``hyperparameters`` (``<arch>.*`` keys), ``tokenizer`` (model, pre, n_tokens),
        ``tensor_types`` ({type: count}), ``n_tensors``, ``n_elements``, ``bits_per_weight``
        (whole file), ``quantized_bits_per_weight`` (tensor data of non-float tensors),
        ``tensors`` (name, type, shape, bytes) and ``export_report`` (dict or None).

    Raises:
        ExportError: the file is missing or not a GGUF file.
    """
    p = Path(path)
    reader = _open_gguf(p)

    def get(key: str) -> Any:
        f = reader.get_field(key)
        return None if f is None else f.contents()

    arch = get("general.architecture")
    hyper = {}
    for key, f in reader.fields.items():
        if arch and key.startswith(f"{arch}."):
            hyper[key[len(arch) + 1 :]] = f.contents()
    tensors, types = [], {}
    n_el = q_el = q_bytes = 0
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape.tolist())]
        tname = t.tensor_type.name
        types[tname] = types.get(tname, 0) + 1
        tensors.append({"name": t.name, "type": tname, "shape": shape, "bytes": int(t.n_bytes)})
        n_el += int(t.n_elements)
        if tname not in ("F32", "F16", "BF16"):
            q_el += int(t.n_elements)
            q_bytes += int(t.n_bytes)
    tokens = reader.get_field("tokenizer.ggml.tokens")
    raw_report = get(REPORT_KEY)
    size = p.stat().st_size
    return {
        "path": str(p),
        "file_size": size,
        "architecture": arch,
        "name": get("general.name"),
        "file_type": get("general.file_type"),
        "hyperparameters": hyper,
        "tokenizer": {
            "model": get("tokenizer.ggml.model"),
            "pre": get("tokenizer.ggml.pre"),
            "n_tokens": len(tokens.data) if tokens is not None else 0,
            "has_chat_template": reader.get_field("tokenizer.chat_template") is not None,
        },
        "tensor_types": types,
        "n_tensors": len(tensors),
        "n_elements": n_el,
        "bits_per_weight": 8.0 * size / n_el if n_el else 0.0,
        "quantized_bits_per_weight": 8.0 * q_bytes / q_el if q_el else None,
        "tensors": tensors,
        "export_report": json.loads(raw_report) if raw_report else None,
    }


def _open_gguf(p: Path) -> Any:
    """``gguf.GGUFReader`` of ``p``; a missing, truncated or corrupt file is one ExportError."""
    import gguf

    if not p.is_file():
        raise ExportError(f"{p} does not exist or is not a file")
    try:
        return gguf.GGUFReader(str(p))
    except Exception as e:  # noqa: BLE001 - the reader fails in many ways on a cut or corrupt file
        raise ExportError(f"{p} is not a readable GGUF file ({type(e).__name__}: {e}): it is truncated or corrupt") from e


def tensor_sha256(data: np.ndarray) -> str:
    """sha256 of a tensor's bytes as the GGUF file stores them (C order)."""
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def verify_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Decode every tensor of a GGUF file and check it, instead of trusting its stored report.

    Each tensor's bytes are compared with the sha256 the export report stored (files written by
    rqat-deploy), and each tensor gguf can decode must hold finite values.

    Returns:
        ``{"tensors", "checksums_matched", "decoded", "undecodable_types"}``.

    Raises:
        ExportError: the file is unreadable, a tensor differs from its stored checksum, or decodes to NaN/Inf.
    """
    import gguf

    p = Path(path)
    reader = _open_gguf(p)
    field = reader.get_field(REPORT_KEY)
    stored = {t["name"]: t.get("sha256") for t in json.loads(field.contents())["tensors"]} if field else {}
    matched, decoded, undecodable = 0, 0, set()
    for t in reader.tensors:
        want = stored.get(t.name)
        if want:
            if tensor_sha256(t.data) != want:
                raise ExportError(f"{p}: tensor {t.name} differs from what was written (checksum mismatch): the file is corrupt")
            matched += 1
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            undecodable.add(t.tensor_type.name)
            continue
        if not np.isfinite(values).all():
            raise ExportError(f"{p}: tensor {t.name} decodes to NaN or Inf values: the file is corrupt")
        decoded += 1
    return {"tensors": len(reader.tensors), "checksums_matched": matched, "decoded": decoded,
            "undecodable_types": sorted(undecodable)}


def format_inspect(info: dict[str, Any]) -> str:
    """Text rendering of :func:`inspect_gguf`'s dict (what ``rqat-deploy inspect`` prints)."""
    lines = [
        f"{info['path']}: {info['file_size'] / 2**20:.2f} MiB, {info['n_tensors']} tensors, "
        f"{info['n_elements'] / 1e6:.2f} M weights, {info['bits_per_weight']:.3f} bits/weight",
        f"architecture: {info['architecture']}   name: {info['name']}",
        "hyperparameters: " + ", ".join(f"{k}={v}" for k, v in sorted(info["hyperparameters"].items())),
        f"tokenizer: {info['tokenizer']['model']} (pre {info['tokenizer']['pre']}), "
        f"{info['tokenizer']['n_tokens']} tokens, chat template: {info['tokenizer']['has_chat_template']}",
        "tensor types: " + ", ".join(f"{k} x{v}" for k, v in sorted(info["tensor_types"].items())),
    ]
    if info["quantized_bits_per_weight"] is not None:
        lines.append(f"quantized tensors: {info['quantized_bits_per_weight']:.3f} bits/weight")
    rep = info.get("export_report")
    if rep:
        checked = info.get("verification")
        lines.append(
            f"export report{'' if checked else ' (as stored at export; inspect --verify checks the tensors)'}: "
            f"{rep['bits']}-bit {rep['grid']} -> {rep['gguf_type']}, total weight error "
            f"{rep['total_rel_error']:.3e} (max {rep['max_rel_error']:.3e}){', bit-exact' if rep.get('exact') else ''}"
        )
        for name, why in rep.get("fallbacks", {}).items():
            lines.append(f"  fallback {name}: {why}")
    else:
        lines.append("export report: none (not written by rqat-deploy)")
    checked = info.get("verification")
    if checked:
        lines.append(
            f"verified: {checked['decoded']} of {checked['tensors']} tensors decoded to finite values, "
            f"{checked['checksums_matched']} match the checksums stored at export"
        )
    return "\n".join(lines)
