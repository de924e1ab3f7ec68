"""Tests of the built-in teacher (rqat_deploy.builtin.tiny_reasoner and its shipped asset)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from rqat_deploy.builtin import synth
from rqat_deploy.errors import ConfigError, OutputExistsError
from rqat_deploy.builtin.tiny import CHAT_TEMPLATE
from rqat_deploy.builtin.tiny_reasoner import (
    IGNORE_INDEX, TEACHER_VERSION, BuildConfig, _collate, _tokenize_problems, build, evaluate, teacher_tokenizer,
)

ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


@pytest.fixture(scope="module")
def asset() -> Path:
    return synth.default_model_dir()


@pytest.fixture(scope="module")
def meta(asset: Path) -> dict:
    return json.loads((asset / "TRAINING.json").read_text())


def test_asset_loads_and_has_k_quant_friendly_sizes(asset: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(asset), dtype=torch.float32)
    cfg = model.config
    assert cfg.model_type == "qwen3"
    for size in (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim):
        assert size % 256 == 0
    # every decoder Linear reads a multiple of 256 (llama.cpp k-quants apply to all of them)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    assert linears and all(m.in_features % 256 == 0 for m in linears)
    with safe_open(str(asset / "model.safetensors"), "pt") as fh:
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}
    assert dtypes == {"F16"}
    assert (asset / "model.safetensors").stat().st_size < 16e6


def test_asset_tokenizer_matches_the_tiny_conventions(asset: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(asset))
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    ids = [tok.encode(t) for t in ADDED]
    assert all(len(i) == 1 for i in ids)
    assert [i[0] for i in ids] == list(range(len(tok) - 5, len(tok)))
    text = "Compute 12 + 7 * 3.\n<think>\n7 * 3 = 21.\n</think>\n\nThe answer is \\boxed{33}."
    assert tok.decode(tok.encode(text)) == text
    assert all(len(tok.encode(d)) == 1 for d in "0123456789")  # one token per digit (Qwen's regex)


@pytest.mark.slow
def test_shipped_tokenizer_rebuilds_byte_for_byte(asset: Path, meta: dict, tmp_path: Path) -> None:
    """The one tokenizer builder (rqat_deploy.builtin.tiny) reproduces the shipped teacher's files (~6 s)."""
    if synth.general_text_source() != meta["general_text_source"]:
        built_on = meta["general_text_source"]
        pytest.skip(f"the general text is {synth.general_text_source()}, the asset was built on {built_on}")
    cfg = BuildConfig()  # the build's defaults are the shipped model's
    assert {k: meta["config"][k] for k in ("seed", "vocab_size", "tokenizer_problems")} == {
        "seed": cfg.seed, "vocab_size": cfg.vocab_size, "tokenizer_problems": cfg.tokenizer_problems}
    assert tuple(meta["config"]["levels"]) == cfg.levels
    teacher_tokenizer(tmp_path, cfg, synth.general_texts())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (asset / name).read_bytes(), name


def test_metadata_records_the_build(meta: dict) -> None:
    assert isinstance(meta["config"]["seed"], int) and meta["config"]["steps"] > 0
    assert meta["train_wall_s"] > 0 and meta["train_cpu_s"] > 0
    ev = meta["evaluation"]
    assert set(ev["by_level"]) == {str(lv) for lv in synth.LEVELS}
    assert 0.0 <= ev["accuracy"] <= 1.0 and len(ev["results"]) == ev["n"]
    assert meta["loss_history"][-1]["reasoning"] < meta["loss_history"][0]["reasoning"]


def test_asset_names_its_version(asset: Path, meta: dict) -> None:
    assert meta["teacher_version"] == TEACHER_VERSION
    assert json.loads((asset / "config.json").read_text())["rqat_teacher_version"] == TEACHER_VERSION
    assert meta["config"]["slip_rate"] == BuildConfig().slip_rate > 0
    assert meta["config"]["misread_rate"] == BuildConfig().misread_rate > 0
    from rqat_deploy.builtin.tiny_reasoner import teacher_version

    assert teacher_version() == TEACHER_VERSION


