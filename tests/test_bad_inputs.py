"""The bad-input corpus (issue 17): tampered checkpoints, unsafe paths, diverging runs, concurrent
writers, signals, bad grade files and every failure that used to print a traceback.

Each test names the issue item it covers. Every probe asserts the clear error (one ``error:`` line,
exit code 2, no traceback, through the CLI where a user meets it) and that no file was lost or left
behind (temporaries, locks, half outputs).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import rqat_deploy.exporters.gguf as gguf_mod
from rqat_deploy.cli import cli
from rqat_deploy.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DivergenceError,
    ExportError,
    OutputError,
    OutputExistsError,
)
from rqat_deploy.files import clean_stale, output_lock, staged_dir
from rqat_deploy.quant.checkpoint import QUANT_FILE, read_checkpoint
from rqat_deploy.train.run import quantize_rtn

M = "model.layers.0.self_attn.q_proj"  # a quantized module of the tiny Qwen3


# ----------------------------------------------------------------------------------------- helpers


def run(*args: str) -> tuple[int, str]:
    """The CLI in process; exceptions that escape it fail the test (they would be tracebacks)."""
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.output


def one_error(code: int, out: str, *needles: str, exit_code: int = 2) -> str:
    """Assert one ``error:`` line holding every needle, the exit code, and no traceback."""
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == exit_code and "Traceback" not in out and len(lines) == 1, out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def hidden(folder: Path) -> list[str]:
    """Temporaries and locks our writers leave beside their outputs (names starting with '.')."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def tamper(
    src: Path,
    dst: Path,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
    config: Callable[[dict[str, Any]], None] | None = None,
    meta: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """A copy of checkpoint ``src`` with its tensors, config.json or rqat_quant.json edited in place."""
    shutil.copytree(src, dst)
    for fname, edit in (("config.json", config), (QUANT_FILE, meta)):
        if edit is not None:
            data = json.loads((dst / fname).read_text())
            edit(data)
            (dst / fname).write_text(json.dumps(data))
    if tensors is not None:
        sd = load_file(dst / "model.safetensors")
        tensors(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to prove nothing was changed or lost)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ckpts(tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    return {
        "u2": quantize_rtn(tiny_qwen3_dir, root / "u2", bits=2),
        "k2": quantize_rtn(tiny_qwen3_dir, root / "k2", bits=2, grid="kquant"),
    }


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    f.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(4)))
    return f


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("traces") / "traces.jsonl"
    rows = []
    for i in range(240):
        a, b = i % 50 + 1, (7 * i) % 40 + 1
        answer = f"<think>\n{a} + {b} = {a + b}.\n</think>\n\nThe answer is \\boxed{{{a + b}}}."
        rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                  {"role": "assistant", "content": answer}]})
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def bench_args(model: Path, qa: Path, out: Path) -> list[str]:
    return ["bench", "--model", str(model), "--runtime", "transformers", "--dataset", str(qa), "--limit", "1",
            "--max-tokens", "2", "--greedy", "--no-speed", "--out", str(out)]


def export_args(ckpt: Path, fmt: str, out: Path, *extra: str) -> list[str]:
    more = ["--gguf-type", "Q4_0"] if fmt == "gguf" and "--gguf-type" not in extra else []
    return ["export", str(ckpt), "--format", fmt, "--out", str(out), *more, *extra]


# ------------------------------------------------------------- 1. incomplete checkpoints are refused


def _drop_embed(t: dict) -> None:
    del t["model.embed_tokens.weight"]


def _rows(t: dict) -> None:
    for s in ("qcodes", "scales", "zeros"):
        t[f"{M}.{s}"] = t[f"{M}.{s}"][:64].contiguous()


def _both(t: dict) -> None:
    t[f"{M}.weight"] = torch.zeros(t[f"{M}.qcodes"].shape)  # a float copy beside the codes: duplicated GGUF name


