"""Thinking inflation in bench reports (issue 14, deliverable 2): each key of DESIGN.md 9 checked on
crafted responses, its definition in rqat_deploy.data.thinking checked on crafted spans, and the
keys written by `rqat-deploy bench --responses ... --baseline` (grade-only mode)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rqat_deploy.cli import cli
from rqat_deploy.data.grading import candidate_answers
from rqat_deploy.data.thinking import LoopDetector, analyze_response, answer_seen_then_lost, find_loop
from rqat_deploy.serve.report import BOOTSTRAP_SEED, add_inflation, bootstrap_difference_ci, bootstrap_ratio_ci

KEYS = ("thinking_tokens_ratio", "thinking_tokens_ratio_ci", "loop_fraction", "unclosed_thinking_fraction",
        "truncated_fraction", "answer_seen_then_lost_fraction")


# --------------------------------------------------------------------------------- definitions


def test_loop_is_a_run_seen_repeats_times_overlaps_allowed() -> None:
    assert find_loop("a b c a b c a b".split(), ngram=3, repeats=2) == 6  # "a b c" again at units 4-6
    assert find_loop("a b c a b d a b".split(), ngram=3, repeats=2) is None
    assert find_loop(["x"] * 5, ngram=3, repeats=3) == 5  # overlapping runs of one repeated unit
    assert find_loop(["x"] * 4, ngram=3, repeats=3) is None
    detector = LoopDetector(2, 2)
    assert [detector.add(u) for u in "p q p q p q".split()] == [False, False, False, True, False, False]
    assert detector.loop_at == 4
    with pytest.raises(ValueError):
        LoopDetector(2, 1)


def test_loop_inside_thinking_only_in_every_unit() -> None:
    looping = "<think>" + "carry the one. " * 10 + "</think> \\boxed{5}"
    stats = analyze_response(looping)
    assert stats.loop and stats.loop_at == 24 + 2 * 4  # period 4 words, run of 24, third occurrence
    assert not analyze_response(looping, loop_repeats=11).loop  # 40 units hold only 9 copies of a 24-unit run
    assert not analyze_response("<think>ok</think> " + "again and again " * 30).loop  # the answer part never loops
    o, c = 100, 101
    ids = [o] + [7, 8] * 14 + [c, 5]
    assert analyze_response("", token_ids=ids, think_ids=(o, c), loop_ngram=4, loop_repeats=3).loop_at == 8
    assert analyze_response("", token_ids=[7, 8] * 14, think_ids=(o, c)).loop_at is None  # no span, no loop


def test_unclosed_thinking() -> None:
    assert analyze_response("<think>a b").unclosed
    assert not analyze_response("<think>a</think>b").unclosed
    assert not analyze_response("no thinking at all").unclosed
    assert analyze_response("a b", starts_in_thinking=True).unclosed


def test_candidate_answers() -> None:
    text = "Add 5: 12 + 5 = 17.\nSo the answer is $17$.\nCheck \\boxed{\\frac{1}{2}} and x = 3, y = 4\n= " + "9" * 70
    assert candidate_answers(text) == ["\\frac{1}{2}", "17", "17", "3", "4"]
    assert candidate_answers("1 + 1 = 2. So far, x = 0.5, done") == ["2", "0.5"]


@pytest.mark.parametrize(("thinking", "gold", "correct", "expected"), [
    ("3 + 4 = 7.\n7 * 2 = 14.", "14", False, True),  # a step concluded the gold answer, the response ended wrong
    ("so the answer is 14", "14", False, True),
    ("I think \\boxed{14}", "14", False, True),
    ("3 + 4 = 7.\n7 * 2 = 14.", "14", True, False),  # ended right: not lost
    ("3 + 4 = 7.\n7 * 2 = 15.", "14", False, False),  # never seen
    ("the 14 apples", "14", False, False),  # a number in passing is not a conclusion
    ("x = 14.0 m", "14", False, True),  # compared as the fallback grader compares: exact numbers, units dropped
    (None, "14", False, False),  # no thinking span
    ("= 14", None, None, None),  # ungraded
])
def test_answer_seen_then_lost(thinking: str | None, gold: str | None, correct: bool | None, expected: bool | None) -> None:
    assert answer_seen_then_lost(thinking, gold, correct) is expected


def test_bootstrap_ratio_interval() -> None:
    assert bootstrap_ratio_ci([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == (2.0, 2.0)  # every resample has ratio 2
    a, b = [10.0, 40.0, 3.0, 4.0, 12.0], [4.0, 4.0, 5.0, 4.0, 3.0]
    low, high = bootstrap_ratio_ci(a, b)
    assert low < sum(a) / sum(b) < high
    assert bootstrap_ratio_ci(a, b) == (low, high) == bootstrap_ratio_ci(a, b, seed=BOOTSTRAP_SEED)  # seeded
    assert bootstrap_ratio_ci(a, b, seed=1) != (low, high)
    assert bootstrap_ratio_ci([1.0], [1.0]) is None and bootstrap_ratio_ci([1.0, 2.0], [0.0, 0.0]) is None
    assert bootstrap_difference_ci([3.0, 5.0, 9.0], [1.0, 3.0, 7.0]) == pytest.approx((2.0, 2.0))
    low, high = bootstrap_difference_ci(a, b)
    assert low < (sum(a) - sum(b)) / len(a) < high


def test_ratio_pairs_problems_and_averages_seeds_first() -> None:
    def raw(rows: list[tuple[int, int, int]]) -> dict:
        return {"raw": [{"index": i, "seed": s, "thinking_tokens": t} for i, s, t in rows]}

    models = {"base": raw([(0, 0, 10), (1, 0, 20), (2, 0, 30)]),
              "q": raw([(0, 0, 10), (0, 1, 30), (1, 0, 40), (1, 1, 40), (9, 0, 999)])}  # problem 9: unpaired
    section = add_inflation(models, "base")
    assert models["q"]["thinking_tokens_ratio"] == pytest.approx((20 + 40) / (10 + 20))
    assert models["q"]["thinking_tokens_ratio_n"] == 2 and models["base"]["thinking_tokens_ratio_ci"] == [1.0, 1.0]
    assert section["baseline"] == "base" and set(KEYS) <= set(section["models"]["q"])


# ------------------------------------------------------------------------ the report, grade-only


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def crafted(tmp_path: Path) -> dict[str, Path]:
    """Four questions (gold 2, 4, 6, 8); a baseline that thinks 4 words and is always right; a model
    whose responses are, in turn: wrong after reaching the gold answer in its thinking (10 units), a
    loop (40 units, right), unclosed and truncated (3 units), normal (4 units, right)."""
    qa = _jsonl(tmp_path / "qa.jsonl", [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(1, 5)])
    base = _jsonl(tmp_path / "base.jsonl", [
        {"index": i, "response": f"<think>a b c d</think> \\boxed{{{2 * (i + 1)}}}", "finish_reason": "stop"}
        for i in range(4)])
    quant = _jsonl(tmp_path / "quant.jsonl", [
        {"index": 0, "response": "<think>1 + 1 = 2. So far so good</think> \\boxed{3}", "finish_reason": "stop"},
        {"index": 1, "response": "<think>" + "go on " * 20 + "</think> \\boxed{4}", "finish_reason": "stop"},
        {"index": 2, "response": "<think>x y z", "finish_reason": "length"},
        {"index": 3, "response": "<think>a b c d</think> \\boxed{8}", "finish_reason": "stop"},
    ])
    return {"qa": qa, "base": base, "quant": quant, "out": tmp_path / "graded"}


def _bench(*args: str) -> None:
    res = CliRunner().invoke(cli, ["bench", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output


def test_grade_only_writes_every_inflation_key(crafted: dict[str, Path]) -> None:
    _bench("--responses", str(crafted["base"]), "--responses", str(crafted["quant"]), "--dataset", str(crafted["qa"]),
           "--grader", "fallback", "--out", str(crafted["out"]))
    report = json.loads((crafted["out"] / "report.json").read_text())
    base, quant = report["models"]["base"], report["models"]["quant"]
    for m in (base, quant):
        assert set(KEYS) <= set(m)
    assert quant["thinking_tokens_mean"] == pytest.approx((10 + 40 + 3 + 4) / 4)
    assert quant["thinking_tokens_ratio"] == pytest.approx(14.25 / 4)
    assert quant["thinking_tokens_ratio_ci"] == list(bootstrap_ratio_ci([10, 40, 3, 4], [4, 4, 4, 4]))
    assert base["thinking_tokens_ratio"] == 1.0 and base["thinking_tokens_ratio_ci"] == [1.0, 1.0]
    assert quant["loop_fraction"] == 0.25 and quant["unclosed_thinking_fraction"] == 0.25
    assert quant["truncated_fraction"] == 0.25
    assert quant["answer_seen_then_lost_fraction"] == 0.25 and quant["answer_seen_then_lost_of_incorrect"] == 0.5
    assert [r["loop"] for r in quant["raw"]] == [False, True, False, False]
    assert [r["answer_seen_then_lost"] for r in quant["raw"]] == [True, False, False, False]
    assert all(base[k] == 0 for k in KEYS[2:])
    inflation = report["inflation"]
    assert inflation["baseline"] == "base" and inflation["models"]["quant"]["loop_fraction"] == 0.25
    md = (crafted["out"] / "report.md").read_text()
    assert "## Thinking inflation vs `base`" in md and "| `quant` | 14.2 | 3.562 |" in md
    if pytest.importorskip("matplotlib"):
        assert (crafted["out"] / "thinking_tokens_by_model.png").read_bytes()[:4] == b"\x89PNG"


def test_baseline_flag_picks_the_reference_of_the_ratio(crafted: dict[str, Path]) -> None:
    _bench("--responses", str(crafted["base"]), "--responses", str(crafted["quant"]), "--dataset", str(crafted["qa"]),
           "--baseline", "quant", "--loop-ngram", "2", "--loop-repeats", "2", "--out", str(crafted["out"]))
    report = json.loads((crafted["out"] / "report.json").read_text())
    assert report["inflation"]["baseline"] == "quant"
    assert report["models"]["base"]["thinking_tokens_ratio"] == pytest.approx(4 / 14.25)
    assert report["models"]["quant"]["thinking_tokens_ratio_ci"] == [1.0, 1.0]
    # A shorter loop definition finds more loops: "so far so good" has no repeated pair, "go on" does.
    assert report["models"]["quant"]["loop_fraction"] == 0.25
    assert report["config"]["loop_ngram"] == 2 and report["config"]["loop_repeats"] == 2
