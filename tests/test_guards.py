"""Thinking guards (issue 14, deliverable 3): the shared RequestGuard on scripted logits (numpy and
torch), its per-tokenizer resolution, the vLLM slot logic without vLLM, and the built-in teacher
through llama.cpp and transformers with every guard (identical greedy tokens in both runtimes)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from rqat_deploy.data.thinking import find_loop, thinking_span_ids
from rqat_deploy.errors import ConfigError
from rqat_deploy.serve.guards import (
    GuardPlan,
    RequestGuard,
    SlotGuards,
    ThinkingGuards,
    guard_from_params,
    starts_in_thinking_ids,
    summarize_guard_reports,
    vllm_extra_args,
)

OPEN, CLOSE, NL, NL2, WAIT, HMM = 100, 101, 10, 11, 50, 51
VOCAB = 128


def _encode(text: str) -> list[int]:
    """A toy tokenizer: the tags, newlines and two hesitation words are single tokens."""
    table = {"<think>": [OPEN], "</think>": [CLOSE], "\n</think>\n\n": [NL, CLOSE, NL2], "Wait": [WAIT], " Wait": [WAIT],
             "Hmm": [HMM], "hmm": [HMM], "Alternatively": [60, 61]}
    return table.get(text, [70, 71])


def _plan(**kwargs: Any) -> GuardPlan:
    return ThinkingGuards(**kwargs).bind(_encode, (OPEN, CLOSE))


def _run(guard: RequestGuard, script: list[int], steps: int, tensor: Any = np.zeros) -> list[int]:
    """Greedy decoding of a scripted model whose preferred token at step k is ``script[k]``."""
    out: list[int] = []
    for k in range(steps):
        logits = tensor(VOCAB)
        logits[script[k % len(script)]] = 5.0
        out.append(int(guard(list(out), logits).argmax()))
    return out


# ---------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"budget": 0}, "--think-budget"), ({"loop_ngram": 0}, "--loop-ngram"), ({"loop_repeats": 1}, "--loop-repeats"),
    ({"hesitation_penalty": -1.0}, "--hesitation-penalty"), ({"hesitation_penalty": math.nan}, "--hesitation-penalty"),
    ({"hesitation_penalty": 1.0, "hesitation_words": ()}, "--hesitation-words"), ({"close_text": "done"}, "close_text"),
])
def test_settings_are_checked_naming_the_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        ThinkingGuards(**kwargs)


def test_bind_resolves_words_per_tokenizer_and_refuses_split_tags() -> None:
    plan = _plan(hesitation_penalty=2.0, hesitation_words=("Wait", "Hmm", "Alternatively"))
    assert plan.close_ids == (NL, CLOSE, NL2) and plan.close_at == 1
    assert plan.hesitation_ids == (WAIT, HMM)
    assert plan.hesitation_resolved == {"Wait": [WAIT], "Hmm": [HMM]}
    assert plan.hesitation_skipped == ["Alternatively"]  # two tokens: never penalized by a piece
    assert plan.describe()["hesitation_skipped"] == ["Alternatively"]
    with pytest.raises(ConfigError, match="single tokens"):
        ThinkingGuards(budget=5).bind(_encode, None)
    with pytest.raises(ConfigError, match="close_text"):
        ThinkingGuards(budget=5, close_text="x</think>").bind(_encode, (OPEN, CLOSE))
    assert not ThinkingGuards().active and ThinkingGuards(loop_breaker=True).active


def test_starts_in_thinking_from_prompt_ids() -> None:
    assert starts_in_thinking_ids([1, OPEN, 2], OPEN, CLOSE)
    assert not starts_in_thinking_ids([OPEN, 2, CLOSE, 3], OPEN, CLOSE)
    assert not starts_in_thinking_ids([1, 2], OPEN, CLOSE)


# ------------------------------------------------------------------------------------ the guard


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_budget_closes_thinking_at_exactly_n_tokens(backend: str) -> None:
    import torch

    tensor = np.zeros if backend == "numpy" else (lambda n: torch.zeros(n))
    guard = _plan(budget=6).new_request([1, 2])
    out = _run(guard, [OPEN, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39], 12, tensor)
    # <think>, 5 free thinking tokens, then the closing text: its "\n" is the 6th thinking token.
    assert out[:9] == [OPEN, 30, 31, 32, 33, 34, NL, CLOSE, NL2] and out[9:] == [38, 39, OPEN]  # a later <think> is answer text
    assert thinking_span_ids(out, OPEN, CLOSE) == (6, True, True)
    rep = guard.report()
    assert rep["budget_fired_at"] == 5 and rep["forced_tokens"] == 3 and rep["thinking_tokens"] == 6
    assert rep["loop_fired_at"] is None and rep["hesitation_steps"] == 0


def test_report_counts_the_last_token_of_a_response_cut_by_the_limit() -> None:
    """The last token is sampled after the guard's last call: report(ids) observes it."""
    guard = _plan(budget=100).new_request([1, 2])
    out = _run(guard, [OPEN, 30, 31, 32, 33], 5)  # cut by the token limit inside thinking
    assert thinking_span_ids(out, OPEN, CLOSE)[0] == 4
    assert guard.report()["thinking_tokens"] == 3  # the guard saw 4 of the 5 tokens
    assert guard.report(out)["thinking_tokens"] == 4
    assert guard.report(out)["thinking_tokens"] == 4  # ids already seen are not counted twice


