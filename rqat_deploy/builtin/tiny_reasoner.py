"""The built-in teacher: a tiny Qwen3 trained on CPU to reason (a little) about synthetic problems.

``python -m rqat_deploy.builtin.tiny_reasoner build --out DIR --seed 0`` rebuilds the model shipped in
``rqat_deploy/builtin/assets/tiny-reasoner`` from nothing but this repository:

1. data: train-split reasoning problems of :mod:`rqat_deploy.builtin.synth` rendered with the chat template
   (question + the benchmark's instruction as the user turn; ``<think>`` trace and ``\\boxed{}``
   answer as the assistant turn), with checked steps and ``slip_rate`` slips (the wrong value of a
   slip gets no loss: the model learns to catch and redo a slip, not to make one), and general
   English text (:func:`rqat_deploy.builtin.synth.general_texts`);
2. a byte-level BPE tokenizer trained on that corpus, with the pipeline, special tokens and chat
   template of :mod:`rqat_deploy.builtin.tiny` (Qwen2/Qwen3's);
3. a Qwen3 (hidden 256, 4 layers, 4 query / 2 key-value heads of 64, intermediate 768, tied
   embeddings: every decoder Linear input is a multiple of 256, so llama.cpp k-quants apply)
   trained from scratch with AdamW on a fixed number of steps: reasoning rows (loss on the
   completion only) mixed with general-text rows (loss on every token);
4. saved in float16 safetensors, then evaluated greedily (transformers ``generate`` +
   :mod:`rqat_deploy.data.grading`) on held-out problems; seed, steps, times and accuracy per
   level go to ``TRAINING.json`` / ``TRAINING.md`` beside the weights.

Training runs on ``--threads`` CPU threads (default 2) and is deterministic for a given seed,
machine and torch build; the thread count does not change the weights (one and two threads give
the same bytes, tested).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from rqat_deploy.builtin import synth
from rqat_deploy.builtin.tiny import build_tokenizer
from rqat_deploy.errors import ConfigError, OutputExistsError
from rqat_deploy.train.schedule import lr_at

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

__all__ = ["TEACHER_VERSION", "BuildConfig", "build", "evaluate", "main", "teacher_tokenizer", "teacher_version"]

IGNORE_INDEX = -100
#: The built-in teacher's version, written to its ``config.json`` (``rqat_teacher_version``, which
#: every checkpoint trained from it carries on) and ``TRAINING.json``. v1: plain traces, thinking
#: length fixed by the problem. v2: checked traces with slips and redos in training (thinking
#: length grows with the model's computing errors). v3: every pass ends with a recheck read from the
#: question, and training traces also misread the question, fail the recheck and start over (thinking
#: length grows with reading errors too, which are most of a trained teacher's).
TEACHER_VERSION = "tiny-reasoner-v3"


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the built model (recorded in ``TRAINING.json``).

    Attributes:
        seed: seed of the data order, the initialisation and the problem draws.
        steps: optimizer steps.
        reasoning_rows: reasoning samples per step.
        text_rows: general-text rows per step.
        text_len: tokens per general-text row (documents packed with EOS between them).
        lr: peak learning rate (linear warmup, cosine decay to ``lr * final_lr_ratio``).
        warmup_steps: warmup length.
        final_lr_ratio: last learning rate / peak.
        weight_decay: AdamW weight decay (matrices only).
        grad_clip: gradient norm clipping.
        text_loss_weight: weight of a general-text token in the loss, relative to a reasoning
            completion token (prompts have weight 0).
        vocab_size: tokenizer size, the 5 added tokens included.
        tokenizer_problems: rendered problems in the tokenizer's training corpus.
        hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size: Qwen3 sizes.
        max_position_embeddings: context length written to the config.
        rope_theta: RoPE base frequency.
        threads: torch CPU threads (speed only: one and two threads build the same bytes).
        eval_per_level: held-out problems per level for the final evaluation (0: no evaluation).
        eval_max_new_tokens: generation budget of the evaluation.
        eval_seed: seed of the held-out problems (that of :func:`rqat_deploy.builtin.synth.default_data`).
        eval_every: also evaluate 10 problems per level every this many steps (0: never; progress
            monitoring only, it does not change the model).
        levels: the problem levels trained and evaluated.
        slip_rate: probability that an attempt at a step of a training trace slips (a wrong result,
            masked out of the loss, then a failed check and a redo; :func:`rqat_deploy.builtin.synth.make_problem`).
        misread_rate: probability that a pass of a training trace reads one instruction wrong (masked;
            then the final recheck fails and the trace starts over).
    """

    seed: int = 0
    steps: int = 2500
    reasoning_rows: int = 8
    text_rows: int = 1
    text_len: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    text_loss_weight: float = 0.25
    vocab_size: int = 2048
    tokenizer_problems: int = 8000
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    threads: int = 2
    eval_per_level: int = 25
    eval_max_new_tokens: int = 512
    eval_seed: int = synth.DEFAULT_DATA_SEED
    eval_every: int = 600
    levels: tuple[int, ...] = synth.LEVELS
    slip_rate: float = 0.3
    misread_rate: float = 0.3
    extra: dict[str, Any] = field(default_factory=dict)


