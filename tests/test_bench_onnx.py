"""The onnxruntime bench runtime (issue 8): an ONNX export of a 4-bit uniform checkpoint answers with
the same prompts, greedy tokens, stopping and counts as the transformers runtime on the checkpoint,
and ``rqat-deploy bench --runtime onnxruntime`` writes a report with the speed fields."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rqat_deploy.errors import BackendError, ConfigError
from rqat_deploy.serve.bench import BenchConfig, run_bench
from rqat_deploy.serve.runtime_onnx import OnnxRuntime
from rqat_deploy.serve.runtimes import RUNTIMES, SamplingParams, detect_runtime, load_runtime

SPEED_FIELDS = ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s")
QUESTIONS = ["What is 12 + 30?", "Alice buys 3 apples and Bob buys 4. How many apples?"]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
_MISSING = [m for m in ("onnxruntime", "onnxruntime_genai", "onnx", "onnx_ir") if importlib.util.find_spec(m) is None]
needs_ort = pytest.mark.skipif(
    bool(_MISSING), reason=f"{', '.join(_MISSING)} not installed (pip install 'rqat-deploy[onnx]')"
)


@pytest.fixture(scope="module")
def tiny_onnx(tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Qwen3 as a 4-bit uniform RTN checkpoint and its ONNX export (fp32 activations)."""
    if _MISSING:
        pytest.skip(f"{', '.join(_MISSING)} not installed (pip install 'rqat-deploy[onnx]')")
    from rqat_deploy.exporters.onnx import export_onnx
    from rqat_deploy.train.run import quantize_rtn

    root = tmp_path_factory.mktemp("bench_onnx")
    ckpt = quantize_rtn(tiny_qwen3_dir, root / "ckpt", bits=4, grid="uniform")
    out = root / "onnx"
    export_onnx(ckpt, out, accuracy_level=0)
    return {"ckpt": Path(ckpt), "onnx": out}


@pytest.fixture(scope="module")
def runtimes(tiny_onnx: dict[str, Path]) -> Any:
    ox = load_runtime(str(tiny_onnx["onnx"]), "onnxruntime", n_threads=1)
    tr = load_runtime(str(tiny_onnx["ckpt"]), "transformers", n_threads=1)
    yield ox, tr
    ox.close()
    tr.close()


def _fake_export(root: Path) -> Path:
    root.mkdir()
    (root / "model.onnx").write_bytes(b"")
    (root / "genai_config.json").write_text("{}")
    return root


def test_detection_and_refusals(tmp_path: Path) -> None:
    assert "onnxruntime" in RUNTIMES
    export, plain = _fake_export(tmp_path / "export"), tmp_path / "plain"
    plain.mkdir()
    assert detect_runtime(str(export)) == "onnxruntime"
    assert detect_runtime(str(plain)) == "transformers" and detect_runtime("m.gguf") == "llama.cpp"
    with pytest.raises(ConfigError, match="ONNX export"):
        load_runtime(str(plain), "onnxruntime")
    with pytest.raises(ConfigError, match="--runtime onnxruntime"):
        load_runtime(str(export), "transformers")


def test_clear_error_without_onnxruntime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export = _fake_export(tmp_path / "export")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(BackendError, match="pip install onnxruntime"):
        load_runtime(str(export))


@needs_ort
def test_cpu_only(tiny_onnx: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="CPU"):
        OnnxRuntime(str(tiny_onnx["onnx"]), device="cuda")