TAMPERED = {  # name: (tamper kwargs, what the error line names)
    "embedding missing": ({"tensors": _drop_embed}, "model.embed_tokens.weight"),
    "module not listed": ({"meta": lambda m: m["modules"].remove(M)}, f"{M}.qcodes"),
    "qcodes rows": ({"tensors": _rows}, f"{M}.qcodes"),
    "hidden_size": ({"config": lambda c: c.update(hidden_size=512)}, "config.json"),
    "float and codes": ({"tensors": _both}, f"{M}.weight"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
@pytest.mark.parametrize("command", ["compressed-tensors", "gguf", "bench"])
def test_incomplete_checkpoint_is_refused(ckpts: dict, qa: Path, tmp_path: Path, case: str, command: str) -> None:
    """Item 1: a checkpoint lacking tensors, with unlisted quantization tensors, wrong shapes or a
    disagreeing config.json is refused on open by every exporter and by bench, naming the tensor."""
    edit, needle = TAMPERED[case]
    bad = tamper(ckpts["u2"], tmp_path / "bad", **edit)
    out = tmp_path / "out"
    args = bench_args(bad, qa, out) if command == "bench" else export_args(bad, command, out)
    one_error(*run(*args), needle)
    assert not out.exists() and hidden(tmp_path) == []


def test_verify_on_write_refuses_non_finite_values(ckpts: dict, tmp_path: Path) -> None:
    """Item 1: verify-on-write fails on a weight that decodes to Inf (here an embedding beyond F16),
    where inf == inf used to pass."""
    big = tamper(ckpts["u2"], tmp_path / "big", tensors=lambda t: t["model.embed_tokens.weight"].__setitem__((5, 3), 1e6))
    out = tmp_path / "m.gguf"
    one_error(*run(*export_args(big, "gguf", out, "--embed-type", "F16")), "token_embd.weight", "NaN or Inf", "F32")
    assert not out.exists() and hidden(tmp_path) == []
    code, text = run(*export_args(big, "gguf", out, "--embed-type", "F32"))  # the fix the message names
    assert code == 0 and out.is_file(), text


# ------------------------------------------------------------------------- 2. diverged training


def test_diverging_stage2_is_stopped_and_nothing_saved(tiny_qwen3_dir: Path, ckpts: dict, traces: Path,
                                                       tmp_path: Path) -> None:
    """Item 2: `train --init-from CK --stage2-lr 1e9` used to exit 0 with every scale at 65504."""
    out = tmp_path / "ck"
    code, text = run("train", "--model", tiny_qwen3_dir, "--init-from", ckpts["u2"], "--out", out,
                     "--train-data", traces, "--train-samples", "32", "--train-seq-len", "64", "--global-batch", "4",
                     "--stage2-lr", "1e9", "--no-teacher-cache")
    one_error(code, text, "diverged", "fp16 limit 65504", "--stage2-lr", "no checkpoint is written")
    assert not out.exists() and hidden(tmp_path) == []


def test_loss_far_above_its_start_stops_and_keeps_the_last_good_state(ckpts: dict, traces: Path, tmp_path: Path) -> None:
    """Item 2: a loss ten times its start stops stage 2; the state on disk stays the last good one."""
    from rqat_deploy.data.sft import build_sft
    from rqat_deploy.quant.checkpoint import load_model
    from rqat_deploy.train.stage2 import STATE_FILE, Stage2Config, run_stage2
    from rqat_deploy.train.teacher import LiveTeacher

    student, tok = load_model(ckpts["u2"], form="stage2")
    teacher, _ = load_model(ckpts["u2"])  # the student's own weights: a low, stable starting loss
    data = build_sft(tok, str(traces), 24, 64, 0)
    saved: dict[str, torch.Tensor] = {}

    def blow_up(done: int, _metrics: dict) -> None:  # after step 2 is saved, the model goes bad (sharp logits)
        if done == 2:
            saved.update({n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad})
            with torch.no_grad():
                student.get_input_embeddings().weight.mul_(50.0)

    cfg = Stage2Config(lr=1e-4, global_batch=2, micro_batch=2, save_every=1, eval_samples=0, max_steps=8,
                       autocast_dtype=None)
    with pytest.raises(DivergenceError, match=r"step 2: the loss .* more than 10 times .*last good state \(step 2\)"):
        run_stage2(student, data, LiveTeacher(teacher), cfg, state_dir=tmp_path / "s2", progress=False, on_step=blow_up)
    state = torch.load(tmp_path / "s2" / STATE_FILE, weights_only=True)
    assert state["step"] == 2 and all(torch.equal(state["params"][n], saved[n]) for n in saved)
    assert hidden(tmp_path / "s2") == []


# ------------------------------------------------------------------------ 3. NaN / Inf scales


NON_FINITE = {  # name: (checkpoint, tensor, value)
    "kquant dmin inf": ("k2", f"{M}.dmin", math.inf),
    "uniform scales nan": ("u2", f"{M}.scales", math.nan),
    "norm nan": ("u2", "model.norm.weight", math.nan),
}


@pytest.mark.parametrize("case, command", [
    (case, command) for case in NON_FINITE for command in ("gguf", "gguf --no-verify", "compressed-tensors --no-verify", "bench")
    if not (command.startswith("compressed") and NON_FINITE[case][0] == "k2")  # refused for its grid anyway
])
def test_non_finite_values_are_refused(ckpts: dict, qa: Path, tmp_path: Path, case: str, command: str) -> None:
    """Item 3: NaN / Inf scales (and norms) are refused by exports (with or without verification) and bench."""
    key, name, value = NON_FINITE[case]
    bad = tamper(ckpts[key], tmp_path / "bad", tensors=lambda t: t[name].view(-1).__setitem__(0, value))
    out = tmp_path / "out"
    fmt, *flags = command.split()
    args = bench_args(bad, qa, out) if fmt == "bench" else export_args(bad, fmt, out, *flags,
                                                                        *(["--gguf-type", "Q2_K"] if key == "k2" else []))
    one_error(*run(*args), name, "NaN or Inf")
    assert not out.exists() and hidden(tmp_path) == []


# ---------------------------------------------------------------- 4. the teacher names its architecture


def test_builtin_teacher_names_its_architecture(tmp_path: Path) -> None:
    """Item 4: the shipped config.json names Qwen3ForCausalLM, the build script writes the same file,
    and checkpoints of the built-in model inspect (and export to ONNX) with it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rqat_deploy.builtin import synth
    from rqat_deploy.builtin.tiny_reasoner import (
        BuildConfig,
        _model_config,
        save_model_config,
    )

    asset = synth.default_model_dir()
    shipped = (asset / "config.json").read_text()
    assert json.loads(shipped)["architectures"] == ["Qwen3ForCausalLM"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_model_config(BuildConfig(), AutoTokenizer.from_pretrained(str(asset))))
    save_model_config(model, tmp_path)
    rebuilt = json.loads((tmp_path / "config.json").read_text())
    built_on = json.loads(shipped)["transformers_version"]  # the version the asset was built with
    assert rebuilt | {"transformers_version": built_on} == json.loads(shipped)
    assert (tmp_path / "config.json").read_text().replace(rebuilt["transformers_version"], built_on) == shipped
    ck = quantize_rtn(asset, tmp_path / "rtn2", bits=2)
    code, text = run("inspect", ck)
    assert code == 0 and "architecture: Qwen3ForCausalLM" in text, text
    pytest.importorskip("onnxruntime_genai")
    code, text = run("export", ck, "--format", "onnx", "--out", tmp_path / "onnx")
    assert code == 0 and (tmp_path / "onnx" / "model.onnx").is_file(), text


# ------------------------------------------------------------------------------- 5. nothing lost


def test_output_that_appears_during_an_export_is_kept(ckpts: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 5: the 'already exists' check also holds at rename time; what appeared is never deleted."""
    out = tmp_path / "m.gguf"

    def someone_writes(*_args: Any) -> None:
        out.write_text("a file another program wrote meanwhile")

    monkeypatch.setattr(gguf_mod, "_verify", someone_writes)
    one_error(*run(*export_args(ckpts["u2"], "gguf", out)), "appeared while", str(out))
    assert out.read_text() == "a file another program wrote meanwhile" and hidden(tmp_path) == []


def test_concurrent_writers_one_wins_the_others_are_told(ckpts: dict, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 5: of four concurrent writers to one path exactly one succeeds; the others are refused at
    once, and an export started while another writes the same path is refused too."""
    out = tmp_path / "shared.gguf"
    script = textwrap.dedent("""
        import sys, time
        from rqat_deploy.files import staged_output_file
        try:
            with staged_output_file(sys.argv[1], False) as tmp:
                tmp.write_text(sys.argv[2]); time.sleep(1.5)
        except Exception as e:
            print(type(e).__name__, e); sys.exit(3)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out), f"writer {i}"], stdout=subprocess.PIPE, text=True)
             for i in range(4)]
    results = [(p.wait(timeout=60), p.stdout.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 3, 3, 3], results
    assert all("being written by another rqat-deploy run" in text or "already exists" in text
               for code, text in results if code), results
    assert out.read_text().startswith("writer ") and hidden(tmp_path) == []

    second: list[BaseException] = []
    out2 = tmp_path / "two.gguf"
    real = gguf_mod._verify

    def export_meanwhile(*args: Any) -> None:  # a second export of the same path, from another thread
        def other() -> None:
            try:
                gguf_mod.export_gguf(ckpts["u2"], out2, gguf_type="Q4_0")
            except BaseException as e:  # noqa: BLE001 - recorded for the assertion
                second.append(e)

        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
        real(*args)

    monkeypatch.setattr(gguf_mod, "_verify", export_meanwhile)
    code, text = run(*export_args(ckpts["u2"], "gguf", out2))
    assert code == 0, text
    assert isinstance(second[0], OutputError) and "being written by another rqat-deploy run" in str(second[0])
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("target", ["model.safetensors", ".", ".."])
def test_export_over_its_checkpoint_is_refused(ckpts: dict, tmp_path: Path, target: str) -> None:
    """Item 5: `export ck --format gguf --out ck/model.safetensors --force` used to destroy the checkpoint."""
    ck = tamper(ckpts["u2"], tmp_path / "ck")
    before = snapshot(ck)
    one_error(*run(*export_args(ck, "gguf", ck / target, "--force")), "overlaps the checkpoint directory")
    one_error(*run(*export_args(ck, "compressed-tensors", ck / target, "--force")), "overlaps the checkpoint directory")
    assert snapshot(ck) == before and hidden(tmp_path) == []


def test_train_over_its_base_model_is_refused(tiny_qwen3_dir: Path, ckpts: dict, tmp_path: Path) -> None:
    """Item 5: `train --model M --out M --force` used to replace the base model."""
    model = shutil.copytree(tiny_qwen3_dir, tmp_path / "m")
    before = snapshot(model)
    one_error(*run("train", "--model", model, "--recipe", "rtn", "--out", model, "--force"), "overlaps the base model")
    one_error(*run("train", "--model", model, "--recipe", "rtn", "--out", model / "sub", "--force"), "overlaps the base model")
    ck = tamper(ckpts["u2"], tmp_path / "ck")
    one_error(*run("train", "--model", model, "--init-from", ck, "--out", ck, "--force"), "overlaps the --init-from")
    assert snapshot(model) == before and hidden(tmp_path) == []


def test_bench_force_replaces_the_whole_report(qa: Path, tmp_path: Path) -> None:
    """Item 5: bench had no --force: a second run replaced report.json and left the old responses."""
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(json.dumps({"index": 0, "response": "\\boxed{0}"}) + "\n")
    second.write_text(json.dumps({"index": 1, "response": "\\boxed{2}"}) + "\n")
    out = tmp_path / "report"
    assert run("bench", "--responses", first, "--dataset", qa, "--out", out)[0] == 0
    (out / "responses").mkdir()
    (out / "responses" / "old-model.jsonl").write_text("{}\n")  # what a generate run leaves
    before = snapshot(out)
    one_error(*run("bench", "--responses", second, "--dataset", qa, "--out", out), "already exists", "--force")
    assert snapshot(out) == before
    code, text = run("bench", "--responses", second, "--dataset", qa, "--out", out, "--force")
    assert code == 0, text
    assert not (out / "responses").exists() and list(json.loads((out / "report.json").read_text())["models"]) == ["b"]
    one_error(*run("bench", "--responses", first, "--dataset", qa, "--out", tmp_path, "--force"), "overlaps the responses file")
    assert hidden(tmp_path) == []


# ------------------------------------------------------------------------- 6. the work directory lock


HOLD = textwrap.dedent("""
    import sys, time
    from rqat_deploy.files import output_lock
    with output_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
""")


def test_work_directory_and_output_are_locked(tiny_qwen3_dir: Path, traces: Path, tmp_path: Path) -> None:
    """Item 6: while run A trains (holding OUT and OUT.work), run B -- with or without --resume -- is
    refused at once instead of sharing OUT.work."""
    out = tmp_path / "ck"
    work = tmp_path / "ck.work"
    work.mkdir()
    (work / "run.json").write_text("{}")
    args = ["train", "--model", tiny_qwen3_dir, "--out", out, "--calib", traces, "--train-data", traces, "--resume"]
    for held, name in ((work, "ck.work"), (out, "ck")):
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(held)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            one_error(*run(*args), f"{name} is being written by another rqat-deploy run (pid {holder.pid})")
        finally:
            holder.kill()
            holder.wait()
    assert sorted(p.name for p in work.iterdir()) == ["run.json"] and not out.exists()


# ----------------------------------------------------------------------- 7. SIGTERM and SIGKILL


def test_sigterm_in_stage2_saves_the_state(tiny_qwen3_dir: Path, ckpts: dict, traces: Path, tmp_path: Path) -> None:
    """Item 7: SIGTERM (timeout, schedulers) is handled like Ctrl-C: stage 2 saves its state, the run
    exits 130 saying how to resume, nothing temporary is left, and --resume finishes it."""
    out = tmp_path / "ck"
    args = ["train", "--model", str(tiny_qwen3_dir), "--init-from", str(ckpts["u2"]), "--out", str(out),
            "--train-data", str(traces), "--train-samples", "240", "--train-seq-len", "48", "--global-batch", "1",
            "--stage2-lr", "1e-4", "--no-teacher-cache"]
    proc = subprocess.Popen([sys.executable, "-m", "rqat_deploy.cli", *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = tmp_path / "ck.work" / "stage2" / "stage2_metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= 3:
            break  # three training steps logged (the rqat recipe also logs an lr_search line before them)
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "--resume" in text and "Traceback" not in text, text
    state = torch.load(tmp_path / "ck.work" / "stage2" / "stage2_state.pt", weights_only=True)
    assert state["step"] >= 3
    assert hidden(tmp_path) == [] and hidden(tmp_path / "ck.work" / "stage2") == [] and not out.exists()
    code, text = run(*args, "--resume")
    assert code == 0 and (out / "model.safetensors").exists(), text
    assert not (tmp_path / "ck.work").exists() and hidden(tmp_path) == []


def test_sigterm_during_an_export_removes_its_temporaries(ckpts: dict, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 7: an export stopped by SIGTERM removes its temporary file (it used to leave 4.5 MB each)."""
    from rqat_deploy.cli.commands import install_signal_handlers

    previous = signal.getsignal(signal.SIGTERM)
    install_signal_handlers()
    try:
        monkeypatch.setattr(gguf_mod, "_verify", lambda *a: os.kill(os.getpid(), signal.SIGTERM))
        code, text = run(*export_args(ckpts["u2"], "gguf", tmp_path / "m.gguf"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130 and "interrupted" in text and "Traceback" not in text, text
    assert list(tmp_path.iterdir()) == []


KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from rqat_deploy.files import staged_dir
    with staged_dir(sys.argv[1], True) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_temporaries_of_killed_runs_are_cleaned(tmp_path: Path) -> None:
    """Item 7: temporaries a SIGKILL leaves are removed by the next run on that output, and an output
    moved aside while being replaced is put back."""
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-c", KILLED, str(out)], check=False)
    assert proc.returncode == -signal.SIGKILL
    left = hidden(tmp_path)  # what the killed run left: its temporary directory and its (free) lock file
    assert len(left) == 2 and left[0] == ".export.lock" and left[1].startswith(".export.tmp-")
    with staged_dir(out, False) as tmp:
        (tmp / "model.bin").write_text("new")
    assert hidden(tmp_path) == [] and (out / "model.bin").read_text() == "new"
    # killed between moving the old output aside and renaming the new one in: the old one comes back
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=False)
    aside = tmp_path / f".export.old-{int(dead.stdout)}"
    out.rename(aside)
    assert clean_stale(out) == [aside] and (out / "model.bin").read_text() == "new" and hidden(tmp_path) == []


# ------------------------------------------------------------------- 8. untrusted checkpoint paths


def _sharded(src: Path, dst: Path, shard: str) -> Path:
    """A copy whose index sends every tensor to ``shard``."""
    ck = tamper(src, dst)
    names = list(load_file(ck / "model.safetensors"))
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {n: shard for n in names}}))
    return ck


def test_paths_in_a_checkpoint_stay_inside_it(ckpts: dict, tmp_path: Path) -> None:
    """Item 8: shard names with '..' or absolute paths and symlinks leading out are refused, never read
    or copied (a symlinked added_tokens.json used to copy the secret into the export)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(ckpts["u2"] / "model.safetensors", outside / "x.safetensors")
    secret = outside / "secret.txt"
    secret.write_text("the key to everything")
    cases = {
        "dotdot": _sharded(ckpts["u2"], tmp_path / "dotdot", "../outside/x.safetensors"),
        "absolute": _sharded(ckpts["u2"], tmp_path / "absolute", str(outside / "x.safetensors")),
        "symlinked shard": _sharded(ckpts["u2"], tmp_path / "link", "x.safetensors"),
        "symlinked tokens": tamper(ckpts["u2"], tmp_path / "tokens"),
    }
    (cases["symlinked shard"] / "x.safetensors").symlink_to(outside / "x.safetensors")
    (cases["symlinked tokens"] / "added_tokens.json").symlink_to(secret)
    for name, ck in cases.items():
        for fmt in ("compressed-tensors", "gguf"):
            out = tmp_path / f"out-{fmt}"
            line = one_error(*run(*export_args(ck, fmt, out)), "outside")
            assert not out.exists(), (name, line)
    copies = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p.read_bytes() == secret.read_bytes()]
    assert copies == [secret]
    assert hidden(tmp_path) == []


# -------------------------------------------------------------------------- 9. grade-only indexes


def _grade(tmp_path: Path, qa: Path, rows: list[Any]) -> tuple[int, str]:
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run("bench", "--responses", f, "--dataset", qa, "--out", tmp_path / "graded")


def test_duplicate_or_non_integer_grade_indexes_are_refused(qa: Path, tmp_path: Path) -> None:
    """Item 9: four right answers to index 0 and a wrong one to index 1 used to score 0.8 with n=2;
    indexes "0", 0.5 and true silently became integers."""
    rows = [{"index": 0, "response": "\\boxed{0}"}] * 4 + [{"index": 1, "response": "\\boxed{7}"}]
    one_error(*_grade(tmp_path, qa, rows), "r.jsonl:2", "index 0 (seed 0) was already answered at", "r.jsonl:1")
    for bad in ("0", 0.5, True):
        one_error(*_grade(tmp_path, qa, [{"index": bad, "response": "\\boxed{0}"}]), "r.jsonl:1", "`index` must be an integer")
    one_error(*_grade(tmp_path, qa, [{"index": 0, "seed": "1", "response": "x"}]), "`seed` must be an integer")
    ok = [{"index": 0, "seed": s, "response": "\\boxed{0}"} for s in (0, 1)] + [{"index": 1, "response": "\\boxed{7}"}]
    code, text = _grade(tmp_path, qa, ok)
    report = json.loads((tmp_path / "graded" / "report.json").read_text())["models"]["r"]
    assert code == 0 and report["n"] == 2 and report["n_responses"] == 3, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graded", "r.jsonl"]


# ---------------------------------------------------------------------- 10. one line, no traceback


def _cut(f: Path, n: int | None) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if n is None else data[:n])


def _garbage(f: Path) -> None:
    f.write_bytes(os.urandom(4096))


CORRUPT_FILES = {  # name: (file, how, what the line names)
    "truncated safetensors": ("model.safetensors", lambda f: _cut(f, None), "model.safetensors"),
    "empty safetensors": ("model.safetensors", lambda f: _cut(f, 0), "model.safetensors"),
    "corrupt safetensors": ("model.safetensors", _garbage, "model.safetensors"),
    "config.json invalid": ("config.json", lambda f: f.write_text("{'hidden_size': 256"), "config.json is not valid JSON"),
    "rqat_quant.json invalid": (QUANT_FILE, lambda f: f.write_text("{"), "rqat_quant.json is not valid JSON"),
    "index invalid": ("model.safetensors.index.json", lambda f: f.write_text("[1, 2"), "index.json is not valid JSON"),
    "config lacks layers": ("config.json", lambda f: f.write_text(json.dumps(
        {k: v for k, v in json.loads(f.read_text()).items() if k != "num_hidden_layers"})), "num_hidden_layers"),
    "binary config": ("config.json", _garbage, "config.json is not valid JSON"),
}


@pytest.mark.parametrize("case", list(CORRUPT_FILES))
@pytest.mark.parametrize("command", ["gguf", "compressed-tensors", "inspect"])
def test_corrupt_files_are_one_clear_line(ckpts: dict, tmp_path: Path, case: str, command: str) -> None:
    """Item 10: truncated / empty / corrupt safetensors, invalid JSON and a config without
    num_hidden_layers (a KeyError in the GGUF export) used to print tracebacks."""
    fname, how, needle = CORRUPT_FILES[case]
    ck = tamper(ckpts["u2"], tmp_path / "ck")
    how(ck / fname)
    out = tmp_path / "out"
    args = ["inspect", ck] if command == "inspect" else export_args(ck, command, out)
    one_error(*run(*args), needle)
    assert not out.exists() and hidden(tmp_path) == []


def test_corrupt_work_file_on_resume(tiny_qwen3_dir: Path, ckpts: dict, traces: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 10: a corrupt stage-2 state on --resume is one line naming it and the fix."""
    import rqat_deploy.train.stage2 as stage2_mod

    real = stage2_mod.run_stage2

    def interrupted(*args: Any, **kw: Any) -> Any:
        def stop(step: int, _metrics: dict) -> None:
            if step == 2:
                raise KeyboardInterrupt
        return real(*args, **kw, on_step=stop)

    args = ["train", "--model", tiny_qwen3_dir, "--init-from", ckpts["u2"], "--out", tmp_path / "ck", "--train-data",
            traces, "--train-samples", "24", "--train-seq-len", "48", "--global-batch", "2", "--no-teacher-cache"]
    monkeypatch.setattr(stage2_mod, "run_stage2", interrupted)
    assert run(*args)[0] == 130
    monkeypatch.setattr(stage2_mod, "run_stage2", real)
    state = tmp_path / "ck.work" / "stage2" / "stage2_state.pt"
    _cut(state, None)
    one_error(*run(*args, "--resume"), str(state), "corrupt", "delete it")
    assert not (tmp_path / "ck").exists() and hidden(tmp_path) == []


def test_gguf_cut_after_its_header(ckpts: dict, tmp_path: Path) -> None:
    """Item 10: `inspect` of a GGUF cut after its header printed an IndexError traceback."""
    good = tmp_path / "m.gguf"
    assert run(*export_args(ckpts["u2"], "gguf", good))[0] == 0
    for n in (40, 3000, good.stat().st_size // 2):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(good.read_bytes()[:n])
        one_error(*run("inspect", cut), str(cut), "truncated or corrupt")
        one_error(*run("inspect", cut, "--verify"), str(cut))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_full_or_read_only_disk(ckpts: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """Item 10: a full, read-only or forbidden disk is one line naming the problem and the fix."""
    import rqat_deploy.shards as shards_mod

    def fail(_tensors: Any, path: str, **_: Any) -> None:
        raise OSError(err, os.strerror(err), path)

    monkeypatch.setattr(shards_mod, "save_file", fail)
    out = tmp_path / "ct"
    line = one_error(*run(*export_args(ckpts["u2"], "compressed-tensors", out)), "--out" if err != errno.EACCES else "permission")
    assert {errno.ENOSPC: "no space", errno.EROFS: "read-only", errno.EACCES: "permission denied"}[err] in line
    assert not out.exists() and hidden(tmp_path) == []


def test_pickle_weights_are_never_loaded(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    """Item 10: a model directory with only pytorch_model.bin is refused (never unpickled)."""
    model = shutil.copytree(tiny_qwen3_dir, tmp_path / "m")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    one_error(*run("train", "--model", model, "--recipe", "rtn", "--out", tmp_path / "ck"), "pickle", "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_cuda_without_cuda(tiny_qwen3_dir: Path, ckpts: dict, qa: Path, tmp_path: Path) -> None:
    """Item 10: `--device cuda` on a machine without CUDA printed an AssertionError traceback."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_error(*run("train", "--model", tiny_qwen3_dir, "--recipe", "rtn", "--out", tmp_path / "ck", "--device", "cuda"),
              "--device cuda", "no CUDA device")
    one_error(*run(*bench_args(ckpts["u2"], qa, tmp_path / "b"), "--device", "cuda"), "no CUDA device")
    assert list(tmp_path.iterdir()) == []


def test_binary_config_file(tmp_path: Path) -> None:
    """Item 10: a binary --config file was a UnicodeDecodeError traceback."""
    cfg = tmp_path / "run.json"
    cfg.write_bytes(b"\xff\xfe\x00binary")
    res = CliRunner().invoke(cli, ["train", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "cannot parse" in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("command", ["compressed-tensors", "bench"])
def test_custom_code_in_auto_map(ckpts: dict, qa: Path, tmp_path: Path, command: str) -> None:
    """Item 10: a config naming custom code (auto_map) in commands without --trust-remote-code."""
    def custom(c: dict) -> None:
        c.update(model_type="mycustom", auto_map={"AutoConfig": "configuration_x.C", "AutoModelForCausalLM": "modeling_x.M"})

    ck = tamper(ckpts["u2"], tmp_path / "ck", config=custom)
    out = tmp_path / "out"
    args = bench_args(ck, qa, out) if command == "bench" else export_args(ck, command, out)
    one_error(*run(*args), "config.json", "auto_map")
    assert not out.exists() and hidden(tmp_path) == []


def test_internal_errors_exit_1_with_the_traceback_behind_debug(ckpts: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 10: anything unexpected is one line, exit code 1; --debug or RQAT_DEPLOY_DEBUG=1 shows the traceback."""
    def bug(*_a: Any, **_k: Any) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(gguf_mod, "_totals", bug)
    args = export_args(ckpts["u2"], "gguf", tmp_path / "m.gguf")
    one_error(*run(*args), "internal error: ZeroDivisionError: a bug", "--debug", exit_code=1)
    with pytest.raises(ZeroDivisionError):
        run("--debug", *args)
    monkeypatch.setenv("RQAT_DEPLOY_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        run(*args)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 11. found too late


def _must_not_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import rqat_deploy.models as models_mod

    def fail(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(models_mod, "load_hf_model", fail)


@pytest.mark.parametrize("flags, needle", [
    (["--stage2-lr", "nan"], "--stage2-lr must be a positive number, got nan"),
    (["--stage2-lr", "-1"], "--stage2-lr must be a positive number"),
    (["--stage2-lr", "inf"], "--stage2-lr must be a positive number"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--loss", "X+Y"], "X"),
])
def test_bad_flags_are_refused_before_any_work(tiny_qwen3_dir: Path, traces: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, flags: list[str], needle: str) -> None:
    """Item 11: `--stage2-lr nan` was refused only after the teacher cache, and its OUT.work then
    blocked the corrected command."""
    _must_not_load(monkeypatch)
    one_error(*run("train", "--model", tiny_qwen3_dir, "--out", tmp_path / "ck", "--train-data", traces, *flags), needle)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_is_found_before_training_or_generating(tiny_qwen3_dir: Path, ckpts: dict, qa: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 11: an unwritable --out was found after training (117 s) and after every bench generation."""
    import rqat_deploy.serve.bench as bench_mod

    _must_not_load(monkeypatch)
    monkeypatch.setattr(bench_mod, "load_runtime", lambda *a, **k: pytest.fail("generation started"))
    blocker = tmp_path / "file"
    blocker.write_text("a regular file, so nothing can be created below it")
    one_error(*run("train", "--model", tiny_qwen3_dir, "--recipe", "rtn", "--out", blocker / "ck"), "cannot write", "ck")
    one_error(*run(*bench_args(ckpts["u2"], qa, blocker / "b")), "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---------------------------------------------------------------------------------- 12. smaller


def test_resume_with_another_max_steps_is_refused_at_once(tiny_qwen3_dir: Path, traces: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 12: `--resume --max-steps N` was accepted, then refused by stage 2 after the setup."""
    from rqat_deploy.quant.spec import QuantSpec
    from rqat_deploy.train.run import TrainConfig

    cfg = TrainConfig(model=str(tiny_qwen3_dir), out=str(tmp_path / "ck"), quant=QuantSpec(), calib=str(traces),
                      train_data=str(traces))
    work = cfg.work_path
    (work / "stage1").mkdir(parents=True)
    (work / "run.json").write_text(json.dumps(cfg.to_recipe(), default=list))
    _must_not_load(monkeypatch)
    one_error(*run("train", "--model", tiny_qwen3_dir, "--out", tmp_path / "ck", "--calib", traces, "--train-data",
                   traces, "--resume", "--max-steps", "5"), "different settings", "max_steps")
    assert sorted(p.name for p in work.iterdir()) == ["run.json", "stage1"]


def test_checkpoint_files_have_normal_permissions(ckpts: dict) -> None:
    """Item 12: model.safetensors was written 0600 while its siblings were 0644."""
    modes = {p.name: p.stat().st_mode & 0o777 for p in ckpts["u2"].iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_nothing_to_quantize_names_the_reason(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    """Item 12: GPT-2 (Conv1D) or `--exclude '*'` said "run prepare_model first" (an internal name)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    one_error(*run("train", "--model", tiny_qwen3_dir, "--recipe", "rtn", "--exclude", "*", "--out", tmp_path / "a"),
              "nothing to quantize", "--exclude '*'")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=1024)).save_pretrained(gpt2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_qwen3_dir / f, gpt2 / f)
    line = one_error(*run("train", "--model", gpt2, "--recipe", "rtn", "--out", tmp_path / "b"), "nothing to quantize", "Conv1D")
    assert "prepare_model" not in line and sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_inspect_gguf_by_content_and_verify_decodes(ckpts: dict, tmp_path: Path) -> None:
    """Item 12: `inspect upper.GGUF` said "checkpoint directory does not exist"; `inspect` said
    "bit-exact" for a byte-flipped GGUF (it read the stored report, not the tensors)."""
    good = tmp_path / "UPPER.GGUF"
    assert run(*export_args(ckpts["k2"], "gguf", good, "--gguf-type", "Q2_K"))[0] == 0
    code, text = run("inspect", good, "--verify")
    assert code == 0 and "bit-exact" in text and "match the checksums" in text, text
    data = bytearray(good.read_bytes())
    data[-100] ^= 0x10  # a byte of the last tensor's data
    flipped = tmp_path / "flipped.gguf"
    flipped.write_bytes(bytes(data))
    code, text = run("inspect", flipped)
    assert code == 0 and "as stored at export; inspect --verify checks the tensors" in text, text
    one_error(*run("inspect", flipped, "--verify"), "checksum mismatch", "corrupt")
    code, text = run("inspect", ckpts["u2"], "--verify")
    assert code == 0 and "all in range and finite" in text, text


def test_spec_weights_that_overflow(tmp_path: Path) -> None:
    """Item 12: SPEC weights 1e308,1e308 overflowed their sum and silently gave half the samples."""
    from rqat_deploy.data.spec import allocate, parse_spec

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for f in (a, b):
        f.write_text('{"text": "x"}\n')
    weights = [s.weight for s in parse_spec(f"{a}:1e308,{b}:1e308")]
    assert allocate(weights, 100) == [50, 50] and allocate([1e308, 1e-300], 10) == [10, 0]


def test_empty_jsonl_and_missing_tokenizer(ckpts: dict, tmp_path: Path) -> None:
    """Item 12: an empty JSONL said "StopIteration"; a missing tokenizer must be named as such (not
    as "no BPE merges")."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    one_error(*run("bench", "--responses", empty, "--dataset", empty, "--out", tmp_path / "o"), "empty.jsonl is empty")
    with pytest.raises(DataError, match="is empty"):
        from rqat_deploy.data.evalset import load_eval_set

        load_eval_set(str(empty))
    ck = tamper(ckpts["u2"], tmp_path / "ck")
    (ck / "tokenizer.json").unlink()
    line = one_error(*run(*export_args(ck, "gguf", tmp_path / "m.gguf")), "tokenizer.json")
    assert "merges" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "empty.jsonl"]


# ----------------------------------------------------------------------------- the library errors


def test_library_errors_are_the_documented_classes(ckpts: dict, tmp_path: Path) -> None:
    """The classes the CLI maps: a tampered checkpoint is a CheckpointError, an overlap an ExportError
    (exporters) or OutputError, a held lock an OutputError, a taken path OutputExistsError."""
    bad = tamper(ckpts["u2"], tmp_path / "bad", tensors=_drop_embed)
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight"):
        read_checkpoint(bad)
    with pytest.raises(ExportError, match="overlaps"):
        gguf_mod.export_gguf(ckpts["u2"], ckpts["u2"] / "x.gguf")
    out = tmp_path / "o"
    with output_lock(out):
        other = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(60)", "pass"), str(out)],
                               capture_output=True, text=True, check=False)
    assert f"OutputError: {out} is being written by another rqat-deploy run (pid {os.getpid()})" in other.stderr
    assert hidden(tmp_path) == []
    out.mkdir()
    with pytest.raises(OutputExistsError), staged_dir(out, False):
        pass
    with pytest.raises(ConfigError, match="--stage2-lr"):
        from rqat_deploy.train.run import TrainConfig

        TrainConfig(out=str(tmp_path / "x"), stage2_lr=float("nan"))
