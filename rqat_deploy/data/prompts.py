"""Prompts with gold answers for reinforcement learning (:func:`build_prompts`): what GRPO samples from.

A record gives one prompt when it has a gold answer:

- a conversation (``messages`` / ``conversations``) or a prompt/response record
  (:mod:`rqat_deploy.data.records`): the prompt is the chat template applied to every message but
  the last assistant turn, with the generation prompt (as stage 2 renders it); the gold answer is
  the record's answer field (:data:`~rqat_deploy.data.evalset.ANSWER_FIELDS`, e.g. OpenR1-Math's
  ``answer``, the built-in records' ``answer``), else the last ``\\boxed{}`` of the assistant turn;
  the assistant turn's thinking length is kept as the data's reference length;
- a question/answer row (``problem`` / ``question`` + ``answer``, an evaluation file's shape):
  the question as the one user turn (``instruction`` appended on its own line when given).

Records without a gold answer are skipped (counted in the report). Sampling is the training data's
(:mod:`rqat_deploy.data.mixing`): each source shuffled with ``seed``, counts shared by weight.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from rqat_deploy.data.chat import ends_in_thinking, render_prompt
from rqat_deploy.data.evalset import ANSWER_FIELDS, QUESTION_FIELDS, SOLUTION_FIELDS, gold_final_answer
from rqat_deploy.data.grading import last_boxed_content
from rqat_deploy.data.mixing import SourceStats, permutation, report, sample_sources, shortfall
from rqat_deploy.data.records import FieldMap, UnusableRecord, record_kind, render_record
from rqat_deploy.data.sources import iter_records
from rqat_deploy.data.spec import Source
from rqat_deploy.data.thinking import count_text_tokens, split_thinking
from rqat_deploy.errors import DataError

__all__ = ["DEFAULT_RL_SPEC", "PromptSet", "RLPrompt", "build_prompts"]

#: The second paper's GRPO prompts (OpenR1-Math).
DEFAULT_RL_SPEC = "open-r1/OpenR1-Math-220k"


@dataclass(frozen=True)
class RLPrompt:
    """One prompt of a :class:`PromptSet`.

    Attributes:
        text: the rendered prompt (chat template with the generation prompt).
        ids: its token ids.
        answer: the gold final answer.
        ref_thinking_tokens: thinking tokens of the record's own assistant trace (tokenizer
            tokens), or ``None`` when the record has no trace.
        starts_in_thinking: the prompt ends inside an opened ``<think>``.
    """

    text: str
    ids: tuple[int, ...]
    answer: str
    ref_thinking_tokens: int | None = None
    starts_in_thinking: bool = False


@dataclass
class PromptSet:
    """RL prompts in a fixed, seeded order, and the data report."""

    prompts: list[RLPrompt]
    report: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def fingerprint(self) -> str:
        """SHA-256 of the prompts and answers (ties a resumable state to its data)."""
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(json.dumps([p.ids, p.answer, p.ref_thinking_tokens]).encode())
        return h.hexdigest()


def _gold(record: Mapping[str, Any], completion: str | None) -> str | None:
    """The record's answer field, else the last ``\\boxed{}`` of its solution field or of its completion."""
    for name in ANSWER_FIELDS:
        gold = gold_final_answer(record.get(name))
        if gold:
            return gold
    for text in (*(record.get(n) for n in SOLUTION_FIELDS), completion):
        boxed = last_boxed_content(text) if isinstance(text, str) else None
        if boxed and boxed.strip():
            return boxed.strip()
    return None


def _question_prompt(tokenizer: Any, record: Mapping[str, Any], instruction: str | None) -> str | None:
    """The rendered prompt of a question/answer row, or None when the record has no question field."""
    name = next((n for n in QUESTION_FIELDS if isinstance(record.get(n), str) and record[n].strip()), None)
    if name is None:
        return None
    question = record[name] if not instruction else f"{record[name]}\n{instruction}"
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token")}
    return render_prompt(getattr(tokenizer, "chat_template", None), question, special_tokens=special)


