"""Recipes (issue 15): the paper's ablation rows as the paper ran them, recipe defaults, what is recorded."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from rqat_deploy.cli.commands import cli
from rqat_deploy.data.calib import DEFAULT_CALIB_SPEC, MATH_CALIB_SPEC
from rqat_deploy.data.sft import DEFAULT_TRAIN_SPEC, MATH_TRAIN_SPEC
from rqat_deploy.errors import ConfigError
from rqat_deploy.train.recipes import BUILTIN_PRESET, PAPER_ROWS, RECIPE_TABLE, option_defaults
from rqat_deploy.train.run import TrainConfig
from rqat_deploy.train.stage1 import Stage1Config

#: the rows of the paper's ablation: "'S' denotes the conventional supervised fine-tuning with cross entropy
#: loss function, 'R' denotes the teacher-guided reward rectification loss ... and 'C' means the existence of a
#: calibration stage. Therefore, 'C+S' denotes supervised fine-tuning after calibration."
#: (initialisation, stage-2 loss terms or None)
ROWS = {
    "S": ("rtn", "ce"),
    "R": ("rtn", "rr+topk_kl"),
    "C": ("stage1", None),
    "C+S": ("stage1", "ce"),
    "C+R": ("stage1", "rr+topk_kl"),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_each_ablation_recipe_resolves_to_the_papers_row(row: str) -> None:
    init, loss = ROWS[row]
    cfg = TrainConfig(out="x", model="some/model", recipe=row)
    plan = cfg.plan
    assert (plan.init, plan.loss, plan.paper_row) == (init, loss, True)
    if init == "stage1":  # the paper's stage 1: from RTN, the raw block MSE, no keep-better guard
        s1 = Stage1Config(**plan.stage1)
        assert (s1.init, s1.loss_space, s1.keep_better) == ("rtn", "block", False)
    s2 = cfg.stage2_config()
    if loss is None:
        assert s2 is None
        return
    # the paper's stage 2: scales only, one learning rate (the paper's per bit width), no guards, top-20 KL
    assert (s2.train_form, s2.relative_lr, s2.keep_better, s2.lr_search) == ("scales", False, False, ())
    assert (s2.loss_terms, s2.alpha, s2.beta, s2.top_k, s2.lr, s2.schedule) == (loss, 0.2, 1.0, 20, None, "cosine")
    assert cfg.calib_spec() == DEFAULT_CALIB_SPEC and cfg.train_spec() == DEFAULT_TRAIN_SPEC


def test_the_rows_are_the_cli_choices_and_refuse_another_loss() -> None:
    assert set(PAPER_ROWS) == set(ROWS) and set(ROWS) <= set(RECIPE_TABLE)
    with pytest.raises(ConfigError, match="ablation row as the paper ran it.*drop --loss"):
        TrainConfig(out="x", recipe="C+S", loss="ce+topk_kl")
    with pytest.raises(ConfigError, match="round-to-nearest by definition"):
        TrainConfig(out="x", recipe="R", init_from="somewhere")
    assert TrainConfig(out="x", recipe="rqat", loss="ce+topk_kl").plan.loss == "ce+topk_kl"  # free outside the rows


def test_old_letter_losses_fail_on_the_cli_with_the_new_names(tmp_path) -> None:
    res = CliRunner().invoke(cli, ["train", "--loss", "C+S", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "'C+S' means 'ce+topk_kl'" in res.output and "--recipe C+S" in res.output


def test_help_describes_the_rows_and_the_loss_terms() -> None:
    text = " ".join(CliRunner().invoke(cli, ["train", "--help"], terminal_width=200).output.split())
    for part in ("S (RTN, then CE)", "R (RTN, then rr+topk_kl)", "C (stage 1 only)", "C+S (stage 1, then CE)",
                 "C+R (stage 1, then rr+topk_kl: the paper's method)", "a partial sum, not renormalised",
                 "topk_kl_renorm", "whole samples up to the model's context length"):
        assert part in text, part


def test_recipe_defaults_resolve_unset_options_only() -> None:
    assert TrainConfig(out="x", model="m", recipe="rqat").calib_samples == 4096
    for recipe in ("gptq", "awq"):  # the papers' PTQ baselines: 128 math samples
        cfg = TrainConfig(out="x", model="m", recipe=recipe)
        assert cfg.calib_samples == 128 and cfg.calib_spec() == MATH_CALIB_SPEC
        assert TrainConfig(out="x", model="m", recipe=recipe, calib_samples=7, calib="a.jsonl").calib_spec() == "a.jsonl"
    builtin = TrainConfig(out="x", recipe="gptq")
    assert builtin.calib_samples == 128
    # a window holds a whole built-in math sample (a checked trace) for 95 % of them, as "128 samples" means
    from transformers import AutoTokenizer

    from rqat_deploy.builtin import synth
    from rqat_deploy.builtin.tiny_reasoner import _tokenize_problems

    tok = AutoTokenizer.from_pretrained(str(synth.default_model_dir()))
    lengths = sorted(len(ids) for ids, _, _ in _tokenize_problems(tok, synth.generate_problems(200, seed=1)))
    assert lengths[int(0.95 * len(lengths))] <= builtin.calib_seq_len < 2 * lengths[-1]
    assert builtin.calib_spec().endswith("reasoning_train.jsonl")  # math: the built-in traces
    assert TrainConfig(out="x", recipe="C").calib_samples == BUILTIN_PRESET["calib_samples"]
    assert option_defaults("rqat", builtin=True)["train_samples"] == BUILTIN_PRESET["train_samples"]


def test_reasoning_qat_as_published() -> None:
    """GPTQ on NuminaMath-1.5, then KD (full KL) on the latent weights: Adam (0.9, 0.95), lr 1e-6, cosine,
    180 warm-up steps of 6,000, global batch 32, OpenR1-Math."""
    cfg = TrainConfig(out="x", model="m", recipe="reasoning-qat")
    plan, s2 = cfg.plan, cfg.stage2_config()
    assert (plan.init, plan.loss) == ("gptq", "kl")
    assert cfg.calib_spec() == MATH_CALIB_SPEC and cfg.train_spec() == MATH_TRAIN_SPEC and cfg.calib_samples == 128
    assert (s2.train_form, s2.betas, s2.lr, s2.schedule, s2.global_batch, s2.max_steps) == (
        "weights", (0.9, 0.95), 1e-6, "cosine", 32, 6000)
    assert round(s2.warmup_ratio * 6000) == 180 and (cfg.train_samples - 64) * 3 // 32 == 6000
    assert s2.loss_config().needs_full_teacher
    small = TrainConfig(out="x", recipe="reasoning-qat")  # the built-in model: the preset's sizes
    assert (small.global_batch, small.train_samples, small.max_steps) == (16, 2048, None)
    assert small.stage2_config().train_form == "weights"
    assert TrainConfig(out="x", model="m", recipe="reasoning-qat-scales").stage2_config().train_form == "scales"
    assert RECIPE_TABLE["rqat-released"].stage2["train_form"] == "weights"
    g = cfg.grpo_config()  # then cold-start GRPO with the paper's Table 7 settings
    assert (g.steps, g.lr, g.global_batch, g.max_new_tokens) == (250, 5e-7, 64, 32768)
    kd = TrainConfig(out="x", model="m", recipe="reasoning-qat-kd")  # the KD stage alone
    assert kd.grpo_config() is None and kd.stage2_config() == s2
    assert (small.stage2_lr, small.grpo_config().lr) == (1e-3, BUILTIN_PRESET["grpo_lr"])
