"""``bench --reference``: next-token KL to a reference and top-1 agreement (serve/fidelity.py).

The models: the built-in tiny teacher and its RTN int2 student (uniform, group 128), in
transformers (the checkpoint), llama.cpp (the student as an exact Q4_0 GGUF against an F32 GGUF of
the teacher) and ONNX Runtime (the student's export, fp32 activations).

Measured here on the 12 questions below (437 positions), KL / top-1: transformers 0.33450 / 0.7941,
ONNX Runtime 0.33450 / 0.7941 (5e-7 relative apart), llama.cpp 0.33370 / 0.7986: its Q4_0 matmuls
round activations to Q8_0, 2.4e-3 relative in the mean KL and 2 positions in agreement (on 40
held-out problems, 1,530 positions: 0.31823 / 0.7980 vs 0.31834 / 0.7987). The tolerances used
between runtimes: 2e-2 relative on the mean KL, 0.02 on the agreement rate.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from rqat_deploy.builtin import synth
from rqat_deploy.errors import ConfigError
from rqat_deploy.serve.bench import BenchConfig, run_bench
from rqat_deploy.serve.fidelity import compare_to_reference, next_token_divergence
from rqat_deploy.serve.runtimes import Runtime, load_runtime

KL_RTOL = 2e-2  # between runtimes, on the mean KL (measured 2.4e-3 for llama.cpp Q4_0)
TOP1_ATOL = 0.02  # between runtimes, on the agreement rate (measured 0.0046)
QUESTIONS = [
    "Start with 7. Add 5, then multiply by 3.", "Compute 9 + 4 * 6.", "Alice has 7 apples. She buys 5 more.",
    "Start with 12. Subtract 4, then add 9.", "Compute 45 - 17.", "Bob has 30 marbles. He gives away 12.",
    "Start with 3. Multiply by 8, then subtract 5.", "Compute 6 * 7 + 2.", "Carol has 14 books. She buys 9 more.",
    "Start with 50. Subtract 25, then add 3.", "Compute 81 - 9 * 4.", "David has 8 coins. He finds 11 more.",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The built-in teacher and its RTN int2 checkpoint."""
    from rqat_deploy.train.run import quantize_rtn

    root = tmp_path_factory.mktemp("fidelity")
    teacher = synth.default_model_dir()
    return {"teacher": teacher, "student": quantize_rtn(teacher, root / "rtn2", bits=2), "root": root}


@pytest.fixture(scope="module")
def transformers_run(models: dict[str, Path]) -> Any:
    """The teacher and the student in transformers, and the student's fidelity there."""
    teacher = load_runtime(str(models["teacher"]), n_threads=1)
    student = load_runtime(str(models["student"]), n_threads=1)
    prompts = [teacher.render_prompt(q) for q in QUESTIONS]
    yield teacher, student, prompts, compare_to_reference(student, teacher, prompts)
    student.close()
    teacher.close()


# ----------------------------------------------------------------------------------- the measure


def test_kl_and_agreement_of_crafted_logits() -> None:
    ref = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 5.0]])
    model = np.array([[math.log(3.0), 0.0], [2.0, 0.0], [5.0, 0.0]])
    kl, agree = next_token_divergence(ref, model)
    # p = (1/2, 1/2) vs q = (3/4, 1/4): 1/2 ln(2/3) + 1/2 ln(2) = 1/2 ln(4/3)
    assert kl[0] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    assert kl[1] == 0.0 and kl[2] > 4.0
    assert agree.tolist() == [True, True, False]  # a tie goes to the lowest id
    big = np.full((1, 50_000), 1e4, dtype=np.float32)  # float64 inside: no overflow, exactly 0
    assert next_token_divergence(big, big)[0].tolist() == [0.0]
    with pytest.raises(ConfigError, match="cannot be compared"):
        next_token_divergence(ref, model[:, :1])


class _Fake(Runtime):
    name = "fake"

    def __init__(self, ids: list[int], vocab: int) -> None:
        super().__init__("fake")
        self.ids, self.vocab = ids, vocab

    def tokenize(self, text: str) -> list[int]:
        return self.ids

    def logits(self, prompt_ids: Any) -> np.ndarray:
        return np.zeros((len(prompt_ids), self.vocab), dtype=np.float32)

    def _generate_one(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("not called")

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name}


def test_a_reference_of_another_vocabulary_fails_clearly() -> None:
    model = _Fake([1, 2, 3], 8)
    assert compare_to_reference(model, _Fake([1, 2, 3], 8), ["p"])["kl_to_reference_mean"] == 0.0
    with pytest.raises(ConfigError, match="vocabulary differs.*from token 1"):
        compare_to_reference(model, _Fake([1, 5, 3], 8), ["p"])
    with pytest.raises(ConfigError, match="vocabulary differs.*: 9 logits vs the model's 8"):
        compare_to_reference(model, _Fake([1, 2, 3], 9), ["p"])