def teacher_version(model_dir: str | Path | None = None) -> str:
    """The version a built-in teacher names in its ``config.json`` (``rqat_teacher_version``).

    Args:
        model_dir: the teacher's directory (default: the shipped one).

    Returns:
        e.g. ``"tiny-reasoner-v2"``; ``"tiny-reasoner-v1"`` for a config without the key (v1 wrote none).
    """
    config = Path(model_dir or synth.default_model_dir()) / "config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("rqat_teacher_version", "tiny-reasoner-v1")


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------


def _render(tokenizer_or_template: Any, problem: synth.Problem) -> tuple[str, str]:
    """(prompt, completion) of a problem through the chat template (as stage-2 training renders it)."""
    from rqat_deploy.data.chat import split_conversation

    rendered = split_conversation(tokenizer_or_template, synth.problem_messages(problem))
    return rendered.prompt, rendered.completion


def _render_plain(problem: synth.Problem) -> str:
    """The chat-template rendering, written out (used before a tokenizer exists)."""
    user = f"{problem.question}\n{synth.INSTRUCTION}"
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{problem.completion}<|im_end|>\n"


def teacher_tokenizer(out_dir: Path, cfg: BuildConfig, docs: Sequence[str]) -> PreTrainedTokenizerFast:
    """Build the teacher's tokenizer into ``out_dir`` (``tokenizer.json`` + ``tokenizer_config.json``).

    :func:`rqat_deploy.builtin.tiny.build_tokenizer` (the pipeline, added tokens and chat template of
    the test models) trained on ``cfg.tokenizer_problems`` rendered train-split problems followed by
    ``docs``, to ``cfg.vocab_size`` tokens.

    Args:
        out_dir: directory to write the files into.
        cfg: the build configuration (``vocab_size``, ``tokenizer_problems``, ``seed``, ``levels``).
        docs: the general text of the build (:func:`rqat_deploy.builtin.synth.general_texts`).

    Returns:
        The tokenizer loaded back with ``AutoTokenizer`` from ``out_dir``.

    Raises:
        ConfigError: the corpus yields fewer merges than ``cfg.vocab_size`` needs.
    """
    return build_tokenizer(out_dir, cfg.vocab_size, corpus=_corpus(cfg, docs))


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


Sample = tuple[list[int], int, tuple[int, ...]]  # (token ids, first completion token, positions without loss)


@dataclass
class _Data:
    reasoning: list[Sample]
    text_rows: list[list[int]]  # general text, packed rows of text_len tokens


