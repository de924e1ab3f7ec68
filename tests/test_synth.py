"""Tests of the offline synthetic data (rqat_deploy.builtin.synth)."""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest

from rqat_deploy.builtin import synth
from rqat_deploy.errors import ConfigError, DataError
from rqat_deploy.data.grading import grade_response

STEP_RE = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.$")
CHECK_RE = re.compile(r"^Check: (\d+) ([-+*/]) (\d+) = (\d+) vs (\d+), (ok|wrong)\.$")
RECHECK_RE = re.compile(r"^Recheck: (.+)\. (\d+) vs (\d+), (ok|wrong)\.$")
INVERSE = {"+": "-", "-": "+", "*": "/", "/": "*"}


@pytest.fixture(scope="module")
def train_problems() -> list[synth.Problem]:
    return synth.generate_problems(1200, split="train", seed=3)


@pytest.fixture(scope="module")
def heldout_problems() -> list[synth.Problem]:
    return synth.generate_problems(400, split="heldout", seed=3)


def _steps(problem: synth.Problem) -> list[tuple[int, str, int, int]]:
    """The arithmetic lines of a trace, parsed independently of the generator."""
    out = []
    for line in problem.thinking.split("\n"):
        m = STEP_RE.search(line)
        if m:
            out.append((int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))))
    return out


def test_generation_is_deterministic() -> None:
    a = synth.generate_problems(60, seed=5)
    b = synth.generate_problems(60, seed=5)
    c = synth.generate_problems(60, seed=6)
    assert a == b
    assert [p.question for p in a] != [p.question for p in c]


def test_levels_and_families_are_balanced(train_problems: list[synth.Problem]) -> None:
    for level in synth.LEVELS:
        n = sum(p.level == level for p in train_problems)
        assert n == len(train_problems) // len(synth.LEVELS)
    for family in synth.FAMILIES:
        n = sum(p.family == family for p in train_problems)
        assert abs(n - len(train_problems) / len(synth.FAMILIES)) <= len(synth.LEVELS)


def test_train_and_heldout_are_disjoint(train_problems, heldout_problems) -> None:
    assert {p.split for p in train_problems} == {"train"}
    assert {p.split for p in heldout_problems} == {"heldout"}
    train_keys = {p.key for p in train_problems}
    assert not train_keys & {p.key for p in heldout_problems}
    assert not {p.question for p in train_problems} & {p.question for p in heldout_problems}
    # The split is a function of the computation, whatever the surface form or seed.
    for p in heldout_problems[:50]:
        assert synth.split_of(p.key) == "heldout"


def test_heldout_fraction_is_the_configured_one() -> None:
    rng = random.Random(0)
    keys = [f"{rng.randint(1, 99)}+{rng.randint(1, 99)}={rng.random()}" for _ in range(20000)]
    frac = sum(synth.split_of(k) == "heldout" for k in keys) / len(keys)
    assert abs(frac - synth.HELDOUT_PERCENT / 100) < 0.01


def _value(expr: str) -> Fraction:
    """Exact value of an arithmetic expression (Python precedence = the usual one)."""
    return eval(re.sub(r"(\d+)", r"Fraction(\1)", expr), {"Fraction": Fraction})  # noqa: S307


def test_chain_and_word_traces_are_correct_arithmetic(train_problems, heldout_problems) -> None:
    problems = [p for p in train_problems + heldout_problems if p.family in ("chain", "word")]
    assert problems
    for p in problems:
        steps = _steps(p)
        assert len(steps) == p.level, p.thinking
        for a, op, b, r in steps:
            assert _value(f"{a} {op} {b}") == r, (p.question, p.thinking)
            assert all(1 <= v <= synth.VALUE_MAX for v in (a, b, r))
        assert str(steps[-1][3]) == p.answer
        # each step continues from the previous result; the first from the question's start value
        assert all(steps[i][0] == steps[i - 1][3] for i in range(1, len(steps)))
        assert re.search(rf"\b{steps[0][0]}\b", p.question)
        # the opener and every step line restate a sentence of the question before computing it
        lines = p.thinking.split("\n")
        for line in [lines[0]] + [ln for ln in lines if STEP_RE.search(ln)]:
            quoted = line.split(":")[0].rstrip(".")
            assert quoted.lower() in p.question.lower(), (line, p.question)