def _prompt_and_trace(
    tokenizer: Any, record: Mapping[str, Any], fields: FieldMap, instruction: str | None
) -> tuple[str, str | None]:
    """``(prompt, assistant completion or None)`` of one record.

    Raises:
        UnusableRecord: a record of neither shape.
    """
    try:
        kind = record_kind(record, fields)
    except DataError:
        kind = None
    if kind in ("conversations", "messages", "prompt_response"):
        rendered = render_record(tokenizer, record, fields, kind)
        return rendered.prompt, rendered.completion
    prompt = _question_prompt(tokenizer, record, instruction)
    if prompt is None:
        raise UnusableRecord("no_prompt")
    return prompt, None


def _records(source: Source, seed: int, streaming: bool | None, stats: SourceStats) -> Iterator[Mapping[str, Any]]:
    for record in iter_records(source, seed, streaming):
        stats.records_read += 1
        yield record


def _source_prompts(
    tokenizer: Any, source: Source, want: int, seed: int, fields: FieldMap, *, max_prompt_tokens: int,
    instruction: str | None, streaming: bool | None,
) -> tuple[list[RLPrompt], SourceStats]:
    stats = SourceStats(source)
    out: list[RLPrompt] = []
    for record in _records(source, seed, streaming, stats) if want else ():
        try:
            prompt, completion = _prompt_and_trace(tokenizer, record, fields, instruction)
            answer = _gold(record, completion)
            if not answer:
                raise UnusableRecord("no_gold_answer")
            ids = tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if len(ids) > max_prompt_tokens:
                raise UnusableRecord("prompt_too_long")
        except UnusableRecord as s:
            stats.skipped[s.reason] += 1
            continue
        opened = ends_in_thinking(prompt)
        ref = None
        if completion is not None:
            trace = split_thinking(completion, starts_in_thinking=opened).thinking
            ref = count_text_tokens(trace, tokenizer) if trace is not None else None
        out.append(RLPrompt(prompt, ids, answer, ref, opened))
        stats.tokens += len(ids)
        if len(out) == want:
            break
    stats.samples = len(out)
    if stats.samples < want:
        raise shortfall(stats, want, f"prompts need a gold answer and at most {max_prompt_tokens} tokens")
    return out, stats


def build_prompts(
    tokenizer: Any,
    spec: str = DEFAULT_RL_SPEC,
    n_prompts: int = 2000,
    seed: int = 0,
    *,
    max_prompt_tokens: int = 2048,
    instruction: str | None = None,
    fields: FieldMap | str | Mapping[str, Any] | None = None,
    streaming: bool | None = None,
) -> PromptSet:
    """Build ``n_prompts`` RL prompts with gold answers from a SPEC (module docstring).

    Args:
        tokenizer: the model's tokenizer with its chat template.
        spec: ``source[:weight],...`` (:mod:`rqat_deploy.data.spec`).
        n_prompts: prompts in all, shared by weight.
        seed: shuffle and interleave seed.
        max_prompt_tokens: longer prompts are skipped.
        instruction: appended to the questions of question/answer rows (conversations are kept as they are).
        fields: record field names (:class:`~rqat_deploy.data.records.FieldMap`).
        streaming: see :func:`rqat_deploy.data.sources.iter_records`.

    Returns:
        A :class:`PromptSet`; ``report`` holds the spec, counts and per-source statistics.

    Raises:
        DataError: a bad spec, an unloadable source, or a source with too few usable prompts.
    """
    prompts, stats = sample_sources(
        spec, n_prompts, max(2, max_prompt_tokens), fields,
        lambda source, want, fmap: _source_prompts(
            tokenizer, source, want, seed, fmap, max_prompt_tokens=max_prompt_tokens, instruction=instruction,
            streaming=streaming,
        ),
    )
    ordered = [prompts[i] for i in permutation(len(prompts), seed)]
    refs = [p.ref_thinking_tokens for p in ordered if p.ref_thinking_tokens is not None]
    rep = report(spec, seed, n_prompts, max_prompt_tokens, sum(len(p.ids) for p in ordered), stats,
                 ref_thinking_tokens_mean=sum(refs) / len(refs) if refs else None)
    return PromptSet(ordered, rep)