@needs_ort
def test_same_prompts_and_greedy_tokens_as_transformers(runtimes: Any) -> None:
    ox, tr = runtimes
    assert ox.think_ids == tr.think_ids is not None
    # The export's generation_config.json eos ids (the model's own); the transformers runtime on a
    # checkpoint currently sees only config.json's (load_model does not read generation_config.json).
    gen_cfg = json.loads((Path(ox.model_path) / "generation_config.json").read_text())["eos_token_id"]
    assert set(ox.eos_ids) == set(gen_cfg) | {ox.tokenizer.eos_token_id} and set(tr.eos_ids) <= set(ox.eos_ids)
    prompts = []
    for q in QUESTIONS:
        p_ox, p_tr = ox.render_prompt(q), tr.render_prompt(q)
        assert p_ox == p_tr and p_ox.endswith("<|im_start|>assistant\n")
        assert ox.tokenize(p_ox) == tr.tokenize(p_tr)
        prompts.append(p_tr)
    greedy = SamplingParams(greedy=True, max_tokens=24)
    for a, b in zip(ox.generate(prompts, greedy), tr.generate(prompts, greedy)):
        assert len(set(a.token_ids)) >= 3  # a real sequence, not one token repeated
        assert a.token_ids == b.token_ids and len(a.token_ids) >= 16
        assert (a.text, a.finish_reason, a.n_prompt_tokens, a.n_completion_tokens) == (
            b.text, b.finish_reason, b.n_prompt_tokens, b.n_completion_tokens,
        )
        assert a.think_ids == b.think_ids and a.starts_in_thinking == b.starts_in_thinking
        for key in SPEED_FIELDS:
            assert getattr(a, key) is not None and getattr(a, key) > 0, key


@needs_ort
def test_stops_at_eos_like_transformers(runtimes: Any) -> None:
    """A prompt whose greedy next token (by the PyTorch model) is an eos both runtimes know: both stop at once."""
    ox, tr = runtimes
    rng = np.random.default_rng(0)
    prompt = None
    for _ in range(20):
        ids = rng.integers(0, 1000, 1000).tolist()
        hits = np.flatnonzero(np.isin(tr.logits(ids).argmax(-1), tr.eos_ids))  # [hits]
        if len(hits):
            prompt = ids[: int(hits[0]) + 1]
            break
    assert prompt is not None, "no eos among 20k greedy positions of the tiny model"
    greedy = SamplingParams(greedy=True, max_tokens=6)
    a, b = ox._generate_one(prompt, greedy, 0), tr._generate_one(prompt, greedy, 0)
    assert (a.token_ids, a.finish_reason, a.n_completion_tokens) == ([], "stop", 0)
    assert (b.token_ids, b.finish_reason) == (a.token_ids, a.finish_reason)
    forced = ox._generate_one(prompt, greedy, 0, ignore_eos=True)  # the speed run's mode
    assert len(forced.token_ids) == 6 and forced.token_ids[0] in ox.eos_ids and forced.finish_reason == "length"


@needs_ort
def test_seeded_sampling_and_speed(runtimes: Any) -> None:
    ox, _ = runtimes
    prompt = [ox.render_prompt(QUESTIONS[0])]
    sample = SamplingParams(max_tokens=10)  # temperature 0.6, top-k 20
    a = ox.generate(prompt, sample, seeds=[7])[0].token_ids
    assert a == ox.generate(prompt, sample, seeds=[7])[0].token_ids
    assert a != ox.generate(prompt, sample, seeds=[8])[0].token_ids
    sp = ox.speed("Count the marbles in the bag.", n_prompt_tokens=24, n_tokens=4, repeats=2)
    assert [r["prompt_tokens"] for r in sp["repetitions"]] == [24, 24]
    assert [r["completion_tokens"] for r in sp["repetitions"]] == [4, 4]
    for key in SPEED_FIELDS:
        assert sp[key]["n"] == 2 and sp[key]["median"] > 0
    assert sp["throughput"] is None
    d = ox.describe()
    assert (d["runtime"], d["kind"], d["engine"], d["accuracy_level"], d["bits"]) == ("onnxruntime", "onnx", "onnxruntime", 0, 4)