def _tokenize_problems(tokenizer: Any, problems: Sequence[synth.Problem]) -> list[Sample]:
    """Token ids of each rendered problem, where its completion starts, and the tokens that overlap
    the problem's :attr:`~rqat_deploy.builtin.synth.Problem.masked` spans (slipped results: no loss)."""
    prompts, fulls, bases = [], [], []
    for p in problems:
        prompt, completion = _render(tokenizer, p)
        at = completion.find(p.completion)
        if p.masked and at < 0:
            raise ConfigError("the chat template changed the assistant turn; slipped values cannot be located")
        prompts.append(prompt)
        fulls.append(prompt + completion)
        bases.append(len(prompt) + at)
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full = tokenizer(fulls, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for p, base, pi, fi, offsets in zip(problems, bases, p_ids, full["input_ids"], full["offset_mapping"]):
        if fi[: len(pi)] != pi:  # the prompt ends in a special token, so this cannot happen
            raise ConfigError("prompt tokens are not a prefix of the full rendering; check the chat template")
        spans = [(base + a, base + b) for a, b in p.masked]
        masked = tuple(i for i, (a, b) in enumerate(offsets) if any(a < hi and lo < b for lo, hi in spans))
        out.append((fi, len(pi), masked))
    return out


def _pack_text(tokenizer: Any, docs: Sequence[str], row_len: int) -> list[list[int]]:
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream: list[int] = []
    for ids in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    return [stream[i : i + row_len] for i in range(0, len(stream) - row_len + 1, row_len)]


def _batches(cfg: BuildConfig, data: _Data) -> list[tuple[list[Sample], list[list[int]]]]:
    """The step-by-step batches: reasoning samples in order (length-bucketed), text rows cycling."""
    rng = random.Random(f"rqat-tiny-reasoner-batches:{cfg.seed}")
    r = cfg.reasoning_rows
    batches: list[list[Sample]] = []
    bucket = 16  # sort 16 batches' worth by length, so each batch pads little
    samples = data.reasoning
    for start in range(0, cfg.steps * r, bucket * r):
        chunk = sorted(samples[start : start + bucket * r], key=lambda s: len(s[0]))
        group = [chunk[i : i + r] for i in range(0, len(chunk), r)]
        rng.shuffle(group)
        batches.extend(group)
    text_order = list(range(len(data.text_rows)))
    rng.shuffle(text_order)
    out = []
    for step in range(cfg.steps):
        rows = [data.text_rows[text_order[(step * cfg.text_rows + j) % len(text_order)]] for j in range(cfg.text_rows)]
        out.append((batches[step], rows))
    return out


def _collate(
    batch: list[Sample], text_rows: list[list[int]], pad_id: int, text_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's right-padded ``input_ids``, ``labels`` (``-100`` on prompts, slipped values and
    padding) and per-token loss ``weights`` (1 on reasoning completions, ``text_weight`` on text,
    0 elsewhere)."""
    import torch

    rows = [(ids, start, masked, 1.0) for ids, start, masked in batch]
    rows += [(ids, 0, (), text_weight) for ids in text_rows]
    t = max(len(ids) for ids, _, _, _ in rows)
    input_ids = torch.full((len(rows), t), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), t), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    weights = torch.zeros((len(rows), t), dtype=torch.float32)  # [B, T]
    for i, (ids, start, masked, w) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, start : len(ids)] = torch.tensor(ids[start:])
        weights[i, start : len(ids)] = w
        labels[i, list(masked)] = IGNORE_INDEX
        weights[i, list(masked)] = 0.0
    return input_ids, labels, weights


# --------------------------------------------------------------------------------------------------
# model and training
# --------------------------------------------------------------------------------------------------


def _model_config(cfg: BuildConfig, tokenizer: Any) -> Any:
    from transformers import Qwen3Config

    for name, size in (("hidden_size", cfg.hidden_size), ("num_heads*head_dim", cfg.num_heads * cfg.head_dim),
                       ("intermediate_size", cfg.intermediate_size)):
        if size % 256:
            raise ConfigError(f"{name}={size} is not a multiple of 256 (llama.cpp k-quants need it)")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )


def save_model_config(model: Any, out: Path) -> None:
    """Write the teacher's ``config.json``: float16 weights, and its architecture named.

    ``architectures`` is what tools read to pick the model class (the ONNX exporter, ``inspect``);
    ``PretrainedConfig.save_pretrained`` alone leaves it out, ``PreTrainedModel.save_pretrained`` would
    add it but also write the weights.
    """
    model.config.dtype = "float16"
    model.config.architectures = [type(model).__name__]
    model.config.rqat_teacher_version = TEACHER_VERSION
    model.config.save_pretrained(str(out))


def _lr_at(cfg: BuildConfig, step: int) -> float:
    """The build's learning rate at ``step``: linear warm-up, cosine to ``lr * final_lr_ratio``."""
    return lr_at(step, peak=cfg.lr, total=cfg.steps, warmup=cfg.warmup_steps, floor=cfg.lr * cfg.final_lr_ratio)


def _train(cfg: BuildConfig, model: Any, data: _Data, pad_id: int, log: Any, tokenizer: Any = None) -> list[dict[str, float]]:
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    history = []
    model.train()
    t0 = time.time()
    sums = {"loss": 0.0, "reasoning": 0.0, "text": 0.0}
    n_reasoning = cfg.reasoning_rows
    for step, (batch, text_rows) in enumerate(_batches(cfg, data)):
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        input_ids, labels, weights = _collate(batch, text_rows, pad_id, cfg.text_loss_weight)  # [B, T]
        logits = model(input_ids=input_ids).logits[:, :-1]  # [B, T-1, V]
        target, weight = labels[:, 1:], weights[:, 1:]  # [B, T-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(target)  # [B, T-1]
        loss = (nll * weight).sum() / weight.sum()
        mask = target != IGNORE_INDEX  # [B, T-1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            sums["loss"] += float(loss)
            sums["reasoning"] += float((nll * mask)[:n_reasoning].sum() / mask[:n_reasoning].sum().clamp(min=1))
            sums["text"] += float((nll * mask)[n_reasoning:].sum() / mask[n_reasoning:].sum().clamp(min=1))
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            n = 50 if (step + 1) % 50 == 0 else (step + 1) % 50
            row = {"step": step + 1, "wall_s": round(time.time() - t0, 1)}
            row.update({k: round(v / n, 4) for k, v in sums.items()})
            history.append(row)
            log(f"step {step + 1}/{cfg.steps} loss {row['loss']:.4f} (reasoning {row['reasoning']:.4f}, "
                f"text {row['text']:.4f}) lr {_lr_at(cfg, step):.2e} {row['wall_s']:.0f}s")
            sums = dict.fromkeys(sums, 0.0)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and tokenizer is not None:
            model.eval()
            ev = evaluate(None, per_level=10, seed=cfg.eval_seed + 7, levels=cfg.levels, max_new_tokens=200,
                          model=model, tokenizer=tokenizer)
            model.train()
            log(f"  eval@{step + 1}: {ev['accuracy']:.0%} " + " ".join(
                f"L{lv}={s['accuracy']:.0%}" for lv, s in ev["by_level"].items()))
            for r in ev["results"][5::10]:
                log(f"    {r['question']!r} -> {r['response']!r} ({r['answer']})")
    model.eval()
    return history


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------


def evaluate(
    model_dir: str | Path,
    problems: Sequence[synth.Problem] | None = None,
    *,
    per_level: int = 100,
    seed: int = synth.DEFAULT_DATA_SEED,
    levels: Sequence[int] = synth.LEVELS,
    max_new_tokens: int = 512,
    batch_size: int = 50,
    model: Any = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Greedy held-out accuracy of a model directory, graded with :mod:`rqat_deploy.data.grading`.

    Thinking tokens are counted on the generated ids as the bench counts them
    (:func:`rqat_deploy.data.thinking.thinking_span_ids`).

    Args:
        model_dir: the model (loaded in float32 unless ``model`` is given).
        problems: the problems; default ``per_level`` distinct held-out problems per level drawn
            with ``seed`` (the first rows of :func:`rqat_deploy.builtin.synth.write_eval_jsonl` with that seed).
        per_level: see ``problems``.
        seed: see ``problems``.
        levels: see ``problems``.
        max_new_tokens: generation budget.
        batch_size: prompts per ``generate`` call (left-padded).
        model: an already loaded model to use instead of loading ``model_dir``.
        tokenizer: an already loaded tokenizer.

    Returns:
        ``{"accuracy", "n", "by_level": {level: {"accuracy", "n", "thinking_tokens_mean",
        "thinking_tokens_correct_mean", "thinking_tokens_incorrect_mean"}},
        "by_family": {...}, "thinking_tokens_mean", "truncated_fraction", "results": [per problem]}``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rqat_deploy.data.chat import ends_in_thinking
    from rqat_deploy.data.grading import grade_response
    from rqat_deploy.data.thinking import thinking_span_ids

    if problems is None:
        problems = [
            p for level in levels
            for p in synth.generate_problems(per_level, split="heldout", seed=seed, levels=(level,), unique=True)
        ]
    tok = tokenizer or AutoTokenizer.from_pretrained(str(model_dir))
    net = model or AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    net.eval()
    tok.padding_side = "left"
    think_open, think_close = tok.convert_tokens_to_ids(["<think>", "</think>"])
    eos_ids = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    results = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [_render(tok, p)[0] for p in chunk]
        enc = tok(prompts, add_special_tokens=False, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = net.generate(
                **enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                pad_token_id=tok.pad_token_id,
            )
        for p, prompt, row in zip(chunk, prompts, out[:, enc["input_ids"].shape[1] :].tolist()):
            ended = any(t in eos_ids for t in row)
            if ended:
                row = row[: min(row.index(t) for t in eos_ids if t in row)]
            text = tok.decode(row, skip_special_tokens=True)
            thinking, _, _ = thinking_span_ids(row, think_open, think_close, starts_in_thinking=ends_in_thinking(prompt))
            grade = grade_response(text, p.answer, backend="fallback")
            results.append({
                "level": p.level, "family": p.family, "question": p.question, "answer": p.answer,
                "predicted": grade.extracted, "correct": bool(grade.correct), "truncated": not ended,
                "thinking_tokens": thinking, "response": text,
            })

    def mean_thinking(rows: list[dict[str, Any]]) -> float:
        return sum(r["thinking_tokens"] for r in rows) / len(rows) if rows else float("nan")

    def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(rows)
        return {
            "accuracy": sum(r["correct"] for r in rows) / n if n else float("nan"),
            "n": n,
            "thinking_tokens_mean": mean_thinking(rows),
            "thinking_tokens_correct_mean": mean_thinking([r for r in rows if r["correct"]]),
            "thinking_tokens_incorrect_mean": mean_thinking([r for r in rows if not r["correct"]]),
        }

    report = summary(results)
    report["truncated_fraction"] = sum(r["truncated"] for r in results) / max(1, len(results))
    report["by_level"] = {str(lv): summary([r for r in results if r["level"] == lv]) for lv in sorted({r["level"] for r in results})}
    report["by_family"] = {f: summary([r for r in results if r["family"] == f]) for f in synth.FAMILIES if any(r["family"] == f for r in results)}
    report["results"] = results
    return report


# --------------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------------


def _corpus(cfg: BuildConfig, docs: Sequence[str]) -> list[str]:
    problems = synth.generate_problems(cfg.tokenizer_problems, split="train", seed=cfg.seed + 1000, levels=cfg.levels,
                                       slip_rate=cfg.slip_rate, misread_rate=cfg.misread_rate)
    return [_render_plain(p) for p in problems] + list(docs)


def _write_generation_config(out: Path, tokenizer: Any) -> None:
    from transformers import GenerationConfig

    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id,
        do_sample=True, temperature=0.6, top_k=20, top_p=0.95,
    ).save_pretrained(str(out))


def _training_md(meta: dict[str, Any]) -> str:
    ev = meta.get("evaluation") or {}
    lines = [
        "# tiny-reasoner",
        "",
        "A tiny Qwen3 trained from scratch on CPU by `python -m rqat_deploy.builtin.tiny_reasoner build "
        f"--out DIR --seed {meta['config']['seed']}` on the synthetic reasoning problems of "
        "`rqat_deploy.builtin.synth` (`<think>` trace, `\\boxed{}` answer) mixed with general English text "
        f"({meta['general_text_source']}).",
        "",
        f"- version: {meta['teacher_version']} (checked traces: every step is undone and compared; training "
        f"traces slip with probability {meta['config']['slip_rate']} per attempt, the wrong value masked out of "
        "the loss, then fail their check and redo the step; each pass ends with a recheck read from the question, "
        f"and a pass misreads one instruction with probability {meta['config']['misread_rate']}, masked, "
        "then fails its recheck and starts over)",
        f"- parameters: {meta['parameters']:,} ({meta['weights_dtype']} safetensors, "
        f"{meta['weights_bytes'] / 1e6:.1f} MB)",
        f"- steps: {meta['config']['steps']}, seed {meta['config']['seed']}, "
        f"{meta['train_tokens']:,} training tokens ({meta['train_loss_tokens']:,} with loss)",
        f"- training time: {meta['train_wall_s']:.0f} s wall, {meta['train_cpu_s']:.0f} s CPU "
        f"({meta['config']['threads']} torch threads); whole build {meta['build_wall_s']:.0f} s wall, "
        f"{meta['build_cpu_s']:.0f} s CPU",
        f"- machine: {meta['machine']}",
        "",
    ]
    if ev:
        lines += [
            f"Greedy accuracy on held-out problems (never seen in training; {ev['n']} problems, "
            f"max {meta['config']['eval_max_new_tokens']} new tokens): **{ev['accuracy']:.1%}**",
            "",
            "| level (operations) | n | accuracy | thinking tokens | when right | when wrong |",
            "|---|---|---|---|---|---|",
        ]
        for lv, s in ev["by_level"].items():
            lines.append(f"| {lv} | {s['n']} | {s['accuracy']:.1%} | {s['thinking_tokens_mean']:.1f} | "
                         f"{s['thinking_tokens_correct_mean']:.1f} | {s['thinking_tokens_incorrect_mean']:.1f} |")
        lines += ["", "| family | n | accuracy |", "|---|---|---|"]
        for fam, s in ev["by_family"].items():
            lines.append(f"| {fam} | {s['n']} | {s['accuracy']:.1%} |")
    return "\n".join(lines) + "\n"


def build(
    out_dir: str | Path,
    config: BuildConfig | None = None,
    *,
    force: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Build the tiny reasoner into ``out_dir`` (see the module docstring).

    Args:
        out_dir: output directory (created; must be empty or absent unless ``force``).
        config: the :class:`BuildConfig` (default: the shipped model's).
        force: write into a non-empty directory.
        log: progress printer.

    Returns:
        The metadata written to ``TRAINING.json``.

    Raises:
        OutputExistsError: ``out_dir`` is not empty and ``force`` is False.
        ConfigError: invalid sizes.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cfg = config or BuildConfig()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out} is not empty; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    t_wall, t_cpu = time.time(), time.process_time()
    torch.set_num_threads(cfg.threads)

    docs = synth.general_texts()
    tokenizer = teacher_tokenizer(out, cfg, docs)
    log(f"tokenizer: {len(tokenizer)} tokens ({time.time() - t_wall:.0f}s)")
    problems = synth.generate_problems(cfg.steps * cfg.reasoning_rows, split="train", seed=cfg.seed, levels=cfg.levels,
                                       slip_rate=cfg.slip_rate, misread_rate=cfg.misread_rate)
    data = _Data(_tokenize_problems(tokenizer, problems), _pack_text(tokenizer, docs, cfg.text_len))
    log(f"data: {len(data.reasoning)} problems, {len(data.text_rows)} text rows ({time.time() - t_wall:.0f}s)")

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(_model_config(cfg, tokenizer), dtype=torch.float32)
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tr_wall, tr_cpu = time.time(), time.process_time()
    history = _train(cfg, model, data, pad_id, log, tokenizer)
    train_wall, train_cpu = time.time() - tr_wall, time.process_time() - tr_cpu

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_model_config(model, out)
    _write_generation_config(out, tokenizer)

    batches = _batches(cfg, data)
    n_tokens = sum(len(ids) for b, t in batches for ids, _, _ in b) + cfg.steps * cfg.text_rows * cfg.text_len
    n_loss = sum(len(ids) - s - len(m) for b, _ in batches for ids, s, m in b) + cfg.steps * cfg.text_rows * cfg.text_len
    meta: dict[str, Any] = {
        "config": {k: v for k, v in asdict(cfg).items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_dtype": "float16",
        "weights_bytes": (out / "model.safetensors").stat().st_size,
        "train_tokens": n_tokens,
        "train_loss_tokens": n_loss,
        "train_wall_s": train_wall,
        "train_cpu_s": train_cpu,
        "loss_history": history,
        "general_text_source": synth.general_text_source(),
        "general_text_rows": len(data.text_rows),
        "data_version": synth.DATA_VERSION,
        "teacher_version": TEACHER_VERSION,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", torch {torch.__version__}, python {platform.python_version()}",
    }
    del model
    if cfg.eval_per_level > 0:
        log("evaluating the saved (float16) weights ...")
        ev = evaluate(out, per_level=cfg.eval_per_level, seed=cfg.eval_seed, levels=cfg.levels,
                      max_new_tokens=cfg.eval_max_new_tokens)
        meta["evaluation"] = {k: v for k, v in ev.items() if k != "results"}
        meta["evaluation"]["examples"] = ev["results"][:: max(1, len(ev["results"]) // 8)]
        meta["evaluation"]["results"] = [{k: v for k, v in r.items() if k != "response"} for r in ev["results"]]
        log(f"held-out accuracy {ev['accuracy']:.1%}: " + ", ".join(
            f"L{lv} {s['accuracy']:.0%}" for lv, s in ev["by_level"].items()))
    meta["build_wall_s"] = time.time() - t_wall
    meta["build_cpu_s"] = time.process_time() - t_cpu
    (out / "TRAINING.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (out / "TRAINING.md").write_text(_training_md(meta), encoding="utf-8")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``build --out DIR [--seed S] [--steps N] [--threads T] [--force]`` or ``eval --model DIR``."""
    parser = argparse.ArgumentParser(prog="python -m rqat_deploy.builtin.tiny_reasoner", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the tiny reasoner")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps", type=int, default=None)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--eval-per-level", type=int, default=None)
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override another BuildConfig field (experiments)")
    b.add_argument("--force", action="store_true")
    e = sub.add_parser("eval", help="greedy held-out accuracy of a model directory")
    e.add_argument("--model", default=None, help="default: the built-in model")
    e.add_argument("--per-level", type=int, default=100)
    e.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.cmd == "build":
        cfg = BuildConfig(seed=args.seed)
        over: dict[str, Any] = {}
        if args.steps is not None:
            over["steps"] = args.steps
        if args.threads is not None:
            over["threads"] = args.threads
        if args.eval_per_level is not None:
            over["eval_per_level"] = args.eval_per_level
        for item in args.set:
            key, _, value = item.partition("=")
            if key not in BuildConfig.__dataclass_fields__:
                raise ConfigError(f"unknown BuildConfig field {key!r}")
            current = getattr(cfg, key)
            over[key] = tuple(int(x) for x in value.split(",")) if isinstance(current, tuple) else type(current)(value)
        meta = build(args.out, replace(cfg, **over), force=args.force)
        print(json.dumps({k: meta[k] for k in ("train_wall_s", "train_cpu_s", "build_wall_s", "build_cpu_s")}))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    ev = evaluate(args.model or synth.default_model_dir(), per_level=args.per_level)
    print(json.dumps({k: v for k, v in ev.items() if k != "results"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
