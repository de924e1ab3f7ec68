"""The q2_0 grid (llama.cpp's Q2_0, 2.25 bits per weight) and its GGUF type, checked against ggml.

ggml's own code is the oracle: its Q2_0 dequantizer (``dequantize_row_q2_0`` through the type
traits) decodes what our packer writes, and its quantizer (``quantize_row_q2_0_ref``, d = max|w|)
is the baseline our initialisation must never lose to.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from rqat_deploy.ggml_types import Q2_0_BYTES, Q2_0_TYPE, QK2_0, dequantize_q2_0_blocks
from rqat_deploy.quant.grids import grid_for
from rqat_deploy.quant.grids.q2_0 import init_q2_0
from rqat_deploy.quant.qlinear import QuantLinear
from rqat_deploy.quant.spec import QuantSpec
from rqat_deploy.train.run import quantize_rtn


class _Traits(ctypes.Structure):  # ggml.h struct ggml_type_traits (leading fields)
    _fields_ = [
        ("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def _ggml_dequantize(lib: ctypes.CDLL, blocks: np.ndarray) -> np.ndarray:
    """ggml's ``dequantize_row_q2_0`` of ``uint8 [n, 18]`` blocks -> float32 ``[n * 64]``."""
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    traits = lib.ggml_get_type_traits(Q2_0_TYPE).contents
    assert traits.type_name == b"q2_0" and (traits.blck_size, traits.type_size) == (QK2_0, Q2_0_BYTES)
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(traits.to_float)
    src = np.ascontiguousarray(blocks, dtype=np.uint8)
    out = np.zeros(len(src) * QK2_0, dtype=np.float32)
    to_float(src.ctypes.data, out.ctypes.data, out.size)
    return out