def test_budget_counts_from_a_prompt_that_opened_thinking() -> None:
    guard = _plan(budget=3).new_request([1, OPEN])
    out = _run(guard, [30, 31, 32, 33, 34, 35], 6)
    assert out == [30, 31, NL, CLOSE, NL2, 35]
    assert thinking_span_ids(out, OPEN, CLOSE, starts_in_thinking=True)[0] == 3


def test_loop_breaker_closes_where_the_loop_metric_finds_the_loop() -> None:
    guard = _plan(loop_breaker=True, loop_ngram=3, loop_repeats=2).new_request([])
    script = [OPEN, 30, 31, 32, 33, 30, 31, 32, 33, 30, 31, 32, 33]  # a period-4 loop inside thinking
    out = _run(guard, script, 14)
    close = out.index(CLOSE)
    thinking = out[1 : close - 1]  # the forced "\n" left out
    assert thinking == [30, 31, 32, 33, 30, 31, 32] and out[close - 1 : close + 2] == [NL, CLOSE, NL2]
    assert guard.report()["loop_fired_at"] == find_loop(thinking, 3, 2) == 7
    # The metric counts the response the breaker cut as a loop (the forced "\n" included).
    assert find_loop(out[1:close], 3, 2) == 7


def test_hesitation_penalty_only_inside_thinking_and_counts_what_it_did() -> None:
    guard = _plan(hesitation_penalty=3.0).new_request([])

    def step(generated: list[int], wait: float) -> np.ndarray:
        logits = np.zeros(VOCAB)
        logits[[30, WAIT]] = [2.0, wait]
        return guard(generated, logits)

    assert step([], 2.5)[WAIT] == 2.5  # before <think>: untouched
    logits = step([OPEN], 2.5)  # inside: Wait led, the penalty replaces it
    assert int(logits.argmax()) == 30 and logits[WAIT] == pytest.approx(-0.5) and logits[HMM] == -3.0
    assert step([OPEN, 30], 1.0)[WAIT] == pytest.approx(-2.0)  # penalized, but it did not lead
    step([OPEN, 30, WAIT], 1.0)  # a hesitation token generated all the same
    assert step([OPEN, 30, WAIT, CLOSE], 2.5)[WAIT] == 2.5  # after </think>: untouched
    rep = guard.report()
    assert (rep["hesitation_steps"], rep["hesitation_fired"], rep["hesitation_emitted"]) == (3, 1, 1)


def test_replay_reproduces_the_live_decisions() -> None:
    def plan() -> GuardPlan:
        return _plan(budget=10, loop_breaker=True, loop_ngram=2, loop_repeats=2)

    live = plan().new_request([])
    out = _run(live, [OPEN, 30, 31, 30, 31, 30, 31, 30], 12)
    replayed = plan().new_request([]).replay(out).report()
    assert replayed == {**live.report(), "hesitation_steps": None, "hesitation_fired": None}
    assert live.report()["loop_fired_at"] == 4 and live.report()["budget_fired_at"] is None


