"""Reports, runtimes and the bench driver: crafted records, a fake runtime, and the tiny Qwen3 model
through llama.cpp (F32 GGUF) and transformers (the quantized checkpoint it was exported from)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rqat_deploy.errors import BackendError, ConfigError, DataError
from rqat_deploy.serve import bench as bench_mod
from rqat_deploy.serve.bench import BenchConfig, model_labels, run_bench
from rqat_deploy.serve.report import (
    accuracy_interval,
    compare_models,
    model_info,
    render_markdown,
    summarize_model,
    write_report,
)
from rqat_deploy.data.chat import render_prompt
from rqat_deploy.serve.runtimes import (
    Generation,
    Runtime,
    SamplingParams,
    detect_runtime,
    load_runtime,
)

REQUIRED_FIELDS = (
    "accuracy", "n", "thinking_tokens_mean", "thinking_tokens_correct_mean", "thinking_tokens_incorrect_mean",
    "truncated_fraction",
)
SPEED_FIELDS = ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def qa_file(tmp_path: Path) -> Path:
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(1, 7)]
    return _write_jsonl(tmp_path / "qa.jsonl", rows)


# ----------------------------------------------------------------------------------- statistics


def test_wilson_interval_solves_its_defining_equation() -> None:
    # Wilson bounds p are the roots of (phat - p)^2 = z^2 p (1 - p) / n.
    ci = accuracy_interval([0.7], 7, 10)
    z, phat, n = 1.959964, 0.7, 10
    for p in (ci["low"], ci["high"]):
        assert (phat - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, rel=1e-6)
    assert ci["low"] < phat < ci["high"] and "wilson" in ci["method"]


def test_seed_interval_is_t_based() -> None:
    ci = accuracy_interval([0.5, 0.6, 0.7], 18, 30)
    # mean 0.6, sample std 0.1, t(0.975, df=2) = 4.303
    assert ci["std"] == pytest.approx(0.1)
    assert ci["low"] == pytest.approx(0.6 - 4.303 * 0.1 / math.sqrt(3), abs=1e-6)
    assert ci["high"] == pytest.approx(0.6 + 4.303 * 0.1 / math.sqrt(3), abs=1e-6)
    assert accuracy_interval([], 0, 0)["low"] is None


def _rec(index: int, seed: int, correct: bool | None, think: int, truncated: bool = False, restarts: int = 0) -> dict:
    return {
        "index": index, "seed": seed, "correct": correct, "thinking_tokens": think, "truncated": truncated,
        "restarts": restarts, "extracted": "1", "response": "text", "thinking_token_unit": "ids",
    }


def test_summary_fields_and_splits() -> None:
    records = [
        _rec(0, 0, True, 10), _rec(1, 0, False, 30, truncated=True, restarts=3), _rec(0, 1, True, 20),
        _rec(1, 1, True, 40, restarts=1),
    ]
    s = summarize_model(records, info={"path": "m"})
    assert s["n"] == 2 and s["n_responses"] == 4
    assert s["accuracy"] == pytest.approx(0.75)
    assert s["accuracy_per_seed"] == {"0": 0.5, "1": 1.0}
    assert s["thinking_tokens_mean"] == pytest.approx(25.0)
    assert s["thinking_tokens_correct_mean"] == pytest.approx((10 + 20 + 40) / 3)
    assert s["thinking_tokens_incorrect_mean"] == pytest.approx(30.0)
    assert s["truncated_fraction"] == pytest.approx(0.25)
    assert s["restarts_mean"] == pytest.approx(1.0) and s["restarts_incorrect_mean"] == 3
    assert s["accuracy_ci_method"] == "t over 2 seeds"
    assert all("response" not in r for r in s["raw"]) and len(s["raw"]) == 4
    for key in SPEED_FIELDS:  # no runtime measurements in these records
        assert s[key] is None


def test_compare_ratios_and_zero_baseline() -> None:
    models = {
        "bf16": {"accuracy": 0.8, "thinking_tokens_mean": 100.0, "decode_tokens_per_s": 50.0, "truncated_fraction": 0.0},
        "int2": {"accuracy": 0.6, "thinking_tokens_mean": 230.0, "decode_tokens_per_s": 150.0, "truncated_fraction": 0.1},
    }
    comp = compare_models(models, "bf16")
    r = comp["ratios"]["int2"]
    assert r["accuracy"] == pytest.approx(0.75) and r["thinking_tokens_mean"] == pytest.approx(2.3)
    assert r["decode_tokens_per_s"] == pytest.approx(3.0)
    assert r["truncated_fraction"] is None  # baseline 0
    assert r["ttft_s"] is None  # missing


def test_write_report_files(tmp_path: Path) -> None:
    records = [_rec(i, 0, i % 2 == 0, 10 * (i + 1)) for i in range(6)]
    report = {
        "created": "now", "dataset": {"spec": "x.jsonl", "n": 6}, "config": {"runtime": None, "seeds": 1},
        "models": {"a": summarize_model(records, info={"bits": 2, "bits_per_weight": 2.19}),
                   "b": summarize_model(records[:4], info={"bits": 16})},
    }
    report["compare"] = compare_models(report["models"], "a")
    paths = write_report(report, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(REQUIRED_FIELDS) <= set(data["models"]["a"])
    md = (tmp_path / "report.md").read_text()
    assert "| `a` |" in md and "Ratios to `a`" in md
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"
    if pytest.importorskip("matplotlib"):
        names = sorted(p.name for p in paths["plots"])
        assert names == ["accuracy_vs_bits.png", "thinking_tokens.png", "thinking_tokens_by_model.png"]
        for p in paths["plots"]:
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert render_markdown(report) == md


def test_model_labels() -> None:
    assert model_labels(["/a/m.gguf", "/b/ckpt/"]) == ["m.gguf", "ckpt"]
    assert model_labels(["/x/a/model", "/y/b/model"]) == ["a/model", "b/model"]
    assert model_labels(["m.gguf", "m.gguf"]) == ["m.gguf#0", "m.gguf#1"]


# ------------------------------------------------------------------------------------ grade only


def test_grade_only_groups_orders_and_errors(tmp_path: Path, qa_file: Path) -> None:
    rows = [
        {"model": "good", "response": "<think>a b c</think>\\boxed{2}"},  # index 0 by order
        {"model": "good", "response": "<think>Wait, x</think>\\boxed{4}"},
        {"model": "good", "index": 3, "response": "<think>never closed", "finish_reason": "length"},
        {"model": "bad", "index": 0, "response": "<think>p</think>\\boxed{3}"},
    ]
    resp = _write_jsonl(tmp_path / "r.jsonl", rows)
    report = run_bench(BenchConfig(dataset=str(qa_file), responses=str(resp), out_dir=tmp_path / "out", progress=False,
                                   plots=False))
    good, bad = report["models"]["good"], report["models"]["bad"]
    assert good["n"] == 3 and good["accuracy"] == pytest.approx(2 / 3)
    assert [r["index"] for r in good["raw"]] == [0, 1, 3]
    assert good["thinking_tokens_correct_mean"] == pytest.approx((3 + 3) / 2)  # `Wait , x` is 3
    assert good["truncated_fraction"] == pytest.approx(1 / 3)
    assert good["restarts_mean"] == pytest.approx(1 / 3)
    assert bad["accuracy"] == 0.0
    assert report["compare"]["baseline"] == "good"
    assert (tmp_path / "out" / "report.json").exists()

    with pytest.raises(DataError, match="outside the dataset"):
        run_bench(BenchConfig(dataset=str(qa_file), responses=str(_write_jsonl(tmp_path / "x.jsonl", [{"index": 9, "response": "1"}])),
                              out_dir=tmp_path / "o2", progress=False))
    with pytest.raises(DataError, match="gold"):
        run_bench(BenchConfig(responses=str(resp), out_dir=tmp_path / "o3", progress=False))
    with pytest.raises(ConfigError, match="not both"):
        BenchConfig(models=["m.gguf"], dataset=str(qa_file), responses=str(resp), out_dir=tmp_path / "o4")
    with pytest.raises(ConfigError, match="nothing"):
        BenchConfig(dataset=str(qa_file), out_dir=tmp_path / "o5")


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"seeds": 0}, "--seeds"),
        ({"max_tokens": 0}, "--max-tokens"),
        ({"limit": 0}, "--limit"),
        ({"temperature": 0.0}, "--temperature"),
        ({"top_k": -1}, "--top-k"),
        ({"top_p": 1.5}, "--top-p"),
        ({"grader": "sympy"}, "--grader"),
        ({"runtime": "onnx"}, "--runtime"),
        ({"concurrency": 0}, "--concurrency"),
        ({"n_threads": 0}, "--threads"),
        ({"compare": True}, "--compare"),
        ({"speed_tokens": 1}, "speed_tokens"),
    ],
)
def test_bench_config_names_the_bad_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        BenchConfig(models=["m.gguf"], **kwargs)


def test_bench_config_is_frozen_and_normalized(tmp_path: Path) -> None:
    cfg = BenchConfig(responses=str(tmp_path / "r.jsonl"), out_dir=str(tmp_path), restart_patterns=["Hmm"],
                      temperature=0.0, greedy=True)
    assert cfg.responses == (str(tmp_path / "r.jsonl"),) and cfg.models == () and cfg.grade_only
    assert cfg.out_dir == tmp_path and cfg.restart_patterns == ("Hmm",)
    assert cfg.sampling(3) == SamplingParams(temperature=0.0, greedy=True, seed=3)
    assert cfg.report_config()["restart_patterns"] == ["Hmm"] and cfg.report_config()["limit"] is None
    with pytest.raises(AttributeError):
        cfg.seeds = 2  # type: ignore[misc]


def test_cli_bench_refuses_bad_flags_before_any_work(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from rqat_deploy.cli import cli

    for args, flag in ((["--model", "a.gguf", "--seeds", "0"], "--seeds"), (["--model", "a.gguf", "--compare"], "--compare"),
                       ([], "--model")):
        res = CliRunner().invoke(cli, ["bench", *args, "--dataset", "builtin", "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and flag in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- fake runtime path


class FakeRuntime(Runtime):
    """Answers `What is i + i?` with a crafted thinking trace; wrong on odd i."""

    name = "fake"

    def __init__(self, model_path: str, fail_after: int | None = None, **_: Any) -> None:
        super().__init__(model_path)
        self.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
        self.calls = 0
        self.fail_after = fail_after

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def _generate_one(self, prompt_ids: list[int], sampling: SamplingParams, seed: int, *, ignore_eos: bool = False) -> Generation:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        prompt = "".join(chr(i) for i in prompt_ids)
        i = int(prompt.split("What is ")[1].split(" ")[0]) if "What is " in prompt else 1
        answer = 2 * i if i % 2 == 0 else 2 * i + 1
        text = "<think>" + "step " * i + "</think> \\boxed{" + str(answer) + "}"
        n = min(sampling.max_tokens, len(text))
        return Generation(text, list(range(n)), len(prompt_ids), n, "stop", 0.01, 0.02, 1000.0, 100.0)

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "device": "none"}


def test_bench_with_fake_runtime_seeds_and_compare(tmp_path: Path, qa_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_mod, "load_runtime", lambda model, runtime=None, **kw: FakeRuntime(model))
    report = run_bench(BenchConfig(
        models=["first", "second"], dataset=str(qa_file), limit=4, seeds=2, max_tokens=64, out_dir=tmp_path / "o",
        speed_prompt_tokens=8, speed_tokens=4, speed_repeats=2, progress=False, hashes=False, plots=False,
    ))
    m = report["models"]["first"]
    assert m["n"] == 4 and m["n_responses"] == 8
    assert m["accuracy"] == pytest.approx(0.5)  # i = 2, 4 right; 1, 3 wrong
    assert m["thinking_tokens_correct_mean"] == pytest.approx((2 + 4) / 2)  # words in "step step ..."
    assert m["thinking_tokens_incorrect_mean"] == pytest.approx((1 + 3) / 2)
    assert m["thinking_token_unit"] == "regex-words"  # the fake runtime has no think ids
    assert m["accuracy_ci_method"] == "t over 2 seeds"
    assert m["speed"]["repeats"] == 2 and m["decode_tokens_per_s"] == pytest.approx(100.0)
    assert report["compare"]["ratios"]["second"]["accuracy"] == pytest.approx(1.0)
    lines = (tmp_path / "o" / "responses" / "first.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["model"] == "first"


def test_speed_only_without_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_mod, "load_runtime", lambda model, runtime=None, **kw: FakeRuntime(model))
    report = run_bench(BenchConfig(models=["m"], out_dir=tmp_path / "o", speed_prompt_tokens=8, speed_tokens=4,
                                   speed_repeats=3, progress=False, hashes=False))
    m = report["models"]["m"]
    assert m["n"] == 0 and m["accuracy"] is None and m["speed"]["repeats"] == 3
    assert m["ttft_s"] == pytest.approx(0.01) and m["prefill_tokens_per_s"] == pytest.approx(1000.0)
    assert "| `m` |" in (tmp_path / "o" / "report.md").read_text()


def test_ctrl_c_keeps_finished_responses(tmp_path: Path, qa_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The speed run makes 1 warm-up + 1 measured call; then 3 generations finish before Ctrl-C.
    monkeypatch.setattr(bench_mod, "load_runtime", lambda model, runtime=None, **kw: FakeRuntime(model, fail_after=5))
    report = run_bench(BenchConfig(
        models=["a", "b"], dataset=str(qa_file), max_tokens=64, out_dir=tmp_path / "o", speed_prompt_tokens=8,
        speed_tokens=4, speed_repeats=1, progress=False, hashes=False, plots=False,
    ))
    assert report["interrupted"] is True
    assert list(report["models"]) == ["a"]  # the second model never started
    assert report["models"]["a"]["n_responses"] == 3
    saved = json.loads((tmp_path / "o" / "report.json").read_text())
    assert saved["interrupted"] is True and saved["models"]["a"]["n"] == 3
    assert len((tmp_path / "o" / "responses" / "a.jsonl").read_text().splitlines()) == 3


# ------------------------------------------------------------------------------------- runtimes


def test_sampling_params_validation() -> None:
    assert SamplingParams().temperature == 0.6 and SamplingParams().top_k == 20
    for bad in ({"max_tokens": 0}, {"temperature": 0.0}, {"top_k": -1}, {"top_p": 0.0}):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)
    assert SamplingParams(greedy=True, temperature=0.0).greedy
    s = SamplingParams(seed=3)
    assert s.seed_for(5) != s.seed_for(6) and s.seed_for(5) != SamplingParams(seed=4).seed_for(5)


def test_detect_and_load_errors(tmp_path: Path) -> None:
    assert detect_runtime("x/model.GGUF") == "llama.cpp" and detect_runtime("x/dir") == "transformers"
    with pytest.raises(ConfigError, match="unknown runtime"):
        load_runtime("m", "onnx")
    with pytest.raises(ConfigError, match="GGUF"):
        load_runtime(str(tmp_path), "llama.cpp")
    with pytest.raises(ConfigError, match="not a GGUF"):
        load_runtime("m.gguf", "transformers")


def test_runtime_modules_import_no_runtime_package() -> None:
    # Each runtime imports llama_cpp / transformers / vllm / onnxruntime when it loads a model, not at import.
    code = (
        "import sys, rqat_deploy.serve.bench, rqat_deploy.serve.runtimes as r\n"
        "[r.runtime_class(n) for n in r.RUNTIMES]\n"
        "print(sorted(m for m in ('torch', 'transformers', 'llama_cpp', 'vllm', 'onnxruntime', 'onnxruntime_genai') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout
    assert out.strip() == "[]"


def test_vllm_clear_error_without_vllm_or_gpu() -> None:
    try:
        import torch
        import vllm  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("vLLM and a GPU are present")
    except ImportError:
        pass
    with pytest.raises(BackendError, match="vllm|vLLM"):
        load_runtime("some/model", "vllm")


def test_render_prompt_thinking_switch() -> None:
    from rqat_deploy.builtin.tiny import CHAT_TEMPLATE

    on = render_prompt(CHAT_TEMPLATE, "hi")
    off = render_prompt(CHAT_TEMPLATE, "hi", enable_thinking=False)
    assert on == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    assert render_prompt(None, "plain") == "plain"
    with pytest.raises(ConfigError, match="chat template"):
        render_prompt("{{ raise_exception('no system role') }}", "x")


# ------------------------------------------------------------------- tiny model, both runtimes


@pytest.fixture(scope="module")
def tiny_exports(tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Qwen3 as a 2-bit RTN checkpoint and its exact F32 GGUF (same dequantized weights)."""
    from rqat_deploy.exporters.gguf import export_gguf
    from rqat_deploy.train.run import quantize_rtn

    root = tmp_path_factory.mktemp("bench_tiny")
    ckpt = quantize_rtn(tiny_qwen3_dir, root / "ckpt", bits=2)
    gguf_path = root / "tiny-f32.gguf"
    export_gguf(ckpt, gguf_path, gguf_type="F32", embed_type="F32")
    return {"hf": tiny_qwen3_dir, "ckpt": ckpt, "gguf": gguf_path}


