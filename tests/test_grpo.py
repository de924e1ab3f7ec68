"""GRPO on the built-in tiny reasoner: the objective, what trains, direction of the update, resume, exactness, CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from rqat_deploy.builtin.synth import default_data, default_model_dir
from rqat_deploy.data.prompts import build_prompts
from rqat_deploy.errors import ConfigError
from rqat_deploy.quant.spec import QuantSpec
from rqat_deploy.quant.surgery import freeze_codes, prepare_model, quant_linears
from rqat_deploy.train.grpo import (
    GRPOConfig, Rollouts, clipped_token_loss, group_advantages, resolve_trains, run_grpo, sequence_logprobs,
)
from rqat_deploy.train.rewards import RewardConfig, Scored, overlong, score_response

pytestmark = pytest.mark.slow

SMALL = dict(group_size=4, global_batch=8, grad_accum=2, max_new_tokens=72, warmup_steps=0, tensorboard=False)


@pytest.fixture(scope="module")
def env() -> dict[str, Any]:
    from rqat_deploy.models import load_hf_model

    teacher, tok = load_hf_model(str(default_model_dir()))
    student = copy.deepcopy(teacher)
    prepare_model(student, QuantSpec(bits=2), progress=False)  # RTN, stage-1 form
    prompts = build_prompts(tok, default_data("train"), 8, seed=0, max_prompt_tokens=256)
    return {"teacher": teacher, "tok": tok, "student": student, "prompts": prompts}


def _student(env: dict[str, Any], form: str) -> torch.nn.Module:
    s = copy.deepcopy(env["student"])
    if form == "stage2":
        freeze_codes(s)
    return s


# -- the objective ----------------------------------------------------------------------------


def test_group_advantages_are_centred_per_group_and_zero_for_equal_rewards() -> None:
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    a = group_advantages(r)
    assert torch.allclose(a.sum(dim=1), torch.zeros(2), atol=1e-6)
    assert torch.equal(a[1], torch.zeros(4))
    assert a[0, 0] > 0 > a[0, 1]
    assert torch.allclose(group_advantages(r, "none")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_clipped_loss_takes_the_gradient_away_outside_the_range_and_adds_the_k3_kl() -> None:
    logp = torch.log(torch.tensor([0.5, 0.5, 0.5])).requires_grad_(True)
    old = torch.log(torch.tensor([0.5, 0.3, 0.7]))  # ratios 1, 1.67, 0.71
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, clipped, kl = clipped_token_loss(logp, old, adv, clip_eps=0.2)
    assert torch.allclose(loss[0], torch.tensor(-1.0))
    assert clipped.tolist() == [False, True, True]
    loss.sum().backward()
    assert logp.grad[0] < 0 and logp.grad[1] == 0 and logp.grad[2] == 0  # clipped tokens carry no gradient
    assert torch.equal(kl, torch.zeros(3))
    ref = torch.log(torch.tensor([0.5, 0.4, 0.6]))
    _, _, kl = clipped_token_loss(logp.detach(), logp.detach(), adv, ref_logp=ref, kl_beta=0.1)
    assert kl[0] == 0 and (kl[1:] > 0).all()


def test_length_penalty_orders_answers_of_equal_correctness_only() -> None:
    assert overlong(40, 50) == 0.0 and overlong(75, 50) == 0.5 and overlong(500, 50) == 1.0 and overlong(9, None) == 0.0
    cfg = RewardConfig(grader="fallback", length_weight=0.5)
    good = "<think>\n7 + 5 = 12.\n</think>\n\nThe answer is \\boxed{12}."
    long_right = score_response(good, "12", 200, cfg, reference=40)
    short_wrong = score_response(good.replace("{12}", "{13}"), "12", 10, cfg, reference=40)
    assert long_right.correct and long_right.overlong == 1.0 and long_right.reward == 0.5
    assert short_wrong.reward == 0.0 < long_right.reward < score_response(good, "12", 30, cfg, reference=40).reward
    assert score_response(good, "12", 30, RewardConfig(grader="fallback", format_weight=0.2)).reward == 1.2
    with pytest.raises(ConfigError, match="length_budget"):
        RewardConfig(length_weight=1.0, length_reference="budget")


# -- data -------------------------------------------------------------------------------------


def test_prompts_take_gold_answers_from_fields_traces_or_question_rows(env: dict[str, Any], tmp_path: Path) -> None:
    f = tmp_path / "mix.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "Compute 2 + 3."},
                      {"role": "assistant", "content": "<think>\n2 + 3 = 5.\n</think>\n\nThe answer is \\boxed{5}."}]},
        {"problem": "What is 4 * 4?", "answer": "16"},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},  # no gold
        {"problem": "What is 3 + 4?", "solution": "3 + 4 is \\boxed{7}."},
        {"problem": "Name a colour.", "solution": "Blue, for instance."},  # a solution without a final answer
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ps = build_prompts(env["tok"], str(f), 3, seed=0, instruction="Box it.")
    by_answer = {p.answer: p for p in ps.prompts}
    assert set(by_answer) == {"5", "16", "7"}
    assert by_answer["5"].ref_thinking_tokens > 0 and by_answer["16"].ref_thinking_tokens is None
    assert "What is 4 * 4?\nBox it." in by_answer["16"].text and by_answer["16"].text.endswith("assistant\n")
    assert ps.report["sources"][0]["records_skipped"] == {"no_gold_answer": 2}


# -- what trains ------------------------------------------------------------------------------


def test_trains_follows_the_form_or_the_recorded_recipe(env: dict[str, Any]) -> None:
    s1, s2 = _student(env, "stage1"), _student(env, "stage2")
    assert resolve_trains("auto", s1) == "weights"
    assert resolve_trains("auto", s2) == "scales"
    assert resolve_trains("auto", s2, {"trains": "weights"}) == "weights"
    assert resolve_trains("scales", s1) == "scales"
    with pytest.raises(ConfigError, match="quantized student"):
        resolve_trains("auto", env["teacher"])


def test_latent_weights_keep_the_forward_and_the_codes(env: dict[str, Any]) -> None:
    from rqat_deploy.quant.surgery import select_trainable

    s = _student(env, "stage2")
    ids = torch.tensor([env["prompts"].prompts[0].ids])
    codes = {n: m.codes().clone() for n, m in quant_linears(s)}
    with torch.no_grad():
        before = s(input_ids=ids).logits
    weights = [p for _, p in select_trainable(s, "weights")]
    with torch.no_grad():
        after = s(input_ids=ids).logits
    assert torch.equal(before, after)
    assert all(torch.equal(codes[n], m.codes()) and m.form == "stage1" for n, m in quant_linears(s))
    assert [p for p in s.parameters() if p.requires_grad] == weights


# -- the update -------------------------------------------------------------------------------


@pytest.mark.parametrize("form, trains, lr", [("stage2", "scales", 3e-3), ("stage1", "weights", 1e-2)])
def test_a_crafted_reward_raises_the_likelihood_of_the_rewarded_rollouts(
    env: dict[str, Any], form: str, trains: str, lr: float
) -> None:
    """Reward 1 for the first two rollouts of each group of four, 0 for the others: after one
    update the rewarded responses gained log-probability relative to the others."""
    student = _student(env, form)
    seen: dict[str, Any] = {}

    def crafted(roll: Rollouts, group: int, _ref: Any) -> list[Scored]:
        seqs = [(p.ids, c) for p, c in zip(roll.prompts, roll.completions)]
        with torch.no_grad():
            seen["seqs"], seen["before"] = seqs, _per_sequence(student, seqs)
        return _alternating(roll, group, None)

    cfg = GRPOConfig(steps=1, lr=lr, trains=trains, **SMALL)
    rep = run_grpo(student, env["tok"], env["prompts"], cfg, progress=False, reward_fn=crafted)
    assert rep.trains == trains
    with torch.no_grad():
        gain = _per_sequence(student, seen["seqs"]) - seen["before"]
    rewarded = torch.tensor([k % 4 < 2 for k in range(len(gain))])
    assert gain[rewarded].mean() > gain[~rewarded].mean()


def _alternating(roll: Rollouts, group: int, _ref: Any) -> list[Scored]:
    """Reward 1 for the first half of each group, 0 for the rest (never a uniform group)."""
    return [Scored(float(k % group < group // 2), False, False, 0.0) for k in range(len(roll.texts))]


def _per_sequence(model: torch.nn.Module, seqs: list) -> torch.Tensor:
    logp, _ = sequence_logprobs(model, seqs)
    out, a = [], 0
    for _, c in seqs:
        out.append(logp[a : a + len(c)].sum())
        a += len(c)
    return torch.stack(out)


def test_resume_after_ctrl_c_equals_an_uninterrupted_run(env: dict[str, Any], tmp_path: Path) -> None:
    cfg = GRPOConfig(steps=3, lr=3e-3, trains="scales", save_every=0, **SMALL)
    a = _student(env, "stage2")
    rep_a = run_grpo(a, env["tok"], env["prompts"], cfg, state_dir=tmp_path / "a", progress=False)

    def interrupt(done: int, _m: dict[str, Any]) -> None:
        if done == 1:
            raise KeyboardInterrupt

    b = _student(env, "stage2")
    with pytest.raises(KeyboardInterrupt):
        run_grpo(b, env["tok"], env["prompts"], cfg, state_dir=tmp_path / "b", progress=False, on_step=interrupt)
    with pytest.raises(ConfigError, match="resume"):
        run_grpo(_student(env, "stage2"), env["tok"], env["prompts"], cfg, state_dir=tmp_path / "b", progress=False)
    b2 = _student(env, "stage2")
    rep_b = run_grpo(b2, env["tok"], env["prompts"], cfg, state_dir=tmp_path / "b", resume=True, progress=False)
    assert rep_b.start_step == 1 and rep_b.history == rep_a.history
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b2.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
    lines = [json.loads(x) for x in (tmp_path / "b" / "grpo_metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert {"reward", "response_length", "entropy"} <= set(lines[0])
    with pytest.raises(ConfigError, match="cannot resume"):
        run_grpo(_student(env, "stage2"), env["tok"], env["prompts"], GRPOConfig(**{**cfg.to_dict(), "lr": 1e-3}),
                 state_dir=tmp_path / "b", resume=True, progress=False)


def test_latent_weight_training_writes_an_exact_checkpoint(env: dict[str, Any], tmp_path: Path) -> None:
    from rqat_deploy.quant.checkpoint import load_model, save_checkpoint

    s = _student(env, "stage2")
    start = {n: m.codes().clone() for n, m in quant_linears(s)}
    run_grpo(s, env["tok"], env["prompts"], GRPOConfig(steps=1, lr=2e-2, trains="weights", **SMALL), progress=False,
             reward_fn=_alternating)
    moved = sum(int((start[n] != m.codes()).sum()) for n, m in quant_linears(s))
    assert moved > 0  # the codes are re-derived from the trained latent weights
    save_checkpoint(s, tmp_path / "ck", tokenizer=env["tok"])
    loaded, _ = load_model(tmp_path / "ck")
    ids = torch.tensor([env["prompts"].prompts[0].ids])
    with torch.no_grad():
        assert torch.equal(s(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_config_is_checked_before_any_work() -> None:
    for bad in ({"group_size": 1}, {"global_batch": 12, "group_size": 8}, {"lr": 0.0}, {"trains": "codes"},
                {"kl_reference": "base"}, {"temperature": 0.0}):
        with pytest.raises(ConfigError):
            GRPOConfig(**bad)


# -- the command line -------------------------------------------------------------------------


def test_cli_grpo_from_a_checkpoint_writes_a_checkpoint_that_exports(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from rqat_deploy.cli import cli
    from rqat_deploy.quant.checkpoint import read_checkpoint
    from rqat_deploy.serve.report import model_info, write_training_curves

    run = CliRunner().invoke
    rtn, out = tmp_path / "rtn", tmp_path / "g"
    assert run(cli, ["train", "--recipe", "rtn", "--out", str(rtn)]).exit_code == 0
    res = run(cli, ["train", "--recipe", "grpo", "--out", str(out)])
    assert res.exit_code == 2 and "--init-from" in res.output
    res = run(cli, ["train", "--recipe", "grpo", "--init-from", str(rtn), "--out", str(out), "--grpo-steps", "2",
                    "--grpo-batch", "8", "--grpo-max-tokens", "48", "--length-penalty", "0.5"])
    assert res.exit_code == 0, res.output
    recipe = read_checkpoint(out).meta.recipe
    assert recipe["trains"] == "scales" and recipe["grpo"]["reward"]["length_weight"] == 0.5
    grpo = recipe["reports"]["grpo"]
    assert grpo["sampling"]["temperature"] == 1.0 and len(grpo["history"]["entropy"]) == 2
    assert not Path(f"{out}.work").exists()
    res = run(cli, ["export", str(out), "--format", "gguf", "--gguf-type", "Q4_0", "--out", str(tmp_path / "g.gguf")])
    assert res.exit_code == 0, res.output
    history = model_info(str(out), hashes=False)["grpo_history"]
    assert write_training_curves({"g": history}, tmp_path / "c.png").stat().st_size > 0


def test_rollouts_sample_as_configured_not_with_the_models_own_defaults(env: dict[str, Any]) -> None:
    """The built-in model's generation_config says temperature 0.6, top-k 20: rollouts must not inherit it."""
    from rqat_deploy.train.grpo import generate_rollouts

    model = env["teacher"]
    assert model.generation_config.top_k == 20
    seen: dict[str, Any] = {}
    original = model.generate

    def spy(**kw: Any) -> torch.Tensor:
        seen.update(kw)
        return original(**kw)

    model.generate = spy
    try:
        torch.manual_seed(0)
        roll = generate_rollouts(model, env["tok"], env["prompts"].prompts[:1], 2, max_new_tokens=8)
    finally:
        del model.generate
    assert (seen["temperature"], seen["top_p"], seen["top_k"], seen["do_sample"]) == (1.0, 1.0, 0, True)
    assert len(roll.completions) == 2 and all(len(c) <= 8 for c in roll.completions)


def test_second_update_on_a_batch_is_clipped_and_pays_the_kl_to_the_start(env: dict[str, Any]) -> None:
    """With two updates per rollout batch the second is off-policy: the clip bites and the k3 KL
    to the starting model (the reference) is positive."""
    cfg = GRPOConfig(steps=1, lr=3e-2, trains="scales", updates_per_batch=2, kl_beta=0.1, **SMALL)
    seen: list[dict[str, Any]] = []
    run_grpo(_student(env, "stage2"), env["tok"], env["prompts"], cfg, progress=False, reward_fn=_alternating,
             on_step=lambda _s, m: seen.append(m))
    assert seen[0]["clip_fraction"] > 0 and seen[0]["kl"] > 0
