"""GPTQ export (exporters/gptq.py): layout, zero-point conventions, and the GPTQ decoder.

The decoder is checked on hand-built words (GPTQModel's published bit layout) and against the
compressed-tensors export of the same checkpoint, decoded by the compressed-tensors package: the
two layouts hold the same codes, transposed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rqat_deploy.quant.checkpoint import read_checkpoint
from rqat_deploy.errors import CheckpointError, ConfigError, ExportError, OutputExistsError
from rqat_deploy.exporters.compressed_tensors import export_compressed_tensors
from rqat_deploy.exporters.gptq import QUANTIZE_CONFIG_FILE, decode_gptq, export_gptq
from rqat_deploy.exporters.safetensors_io import REPORT_FILE
from rqat_deploy.shards import SafetensorsDir
from rqat_deploy.train.run import quantize_rtn


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _set_zeros(src: Path, dst: Path, seed: int, lowest: int) -> Path:
    """Copy a uniform checkpoint with random codes and zero points in ``lowest..qmax`` (both ends present)."""
    shutil.copytree(src, dst)
    qmax = 2 ** json.loads((dst / "rqat_quant.json").read_text())["bits"] - 1
    sd = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name in sorted(sd):
        lo = lowest if name.endswith(".zeros") else 0
        if name.endswith((".qcodes", ".zeros")):
            t = torch.randint(lo, qmax + 1, sd[name].shape, generator=g, dtype=torch.uint8)
            t.view(-1)[:2] = torch.tensor([lo, qmax], dtype=torch.uint8)
            sd[name] = t
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def ckpts(tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("gptq_ckpts")
    return {b: quantize_rtn(tiny_qwen3_dir, root / f"rtn{b}", bits=b) for b in (2, 3, 4)}


def _module(out: Path, m: str) -> dict[str, torch.Tensor]:
    d = SafetensorsDir(out)
    return {s: d.get(f"{m}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_layout_and_config(ckpts: dict[int, Path], tmp_path: Path, bits: int) -> None:
    out = tmp_path / "gptq"
    report = export_gptq(ckpts[bits], out)
    ckpt = read_checkpoint(ckpts[bits])
    assert report.verified and report.max_abs_error == 0.0 and report.details["checkpoint_format"] == "gptq_v2"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq_v2"
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["lm_head"]) == (bits, 128, False, False, False)
    assert "dynamic" not in qc  # every decoder Linear is quantized
    gm = json.loads((out / QUANTIZE_CONFIG_FILE).read_text())
    assert gm["format"] == "gptq_v2" and gm["bits"] == bits
    m = "model.layers.0.mlp.down_proj"  # weight [N=256, K=512]
    t = _module(out, m)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (512 * bits // 32, 256)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (4, 256 * bits // 32)
    assert t["scales"].dtype == torch.float16 and torch.equal(t["scales"], ckpt.tensor(f"{m}.scales").t())
    assert t["g_idx"].dtype == torch.int32 and torch.equal(t["g_idx"], torch.arange(512, dtype=torch.int32) // 128)
    assert (out / "tokenizer.json").exists() and json.loads((out / REPORT_FILE).read_text()) == report.to_json()
    assert _leftovers(out) == []


def _words(*values: int) -> list[int]:
    """uint32 bit patterns as the int32 values a safetensors file stores."""
    return [v - 2**32 if v >= 2**31 else v for v in values]


def test_decoder_on_hand_built_three_bit_words() -> None:
    # GPTQ 3-bit: 32 codes of one column in 3 words; code 10 straddles words 0/1, code 21 words 1/2.
    codes = [0] * 32
    codes[0], codes[10], codes[11], codes[21], codes[22], codes[31] = 5, 7, 3, 6, 1, 4
    w0 = 5 | (7 & 0b11) << 30
    w1 = (7 >> 2) | 3 << 1 | (6 & 1) << 31
    w2 = (6 >> 1) | 1 << 2 | 4 << 29
    qweight = torch.tensor([_words(w0), _words(w1), _words(w2)], dtype=torch.int32)  # [K*3/32=3, N=1]
    # zero point 2 for N=32 columns is one 3-word stream too: only column 0 matters here
    qzeros = torch.tensor([_words(2, 0, 0)], dtype=torch.int32)  # [1 group, 32*3/32]
    scales = torch.full((1, 32), 0.5, dtype=torch.float16)
    qweight32 = torch.zeros(3, 32, dtype=torch.int32)
    qweight32[:, 0] = qweight[:, 0]
    w = decode_gptq(qweight32, qzeros, scales, torch.zeros(32, dtype=torch.int32), bits=3)  # [N=32, K=32]
    assert w[0].tolist() == [0.5 * (c - 2) for c in codes]
    assert w[1].tolist() == [0.0] * 32  # column 1: codes 0, zero point 0
    v1 = decode_gptq(qweight32, qzeros, scales, torch.zeros(32, dtype=torch.int32), bits=3, checkpoint_format="gptq")
    assert v1[0].tolist() == [0.5 * (c - 3) for c in codes]  # v1 stores z-1


def test_decoder_on_hand_built_two_and_four_bit_words() -> None:
    # 2-bit: 16 codes per word along K, code i at bits 2i; 4-bit: 8 codes per word
    qweight = torch.tensor([_words(0b11_10_01_00)] + [[0]], dtype=torch.int32)  # K=32 -> 2 words, N=1
    qweight = qweight.repeat(1, 16)  # N=16 columns, identical
    qzeros = torch.tensor([_words(0b01)], dtype=torch.int32)  # column 0 zero point 1, others 0
    w = decode_gptq(qweight, qzeros, torch.ones(1, 16, dtype=torch.float16), torch.zeros(32, dtype=torch.int32), bits=2)
    assert w[0, :5].tolist() == [-1.0, 0.0, 1.0, 2.0, -1.0] and w[1, :4].tolist() == [0.0, 1.0, 2.0, 3.0]
    qweight = torch.tensor([_words(0xF00000A1)], dtype=torch.int32).repeat(1, 8)  # K=8, N=8
    qzeros = torch.tensor([_words(0x8)], dtype=torch.int32)
    w = decode_gptq(qweight, qzeros, torch.ones(1, 8, dtype=torch.float16), torch.zeros(8, dtype=torch.int32), bits=4)
    assert w[0].tolist() == [1 - 8, 10 - 8, 0 - 8, 0 - 8, 0 - 8, 0 - 8, 0 - 8, 15 - 8]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_is_the_transposed_compressed_tensors_layout(ckpts: dict[int, Path], tmp_path: Path, bits: int) -> None:
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    src = _set_zeros(ckpts[bits], tmp_path / "random", seed=bits, lowest=0)
    ckpt = read_checkpoint(src)
    export_gptq(src, tmp_path / "gptq")
    export_compressed_tensors(src, tmp_path / "ct")
    cfg = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"])
    scheme, comp = cfg.config_groups["group_0"], BaseCompressor.get_value_from_registry(cfg.format)
    ctd = SafetensorsDir(tmp_path / "ct")
    for m in ckpt.meta.modules:
        g = _module(tmp_path / "gptq", m)
        c = {s: ctd.get(f"{m}.{s}") for s in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
        assert torch.equal(g["qweight"], c["weight_packed"].t())
        assert torch.equal(g["qzeros"], c["weight_zero_point"].t())
        assert torch.equal(g["scales"], c["weight_scale"].t())
        from_ct = comp.decompress({**c, "weight_scale": c["weight_scale"].float()}, scheme)["weight"]
        from_gptq = decode_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits)
        assert torch.equal(from_gptq, from_ct)
        assert torch.equal(from_gptq, ckpt.dequantized_weight(m))


def test_v1_refuses_zero_point_zero(ckpts: dict[int, Path], tmp_path: Path) -> None:
    src = _set_zeros(ckpts[3], tmp_path / "with0", seed=1, lowest=0)
    out = tmp_path / "v1"
    with pytest.raises(ExportError, match="zero points .* are 0.*gptq_v2"):
        export_gptq(src, out, zero_point="v1")
    assert not out.exists() and _leftovers(out) == []
    report = export_gptq(src, tmp_path / "v2")  # the default v2 holds z = 0
    assert report.verified and report.max_abs_error == 0.0


@pytest.mark.parametrize("bits", [2, 3])
def test_v1_stores_zero_point_minus_one(ckpts: dict[int, Path], tmp_path: Path, bits: int) -> None:
    src = _set_zeros(ckpts[bits], tmp_path / "no0", seed=2, lowest=1)
    ckpt = read_checkpoint(src)
    r1 = export_gptq(src, tmp_path / "v1", zero_point="v1")
    export_gptq(src, tmp_path / "v2")
    assert r1.details["checkpoint_format"] == "gptq"
    assert json.loads((tmp_path / "v1" / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq"
    for m in ckpt.meta.modules[:4]:
        a, b = _module(tmp_path / "v1", m), _module(tmp_path / "v2", m)
        assert torch.equal(a["qweight"], b["qweight"]) and not torch.equal(a["qzeros"], b["qzeros"])
        ref = ckpt.dequantized_weight(m)
        assert torch.equal(decode_gptq(a["qweight"], a["qzeros"], a["scales"], a["g_idx"], bits, "gptq"), ref)
        # read with the v2 convention, a v1 file is off by exactly one scale step
        off = decode_gptq(a["qweight"], a["qzeros"], a["scales"], a["g_idx"], bits, "gptq_v2") - ref
        step = a["scales"].float()[a["g_idx"].long()].t()  # [N, K]
        assert torch.equal(off, step)


def test_refusals_leave_no_output(ckpts: dict[int, Path], tmp_path: Path) -> None:
    # kquant grid
    kq = tmp_path / "kq"
    shutil.copytree(ckpts[2], kq)
    meta = json.loads((kq / "rqat_quant.json").read_text())
    sd = load_file(kq / "model.safetensors")
    for m in meta["modules"]:
        n, k = sd[f"{m}.qcodes"].shape
        del sd[f"{m}.scales"], sd[f"{m}.zeros"]
        for name in ("d", "dmin"):
            sd[f"{m}.{name}"] = torch.full((n, k // 256), 0.01, dtype=torch.float16)
        for name in ("sub_scales", "sub_mins"):
            sd[f"{m}.{name}"] = torch.ones(n, k // 16, dtype=torch.uint8)
    save_file(sd, kq / "model.safetensors")
    meta.update(grid="kquant", group_size=256)
    (kq / "rqat_quant.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="--format gguf"):
        export_gptq(kq, out)
    # missing scale tensor
    bad = tmp_path / "bad"
    shutil.copytree(ckpts[2], bad)
    sd = load_file(bad / "model.safetensors")
    del sd["model.layers.1.self_attn.o_proj.scales"]
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="o_proj.scales"):
        export_gptq(bad, out)
    with pytest.raises(ConfigError, match="'v2' or 'v1'"):
        export_gptq(ckpts[2], out, zero_point="v3")
    assert not out.exists() and _leftovers(out) == []
    # existing output
    out.mkdir()
    with pytest.raises(OutputExistsError):
        export_gptq(ckpts[2], out)
    assert list(out.iterdir()) == []
    assert export_gptq(ckpts[2], out, force=True).verified


def test_unquantized_decoder_linear_becomes_dynamic_skip(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    src = quantize_rtn(tiny_qwen3_dir, tmp_path / "ckpt", bits=4, exclude=("*.mlp.down_proj",))
    report = export_gptq(src, tmp_path / "gptq")
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert report.ignored == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    assert set(qc["dynamic"]) == {r"-:^model\.layers\.0\.mlp\.down_proj$", r"-:^model\.layers\.1\.mlp\.down_proj$"}
    names = SafetensorsDir(tmp_path / "gptq").names()
    assert "model.layers.0.mlp.down_proj.weight" in names and "model.layers.0.mlp.down_proj.qweight" not in names


def test_refuses_rows_that_do_not_fill_words(tmp_path: Path) -> None:
    from rqat_deploy.builtin.tiny import build_tiny_model

    # a consistent model whose k/v projections have 16 rows: 16 rows * 3 bits is not a whole number of
    # words (checkpoints whose tensors disagree with config.json are refused when opened)
    model = build_tiny_model(tmp_path / "m", "qwen3", num_layers=1, num_heads=16, num_kv_heads=1, head_dim=16)
    src = quantize_rtn(model, tmp_path / "odd", bits=3)
    out = tmp_path / "gptq"
    with pytest.raises(ExportError, match="multiples of 32"):
        export_gptq(src, out)
    assert not out.exists() and _leftovers(out) == []
