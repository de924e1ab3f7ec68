"""The rqat-deploy command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rqat_deploy.quant.checkpoint import load_model, read_checkpoint
from rqat_deploy.cli import cli


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return res.exit_code, res.output


def test_help_is_instant_and_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "from rqat_deploy.cli import main; import sys; sys.argv=['rqat-deploy','--help']; main()"],
        capture_output=True, text=True,
    )
    assert "train" in out.stdout and "inspect" in out.stdout
    assert "| torch" not in out.stderr and "transformers" not in out.stderr  # nothing heavy imported


@pytest.mark.parametrize("bits, grid", [("2", "uniform"), ("3", "kquant")])
def test_train_rtn_end_to_end(tiny_qwen3_dir: Path, tmp_path: Path, bits: str, grid: str) -> None:
    code, out = run("train", "--model", str(tiny_qwen3_dir), "--recipe", "rtn", "--bits", bits, "--grid", grid,
                    "--out", str(tmp_path / "ck"))
    assert code == 0, out
    ckpt = read_checkpoint(tmp_path / "ck")
    assert (ckpt.meta.bits, ckpt.meta.grid, ckpt.meta.recipe["name"]) == (int(bits), grid, "rtn")
    assert len(ckpt.meta.modules) == 14
    model, tok = load_model(tmp_path / "ck")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([tok("1 + 1 = 2")["input_ids"]])).logits).all()
    code, out = run("inspect", str(tmp_path / "ck"), "--json")
    info = json.loads(out)
    assert info["bits"] == int(bits) and info["quantized_modules"] == 14 and info["bits_per_weight"] > int(bits)


def test_config_file_then_flags_override(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{tiny_qwen3_dir}"\nrecipe = "rtn"\nbits = "3"\ngroup-size = 64\n')
    code, out = run("train", "--config", str(cfg), "--bits", "2", "--out", str(tmp_path / "ck"))
    assert code == 0, out
    meta = read_checkpoint(tmp_path / "ck").meta
    assert (meta.bits, meta.group_size) == (2, 64)  # flag beats file; file beats default


def test_errors_are_one_clean_line(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    code, out = run("train", "--model", str(tiny_qwen3_dir), "--recipe", "rtn", "--out", str(tmp_path / "ck"))
    assert code == 2 and "already exists" in out and "--force" in out and "Traceback" not in out
    code, out = run("train", "--model", str(tmp_path / "nope"), "--recipe", "rtn", "--out", str(tmp_path / "o"))
    assert code == 2 and "does not exist" in out
    code, out = run("train", "--model", str(tiny_qwen3_dir), "--out", str(tmp_path / "o"))  # default data: Hub
    assert code == 2 and "could not load dataset" in out and "local JSONL" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no output, no empty work dir left
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"grup_size": 64}))
    res = CliRunner().invoke(cli, ["train", "--config", str(bad), "--model", "x", "--out", "y"])
    assert res.exit_code == 2 and "did you mean 'group_size'" in res.output