@needs_ort
def test_cli_bench_runtime_onnxruntime(tiny_onnx: dict[str, Path], tmp_path: Path) -> None:
    if not DATA.exists():
        pytest.skip(f"shared benchmark data {DATA} absent")
    from click.testing import CliRunner

    from rqat_deploy.cli import cli

    out = tmp_path / "bench"
    args = ["bench", "--model", str(tiny_onnx["onnx"]), "--runtime", "onnxruntime", "--dataset", str(DATA),
            "--limit", "2", "--max-tokens", "8", "--greedy", "--threads", "1", "--out", str(out)]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["runtime"] == "onnxruntime"
    m = report["models"]["onnx"]
    assert (m["runtime"], m["kind"], m["bits"], m["n"]) == ("onnxruntime", "onnx", 4, 2)
    assert all(m[k] is not None and m[k] > 0 for k in SPEED_FIELDS)
    assert m["speed"]["n_tokens"] == 128 and m["speed"]["repeats"] == 3
    # The inflation keys (DESIGN.md 9); this random model never thinks, so its ratio is 0 / 0: None.
    assert report["inflation"]["baseline"] == "onnx" and "thinking_tokens_ratio_ci" in m
    assert all(m[k] is not None for k in ("loop_fraction", "unclosed_thinking_fraction", "answer_seen_then_lost_fraction"))
    # The same questions through the transformers runtime on the checkpoint: identical responses.
    ref = run_bench(BenchConfig(models=[str(tiny_onnx["ckpt"])], dataset=str(DATA), limit=2, max_tokens=8, greedy=True,
                                out_dir=tmp_path / "ref", speed=False, n_threads=1, progress=False, plots=False,
                                hashes=False))["models"]["ckpt"]
    assert ref["runtime"] == "transformers"
    for a, b in zip(m["raw"], ref["raw"]):
        assert (a["index"], a["n_completion_tokens"], a["n_prompt_tokens"], a["finish_reason"]) == (
            b["index"], b["n_completion_tokens"], b["n_prompt_tokens"], b["finish_reason"],
        )
    responses = [json.loads(line) for line in (out / report["responses_files"]["onnx"]).read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (tmp_path / "ref" / "responses" / "ckpt.jsonl").read_text().splitlines()]
    assert [r["response"] for r in responses] == [r["response"] for r in ref_rows]


@needs_ort
def test_thinking_guards_in_onnxruntime_match_transformers(runtimes: Any, tiny_onnx: dict[str, Path]) -> None:
    # Prompts that end inside <think>: the random model thinks from its first token, and one guard
    # makes the same decisions in ONNX Runtime's loop, in onnxruntime-genai's generator and in transformers.
    from rqat_deploy.serve.guards import ThinkingGuards
    from rqat_deploy.serve.runtime_onnx import OnnxCausalLM

    ox, tr = runtimes
    prompts = [tr.render_prompt(q) + "<think>\n" for q in QUESTIONS]
    free = tr.generate(prompts, SamplingParams(greedy=True, max_tokens=12))
    word = next(w for w in (tr.tokenizer.decode([t]) for g in free for t in g.token_ids[:3]) if len(tr.tokenize(w)) == 1)
    guards = ThinkingGuards(budget=6, loop_breaker=True, loop_ngram=2, loop_repeats=2, hesitation_penalty=1e4,
                            hesitation_words=(word,))
    sampling = SamplingParams(greedy=True, max_tokens=12, guards=guards)
    g_ox, g_tr = ox.generate(prompts, sampling), tr.generate(prompts, sampling)
    assert [g.token_ids for g in g_ox] == [g.token_ids for g in g_tr]
    assert [g.guards for g in g_ox] == [g.guards for g in g_tr]
    close = tr.think_ids[1]
    plan = tr.guard_plan(guards)
    for g in g_ox:
        assert close in g.token_ids and g.token_ids.index(close) <= 6  # the budget, or the loop breaker first
        assert not set(g.token_ids[: g.token_ids.index(close)]) & set(plan.hesitation_ids)
    assert sum(g.guards["hesitation_fired"] for g in g_ox) >= 1
    genai = OnnxCausalLM(tiny_onnx["onnx"], engine="genai", threads=1)
    ids = ox.tokenize(prompts[0])
    out = genai.generate(ids, len(g_ox[0].token_ids), guard=plan.new_request(ids))
    assert out.token_ids == g_ox[0].token_ids
    genai.close()