def test_runtimes_without_full_logits_say_so() -> None:
    from rqat_deploy.serve.runtime_vllm import VLLMRuntime

    class NoLogits(_Fake):
        logits = Runtime.logits  # the base class's: not exposed

    with pytest.raises(ConfigError, match="does not expose per-token logits, which --reference needs"):
        NoLogits([1], 2).logits([1])
    with pytest.raises(ConfigError, match="top-k prompt log-probabilities"):
        VLLMRuntime.logits(object.__new__(VLLMRuntime), [1, 2])


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"responses": "r.jsonl", "dataset": "d.jsonl"}, "cannot grade --responses"),
        ({"models": ["m"]}, "needs --dataset"),
        ({"models": ["m"], "dataset": "d.jsonl", "runtime": "vllm"}, "vLLM does not return"),
    ],
)
def test_bench_config_checks_reference(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=f"--reference .*{problem}"):
        BenchConfig(reference="teacher", **kwargs)


# ----------------------------------------------------------------------------------- in runtimes


def test_transformers_self_and_rtn_student(transformers_run: Any) -> None:
    teacher, student, prompts, fid = transformers_run
    same = compare_to_reference(teacher, teacher, prompts)
    assert same["kl_to_reference_mean"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["fidelity"]["n_positions"] == sum(len(teacher.tokenize(p)) for p in prompts)
    assert fid["kl_to_reference_mean"] > 0.05 and 0.5 < fid["top1_agreement"] < 1.0
    assert fid["fidelity"]["kl_to_reference_max"] >= fid["fidelity"]["kl_to_reference_median"] > 0


@pytest.mark.llamacpp
def test_llamacpp_agrees_with_transformers(models: dict[str, Path], transformers_run: Any) -> None:
    pytest.importorskip("llama_cpp")
    from rqat_deploy.exporters.gguf import export_gguf

    root = models["root"]
    export_gguf(models["teacher"], root / "teacher.gguf", embed_type="F32")
    report = export_gguf(models["student"], root / "student.gguf", gguf_type="Q4_0", embed_type="F32")
    assert report.exact
    teacher, student = (load_runtime(str(root / f"{n}.gguf"), n_threads=1) for n in ("teacher", "student"))
    try:
        prompts = transformers_run[2]
        same = compare_to_reference(teacher, teacher, prompts)
        assert same["kl_to_reference_mean"] == 0.0 and same["top1_agreement"] == 1.0
        fid, want = compare_to_reference(student, teacher, prompts), transformers_run[3]
    finally:
        teacher.close()
        student.close()
    assert fid["kl_to_reference_mean"] == pytest.approx(want["kl_to_reference_mean"], rel=KL_RTOL)
    assert fid["kl_to_reference_mean"] != want["kl_to_reference_mean"]  # Q8_0 activations: not bit-equal
    assert abs(fid["top1_agreement"] - want["top1_agreement"]) <= TOP1_ATOL


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai not installed")
def test_onnxruntime_agrees_with_transformers(models: dict[str, Path], transformers_run: Any) -> None:
    import shutil

    from rqat_deploy.exporters.onnx import export_onnx

    # The built-in teacher's config.json names no `architectures`, which the ONNX exporter reads.
    ckpt = Path(shutil.copytree(models["student"], models["root"] / "rtn2-arch"))
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen3ForCausalLM"]}))
    export_onnx(ckpt, models["root"] / "onnx", accuracy_level=0)
    student = load_runtime(str(models["root"] / "onnx"), n_threads=1)
    try:
        fid = compare_to_reference(student, transformers_run[0], transformers_run[2])
    finally:
        student.close()
    want = transformers_run[3]  # fp32 activations: the same function up to float summation order
    assert fid["kl_to_reference_mean"] == pytest.approx(want["kl_to_reference_mean"], rel=1e-4)
    assert abs(fid["top1_agreement"] - want["top1_agreement"]) <= TOP1_ATOL


# ----------------------------------------------------------------------------------- the command


def test_bench_reference_writes_the_report_keys(models: dict[str, Path], tmp_path: Path) -> None:
    from rqat_deploy.cli import cli

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in QUESTIONS[:3]))
    out = tmp_path / "bench"
    res = CliRunner().invoke(cli, [
        "bench", "--model", str(models["teacher"]), "--model", str(models["student"]), "--reference",
        str(models["teacher"]), "--dataset", str(qa), "--greedy", "--max-tokens", "2", "--no-speed", "--threads", "1",
        "--out", str(out),
    ])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["reference"] == str(models["teacher"])
    assert report["reference"]["runtime"] == "transformers" and report["reference"]["files"]
    teacher, student = report["models"]["tiny-reasoner"], report["models"]["rtn2"]
    assert (teacher["kl_to_reference_mean"], teacher["top1_agreement"]) == (0.0, 1.0)
    assert student["kl_to_reference_mean"] > 0 and student["top1_agreement"] < 1
    assert student["fidelity"]["n_prompts"] == 3 and student["fidelity"]["reference_runtime"] == "transformers"
    md = (out / "report.md").read_text()
    assert "## Fidelity to" in md and "| `rtn2` |" in md.split("## Fidelity to")[1]
    plain = run_bench(BenchConfig(models=[str(models["student"])], dataset=str(qa), greedy=True, max_tokens=2,
                                  speed=False, n_threads=1, out_dir=tmp_path / "plain", progress=False, plots=False))
    assert "kl_to_reference_mean" not in plain["models"]["rtn2"] and "reference" not in plain
