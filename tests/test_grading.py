"""Evaluation-set loading, answer extraction and equivalence, on crafted and real benchmark data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rqat_deploy.errors import ConfigError, DataError
from rqat_deploy.serve.bench import BenchConfig, run_bench
from rqat_deploy.data.evalset import detect_fields, eval_sources, gold_final_answer, load_eval_set, load_rows
from rqat_deploy.data import grading
from rqat_deploy.data.grading import (
    extract_answer,
    fallback_equiv,
    grade_response,
    is_equiv,
    last_boxed_content,
    math_verify_available,
    math_verify_equiv,
    normalize_answer,
    resolve_grader,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "math500_test.jsonl").exists(), reason="shared benchmark data absent")
needs_mv = pytest.mark.skipif(not math_verify_available(), reason="math-verify not installed")
BACKENDS = ["fallback", pytest.param("math-verify", marks=needs_mv)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- data


def test_parse_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # local files must exist: the one SPEC grammar checks them when parsing
    for name in ("a.jsonl", "b.jsonl", "b.parquet"):
        (tmp_path / name).write_text("")
    specs = eval_sources("a.jsonl:3, openai/gsm8k@main ,b.parquet:0.5")
    assert [(s.name, s.weight) for s in specs] == [("a.jsonl", 3.0), ("openai/gsm8k@main", 1.0), ("b.parquet", 0.5)]
    # '@' names a split (the configuration is '#main'), as in training SPECs
    assert (specs[1].location, specs[1].config, specs[1].split) == ("openai/gsm8k", None, "main")
    for bad in ["", "a.jsonl,,b.jsonl", "a.jsonl:0"]:
        with pytest.raises(DataError):
            eval_sources(bad)


def test_detect_fields() -> None:
    assert detect_fields(["question", "answer"]) == ("question", "answer", None)
    assert detect_fields(["problem", "solution", "answer", "level"]) == ("problem", "answer", "solution")
    assert detect_fields(["problem", "solution"]) == ("problem", None, "solution")
    assert detect_fields(["q", "a"], question_field="q", answer_field="a") == ("q", "a", None)
    with pytest.raises(DataError, match="question-field"):
        detect_fields(["text", "label"])
    with pytest.raises(DataError, match="'nope'"):
        detect_fields(["question", "answer"], answer_field="nope")


def test_gold_final_answer_forms() -> None:
    assert gold_final_answer("She pays 3*6=<<3*6=18>>18.\n#### 18") == "18"
    assert gold_final_answer("so $x=\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert gold_final_answer(" 42 ") == "42"
    assert gold_final_answer(7) == "7"
    assert gold_final_answer(None) is None and gold_final_answer("  ") is None


def test_load_local_files_limit_and_weights(tmp_path: Path) -> None:
    gsm = _write_jsonl(tmp_path / "g.jsonl", [{"question": f"q{i}", "answer": f"work\n#### {i}"} for i in range(10)])
    math = _write_jsonl(tmp_path / "m.jsonl", [{"problem": f"p{i}", "solution": f"\\boxed{{{i}}}"} for i in range(10)])
    custom = _write_jsonl(tmp_path / "c.jsonl", [{"ask": "what?", "gold": "5", "other": 1}])
    ex = load_eval_set(f"{gsm}:3,{math}:1", limit=8)
    assert [e.source for e in ex] == [str(gsm)] * 6 + [str(math)] * 2
    assert [e.index for e in ex] == list(range(8))
    assert [e.answer for e in ex] == ["0", "1", "2", "3", "4", "5", "0", "1"]
    assert ex[0].solution == "work\n#### 0" and ex[6].solution == "\\boxed{0}"
    assert len(load_eval_set(str(gsm))) == 10
    one = load_eval_set(str(custom), question_field="ask", answer_field="gold")
    assert (one[0].question, one[0].answer, one[0].meta) == ("what?", "5", {"other": 1})
    with pytest.raises(DataError, match="question"):
        load_eval_set(str(custom))
    with pytest.raises(DataError, match="does not exist"):
        load_eval_set(str(tmp_path / "missing.jsonl"))


def test_load_text_and_parquet(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    txt = tmp_path / "prompts.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    ex = load_eval_set(str(txt))
    assert [e.question for e in ex] == ["first prompt", "second prompt"] and ex[0].answer is None
    pq.write_table(pa.table({"question": ["a", "b"], "answer": ["1", "2"]}), tmp_path / "d.parquet")
    assert [e.answer for e in load_eval_set(str(tmp_path / "d.parquet"))] == ["1", "2"]


def test_directory_goes_through_datasets_load_dataset(tmp_path: Path) -> None:
    # A local dataset directory takes the same `datasets.load_dataset` path as a Hub id.
    pytest.importorskip("datasets")
    folder = tmp_path / "myset"
    folder.mkdir()
    _write_jsonl(folder / "test.jsonl", [{"problem": "p", "answer": "\\frac12"}])
    _write_jsonl(folder / "train.jsonl", [{"problem": "t", "answer": "9"}, {"problem": "u", "answer": "8"}])
    rows = load_rows(str(folder))  # `test` is preferred
    assert rows == [{"problem": "p", "answer": "\\frac12"}]
    assert len(load_rows(str(folder), split="train")) == 2
    with pytest.raises(DataError, match="splits"):
        load_rows(str(folder), split="validation")
    with pytest.raises(DataError, match="cannot load dataset"):
        load_rows(str(tmp_path / "no_such_dataset_dir"))


CONFIGS_CARD = """---
configs:
- config_name: main
  data_files:
  - split: test
    path: main/test.jsonl