@pytest.fixture(scope="module")
def both_runtimes(tiny_exports: dict[str, Path]) -> Any:
    pytest.importorskip("llama_cpp")
    # One thread each: the CI machine is shared, and llama.cpp's spinning threads suffer most.
    ll = load_runtime(str(tiny_exports["gguf"]), n_threads=1, f32_kv_cache=True)
    tr = load_runtime(str(tiny_exports["ckpt"]), n_threads=1)
    yield ll, tr
    ll.close()
    tr.close()


QUESTIONS = ["What is 12 + 30?", "Alice buys 3 apples and Bob buys 4. How many apples?"]


@pytest.mark.llamacpp
def test_same_prompt_tokens_and_greedy_tokens(both_runtimes: Any) -> None:
    ll, tr = both_runtimes
    assert ll.think_ids == tr.think_ids is not None
    for q in QUESTIONS:
        p_ll, p_tr = ll.render_prompt(q), tr.render_prompt(q)
        assert p_ll == p_tr and p_ll.endswith("<|im_start|>assistant\n")
        assert ll.tokenize(p_ll) == tr.tokenize(p_tr)
    prompts = [tr.render_prompt(q) for q in QUESTIONS]
    greedy = SamplingParams(greedy=True, max_tokens=20)
    g_ll, g_tr = ll.generate(prompts, greedy), tr.generate(prompts, greedy)
    for a, b in zip(g_ll, g_tr):
        assert len(set(a.token_ids)) > 3  # a real sequence, not one token repeated
        assert a.token_ids == b.token_ids
        assert a.text == b.text and a.finish_reason == b.finish_reason
        assert a.n_prompt_tokens == b.n_prompt_tokens
        assert a.ttft_s is not None and b.ttft_s is not None and a.ttft_s > 0 and b.ttft_s > 0
    # The logits behind those tokens agree closely (F32 weights, F32 KV cache).
    ids = ll.tokenize(prompts[0])
    import numpy as np

    lg_ll, lg_tr = ll.logits(ids), tr.logits(ids)
    assert lg_ll.shape == lg_tr.shape
    assert np.max(np.abs(lg_ll - lg_tr)) <= 1e-3 * max(1.0, float(np.max(np.abs(lg_tr))))


