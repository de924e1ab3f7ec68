"""Thinking-token counting, truncation and restart counting on crafted responses."""

from __future__ import annotations

from typing import Any

import pytest

from rqat_deploy.data.thinking import (
    DEFAULT_RESTART_PATTERNS,
    analyze_response,
    count_restarts,
    count_text_tokens,
    is_truncated,
    split_thinking,
    thinking_span_ids,
)


def test_closed_span_counts_only_inside_tags() -> None:
    text = "<think>one two three</think>The answer is 4."
    stats = analyze_response(text)
    assert stats.thinking_tokens == 3
    assert stats.has_thinking and stats.closed
    assert stats.unit == "regex-words"
    assert split_thinking(text).answer == "The answer is 4."


def test_unclosed_span_runs_to_the_end() -> None:
    text = "<think>a b c d e f, g"
    split = split_thinking(text)
    assert split.thinking == "a b c d e f, g" and split.answer == "" and not split.closed
    stats = analyze_response(text)
    assert stats.thinking_tokens == 8  # 7 words and one comma
    assert not stats.closed


def test_nested_text_inside_span_is_thinking() -> None:
    # A literal <think> inside the span is ordinary text; the first </think> ends the span;
    # a later </think> belongs to the answer part.
    text = "<think>x <think> y</think> answer </think> tail"
    split = split_thinking(text)
    assert split.thinking == "x <think> y"
    assert split.answer == " answer </think> tail"
    assert analyze_response(text).thinking_tokens == count_text_tokens("x <think> y") == 5


def test_close_without_open_means_prompt_opened_it() -> None:
    split = split_thinking("step one\nstep two</think>\n\\boxed{3}")
    assert split.thinking == "step one\nstep two" and split.closed
    assert split.answer.strip() == "\\boxed{3}"


def test_no_tags() -> None:
    assert split_thinking("just an answer 5").thinking is None
    stats = analyze_response("just an answer 5")
    assert stats.thinking_tokens == 0 and not stats.has_thinking and stats.closed
    # ...unless the prompt ended inside thinking: then all of it is thinking, never closed.
    stats = analyze_response("just an answer 5", starts_in_thinking=True)
    assert stats.thinking_tokens == 4 and not stats.closed


def test_token_ids_path_matches_the_same_rules() -> None:
    o, c = 100, 101
    assert thinking_span_ids([o, 1, 2, 3, c, 9, 9], o, c) == (3, True, True)
    assert thinking_span_ids([5, o, 1, 2], o, c) == (2, True, False)
    assert thinking_span_ids([1, 2, c, 9], o, c) == (2, True, True)
    assert thinking_span_ids([1, 2, 3], o, c) == (0, False, True)
    assert thinking_span_ids([1, 2, 3], o, c, starts_in_thinking=True) == (3, True, False)
    stats = analyze_response("ignored", token_ids=[o, 7, 7, c], think_ids=(o, c))
    assert stats.thinking_tokens == 2 and stats.unit == "ids"


class _CharTokenizer:
    """Counts one token per character, to check that the tokenizer is what counts."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return [ord(ch) for ch in text]


def test_tokenizer_counts_the_span_text() -> None:
    stats = analyze_response("<think>abc de</think>zz", tokenizer=_CharTokenizer())
    assert stats.thinking_tokens == len("abc de")
    assert stats.unit == "tokenizer"


def test_restarts() -> None:
    text = (
        "<think>Compute 2+2=4. Wait, let me redo it. But wait, 4 is right. Let me check: 2+2=4. "
        "Let me double-check once more. Waiting is not a restart; nor is 'wait' in lower case.</think>"
        "Wait is outside the span."
    )
    stats = analyze_response(text)
    assert stats.restarts == 4  # Wait, But wait, Let me check, Let me double-check
    assert count_restarts("Hmm. Hmm, hmm.", ["Hmm"]) == 2
    assert count_restarts("Wait Wait", []) == 0
    assert "Wait" in DEFAULT_RESTART_PATTERNS


def test_restarts_without_span_count_whole_text() -> None:
    assert analyze_response("Wait. Let me verify this. Done.").restarts == 2


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"finish_reason": "length"}, True),
        ({"finish_reason": "stop", "closed": False}, False),
        ({"n_completion_tokens": 64, "max_tokens": 64}, True),
        ({"n_completion_tokens": 10, "max_tokens": 64, "closed": False}, False),
        ({"closed": False}, True),
        ({}, False),
    ],
)
def test_is_truncated(kwargs: dict, expected: bool) -> None:
    assert is_truncated(**kwargs) is expected


class _ScriptedModel:
    """Stands in for a causal LM: ``generate`` returns each prompt followed by a scripted row of ids."""

    def __init__(self, rows: list[list[int]], pad_id: int) -> None:
        self.rows, self.pad_id = rows, pad_id

    def eval(self) -> "_ScriptedModel":
        return self

    def generate(self, input_ids: Any, **_: Any) -> Any:
        import torch

        width = max(len(r) for r in self.rows)
        return torch.tensor([p + r + [self.pad_id] * (width - len(r)) for p, r in zip(input_ids.tolist(), self.rows)])


def test_tiny_reasoner_evaluate_counts_thinking_as_the_bench_does() -> None:
    # evaluate() counts thinking tokens with the bench's id counter: the same numbers as before for
    # responses that open <think> (every response of the shipped model's evaluation), and 0 for a
    # response without tags, as the bench counts it (evaluate used to count all of it).
    from transformers import AutoTokenizer

    from rqat_deploy.builtin import synth
    from rqat_deploy.builtin.tiny_reasoner import evaluate

    model_dir = synth.default_model_dir()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    open_id, close_id, end_id, pad_id = tok.convert_tokens_to_ids(["<think>", "</think>", "<|im_end|>", "<|endoftext|>"])
    a, b, c = (tok.convert_tokens_to_ids(d) for d in "123")
    rows = [
        [open_id, a, b, close_id, c, end_id],  # closed span: 2
        [open_id, a, b, c],  # never closed: 3, to the end
        [a, b, c, end_id],  # no tags: no thinking
    ]
    problems = synth.generate_problems(len(rows), split="heldout", seed=0, levels=(1,), unique=True)
    ev = evaluate(model_dir, problems, model=_ScriptedModel(rows, pad_id), tokenizer=tok, batch_size=len(rows))
    assert [r["thinking_tokens"] for r in ev["results"]] == [2, 3, 0]
    bench = [analyze_response("", token_ids=r[: r.index(end_id)] if end_id in r else r, think_ids=(open_id, close_id))
             for r in rows]
    assert [s.thinking_tokens for s in bench] == [2, 3, 0]