- config_name: socratic
  data_files:
  - split: test
    path: socratic/test.jsonl
---
"""


def test_config_is_written_with_hash_and_the_old_at_form_names_it(tmp_path: Path) -> None:
    # A dataset with configs (a local snapshot: configs in README.md) is read as 'name#config[@split]';
    # the old bench spelling 'name@config' now names a split and fails naming 'name#config'.
    pytest.importorskip("datasets")
    folder = tmp_path / "cfgset"
    for config, question in (("main", "m"), ("socratic", "s")):
        (folder / config).mkdir(parents=True)
        _write_jsonl(folder / config / "test.jsonl", [{"question": question, "answer": "1"}])
    (folder / "README.md").write_text(CONFIGS_CARD)
    assert [r["question"] for r in load_rows(f"{folder}#main")] == ["m"]
    assert [e.question for e in load_eval_set(f"{folder}#socratic@test")] == ["s"]
    with pytest.raises(DataError, match=re.escape(f"write '{folder}#main'")):
        load_rows(f"{folder}@main")
    with pytest.raises(DataError, match=re.escape("write 'openai/gsm8k#main'")):  # offline: the Hub id fails too
        load_eval_set("openai/gsm8k@main")


@needs_data
def test_real_sets_load_with_detected_fields() -> None:
    gsm = load_eval_set(str(DATA / "gsm8k_test.jsonl"))
    assert len(gsm) == 1319 and gsm[0].answer == "18" and gsm[0].question.startswith("Janet")
    math = load_eval_set(str(DATA / "math500_test.jsonl"))
    assert len(math) == 500 and math[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math[0].meta["subject"] == "Precalculus" and "\\boxed" in (math[0].solution or "")
    aime = load_eval_set(str(DATA / "aime24_test.jsonl"))
    assert len(aime) == 30 and aime[0].answer == "204" and aime[0].question.startswith("Every morning")


# ------------------------------------------------------------------------------------------ extract


def test_last_boxed_nested_fbox_and_truncated() -> None:
    assert last_boxed_content("a \\boxed{1} b \\boxed{\\frac{\\sqrt{2}}{2}} c") == "\\frac{\\sqrt{2}}{2}"
    assert last_boxed_content("\\fbox{7}") == "7"
    assert last_boxed_content("$\\boxed 5$") == "5"
    assert last_boxed_content("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed_content("\\boxed{3} and then \\boxed{\\frac{1}{") == "3"  # unclosed box skipped
    assert last_boxed_content("\\boxedx{3}") is None and last_boxed_content("none") is None


def test_extract_answer_order() -> None:
    assert extract_answer("<think>\\boxed{1}</think>So \\boxed{2}.") == ("2", "boxed")
    assert extract_answer("<think>I get \\boxed{1}</think>") == ("1", "boxed")  # empty answer part
    assert extract_answer("work\n#### 1,234\n") == ("1,234", "hash")
    assert extract_answer("So the final answer is $12$.") == ("12", "answer_is")
    assert extract_answer("I count 3 then 4.5 apples") == ("4.5", "last_number")
    assert extract_answer("no digits at all") == (None, "none")


# ---------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("\\dfrac{1}{2}", "\\frac12"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\tfrac{1}{2}"),
        ("18.00", "18"),
        ("\\$1,000", "1000"),
        ("10,\\!080", "10080"),
        ("50\\%", "50"),
        ("90^\\circ", "90"),
        ("864 \\mbox{ inches}^2", "864"),
        ("18 dollars", "18"),
        ("\\text{(C)}", "C"),
        ("\\textbf{Evelyn}", "\\text{evelyn}"),
        ("x = 5", "5"),
        ("x \\in [-2,7]", "[-2, 7]"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("(0.5, 2)", "\\left(\\frac12, 2\\right)"),
        ("\\{2, 1\\}", "\\{1,2\\}"),
        ("-2, 1", "1,-2"),
        ("(3, \\infty) \\cup (-\\infty, 0)", "(-\\infty,0)\\cup(3,\\infty)"),
        ("1\\frac{4}{5}", "\\frac{9}{5}"),
        (".35625", "0.35625"),
        ("4210_{5}", "4210_5"),
        ("\\sqrt2", "\\sqrt{2}"),
    ],
)
def test_fallback_equivalent(pred: str, gold: str) -> None:
    assert fallback_equiv(pred, gold), (normalize_answer(pred), normalize_answer(gold))


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("(1, 2)", "(2, 1)"),  # tuples keep their order
        ("(1, 2]", "(1, 2)"),  # interval brackets matter
        ("[1, 2]", "\\{1, 2\\}"),
        ("0.333", "\\frac{1}{3}"),
        ("2m", "2"),
        ("52_8", "52_9"),
        ("1,2,3", "1,2"),
        ("18", "19"),
        (None, "1"),
    ],
)
def test_fallback_not_equivalent(pred: str | None, gold: str) -> None:
    assert not fallback_equiv(pred, gold)


@needs_mv
def test_math_verify_symbolic_and_exact_guards() -> None:
    assert math_verify_equiv("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}")
    assert not fallback_equiv("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}")
    assert is_equiv("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", backend="auto")
    # math-verify alone rounds to 6 decimals and drops base subscripts; the guards decide exactly.
    assert math_verify_equiv(".0000673", ".0000672", exact_numbers=False)
    assert not math_verify_equiv(".0000673", ".0000672")
    assert not math_verify_equiv("52_9", "52_8")


# A symbolic equality only math-verify sees, and a text answer only the fallback accepts.
SYMBOLIC = ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}")
TEXT = ("The answer is \\boxed{east}.", "East")


@needs_mv
def test_auto_is_math_verify_alone_when_installed() -> None:
    # One grader decides: the fallback no longer rescues what math-verify rejects.
    assert resolve_grader("auto") == "math-verify"
    sym, text = grade_response(*SYMBOLIC), grade_response(*TEXT)
    assert (sym.correct, sym.grader) == (True, "math-verify")
    assert (text.correct, text.grader) == (False, "math-verify")
    assert grade_response(*TEXT, backend="fallback").correct  # the fallback alone accepts it


def test_auto_is_the_fallback_without_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grading, "math_verify_available", lambda: False)
    assert resolve_grader("auto") == "fallback" and resolve_grader("fallback") == "fallback"
    sym, text = grade_response(*SYMBOLIC), grade_response(*TEXT)
    assert (sym.correct, sym.grader) == (False, "fallback")
    assert (text.correct, text.grader) == (True, "fallback")
    with pytest.raises(ConfigError, match="pip install math-verify"):
        is_equiv("1", "1", backend="math-verify")
    with pytest.raises(ConfigError, match="--grader"):
        BenchConfig(responses="r.jsonl", grader="math-verify")


@pytest.mark.parametrize("installed", [pytest.param(True, marks=needs_mv), False])
def test_report_names_the_grader_of_every_score(installed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not installed:
        monkeypatch.setattr(grading, "math_verify_available", lambda: False)
    expected = "math-verify" if installed else "fallback"
    data = _write_jsonl(tmp_path / "d.jsonl", [{"question": "q0", "answer": SYMBOLIC[1]}, {"question": "q1", "answer": TEXT[1]}])
    resp = _write_jsonl(tmp_path / "r.jsonl", [{"model": "m", "response": SYMBOLIC[0]}, {"model": "m", "response": TEXT[0]}])
    report = run_bench(BenchConfig(dataset=str(data), responses=str(resp), out_dir=tmp_path / "out", progress=False,
                                   plots=False))
    m = report["models"]["m"]
    assert report["config"]["grader"] == "auto" and m["grader"] == expected
    assert [r["grader"] for r in m["raw"]] == [expected, expected]
    assert [r["correct"] for r in m["raw"]] == ([True, False] if installed else [False, True])
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["models"]["m"]["grader"] == expected
    row = next(line for line in (tmp_path / "out" / "report.md").read_text().splitlines() if line.startswith("| `m` |"))
    assert f"| {expected} |" in row


def test_unknown_backend() -> None:
    with pytest.raises(ConfigError, match="backend"):
        is_equiv("1", "1", backend="sympy")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- real gold solutions


def _perturb(answer: str) -> str | None:
    """Change the last digit of an answer (None when it has none)."""
    digits = list(re.finditer(r"\d", answer))
    if not digits:
        return None
    k = digits[-1].start()
    return answer[:k] + str((int(answer[k]) + 1) % 10) + answer[k + 1 :]


@needs_data
@pytest.mark.parametrize("name", ["math500_test", "gsm8k_test", "aime24_test"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gold_solutions_grade_correct_and_wrong_answers_do_not(name: str, backend: str) -> None:
    examples = load_eval_set(str(DATA / f"{name}.jsonl"))
    if name == "aime24_test":  # AoPS wiki texts; one (row 0) states its answer without any box
        examples = [e for e in examples if "\\boxed" in (e.solution or "")]
        assert len(examples) >= 25
    wrong_right, right_wrong = [], []
    for k, ex in enumerate(examples):
        assert ex.solution is not None and ex.answer is not None
        if not grade_response(ex.solution, ex.answer, backend=backend).correct:  # type: ignore[arg-type]
            right_wrong.append((ex.index, ex.answer, extract_answer(ex.solution)))
        other = examples[(k + 1) % len(examples)].answer
        assert other is not None
        if not fallback_equiv(other, ex.answer) and grade_response(ex.solution, other, backend=backend).correct:  # type: ignore[arg-type]
            wrong_right.append((ex.index, ex.answer, other))
        perturbed = _perturb(ex.answer)
        if perturbed is not None and grade_response(ex.solution, perturbed, backend=backend).correct:  # type: ignore[arg-type]
            wrong_right.append((ex.index, ex.answer, perturbed))
    assert not right_wrong, f"gold solutions graded wrong: {right_wrong[:10]}"
    assert not wrong_right, f"wrong answers graded correct: {wrong_right[:10]}"


@needs_data
@needs_mv
def test_math_verify_alone_accepts_every_math500_gold_solution() -> None:
    # Without the exact-number guards, math-verify itself must accept each boxed gold answer.
    bad = []
    for ex in load_eval_set(str(DATA / "math500_test.jsonl")):
        extracted, _ = extract_answer(ex.solution or "")
        if not math_verify_equiv(extracted, ex.answer, exact_numbers=False):
            bad.append((ex.index, ex.answer, extracted))
    assert not bad


@needs_data
def test_agrees_with_reference_scores_on_model_samples() -> None:
    # math_cot_100 holds 8 Qwen2.5-Math responses per problem with the reference grader's scores.
    # The known disagreements are reference errors: `4:30 p.m.` vs `4:30 \text{ p.m.}` and
    # `10{,}000` vs `10000`, which are the same answers.
    rows = [json.loads(line) for line in (DATA / "math_cot_100.jsonl").read_text().splitlines()]
    disagree = []
    for row in rows:
        for response, score in zip(row["code"], row["score"]):
            if grade_response(response, row["answer"], backend="fallback").correct != score:
                disagree.append(row["answer"])
    assert set(disagree) <= {"\\text{4:30 p.m.}", "10{,}000"}, set(disagree)
    assert len(disagree) <= 9


@needs_data
@pytest.mark.parametrize("name", ["math500_test", "gsm8k_test"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grade_only_mode_on_gold_and_shifted_solutions(name: str, backend: str, tmp_path: Path) -> None:
    # Through `bench --responses`: each gold solution answers its own row (all correct), then the
    # next row's solution answers each row (correct only where the two gold answers are equal).
    spec = str(DATA / f"{name}.jsonl")
    examples = load_eval_set(spec)
    gold_rows = [{"index": e.index, "response": e.solution} for e in examples]
    n = len(examples)
    shifted = [{"index": e.index, "response": examples[(e.index + 1) % n].solution} for e in examples]
    resp = tmp_path / "responses.jsonl"
    _write_jsonl(resp, [{"model": "gold", **r} for r in gold_rows] + [{"model": "shifted", **r} for r in shifted])
    report = run_bench(BenchConfig(dataset=spec, responses=str(resp), out_dir=tmp_path / "out", grader=backend,
                                   progress=False, plots=False))
    gold = report["models"]["gold"]
    assert gold["n"] == n and gold["accuracy"] == 1.0
    assert all(r["correct"] for r in gold["raw"])
    wrongly_right = [
        r["index"] for r in report["models"]["shifted"]["raw"]
        if r["correct"] and not fallback_equiv(examples[(r["index"] + 1) % n].answer, r["gold"])
    ]
    assert not wrongly_right
    assert report["models"]["shifted"]["accuracy"] < 0.1
