"""The built-in path: train without --model, --init-from, float GGUF of the teacher, quickstart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from rqat_deploy.builtin import synth
from rqat_deploy.cli import cli
from rqat_deploy.errors import ConfigError
from rqat_deploy.quant.spec import QuantSpec
from rqat_deploy.train.recipes import BUILTIN_PRESET
from rqat_deploy.train.run import TrainConfig, run_train


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Built-in data generated into a per-test cache (never the user's ~/.cache)."""
    monkeypatch.setenv("RQAT_DEPLOY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_train_without_model_uses_the_builtin_model_data_and_preset(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "ck"
    res = CliRunner().invoke(cli, ["train", "--recipe", "gptq", "--calib-samples", "8", "--calib-seq-len", "64",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "rqat_quant.json").read_text())
    assert meta["base_model"] == synth.default_model_dir().name
    recipe = meta["recipe"]
    assert recipe["model"] is None
    calib = recipe["reports"]["calibration"]
    assert calib["n_samples"] == 8 and calib["seq_len"] == 64  # flags beat the preset
    assert calib["spec"].endswith("reasoning_train.jsonl")  # gptq calibrates on math: the built-in traces (issue 15)
    assert Path(calib["spec"]).parent == cache / f"data-v{synth.DATA_VERSION}"
    for name in ("train_samples", "global_batch", "stage2_lr"):  # defaults became the preset
        assert recipe[name] == BUILTIN_PRESET[name], name
    assert recipe["train_seq_len"] is None  # whole samples up to the context length (issue 15)


def test_init_from_starts_stage2_from_a_stage1_checkpoint(cache: Path, tmp_path: Path) -> None:
    small = dict(calib_samples=8, calib_seq_len=64, train_samples=8, train_seq_len=128, stage1_epochs=1,
                 global_batch=4, stage2_epochs=1, stage2_lr=1e-3)
    s1 = run_train(TrainConfig(out=str(tmp_path / "s1"), recipe="stage1", **small), progress=False)
    assert "stage2" not in json.loads((s1 / "rqat_quant.json").read_text())["recipe"]["reports"]
    out = run_train(TrainConfig(out=str(tmp_path / "s2"), recipe="rqat", init_from=str(s1), **small), progress=False)
    a, b = load_file(str(s1 / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith((".qcodes", ".zeros")))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith(".scales"))
    reports = json.loads((out / "rqat_quant.json").read_text())["recipe"]["reports"]
    assert reports["init_from"]["path"] == str(s1.resolve()) and "stage1" not in reports
    with pytest.raises(ConfigError, match="2-bit uniform"):
        run_train(TrainConfig(out=str(tmp_path / "s3"), recipe="rqat", init_from=str(s1), quant=QuantSpec(bits=3),
                              **small), progress=False)
    with pytest.raises(ConfigError, match="stage 2"):
        TrainConfig(out=str(tmp_path / "s4"), recipe="rtn", init_from=str(s1))


def test_teacher_exports_to_an_exact_f16_gguf(tmp_path: Path) -> None:
    import gguf

    from rqat_deploy.exporters.gguf import export_gguf

    teacher = synth.default_model_dir()
    rep = export_gguf(teacher, tmp_path / "t.gguf", embed_type="F16")
    assert rep.verified and rep.bits == 16 and rep.grid == "float"
    assert all(t.exact for t in rep.tensors) and {t.qtype for t in rep.tensors} == {"F16", "F32"}
    reader = gguf.GGUFReader(str(tmp_path / "t.gguf"))
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    ref = load_file(str(teacher / "model.safetensors"))["model.embed_tokens.weight"]
    assert np.array_equal(np.asarray(emb.data).reshape(ref.shape), ref.numpy())


def test_quickstart_smoke_runs_the_whole_pipeline(cache: Path, tmp_path: Path) -> None:
    """A shortened quickstart: train RTN + rqat, export three GGUFs, bench them in llama.cpp."""
    pytest.importorskip("llama_cpp")
    from rqat_deploy.cli.quickstart import QuickstartConfig, format_table, run_quickstart

    cfg = QuickstartConfig(
        out=str(tmp_path / "qs"), per_level=1, max_tokens=96, threads=1, calib_samples=8, calib_seq_len=128,
        train_samples=8, train_seq_len=192, stage1_epochs=1, global_batch=4, speed=False,
    )
    result = run_quickstart(cfg, progress=False)
    rows = result["rows"]
    assert [r["model"] for r in rows] == ["teacher (fp16)", "llama.cpp's own Q2_K", "RTN int2", "rqat int2"]
    assert [r["gguf_type"] for r in rows] == ["F16", "Q2_K", "Q2_K", "Q2_K"]
    assert [r["exact"] for r in rows] == [True, False, True, True]  # ours: the trained model, bit for bit
    assert [round(r["bits_per_weight"], 3) for r in rows[2:]] == [2.625, 2.625]  # real 2-bit files
    assert rows[2]["file_mb"] < 0.5 * rows[0]["file_mb"]
    report = json.loads((tmp_path / "qs" / "bench" / "report.json").read_text())
    for row, (label, summary) in zip(rows, report["models"].items()):
        responses = (tmp_path / "qs" / "bench" / report["responses_files"][label]).read_text().splitlines()
        graded = [json.loads(line)["correct"] for line in responses]
        assert len(graded) == 4 and row["accuracy"] == sum(graded) / 4
        assert summary["runtime"] == "llama.cpp" and row["thinking_tokens"] > 0
        ratio = row["thinking_tokens"] / rows[0]["thinking_tokens"]  # the inflation column, against the teacher
        assert row["thinking_tokens_ratio"] == pytest.approx(ratio) and len(row["thinking_tokens_ratio_ci"]) == 2
    table = (tmp_path / "qs" / "quickstart.md").read_text()
    assert table.startswith(format_table(result).splitlines()[0]) and "| rqat int2 | Q2_K (exact) | 2.62 |" in table
    with pytest.raises(Exception, match="already exists"):
        run_quickstart(cfg, progress=False)


def test_builtin_spec_word_names_the_builtin_data(cache: Path) -> None:
    from rqat_deploy.builtin.synth import resolve_spec

    root = cache / f"data-v{synth.DATA_VERSION}"
    assert resolve_spec("builtin", "eval") == str(root / "eval_heldout.jsonl")
    rows = (root / "eval_heldout.jsonl").read_text().splitlines()
    assert len(rows) == 4 * synth.DEFAULT_DATA_SIZES["eval_per_level"]
    assert all(synth.split_of(json.loads(r)["key"]) == "heldout" for r in rows)
    assert resolve_spec(None, "train", "builtin") == str(root / "reasoning_train.jsonl")
    assert resolve_spec("x.jsonl", "calib", "builtin") == "x.jsonl" and resolve_spec(None, "calib") is None
