"""Model surgery, the quantized checkpoint, and `train --recipe rtn` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rqat_deploy.quant.checkpoint import load_model, read_checkpoint, save_checkpoint
from rqat_deploy.errors import CheckpointError, ConfigError, OutputExistsError, ShapeError
from rqat_deploy.models import load_hf_model
from rqat_deploy.quant.spec import QuantSpec
from rqat_deploy.quant.surgery import convert_model, freeze_codes, prepare_model, quant_linears

CASES = [(2, "uniform"), (3, "uniform"), (4, "uniform"), (2, "kquant"), (3, "kquant")]


def _ids(tok) -> torch.Tensor:
    return torch.tensor([tok("Question: 12 + 7 * 3 = ? <think> step 1 </think> \\boxed{33}")["input_ids"]])


class _Prepared(dict):
    """Lazily builds, per (bits, grid): the stage-1 model, its logits, and its saved checkpoint."""

    def __init__(self, model_dir: Path, tmp: pytest.TempPathFactory) -> None:
        super().__init__()
        self.model_dir, self.tmp = model_dir, tmp

    def __missing__(self, key: tuple[int, str]):
        bits, grid = key
        model, tok = load_hf_model(str(self.model_dir))
        prepare_model(model, QuantSpec(bits=bits, grid=grid), progress=False)
        with torch.no_grad():
            logits = model(_ids(tok)).logits
        ckpt = save_checkpoint(model, self.tmp.mktemp(f"ck{bits}{grid}") / "ckpt", tokenizer=tok, base_model="tiny")
        self[key] = (model, tok, logits, ckpt)
        return self[key]


@pytest.fixture(scope="module")
def prepared(tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> _Prepared:
    return _Prepared(tiny_qwen3_dir, tmp_path_factory)


@pytest.mark.parametrize("bits, grid", CASES)
def test_checkpoint_loads_back_to_the_same_logits(prepared, bits: int, grid: str) -> None:
    model, tok, logits, ckpt = prepared[(bits, grid)]
    loaded, tok2 = load_model(ckpt)
    with torch.no_grad():
        assert torch.equal(loaded(_ids(tok2)).logits, logits)
    for name, mod in quant_linears(model):
        assert torch.equal(read_checkpoint(ckpt).dequantized_weight(name), mod.dequantized_weight())


@pytest.mark.parametrize("bits, grid", CASES)
def test_stage2_form_and_convert_keep_the_function(prepared, bits: int, grid: str) -> None:
    _, tok, logits, ckpt = prepared[(bits, grid)]
    model, _ = load_model(ckpt, form="stage2")
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    freeze_codes(model)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({"scale"} if grid == "uniform" else ({"d", "dmin"} if bits == 2 else {"d"}))
    with torch.no_grad():
        assert torch.equal(model(_ids(tok)).logits, logits)
    # stage-2 scales receive gradients; codes are buffers that cannot change
    model(_ids(tok)).logits.float().pow(2).mean().backward()
    _, mod = next(quant_linears(model))
    grad = mod.quantizer.scale.grad if grid == "uniform" else mod.quantizer.d.grad
    assert grad is not None and grad.abs().sum() > 0
    convert_model(model)
    assert not list(quant_linears(model))
    with torch.no_grad():
        assert torch.equal(model(_ids(tok)).logits, logits)


def test_stage1_freeze_keeps_logits(tiny_qwen3_dir: Path) -> None:
    model, tok = load_hf_model(str(tiny_qwen3_dir))
    prepare_model(model, QuantSpec(bits=2), progress=False)
    with torch.no_grad():
        before = model(_ids(tok)).logits
        freeze_codes(model)
        assert torch.equal(model(_ids(tok)).logits, before)


def test_round_trip_rewrites_identical_tensors(prepared, tmp_path: Path) -> None:
    _, _, _, ckpt = prepared[(2, "kquant")]
    model, tok = load_model(ckpt, form="stage2")
    again = save_checkpoint(model, tmp_path / "again", tokenizer=tok)
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fixture", ["tiny_qwen2_dir", "tiny_llama_dir"])
def test_biases_and_untied_heads_survive(request, fixture: str, tmp_path: Path) -> None:
    model_dir = request.getfixturevalue(fixture)
    model, tok = load_hf_model(str(model_dir))
    names = prepare_model(model, QuantSpec(bits=3), progress=False)
    assert "lm_head" not in names and all("embed" not in n for n in names)
    with torch.no_grad():
        logits = model(_ids(tok)).logits
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tokenizer=tok)
    loaded, _ = load_model(ckpt)
    with torch.no_grad():
        assert torch.equal(loaded(_ids(tok)).logits, logits)
    names_in_file = read_checkpoint(ckpt).tensor_names()
    if fixture == "tiny_qwen2_dir":
        assert "model.layers.0.self_attn.q_proj.bias" in names_in_file
    else:
        assert "lm_head.weight" in names_in_file


def test_indivisible_module_gets_a_clear_error(tiny_qwen3_dir: Path) -> None:
    model, _ = load_hf_model(str(tiny_qwen3_dir))
    with pytest.raises(ShapeError, match=r"in_features=512.*--group-size 512|in_features=256.*--group-size 256"):
        prepare_model(model, QuantSpec(group_size=1024), progress=False)
    with pytest.raises(ConfigError, match="untied"):
        prepare_model(model, QuantSpec(quantize_lm_head=True), progress=False)


def _corrupt(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_bad_checkpoints_are_refused(prepared, tmp_path: Path) -> None:
    _, _, _, ckpt = prepared[(2, "uniform")]
    m = "model.layers.0.self_attn.q_proj"
    bad = _corrupt(ckpt, tmp_path / "missing", lambda t: t.pop(f"{m}.scales"))
    with pytest.raises(CheckpointError, match=r"lacks the tensor 'model.layers.0.self_attn.q_proj.scales'"):
        read_checkpoint(bad)
    bad = _corrupt(ckpt, tmp_path / "dtype", lambda t: t.__setitem__(f"{m}.scales", t[f"{m}.scales"].float()))
    with pytest.raises(CheckpointError, match="is F32.*expected F16"):
        read_checkpoint(bad)
    bad = _corrupt(ckpt, tmp_path / "range", lambda t: t[f"{m}.qcodes"].__setitem__((0, 0), 9))
    with pytest.raises(CheckpointError, match="outside 0..3"):
        load_model(bad)
    shutil.copytree(ckpt, tmp_path / "version")
    meta = json.loads((tmp_path / "version" / "rqat_quant.json").read_text()) | {"format_version": 2}
    (tmp_path / "version" / "rqat_quant.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 2 is not supported"):
        read_checkpoint(tmp_path / "version")
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        read_checkpoint(ckpt.parent.parent)


def test_existing_output_needs_force_and_failures_leave_nothing(prepared, tmp_path: Path) -> None:
    model, tok, _, _ = prepared[(2, "uniform")]
    out = save_checkpoint(model, tmp_path / "ck", tokenizer=tok)
    with pytest.raises(OutputExistsError, match="--force"):
        save_checkpoint(model, out, tokenizer=tok)
    save_checkpoint(model, out, tokenizer=tok, force=True)

    class Boom:
        def save_pretrained(self, _: Path) -> None:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(model, tmp_path / "never", tokenizer=Boom())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_sharded_checkpoint_loads(prepared, tmp_path: Path) -> None:
    model, tok, logits, _ = prepared[(3, "kquant")]
    out = save_checkpoint(model, tmp_path / "sharded", tokenizer=tok, max_shard_size=400_000)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 1
    loaded, _ = load_model(out)
    with torch.no_grad():
        assert torch.equal(loaded(_ids(tok)).logits, logits)


@pytest.mark.parametrize("grid, bits", [("uniform", 2), ("uniform", 3), ("kquant", 2), ("kquant", 3), ("q2_0", 2)])
def test_to_latent_keeps_the_codes(grid: str, bits: int) -> None:
    """Issue 15: a stage-2 QuantLinear turned back into its stage-1 form (latent weight = dequantized weight)
    has the same codes and the same forward."""
    from rqat_deploy.quant.qlinear import QuantLinear
    from rqat_deploy.quant.spec import QuantSpec

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 64)
    q = QuantLinear.from_linear(lin, QuantSpec(bits=bits, grid=grid))
    q.freeze_codes()
    codes, w = q.codes().clone(), q.dequantized_weight()
    q.to_latent()
    assert q.form == "stage1" and torch.equal(q.codes(), codes) and torch.equal(q.dequantized_weight(), w)
