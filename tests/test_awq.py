"""AWQ (issue 15's baseline) on the tiny Qwen3: function-preserving scales, lower output error than RTN, exact checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from rqat_deploy.errors import ConfigError
from rqat_deploy.quant.spec import QuantSpec
from rqat_deploy.quant.surgery import prepare_model, quant_linears


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_qwen3_dir: Path) -> dict:
    from rqat_deploy.builtin import synth
    from rqat_deploy.data.calib import build_calibration
    from rqat_deploy.models import load_hf_model

    model, tok = load_hf_model(str(tiny_qwen3_dir))
    calib = build_calibration(tok, synth.default_data("train"), 24, 64, seed=0).input_ids
    held = build_calibration(tok, synth.default_data("train"), 8, 64, seed=1).input_ids
    return {"model": model, "tok": tok, "calib": calib, "held": held}


def _kl(teacher: torch.nn.Module, student: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        p = teacher(input_ids=ids).logits.double().log_softmax(-1)
        q = student(input_ids=ids).logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_scales_fold_without_changing_the_function(setup: dict) -> None:
    """s into the Linears' columns, 1/s into the norm or the Linear before: the float model computes the same."""
    from rqat_deploy.train.activations import find_decoder_layers
    from rqat_deploy.train.awq import _LLAMA_GROUPS, _apply_scale

    model = copy.deepcopy(setup["model"])
    _, layers = find_decoder_layers(model)
    with torch.no_grad():
        before = model(input_ids=setup["held"]).logits
        for group in (_LLAMA_GROUPS[0], _LLAMA_GROUPS[2], _LLAMA_GROUPS[3]):  # v -> o is skipped under GQA
            n = layers[0].get_submodule(group.linears[0]).in_features
            s = torch.rand(n, generator=torch.Generator().manual_seed(n)) + 0.5
            _apply_scale(layers[0], group, s, {name: torch.zeros(1, n) for name in group.linears})
        after = model(input_ids=setup["held"]).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grid", ["uniform", "q2_0"])
def test_awq_is_closer_to_the_teacher_than_rtn_and_saves_exactly(setup: dict, grid: str, tmp_path: Path) -> None:
    from rqat_deploy.quant.checkpoint import load_model, save_checkpoint
    from rqat_deploy.train.awq import run_awq

    spec = QuantSpec(bits=2, grid=grid)
    teacher = setup["model"]
    rtn = copy.deepcopy(teacher)
    prepare_model(rtn, spec, progress=False)
    awq = copy.deepcopy(teacher)
    rep = run_awq(awq, spec, setup["calib"], progress=False)
    assert rep.groups and all(g.loss <= g.loss_rtn for g in rep.groups)  # the exponent 0 (plain RTN) is a candidate
    assert any("v_proj" in g for g in rep.skipped_groups)  # the tiny model uses grouped-query attention
    assert len(list(quant_linears(awq))) == len(list(quant_linears(rtn)))
    assert _kl(teacher, awq, setup["held"]) < _kl(teacher, rtn, setup["held"])
    save_checkpoint(awq, tmp_path / "ck", tokenizer=setup["tok"])
    loaded, _ = load_model(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=setup["held"]).logits, awq(input_ids=setup["held"]).logits)


def test_awq_refuses_grids_without_one_scale_per_group(setup: dict) -> None:
    from rqat_deploy.train.awq import run_awq

    with pytest.raises(ConfigError, match="uniform, q2_0.*--recipe gptq"):
        run_awq(copy.deepcopy(setup["model"]), QuantSpec(bits=2, grid="kquant"), setup["calib"], progress=False)