def _checks_follow_steps(p: synth.Problem) -> None:
    """Every step line is followed by a check line that undoes it and finds its left operand."""
    lines = p.thinking.split("\n")
    steps = [i for i, ln in enumerate(lines) if STEP_RE.search(ln)]
    assert len(steps) == p.level, p.thinking
    for i in steps:
        a, op, b, r = STEP_RE.search(lines[i]).groups()
        m = CHECK_RE.match(lines[i + 1])
        assert m, (lines[i], lines[i + 1])
        assert (m.group(1), m.group(2), m.group(3), m.group(5), m.group(6)) == (r, INVERSE[op], b, a, "ok")
        assert _value(f"{r} {INVERSE[op]} {b}") == int(a) == int(m.group(4))
    assert "Wait" not in p.thinking and p.masked == ()


def _recheck_of(key: str) -> str:
    """The recheck's operations, from a problem key (``7+5=12;12*3=36`` -> ``7 + 5 = 12, 12 * 3 = 36``)."""
    return ", ".join(re.sub(r"(\d+)([-+*/])(\d+)=(\d+)", r"\1 \2 \3 = \4", st) for st in key.split(";"))


def _pass_lines(p: synth.Problem) -> list[str]:
    """The lines of a clean trace's single pass, after checking its closing recheck."""
    lines = p.thinking.split("\n")
    m = RECHECK_RE.match(lines[-1])
    assert m, lines[-1]
    assert m.groups() == (_recheck_of(p.key), p.answer, p.answer, "ok")
    assert not any(ln.startswith("Recheck") for ln in lines[:-1])
    return lines[:-1]


def test_every_pass_ends_with_a_recheck_read_from_the_question(train_problems, heldout_problems) -> None:
    for p in train_problems + heldout_problems:
        _pass_lines(p)


def test_every_step_is_checked(train_problems, heldout_problems) -> None:
    for p in train_problems + heldout_problems:
        _checks_follow_steps(p)


def test_expressions_are_computed_and_rewritten_one_operation_at_a_time(train_problems) -> None:
    exprs = [p for p in train_problems if p.family == "expr"]
    assert exprs
    for p in exprs:
        m = re.search(r"(?:Compute|What is|Evaluate|Calculate) ([\d +\-*/]+)[.?]$", p.question)
        assert m, p.question
        lines = _pass_lines(p)
        assert lines[0] == m.group(1)
        rewrites = [lines[0]] + [ln for ln in lines if ln.startswith("= ")]
        assert len(rewrites) == p.level + 1 and len(lines) == 3 * p.level + 1
        assert len(re.findall(r"[-+*/]", lines[0])) == p.level
        for prev, line in zip(rewrites, rewrites[1:]):
            assert len(line[2:].split()) == len(prev.lstrip("= ").split()) - 2  # one operation done
            assert _value(line[2:]) == _value(prev.lstrip("= "))
        # each rewrite follows the step it applies: "a op b = r." then "Check: ...", then "= ... r ..."
        for i in range(p.level):
            step, rewrite = lines[1 + 3 * i], lines[3 + 3 * i]
            assert STEP_RE.search(step) and rewrite.startswith("= ")
            assert STEP_RE.search(step).group(4) in rewrite.split()
        assert lines[-1] == f"= {p.answer}" and _value(lines[0]) == int(p.answer)
        assert all(1 <= int(n) <= synth.VALUE_MAX for line in lines for n in re.findall(r"\d+", line))


def _clean_and_with_errors(**rates: float) -> tuple[list[synth.Problem], list[synth.Problem]]:
    """600 problems drawn without and with training errors; errors never change which problems are
    drawn, their answers or visible responses."""
    clean = synth.generate_problems(600, seed=4)
    drawn = synth.generate_problems(600, seed=4, **rates)
    assert [(p.question, p.answer, p.response, p.key) for p in clean] == [
        (p.question, p.answer, p.response, p.key) for p in drawn]
    return clean, drawn