@pytest.mark.llamacpp
def test_seeded_sampling_is_reproducible(both_runtimes: Any) -> None:
    ll, tr = both_runtimes
    prompt = [tr.render_prompt(QUESTIONS[0])]
    for rt in (ll, tr):
        a = rt.generate(prompt, SamplingParams(max_tokens=10), seeds=[7])[0].token_ids
        b = rt.generate(prompt, SamplingParams(max_tokens=10), seeds=[7])[0].token_ids
        c = rt.generate(prompt, SamplingParams(max_tokens=10), seeds=[8])[0].token_ids
        assert a == b and a != c, rt.name


@pytest.mark.llamacpp
def test_speed_measurement(both_runtimes: Any) -> None:
    ll, tr = both_runtimes
    for rt, conc in ((ll, 1), (tr, 2)):
        sp = rt.speed("Count the marbles in the bag.", n_prompt_tokens=24, n_tokens=4, repeats=2, concurrency=conc)
        assert [r["prompt_tokens"] for r in sp["repetitions"]] == [24, 24]
        assert [r["completion_tokens"] for r in sp["repetitions"]] == [4, 4]
        for key in SPEED_FIELDS:
            assert sp[key]["n"] == 2 and sp[key]["median"] > 0
    assert sp["throughput"]["generated_tokens"] == 8