def _ggml_quantize(lib: ctypes.CDLL, w: np.ndarray) -> np.ndarray:
    """ggml's ``quantize_row_q2_0_ref`` of ``w`` float32 ``[rows, n]`` -> ``uint8 [rows * n/64, 18]``."""
    x = np.ascontiguousarray(w, dtype=np.float32)
    dst = np.zeros((x.size // QK2_0, Q2_0_BYTES), dtype=np.uint8)
    assert lib.ggml_quantize_chunk(Q2_0_TYPE, x.ctypes.data, dst.ctypes.data, 0, x.shape[0], x.shape[1], None) == dst.size
    return dst


def _weights(rows: int = 32, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, :64] = w[:, :64].abs()  # skewed groups, where the sign of d matters
    w[:, 64:128] = -w[:, 64:128].abs()
    return w


@pytest.mark.llamacpp
def test_packer_and_decoder_match_ggml(libggml: ctypes.CDLL) -> None:
    from rqat_deploy.exporters.gguf_quants import pack_q2_0

    rng = np.random.default_rng(0)
    q = rng.integers(0, 4, (8, 256), dtype=np.uint8)
    d = (rng.standard_normal((8, 4)) * 0.01).astype(np.float16)  # both signs
    d[0, 0] = 0.0
    packed = pack_q2_0(q, d).reshape(-1, Q2_0_BYTES)
    ggml = _ggml_dequantize(libggml, packed).reshape(8, 256)
    ours = dequantize_q2_0_blocks(packed).reshape(8, 256)
    want = grid_for("q2_0", 2).dequantize({
        "qcodes": torch.from_numpy(q), "scales": torch.from_numpy(d), "zeros": torch.ones(8, 4, dtype=torch.uint8),
    }).numpy()
    assert np.array_equal(ggml, want) and np.array_equal(ours, want)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    theirs = _ggml_quantize(libggml, w)
    assert np.array_equal(dequantize_q2_0_blocks(theirs), _ggml_dequantize(libggml, theirs).reshape(-1, QK2_0))


@pytest.mark.llamacpp
def test_init_never_loses_to_llamacpp_and_uses_all_levels(libggml: ctypes.CDLL) -> None:
    w = _weights()
    d = init_q2_0(w)  # [32, 8]
    grid = grid_for("q2_0", 2)
    q = grid.from_checkpoint({"scales": d.half()})
    lin = QuantLinear(w.shape[1], w.shape[0], None, q, QuantSpec(grid="q2_0"), weight=w)  # codes of the forward
    ours = lin.checkpoint_tensors()
    mine = grid.dequantize(ours).numpy().reshape(-1, QK2_0)
    theirs = _ggml_dequantize(libggml, _ggml_quantize(libggml, w.numpy())).reshape(-1, QK2_0)
    x = w.numpy().reshape(-1, QK2_0)
    err_ours, err_ggml = ((mine - x) ** 2).sum(1), ((theirs - x) ** 2).sum(1)
    assert (err_ours <= err_ggml).all()
    assert err_ours.sum() < 0.8 * err_ggml.sum()  # the fourth level pays: 20 %+ lower squared error
    assert set(np.unique(ours["qcodes"].numpy())) == {0, 1, 2, 3}
    assert (d < 0).any() and (d > 0).any()


def test_rtn_checkpoint_exports_exactly_everywhere(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    from rqat_deploy.exporters.compressed_tensors import export_compressed_tensors
    from rqat_deploy.exporters.gguf import export_gguf, inspect_gguf
    from rqat_deploy.exporters.gptq import export_gptq

    ckpt = quantize_rtn(tiny_qwen3_dir, tmp_path / "q20", bits=2, grid="q2_0")
    rep = export_gguf(ckpt, tmp_path / "m.gguf")
    assert rep.exact and rep.gguf_type == "Q2_0" and rep.verified
    quantized = [t for t in rep.tensors if t.quantized]
    assert quantized and all(t.qtype == "Q2_0" and t.exact for t in quantized)
    info = inspect_gguf(tmp_path / "m.gguf")  # a reader that knows type 42
    assert "Q2_0" in str(info)
    assert export_compressed_tensors(ckpt, tmp_path / "ct").max_abs_error == 0.0
    assert export_gptq(ckpt, tmp_path / "gptq").max_abs_error == 0.0


def test_q2_0_checkpoints_refuse_other_zero_points(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from rqat_deploy.errors import CheckpointError
    from rqat_deploy.quant.checkpoint import read_checkpoint

    ckpt = quantize_rtn(tiny_qwen3_dir, tmp_path / "q20", bits=2, grid="q2_0")
    sd = load_file(ckpt / "model.safetensors")
    name = next(n for n in sd if n.endswith(".zeros"))
    sd[name][0, 0] = 2
    save_file(sd, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"zeros holds values 1\.\.2 outside 1\.\.1"):
        read_checkpoint(ckpt).quant_tensors(name.removesuffix(".zeros"))


def test_onnx_export_is_exact(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime_genai")
    from rqat_deploy.exporters.onnx import export_onnx

    ckpt = quantize_rtn(tiny_qwen3_dir, tmp_path / "q20", bits=2, grid="q2_0")
    rep = export_onnx(ckpt, tmp_path / "onnx")
    assert rep.verified and rep.max_abs_weight_error == 0.0 and rep.argmax_agreement[0] == 1.0


@pytest.mark.llamacpp
def test_old_llama_cpp_python_gets_a_clear_error(tiny_qwen3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    from rqat_deploy.errors import ModelLoadError
    from rqat_deploy.exporters.gguf import export_gguf
    from rqat_deploy.serve.runtime_llamacpp import LlamaCppRuntime

    ckpt = quantize_rtn(tiny_qwen3_dir, tmp_path / "q20", bits=2, grid="q2_0")
    export_gguf(ckpt, tmp_path / "m.gguf")
    LlamaCppRuntime(str(tmp_path / "m.gguf"))  # this llama-cpp-python runs Q2_0
    monkeypatch.delattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_Q2_0")  # as an older one would
    with pytest.raises(ModelLoadError, match=r"Q2_0 .*pip install 'llama-cpp-python>=0\.3\.36'"):
        LlamaCppRuntime(str(tmp_path / "m.gguf"))