def test_slips_are_caught_redone_and_masked() -> None:
    clean, slipped = _clean_and_with_errors(slip_rate=0.3)
    n_slips = 0
    for c, p in zip(clean, slipped):
        if not p.masked:
            assert p.thinking == c.thinking
            continue
        lines = p.thinking.split("\n")
        wrong_values = [p.completion[a:b] for a, b in p.masked]
        assert all(v.isdigit() for v in wrong_values)
        n_slips += len(wrong_values)
        # remove every slip (its step line and failed check) and the "Wait, redo: " prefix: the clean trace
        kept, i, found = [], 0, []
        while i < len(lines):
            m = STEP_RE.search(lines[i])
            check = CHECK_RE.match(lines[i + 1]) if m and i + 1 < len(lines) else None
            if m and check and check.group(6) != "ok":
                a, op, b, wrong = m.groups()
                assert int(wrong) != _value(f"{a} {op} {b}")  # a real slip ...
                assert int(check.group(4)) == _value(f"{wrong} {INVERSE[op]} {b}") != int(a)  # ... that the check catches
                assert check.group(5) == a
                assert lines[i + 2].startswith("Wait, redo: ")
                found.append(wrong)
                i += 2
                continue
            kept.append(lines[i].replace("Wait, redo: ", "", 1) if lines[i].startswith("Wait, redo: ") else lines[i])
            i += 1
        assert found == wrong_values
        # the clean trace's step lines carry a restated instruction; the redo carries the bare step
        assert [ln.split(": ", 1)[-1] if STEP_RE.search(ln) else ln for ln in kept] == [
            ln.split(": ", 1)[-1] if STEP_RE.search(ln) else ln for ln in c.thinking.split("\n")]
        assert len(wrong_values) <= p.level * synth.MAX_SLIPS_PER_STEP
    assert 0.2 * 600 < n_slips < 0.6 * 600 * 2.5


def test_traces_grade_correct(train_problems) -> None:
    for p in train_problems[:300]:
        assert "<think>" in p.completion and "</think>" in p.completion
        assert grade_response(p.completion, p.answer, backend="fallback").correct
        assert not grade_response(p.completion, str(int(p.answer) + 1), backend="fallback").correct


def test_instruction_is_the_benchmark_prompt() -> None:
    from rqat_deploy.serve.runtimes import DEFAULT_INSTRUCTION

    assert synth.INSTRUCTION == DEFAULT_INSTRUCTION
    p = synth.generate_problems(1, seed=0)[0]
    msgs = synth.problem_messages(p)
    assert msgs[0] == {"role": "user", "content": f"{p.question}\n{DEFAULT_INSTRUCTION}"}
    assert msgs[1]["role"] == "assistant" and msgs[1]["content"].startswith("<think>\n")


def test_bad_arguments_raise() -> None:
    rng = random.Random(0)
    with pytest.raises(ConfigError):
        synth.make_problem(rng, 9, "chain")
    with pytest.raises(ConfigError):
        synth.make_problem(rng, 1, "poem")
    with pytest.raises(ConfigError):
        synth.generate_problems(3, split="test")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        synth.default_data("pretrain")  # type: ignore[arg-type]


def test_general_texts_are_deterministic_prose() -> None:
    docs = synth.general_texts()
    assert docs == synth.general_texts()
    assert len(docs) >= 1000
    assert len(set(docs)) == len(docs)
    for d in docs:
        assert d.isascii() and ">>>" not in d and len(d) >= 60
    assert sum(map(len, docs)) > 200_000


