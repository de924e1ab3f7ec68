"""compressed-tensors ``pack-quantized`` export (exporters/compressed_tensors.py).

The independent reader is the ``compressed-tensors`` package itself (its config parser and its
``pack-quantized`` decompressor), and transformers' loader for the round trip.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rqat_deploy.quant.checkpoint import load_model, read_checkpoint
from rqat_deploy.errors import CheckpointError, ExportError, OutputExistsError
from rqat_deploy.exporters import compressed_tensors as ctx
from rqat_deploy.exporters.compressed_tensors import export_compressed_tensors, hf_quantization_config
from rqat_deploy.exporters.safetensors_io import REPORT_FILE
from rqat_deploy.shards import INDEX_FILE, SafetensorsDir
from rqat_deploy.train.run import quantize_rtn

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

PROMPT = torch.tensor([[5, 17, 300, 42, 7, 900, 11, 64, 3, 250]])


def _leftovers(out: Path) -> list[str]:
    """Temporary siblings an export may have left next to ``out``."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def randomize_codes(src: Path, dst: Path, seed: int = 0) -> Path:
    """Copy a uniform checkpoint with random codes and zero points over the full range (0 and qmax included)."""
    shutil.copytree(src, dst)
    qmax = 2 ** json.loads((dst / "rqat_quant.json").read_text())["bits"] - 1
    sd = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name in sorted(sd):
        if name.endswith((".qcodes", ".zeros")):
            t = torch.randint(0, qmax + 1, sd[name].shape, generator=g, dtype=torch.uint8)
            t.view(-1)[:2] = torch.tensor([0, qmax], dtype=torch.uint8)
            sd[name] = t
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def ckpts(tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("ct_ckpts")
    return {b: quantize_rtn(tiny_qwen3_dir, root / f"rtn{b}", bits=b) for b in (2, 3, 4)}


def _decompress(export: Path, module: str, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode one module of an export with compressed-tensors, configured from the export's config.json."""
    qc = QuantizationConfig.model_validate(json.loads((export / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    out = SafetensorsDir(export)
    sd = {s: out.get(f"{module}.{s}") for s in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
    if scale_dtype is not None:
        sd["weight_scale"] = sd["weight_scale"].to(scale_dtype)
    return BaseCompressor.get_value_from_registry(qc.format).decompress(sd, scheme)["weight"]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_layout_config_and_files(ckpts: dict[int, Path], tmp_path: Path, bits: int) -> None:
    out = tmp_path / "export"
    report = export_compressed_tensors(ckpts[bits], out)
    ckpt = read_checkpoint(ckpts[bits])
    assert report.verified and report.max_abs_error == 0.0
    assert report.modules == len(ckpt.meta.modules) == 14 and report.ignored == ["lm_head"]

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # the package accepts it as written
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    w = parsed.config_groups["group_0"].weights
    assert (w.num_bits, w.type, w.symmetric, w.strategy, w.group_size) == (bits, "int", False, "group", 128)
    assert parsed.ignore == ["lm_head"] and parsed.config_groups["group_0"].targets == ["Linear"]
    assert config["model_type"] == "qwen3" and qc["quant_method"] == "compressed-tensors"

    tensors = load_file(out / "model.safetensors")
    m = "model.layers.1.mlp.down_proj"  # weight [256, 512]
    assert tensors[f"{m}.weight_packed"].dtype == torch.int32
    assert tensors[f"{m}.weight_packed"].shape == (256, 512 * bits // 32)
    assert tensors[f"{m}.weight_scale"].dtype == torch.float16 and tensors[f"{m}.weight_scale"].shape == (256, 4)
    assert tensors[f"{m}.weight_zero_point"].dtype == torch.int32
    assert tensors[f"{m}.weight_zero_point"].shape == (256 * bits // 32, 4)
    assert tensors[f"{m}.weight_shape"].tolist() == [256, 512]
    assert torch.equal(tensors[f"{m}.weight_scale"], ckpt.tensor(f"{m}.scales"))
    assert not any(n.endswith((".qcodes", ".scales", ".zeros")) for n in tensors)

    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (ckpt.path / f).read_bytes()
    assert json.loads((out / REPORT_FILE).read_text()) == report.to_json()
    assert set(report.files) == {p.name for p in out.iterdir()}
    assert _leftovers(out) == []


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_package_decompressor_reproduces_full_code_range(ckpts: dict[int, Path], tmp_path: Path, bits: int) -> None:
    src = randomize_codes(ckpts[bits], tmp_path / "random", seed=bits)
    ckpt = read_checkpoint(src)
    out = tmp_path / "export"
    report = export_compressed_tensors(src, out)
    for m in ckpt.meta.modules:
        ref = ckpt.dequantized_weight(m)
        assert torch.equal(_decompress(out, m, torch.float32), ref)  # exact in float32
        fp16 = _decompress(out, m).float()  # the package decompresses in the scales' dtype
        assert float(((fp16 - ref).abs() - 2**-11 * ref.abs()).max()) <= 0  # one fp16 rounding at most
    # codes q - z reach +-qmax, so the fp16 decode rounds somewhere (except 2 bits: 3*s may be exact)
    assert 0 <= report.runtime_max_rel_error <= 2**-11
    if bits >= 3:
        assert report.runtime_max_rel_error > 0


def _decoded_fp16(ckpt, m: str) -> torch.Tensor:
    """fp16(s * (q - z)), the weight transformers' dequantize-on-load produces, computed here directly."""
    t = ckpt.quant_tensors(m)
    z = t["zeros"].repeat_interleave(ckpt.meta.group_size, dim=1)
    s = t["scales"].repeat_interleave(ckpt.meta.group_size, dim=1)
    return (s.float() * (t["qcodes"].float() - z.float())).half().float()


@pytest.mark.parametrize("arch, bits", [("qwen3", 3), ("qwen2", 2), ("llama", 4)])
def test_transformers_round_trip(request, tmp_path: Path, arch: str, bits: int) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    src = quantize_rtn(model_dir, tmp_path / "ckpt", bits=bits)
    out = tmp_path / "export"
    report = export_compressed_tensors(src, out)
    ckpt = read_checkpoint(src)
    ref, _ = load_model(src, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(out, quantization_config=hf_quantization_config(), dtype=torch.float32)
    assert report.ignored == ["lm_head"]

    ref_sd, hf_sd = ref.state_dict(), hf.state_dict()
    assert set(hf_sd) == set(ref_sd)
    quantized = {f"{m}.weight" for m in ckpt.meta.modules}
    if arch == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in hf_sd)
    for name, t in ref_sd.items():
        if name in quantized:
            # transformers decodes in the scales' dtype: exactly fp16(s*(q-z)), <= 2**-11 relative off
            assert torch.equal(hf_sd[name], _decoded_fp16(ckpt, name[: -len(".weight")])), name
        else:
            assert torch.equal(hf_sd[name], t), name

    with torch.no_grad():
        logits_hf = hf(PROMPT).logits
        logits_ref = ref(PROMPT).logits
        # the same network with the fp16-decoded weights gives transformers' logits (float rounding only)
        for m in ckpt.meta.modules:
            ref.get_submodule(m).weight.copy_(_decoded_fp16(ckpt, m))
        logits_fp16 = ref(PROMPT).logits
    torch.testing.assert_close(logits_hf, logits_fp16, rtol=1e-5, atol=1e-5)
    scale = float(logits_ref.abs().max())
    assert float((logits_hf - logits_ref).abs().max()) <= 2e-3 * scale
    assert torch.equal(logits_hf.argmax(-1), logits_ref.argmax(-1))


def test_sharded_export_with_index(ckpts: dict[int, Path], tmp_path: Path) -> None:
    single = tmp_path / "single"
    export_compressed_tensors(ckpts[3], single)
    sharded = tmp_path / "sharded"
    report = export_compressed_tensors(ckpts[3], sharded, max_shard_bytes=300_000)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3 and report.details["shards"] == len(shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    a, b = SafetensorsDir(single), SafetensorsDir(sharded)
    assert sorted(a.names()) == sorted(b.names())
    assert index["metadata"]["total_size"] == sum(a.get(n).numel() * a.get(n).element_size() for n in a.names())
    for n in a.names():
        assert torch.equal(a.get(n), b.get(n)), n
    for f in shards:  # no shard over the limit unless it holds a single tensor
        assert (sharded / f).stat().st_size <= 300_000 + 10_000 or len(load_file(sharded / f)) == 1


def kquant_checkpoint(src: Path, dst: Path) -> Path:
    """A valid Q2_K-grid checkpoint (DESIGN.md 3 layout) made from a uniform one's codes."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "rqat_quant.json").read_text())
    meta.update(bits=2, grid="kquant", group_size=256)
    (dst / "rqat_quant.json").write_text(json.dumps(meta))
    sd = load_file(dst / "model.safetensors")
    for m in meta["modules"]:
        n, k = sd[f"{m}.qcodes"].shape
        del sd[f"{m}.scales"], sd[f"{m}.zeros"]
        sd[f"{m}.qcodes"] = sd[f"{m}.qcodes"].clamp(max=3)
        sd[f"{m}.d"] = torch.full((n, k // 256), 0.01, dtype=torch.float16)
        sd[f"{m}.dmin"] = torch.full((n, k // 256), 0.005, dtype=torch.float16)
        sd[f"{m}.sub_scales"] = torch.full((n, k // 16), 3, dtype=torch.uint8)
        sd[f"{m}.sub_mins"] = torch.full((n, k // 16), 2, dtype=torch.uint8)
    save_file(sd, dst / "model.safetensors")
    return dst


def test_refuses_kquant(ckpts: dict[int, Path], tmp_path: Path) -> None:
    src = kquant_checkpoint(ckpts[2], tmp_path / "kq")
    assert read_checkpoint(src).meta.grid == "kquant"
    out = tmp_path / "export"
    with pytest.raises(ExportError, match="--format gguf"):
        export_compressed_tensors(src, out)
    assert not out.exists() and _leftovers(out) == []


def test_existing_output_needs_force(ckpts: dict[int, Path], tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        export_compressed_tensors(ckpts[2], out)
    assert (out / "keep.txt").read_text() == "mine"
    export_compressed_tensors(ckpts[2], out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert _leftovers(out) == []


def test_corrupted_checkpoint_leaves_no_output(ckpts: dict[int, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(ckpts[2], bad)
    sd = load_file(bad / "model.safetensors")
    del sd["model.layers.0.mlp.up_proj.scales"]
    save_file(sd, bad / "model.safetensors")
    out = tmp_path / "export"
    with pytest.raises(CheckpointError, match="up_proj.scales"):
        export_compressed_tensors(bad, out)
    assert not out.exists() and _leftovers(out) == []


def test_failed_verification_removes_output(ckpts: dict[int, Path], tmp_path: Path, monkeypatch) -> None:
    good = ctx.pack_module

    def flip_one_code(t: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
        packed = good(t, bits)
        packed["weight_packed"] = packed["weight_packed"] ^ 1  # lowest bit of every word: code 0 changes
        return packed

    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    monkeypatch.setattr(ctx, "pack_module", flip_one_code)
    with pytest.raises(ExportError, match="differs from the checkpoint"):
        export_compressed_tensors(ckpts[3], out, force=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the previous output is untouched
    assert _leftovers(out) == []


def test_no_verify_skips_decoding(ckpts: dict[int, Path], tmp_path: Path) -> None:
    report = export_compressed_tensors(ckpts[2], tmp_path / "export", verify=False)
    assert not report.verified and report.max_abs_error is None


def test_output_inside_checkpoint_is_refused(ckpts: dict[int, Path]) -> None:
    with pytest.raises(ExportError, match="overlaps the checkpoint"):
        export_compressed_tensors(ckpts[2], ckpts[2] / "export")
    assert not (ckpts[2] / "export").exists()