def test_summarize_guard_reports() -> None:
    reps = [{"budget_fired_at": 5, "loop_fired_at": None, "hesitation_fired": 2, "hesitation_steps": 9,
             "hesitation_emitted": 0, "forced_tokens": 3},
            {"budget_fired_at": None, "loop_fired_at": 7, "hesitation_fired": 0, "hesitation_steps": 4,
             "hesitation_emitted": 1, "forced_tokens": 3}, None]
    s = summarize_guard_reports(reps)
    assert (s["responses"], s["budget_fired"], s["budget_fired_fraction"], s["loop_fired_fraction"]) == (2, 1, 0.5, 0.5)
    assert (s["hesitation_fired"], s["hesitation_fired_mean"], s["hesitation_fired_fraction"]) == (2, 1.0, 0.5)
    assert s["forced_tokens"] == 6 and summarize_guard_reports([None])["budget_fired_fraction"] is None


# ------------------------------------------------------------------------- vLLM, without vLLM


def test_vllm_extra_args_round_trip_and_slot_guards() -> None:
    import torch

    plan = _plan(budget=3, hesitation_penalty=1.0, hesitation_words=("Wait",))
    params = SimpleNamespace(extra_args=json.loads(json.dumps(vllm_extra_args(plan, [1, OPEN]))))  # JSON-safe
    assert guard_from_params(params).plan == plan and guard_from_params(SimpleNamespace(extra_args=None)) is None
    slots = SlotGuards()
    assert slots.add(3, params) and not slots.add(0, SimpleNamespace(extra_args={}))
    prompt_len = np.zeros(8, dtype=np.int64)
    prompt_len[[0, 3]] = [4, 2]
    history = {3: [1, OPEN, 30, 31, 32]}
    generated: list[int] = []
    for step in range(6):  # slot 3 starts in thinking; row 0 is unguarded slot 0
        fed = 99 if step == 0 else generated[-1]
        pos = 1 + step  # the last prompt token, then each generated one
        logits = torch.zeros(2, VOCAB)
        logits[:, 30 + step] = 5.0
        slots.apply(logits, np.array([0, 3]), torch.tensor([7, fed]), torch.tensor([9, pos]), prompt_len,
                    lambda s, a, b: history[s][a:b])
        assert int(logits[0].argmax()) == 30 + step  # untouched
        generated.append(int(logits[1].argmax()))
    assert generated[:5] == [30, 31, NL, CLOSE, NL2] and slots.guards[3].report()["budget_fired_at"] == 2
    # A slot resumed after preemption reads the tokens it missed from the runner's history.
    assert slots.add(5, params)
    prompt_len[5] = 2
    logits = torch.zeros(1, VOCAB)
    slots.apply(logits, np.array([5]), torch.tensor([32]), torch.tensor([4]), prompt_len, lambda s, a, b: history[3][a:b])
    assert slots.generated[5] == [30, 31, 32] and int(logits[0].argmax()) == NL
    with pytest.raises(ConfigError, match="speculative"):
        slots.apply(torch.zeros(3, VOCAB), np.array([5, 3]), torch.tensor([1, 1, 1]), torch.tensor([5, 5, 5]), prompt_len,
                    lambda s, a, b: [])


