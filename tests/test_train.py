"""`rqat-deploy train` recipes end to end on the tiny model: stages, resume, records, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rqat_deploy.train.stage2 as stage2_mod
from rqat_deploy.errors import ConfigError, OutputExistsError
from rqat_deploy.quant.spec import QuantSpec
from rqat_deploy.train.run import TrainConfig, run_train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Local reasoning conversations and pre-training text (the Hub is not reachable in tests)."""
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    with open(d / "traces.jsonl", "w") as f:
        for _ in range(48):
            a, b = rng.randint(1, 60), rng.randint(1, 60)
            answer = f"<think>\nAdd {a} and {b}: {a} + {b} = {a + b}.\n</think>\n\nThe answer is \\boxed{{{a + b}}}."
            msgs = [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    words = "the model learns to add numbers and checks each step before it answers".split()
    with open(d / "text.jsonl", "w") as f:
        for _ in range(16):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(120))}) + "\n")
    return d


def _cfg(model: Path, data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(model), out=str(out), recipe="rqat", quant=QuantSpec(bits=2),
        calib=f"{data}/traces.jsonl:0.8,{data}/text.jsonl:0.2", calib_samples=10, calib_seq_len=48,
        train_data=f"{data}/traces.jsonl", train_samples=16, train_seq_len=80, stage1_epochs=1,
        global_batch=4, micro_batch=2, stage2_epochs=1, stage2_lr=1e-3,
    )
    return TrainConfig(**(base | kw))


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def test_rqat_recipe_trains_scales_only_and_records_everything(tiny_qwen3_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = run_train(_cfg(tiny_qwen3_dir, data_dir, tmp_path / "ck", keep_work=True), progress=False)
    init, final = _tensors(tmp_path / "ck.work" / "init"), _tensors(out)
    assert init.keys() == final.keys()
    codes = [k for k in final if k.endswith((".qcodes", ".zeros"))]
    scales = [k for k in final if k.endswith(".scales")]
    assert codes and all(torch.equal(init[k], final[k]) for k in codes)  # frozen in stage 2
    assert sum(not torch.equal(init[k], final[k]) for k in scales) >= len(scales) // 2  # scales trained
    meta = json.loads((out / "rqat_quant.json").read_text())
    recipe = meta["recipe"]
    assert recipe["name"] == "rqat" and recipe["plan"]["loss"] == "rr+topk_kl" and recipe["alpha"] == 0.2
    assert recipe["trains"] == "scales"  # the training form a later --recipe grpo follows
    assert {"calibration", "stage1", "train_data", "stage2"} <= set(recipe["reports"])
    s1 = recipe["reports"]["stage1"]["blocks"]
    assert len(s1) == 2
    s2 = recipe["reports"]["stage2"]
    assert s2["eval_after"]["kl"] < s2["eval_before"]["kl"]


def test_resume_after_interrupt_equals_uninterrupted(tiny_qwen3_dir: Path, data_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ref = run_train(_cfg(tiny_qwen3_dir, data_dir, tmp_path / "ref"), progress=False)

    real = stage2_mod.run_stage2

    def interrupted(*args, **kw):
        def stop(step: int, _metrics: dict) -> None:
            if step == 2:
                raise KeyboardInterrupt
        return real(*args, **kw, on_step=stop)

    monkeypatch.setattr(stage2_mod, "run_stage2", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(_cfg(tiny_qwen3_dir, data_dir, tmp_path / "ck"), progress=False)
    assert not (tmp_path / "ck").exists() and (tmp_path / "ck.work").exists()
    with pytest.raises(OutputExistsError, match="--resume"):
        run_train(_cfg(tiny_qwen3_dir, data_dir, tmp_path / "ck"), progress=False)
    with pytest.raises(ConfigError, match="different settings.*alpha"):
        run_train(_cfg(tiny_qwen3_dir, data_dir, tmp_path / "ck", resume=True, alpha=0.5), progress=False)
    monkeypatch.setattr(stage2_mod, "run_stage2", real)
    out = run_train(_cfg(tiny_qwen3_dir, data_dir, tmp_path / "ck", resume=True), progress=False)
    a, b = _tensors(ref), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "ck.work").exists()


@pytest.mark.parametrize("recipe, grid", [("gptq", "kquant"), ("efficientqat", "uniform"), ("awq", "uniform")])
def test_other_recipes_run(tiny_qwen3_dir: Path, data_dir: Path, tmp_path: Path, recipe: str, grid: str) -> None:
    cfg = _cfg(tiny_qwen3_dir, data_dir, tmp_path / "ck", recipe=recipe, quant=QuantSpec(bits=3, grid=grid))
    out = run_train(cfg, progress=False)
    recipe_rec = json.loads((out / "rqat_quant.json").read_text())["recipe"]
    assert recipe_rec["plan"]["init"] == {"gptq": "gptq", "awq": "awq", "efficientqat": "stage1"}[recipe]
    assert ("stage2" in recipe_rec["reports"]) == (recipe == "efficientqat")


def test_bad_recipe_settings(tiny_qwen3_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'rqat'"):
        _cfg(tiny_qwen3_dir, data_dir, tmp_path / "x", recipe="rqta")
    with pytest.raises(ConfigError, match="with a stage 2; .rtn. has none"):
        run_train(_cfg(tiny_qwen3_dir, data_dir, tmp_path / "x", recipe="rtn", loss="C"), progress=False)
    with pytest.raises(ConfigError, match="calib-seq-len must be >= 1"):
        _cfg(tiny_qwen3_dir, data_dir, tmp_path / "x", calib_seq_len=0)


def test_cli_recipe_choices_are_the_recipe_table() -> None:
    from rqat_deploy.cli.commands import train
    from rqat_deploy.train.recipes import RECIPES

    choice = next(p for p in train.params if p.name == "recipe").type
    assert tuple(choice.choices) == RECIPES


def test_flagship_keeps_gptq_where_stage1_ends_farther_from_the_teacher(tiny_qwen3_dir: Path, data_dir: Path,
                                                                         tmp_path: Path) -> None:
    """rqat's gptq_guard: a stage 1 that only hurts (absurd learning rates, no block guard) is replaced
    by plain GPTQ, measured end to end on the held-out calibration sequences."""
    hurt = {"quant_lr": 0.5, "weight_lr": 0.5, "keep_better": False}
    out = run_train(_cfg(tiny_qwen3_dir, data_dir, tmp_path / "ck", stage1_options=hurt, max_steps=1), progress=False)
    guard = json.loads((out / "rqat_quant.json").read_text())["recipe"]["reports"]["gptq_guard"]
    assert guard["kept"] == "gptq" and guard["gptq_kl"] < guard["stage1_kl"]
@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 whose context (8,192) holds a trace longer than the old 4,096-token stage-2 cut."""
    from rqat_deploy.builtin.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("long_ctx"), "qwen3", max_position_embeddings=8192)


def test_stage2_trains_whole_traces_by_default(long_model: Path, tmp_path: Path) -> None:
    """Issue 15: stage 2 keeps a long trace whole (its </think>, answer and end-of-turn token are labels)
    up to the model's context length; --train-seq-len caps it, and the report counts what was cut."""
    from transformers import AutoTokenizer

    from rqat_deploy.data.sft import build_sft

    rng = random.Random(1)
    steps = "\n".join(f"Step {i}: {rng.randint(1, 99)} + {rng.randint(1, 99)} checks out." for i in range(350))
    rows = [("What is 2 + 3?", f"<think>\n{steps}\n</think>\n\nThe answer is \\boxed{{5}}.")]
    rows += [(f"What is {a} + 1?", f"<think>\n{a} + 1 = {a + 1}\n</think>\n\nThe answer is \\boxed{{{a + 1}}}.") for a in range(7)]
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in rows))
    tok = AutoTokenizer.from_pretrained(long_model)
    cfg = TrainConfig(model=str(long_model), out=str(tmp_path / "ck"), recipe="S", quant=QuantSpec(bits=2),
                      train_data=str(data), train_samples=8, global_batch=4, stage2_epochs=1, stage2_lr=1e-3, max_steps=1)
    assert cfg.train_seq_len is None
    out = run_train(cfg, progress=False)
    reports = json.loads((out / "rqat_quant.json").read_text())["recipe"]["reports"]
    assert reports["stage2"]["data"] == {"seq_len": 8192, "truncated": 0, "truncated_tokens": 0}
    whole = build_sft(tok, str(data), 8, 8192, seed=0)
    longest = int(whole.lengths().argmax())
    assert int(whole.lengths()[longest]) > 4096  # longer than the old default cut
    ids, _, labels = whole.subset([longest]).padded()
    completion = labels[0][labels[0] != -100]
    assert "</think>" in tok.decode(completion) and "\\boxed{5}" in tok.decode(completion)
    assert tok.decode(completion).rstrip().endswith("<|im_end|>")  # the end-of-turn (EOS) token is trained
    assert tok.convert_tokens_to_ids("<|im_end|>") in completion.tolist()
    cut = build_sft(tok, str(data), 8, 4096, seed=0)  # what the old default did
    assert cut.report["truncated"] == 1 and cut.report["truncated_tokens"] == int(whole.lengths()[longest]) - 4096
    cut_labels = cut.subset([longest]).padded()[2][0]
    assert "</think>" not in tok.decode(cut_labels[cut_labels != -100])


def test_checkpoints_of_the_builtin_teacher_name_its_version(tmp_path: Path) -> None:
    """A student records which built-in teacher it came from (rqat_quant.json and config.json)."""
    from rqat_deploy.builtin import synth
    from rqat_deploy.builtin.tiny_reasoner import TEACHER_VERSION

    out = run_train(TrainConfig(model=str(synth.default_model_dir()), out=str(tmp_path / "rtn"), recipe="rtn",
                                quant=QuantSpec(bits=2)), progress=False)
    assert json.loads((out / "rqat_quant.json").read_text())["recipe"]["teacher_version"] == TEACHER_VERSION
    assert json.loads((out / "config.json").read_text())["rqat_teacher_version"] == TEACHER_VERSION