@pytest.mark.llamacpp
def test_bench_end_to_end_gguf_and_checkpoint(tiny_exports: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"
    if not data.exists():
        pytest.skip("shared benchmark data absent")
    out = tmp_path / "bench"
    report = run_bench(BenchConfig(
        models=[str(tiny_exports["gguf"]), str(tiny_exports["ckpt"])], dataset=str(data), limit=2, max_tokens=6,
        greedy=True, out_dir=out, speed_prompt_tokens=16, speed_tokens=3, speed_repeats=1, n_threads=1, progress=False,
    ))
    assert list(report["models"]) == ["tiny-f32.gguf", "ckpt"]
    gg, ck = report["models"]["tiny-f32.gguf"], report["models"]["ckpt"]
    for m in (gg, ck):
        assert set(REQUIRED_FIELDS + SPEED_FIELDS) <= set(m)
        assert {"thinking_tokens_ratio", "thinking_tokens_ratio_ci", "loop_fraction", "unclosed_thinking_fraction",
                "answer_seen_then_lost_fraction"} <= set(m)  # inflation (DESIGN.md 9), in both runtimes
        assert m["n"] == 2 and m["truncated_fraction"] is not None
        assert all(m[k] is not None and m[k] > 0 for k in SPEED_FIELDS)
    assert gg["runtime"] == "llama.cpp" and ck["runtime"] == "transformers"
    assert gg["bits"] == 32 and ck["bits"] == 2
    assert gg["files"]["tiny-f32.gguf"]["sha256"] and "model.safetensors" in ck["files"]
    # Same greedy tokens in both runtimes -> identical per-response measurements.
    for a, b in zip(gg["raw"], ck["raw"]):
        assert (a["thinking_tokens"], a["n_completion_tokens"], a["correct"]) == (b["thinking_tokens"], b["n_completion_tokens"], b["correct"])
    assert report["compare"]["baseline"] == "tiny-f32.gguf"
    saved = json.loads((out / "report.json").read_text())
    assert saved["packages"]["llama-cpp-python"] and saved["environment"]["cpu_count"]
    assert (out / "report.md").exists()
    # The responses file is a valid grade-only input and re-grades to the same numbers.
    regrade = run_bench(BenchConfig(dataset=str(data), limit=2, max_tokens=6,
                                    responses=str(out / report["responses_files"]["ckpt"]),
                                    out_dir=tmp_path / "regrade", progress=False, plots=False))
    r = regrade["models"]["ckpt"]
    assert (r["accuracy"], r["truncated_fraction"]) == (ck["accuracy"], ck["truncated_fraction"])


def test_model_info_bits(tiny_exports: dict[str, Path]) -> None:
    hf = model_info(str(tiny_exports["hf"]), hashes=False)
    assert hf["kind"] == "hf" and hf["bits"] == 32
    ck = model_info(str(tiny_exports["ckpt"]), hashes=False)
    assert ck["kind"] == "checkpoint" and ck["bits"] == 2 and ck["bits_per_weight"] == pytest.approx(2 + (16 + 2) / 128)  # fp16 scale + 2-bit zero per group
    gg = model_info(str(tiny_exports["gguf"]))
    assert gg["kind"] == "gguf" and gg["bits_per_weight"] == pytest.approx(32.0)
    assert len(gg["files"]["tiny-f32.gguf"]["sha256"]) == 64


def test_transformers_ignores_the_models_generation_defaults(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    # A generation_config.json that says top_k=1 would make every seed give the same tokens if it
    # leaked into sampling; SamplingParams must be the only source of sampling settings.
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_qwen3_dir, model_dir)
    cfg = json.loads((model_dir / "generation_config.json").read_text())
    cfg.update({"do_sample": True, "top_k": 1, "temperature": 0.05, "top_p": 0.1})
    (model_dir / "generation_config.json").write_text(json.dumps(cfg))
    rt = load_runtime(str(model_dir), n_threads=1)
    assert rt.model_generation_config["top_k"] == 1  # recorded, not used
    prompt = [rt.render_prompt(QUESTIONS[0])]
    outs = {tuple(rt.generate(prompt, SamplingParams(max_tokens=8), seeds=[s])[0].token_ids) for s in range(3)}
    assert len(outs) > 1
    greedy = SamplingParams(greedy=True, max_tokens=8)
    assert rt.generate(prompt, greedy)[0].token_ids == rt.generate(prompt, greedy, seeds=[5])[0].token_ids
    rt.close()