def test_vllm_runtime_sends_the_plan_and_replays_the_report() -> None:
    from rqat_deploy.serve.runtime_vllm import VLLMRuntime
    from rqat_deploy.serve.runtimes import SamplingParams

    rt = object.__new__(VLLMRuntime)  # no vLLM here: only the request plumbing is exercised
    rt._guard_plans, rt.think_ids, rt.enable_guards = {}, (OPEN, CLOSE), False
    rt.tokenize = _encode  # type: ignore[method-assign]
    rt.tokenizer = SimpleNamespace(eos_token_id=2, decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
    rt._vllm = SimpleNamespace(SamplingParams=lambda **kw: SimpleNamespace(**kw))
    sampling = SamplingParams(greedy=True, max_tokens=9, guards=ThinkingGuards(budget=2))
    with pytest.raises(ConfigError, match="enable_guards"):
        rt._params(sampling, 0, False, [1])
    rt.enable_guards = True
    params = rt._params(sampling, 0, False, [1])
    assert guard_from_params(params).plan == rt.guard_plan(sampling.guards)
    out = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[OPEN, 30, NL, CLOSE, NL2, 40, 2], finish_reason="stop",
                                                   stop_reason=None)], metrics=None)
    gen = rt._to_generation(out, [1], 0.5, sampling)
    assert gen.token_ids[-1] == 40 and gen.guards["budget_fired_at"] == 1 and gen.guards["hesitation_fired"] is None


# ----------------------------------------------------------- the built-in teacher, two runtimes