def test_slipped_values_carry_no_loss(asset: Path) -> None:
    """The wrong result of a slip and a misread instruction are in the input (the check and the
    recheck read them) but never a target."""
    tok = AutoTokenizer.from_pretrained(str(asset))
    problems = synth.generate_problems(40, seed=2, slip_rate=0.4, misread_rate=0.4)
    samples = _tokenize_problems(tok, problems)
    n_masked = 0
    for p, (ids, start, masked) in zip(problems, samples):
        wrong = "".join(p.completion[a:b] for a, b in p.masked).replace(" ", "")
        assert "".join(tok.decode([ids[i]]).strip() for i in masked) == wrong  # no token crosses a span's edge
        assert all(i >= start for i in masked)
        n_masked += len(masked)
    assert n_masked > 20
    input_ids, labels, weights = _collate(samples[:8], [[1, 2, 3]], pad_id=0, text_weight=0.25)
    for row, (ids, start, masked) in enumerate(samples[:8]):
        assert input_ids[row, : len(ids)].tolist() == ids
        keep = [i for i in range(start, len(ids)) if i not in masked]
        assert (labels[row, list(masked)] == IGNORE_INDEX).all() and (weights[row, list(masked)] == 0).all()
        assert labels[row, keep].tolist() == [ids[i] for i in keep] and (weights[row, keep] == 1).all()
        assert (labels[row, :start] == IGNORE_INDEX).all()


def test_greedy_accuracy_on_heldout_problems(asset: Path, meta: dict) -> None:
    """Regenerate the exact held-out problems of the recorded evaluation and re-grade a handful."""
    cfg = meta["config"]
    recorded = meta["evaluation"]["results"]
    problems, measured = [], []
    for level in (1, 2):
        drawn = synth.generate_problems(cfg["eval_per_level"], split="heldout", seed=cfg["eval_seed"],
                                        levels=(level,), unique=True)
        rows = [r for r in recorded if r["level"] == level]
        assert [p.question for p in drawn] == [r["question"] for r in rows]  # synth is stable
        problems += drawn[:12]
        measured += [r["correct"] for r in rows[:12]]
    ev = evaluate(asset, problems, max_new_tokens=cfg["eval_max_new_tokens"], batch_size=24)
    got = sum(r["correct"] for r in ev["results"])
    assert sum(measured) >= 6, "the shipped model should solve some easy held-out problems"
    assert got >= math.ceil(0.5 * sum(measured)), (got, sum(measured))
    assert 0 < ev["thinking_tokens_mean"] < cfg["eval_max_new_tokens"]
    for r in ev["results"]:
        if r["correct"]:
            assert r["response"].startswith("<think>") and "</think>" in r["response"]


def test_smoke_build(tmp_path: Path) -> None:
    cfg = BuildConfig(
        seed=3, steps=3, reasoning_rows=4, text_rows=1, text_len=32, vocab_size=1024, tokenizer_problems=200,
        warmup_steps=1, eval_per_level=1, eval_max_new_tokens=8, threads=1, levels=(1, 2),
    )
    out = tmp_path / "tr"
    meta = build(out, cfg, log=lambda *_: None)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "TRAINING.json", "TRAINING.md"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 1024 and model.config.vocab_size == 1024
    assert meta["config"]["steps"] == 3 and len(meta["loss_history"]) == 1
    assert math.isfinite(meta["loss_history"][0]["loss"])
    assert meta["evaluation"]["n"] == 2
    # the saved float16 weights are the trained ones, rounded
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        emb = fh.get_tensor("model.embed_tokens.weight")
    assert emb.dtype == torch.float16
    torch.testing.assert_close(model.model.embed_tokens.weight, emb.float())
    with pytest.raises(OutputExistsError):
        build(out, cfg, log=lambda *_: None)


@pytest.mark.slow
def test_thread_count_does_not_change_the_weights(tmp_path: Path) -> None:
    """The build defaults to two threads for speed; one thread gives the same bytes (the shipped
    model's sizes, a few steps; ~30 s)."""
    digests = []
    for threads in (1, 2):
        cfg = BuildConfig(steps=4, warmup_steps=1, tokenizer_problems=200, vocab_size=1024, eval_per_level=0,
                          eval_every=0, threads=threads)
        out = tmp_path / f"t{threads}"
        build(out, cfg, log=lambda *_: None)
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_sizes_must_suit_k_quants(tmp_path: Path) -> None:
    cfg = BuildConfig(steps=1, hidden_size=320, tokenizer_problems=200, vocab_size=1024, eval_per_level=0)
    with pytest.raises(ConfigError):
        build(tmp_path / "bad", cfg, log=lambda *_: None)