def test_text_writer_rejects_too_many(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        synth.write_text_jsonl(tmp_path / "t.jsonl", n=10**9)


def test_jsonl_files_load_through_the_package(tmp_path: Path) -> None:
    """The chat and text records are what training data (calib, sft) reads; the eval file what bench reads."""
    from rqat_deploy.data.calib import build_calibration
    from rqat_deploy.data.sft import build_sft
    from rqat_deploy.data.evalset import load_eval_set
    from rqat_deploy.builtin.tiny import build_tokenizer

    tok = build_tokenizer()
    reasoning = synth.write_reasoning_jsonl(tmp_path / "r.jsonl", 40, seed=2)
    text = synth.write_text_jsonl(tmp_path / "t.jsonl", n=60, seed=2)
    rows = [json.loads(line) for line in reasoning.read_text().splitlines()]
    assert len(rows) == 40 and all(r["messages"][1]["role"] == "assistant" for r in rows)

    sft = build_sft(tok, str(reasoning), n_samples=16, seq_len=512, seed=0)
    assert len(sft) == 16 and sft.report["truncated"] == 0
    completion = tok.decode(sft.input_ids[0][sft.labels[0] != -100])
    assert completion.startswith("<think>") and "\\boxed{" in completion

    calib = build_calibration(tok, f"{reasoning}:0.8,{text}:0.2", n_samples=10, seq_len=64, seed=0)
    assert calib.input_ids.shape == (10, 64)
    assert [s["samples"] for s in calib.report["sources"]] == [8, 2]

    eval_path = synth.write_eval_jsonl(tmp_path / "e.jsonl", 5, seed=2, levels=(1, 3))
    examples = load_eval_set(str(eval_path))
    assert len(examples) == 10
    assert [ex.meta["level"] for ex in examples] == [1] * 5 + [3] * 5
    keys = [json.loads(line)["key"] for line in eval_path.read_text().splitlines()]
    assert len(set(keys)) == 10 and all(synth.split_of(k) == "heldout" for k in keys)
    assert all(ex.answer is not None and ex.answer.isdigit() for ex in examples)


def test_default_data_writes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(synth.DEFAULT_DATA_SIZES, "reasoning", 30)
    monkeypatch.setitem(synth.DEFAULT_DATA_SIZES, "eval_per_level", 3)
    calib = synth.default_data("calib", tmp_path)
    paths = [Path(item.rsplit(":", 1)[0]) for item in calib.split(",")]
    weights = [float(item.rsplit(":", 1)[1]) for item in calib.split(",")]
    assert weights == [0.8, 0.2] and all(p.is_file() and p.is_absolute() for p in paths)
    assert synth.default_data("train", tmp_path) == str(paths[0])
    mtime = paths[0].stat().st_mtime_ns
    assert synth.default_data("train", tmp_path) == str(paths[0])
    assert paths[0].stat().st_mtime_ns == mtime
    eval_path = Path(synth.default_data("eval", tmp_path))
    assert len(eval_path.read_text().splitlines()) == 3 * len(synth.LEVELS)
    monkeypatch.setenv("RQAT_DEPLOY_CACHE", str(tmp_path / "cache"))
    assert synth.default_data_dir().parent == tmp_path / "cache"


def test_misreads_fail_the_recheck_start_over_and_are_masked() -> None:
    clean, misread = _clean_and_with_errors(misread_rate=0.3)
    restarted = 0
    for c, p in zip(clean, misread):
        passes = p.thinking.split("\nWait, start over.\n")
        assert passes[-1] == c.thinking and len(passes) <= synth.MAX_RESTARTS + 1
        restarted += len(passes) > 1
        assert len(p.masked) == len(passes) - 1  # one misread per failed pass, nothing else masked
        start = len("<think>\n")
        for text, (a, b) in zip(passes[:-1], p.masked):
            assert start <= a < b <= start + len(text)  # the mask lies in its failed pass
            lines = text.split("\n")
            m = RECHECK_RE.match(lines[-1])
            assert m and m.group(1) == _recheck_of(p.key) and m.group(2) == p.answer
            assert m.group(4) == "wrong" and m.group(3) != p.answer
            # the failed pass computes what it read, correctly, and its result is what the recheck compares
            steps = [STEP_RE.search(ln).groups() for ln in lines if STEP_RE.search(ln)]
            assert all(_value(f"{x} {op} {y}") == int(r) for x, op, y, r in steps)
            assert steps[-1][3] == m.group(3)
            masked = p.completion[a:b]
            row = p.completion[start:a].count("\n")  # the misread line, within its pass
            line, clean_line = lines[row], c.thinking.split("\n")[row]
            if p.family == "expr":  # a number of the (re)written expression, read wrong
                assert masked.isdigit() and line.lstrip("= ").split() != clean_line.lstrip("= ").split()
            else:  # a restated instruction or sentence, read wrong
                assert line.startswith(masked + ": ") and not clean_line.startswith(masked + ": ")
            start += len(text) + len("\nWait, start over.\n")
    assert 0.15 * 600 < restarted < 0.45 * 600