@pytest.fixture(scope="module")
def teacher_runtimes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The built-in teacher as a 4-bit RTN checkpoint (transformers) and its exact F32 GGUF (llama.cpp)."""
    pytest.importorskip("llama_cpp")
    from rqat_deploy.builtin import synth
    from rqat_deploy.exporters.gguf import export_gguf
    from rqat_deploy.serve.runtimes import load_runtime
    from rqat_deploy.train.run import quantize_rtn

    root = tmp_path_factory.mktemp("guards")
    ckpt = quantize_rtn(synth.default_model_dir(), root / "ckpt", bits=4)
    gguf_path = root / "teacher.gguf"
    export_gguf(ckpt, gguf_path, gguf_type="F32", embed_type="F32")
    ll = load_runtime(str(gguf_path), n_threads=1, f32_kv_cache=True)
    tr = load_runtime(str(ckpt), n_threads=1)
    problems = synth.generate_problems(3, split="heldout", seed=0, levels=(2, 3, 4), unique=True)
    yield ll, tr, [tr.render_prompt(p.question) for p in problems], root
    ll.close()
    tr.close()


GUARDS = {
    "budget": ThinkingGuards(budget=12),
    "loop": ThinkingGuards(loop_breaker=True, loop_ngram=2, loop_repeats=2),
    "hesitation": ThinkingGuards(hesitation_penalty=50.0, hesitation_words=("Add", "Multiply", "Subtract")),
}


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", list(GUARDS))
def test_guards_in_llamacpp_and_transformers(teacher_runtimes: Any, name: str) -> None:
    from rqat_deploy.serve.runtimes import SamplingParams

    ll, tr, prompts, _ = teacher_runtimes
    sampling = SamplingParams(greedy=True, max_tokens=320, guards=GUARDS[name])  # room to close a rechecked trace
    plain = tr.generate(prompts, SamplingParams(greedy=True, max_tokens=320))
    g_ll, g_tr = ll.generate(prompts, sampling), tr.generate(prompts, sampling)
    assert [g.token_ids for g in g_ll] == [g.token_ids for g in g_tr]  # one guard, the same decisions
    assert [g.guards for g in g_ll] == [g.guards for g in g_tr]
    assert all(p.guards is None for p in plain)
    close = tr.think_ids[1]
    for gen in g_tr:
        n, _, closed = thinking_span_ids(gen.token_ids, *tr.think_ids)
        rep = gen.guards
        assert rep["thinking_tokens"] == n
        assert closed or name == "hesitation"  # budget and loop breaker close thinking; a penalty need not
        span = gen.token_ids[1 : gen.token_ids.index(close)] if closed else gen.token_ids[1:]
        if name == "budget":
            assert n == 12 and rep["budget_fired_at"] == 11
        elif name == "loop":  # cut where the metric finds the loop, or no loop at all
            cut = span[:-1] if rep["loop_fired_at"] is not None else span
            assert rep["loop_fired_at"] == find_loop(cut, 2, 2)
            assert (rep["loop_fired_at"] is None) == (find_loop(span, 2, 2) is None)
        else:
            assert not set(span) & set(tr.guard_plan(GUARDS[name]).hesitation_ids)
    if name == "loop":
        assert any(g.guards["loop_fired_at"] for g in g_tr)
    if name == "hesitation":
        assert sum(g.guards["hesitation_fired"] for g in g_tr) >= 1
        assert [g.token_ids for g in g_tr] != [p.token_ids for p in plain]


@pytest.mark.llamacpp
def test_bench_reports_guard_settings_and_firings(teacher_runtimes: Any, tmp_path: Path) -> None:
    from rqat_deploy.builtin import synth
    from rqat_deploy.serve.bench import BenchConfig, run_bench

    _, _, _, root = teacher_runtimes
    data = synth.write_eval_jsonl(tmp_path / "heldout.jsonl", 2, seed=1, levels=(3, 4))
    out = tmp_path / "bench"
    report = run_bench(BenchConfig(
        models=[str(root / "teacher.gguf")], dataset=str(data), greedy=True, max_tokens=96, think_budget=20,
        loop_breaker=True, hesitation_penalty=1.0, out_dir=out, speed=False, n_threads=1, progress=False, plots=False,
    ))
    m = report["models"]["teacher.gguf"]
    assert report["config"]["guards"] == {
        "budget": 20, "loop_breaker": True, "loop_ngram": 24, "loop_repeats": 3, "hesitation_penalty": 1.0,
        "hesitation_words": list(ThinkingGuards().hesitation_words), "close_text": "\n</think>\n\n"}
    g = m["guards"]
    assert g["settings"]["budget"] == 20
    resolved = g["settings"]["hesitation_resolved"]
    assert "Wait" in resolved  # the teacher's traces say "Wait, redo: ..." after a failed check
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(synth.default_model_dir()))
    for word, ids in resolved.items():
        assert word in ThinkingGuards().hesitation_words
        assert all(tok.decode([i]).strip().lower() == word.lower() for i in ids), (word, ids)
    fired = sum(r["guards"]["budget_fired_at"] is not None for r in m["raw"])
    assert g["budget_fired"] == fired >= 1 and g["responses"] == 4
    assert max(r["thinking_tokens"] for r in m["raw"]) <= 20
    assert "## Thinking guards" in (out / "report.md").read_text()
    # The responses file carries the guard events through grade-only mode.
    regraded = run_bench(BenchConfig(responses=str(out / report["responses_files"]["teacher.gguf"]), dataset=str(data),
                                     out_dir=tmp_path / "regrade", progress=False, plots=False))
    assert regraded["models"]["teacher.gguf"]["guards"]["budget_fired"] == fired
    with pytest.raises(ConfigError, match="--responses"):
        BenchConfig(responses="x.jsonl", think_budget=5)


# ------------------------------------------------------------------ the API with your own model


@pytest.mark.llamacpp
def test_user_api_with_transformers_and_llama_cpp(teacher_runtimes: Any) -> None:
    import llama_cpp
    from transformers import LogitsProcessorList

    ll, tr, prompts, root = teacher_runtimes
    guards = ThinkingGuards(budget=10)
    input_ids = tr.tokenizer([prompts[0], prompts[1]], return_tensors="pt", padding=True, padding_side="left")["input_ids"]
    proc = guards.transformers_processor(tr.tokenizer, input_ids)
    out = tr.model.generate(input_ids, logits_processor=LogitsProcessorList([proc]), max_new_tokens=40, do_sample=False,
                            attention_mask=(input_ids != tr.pad_id).long())
    for row, guard in zip(out[:, input_ids.shape[1]:].tolist(), proc.guards):
        assert thinking_span_ids(row, *tr.think_ids)[0] == 10 and guard.report()["budget_fired_at"] == 9
    llm = llama_cpp.Llama(model_path=str(root / "teacher.gguf"), n_ctx=512, n_threads=1, verbose=False)
    tokens = ll.tokenize(prompts[0])
    proc = guards.llama_cpp_processor(llm, tokens)
    res = llm.create_completion(tokens, logits_processor=llama_cpp.LogitsProcessorList([proc]), max_tokens=40,
                                temperature=0.0)
    assert "</think>" in res["choices"][0]["text"] and proc.guard.report()["thinking_tokens"] == 10
    llm.close()
