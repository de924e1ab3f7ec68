"""Data-parallel stage 2: two CPU processes under ``torchrun`` (gloo) train the same scales as one.

The two-process run is launched as ``python -m torch.distributed.run --nproc_per_node 2`` on
127.0.0.1 with this file as the worker script (``__main__`` below). It is interrupted after step 2
(rank 0 saves the state), then resumed by a second launch whose ranks both read that state; the
final scales must match a single-process run of the same settings. The settings put 5 samples in
a global batch (shards of 3 and 2, micro-batches of 2) and 1 in the last one (rank 1's shard is
empty), so uneven shards, accumulation and the empty-shard path are all exercised.

Tolerance: the ranks' micro-batches differ from the single process's (padding, matmul shapes) and
the gradient sum is formed in another order, so equality is up to float32 rounding, not bit for
bit: ``rtol=1e-5`` on the scales (observed: well below; see the assertion message), 1e-5 on the
logged losses. The two ranks themselves must agree bit for bit (DDP all-reduces the gradients,
then each rank takes the same optimizer step).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

COT = Path(__file__).resolve().parents[2] / "shared" / "data" / "math_cot_100.jsonl"
N_SAMPLES, SEQ_LEN, INTERRUPT_AT = 20, 96, 2
CFG = dict(lr=3e-3, epochs=1, global_batch=5, micro_batch=2, eval_samples=4, warmup_ratio=0.0, save_every=0,
           tensorboard=False)


def _stage2_config():
    from rqat_deploy.train.stage2 import Stage2Config

    return Stage2Config(**CFG)


def _data(model_dir: Path, conv: Path):
    from transformers import AutoTokenizer

    from rqat_deploy.data.sft import build_sft

    return build_sft(AutoTokenizer.from_pretrained(str(model_dir)), str(conv), N_SAMPLES, SEQ_LEN, seed=0)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# the worker (one per rank, started by torchrun)
# ---------------------------------------------------------------------------------------------


def _worker(args: dict) -> None:
    """Train under torchrun; record every file this rank writes under ``args['watch']``."""
    watch, reports = str(args["watch"]), str(args["reports"])
    writes: list[str] = []

    def audit(event: str, a: tuple) -> None:  # Python's audit hooks see every open/rename/mkdir/remove
        if event == "open":
            path, mode, flags = a
            writing = any(c in (mode or "") for c in "wax+") if mode is not None else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            paths = [path] if writing else []
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "shutil.rmtree"):
            paths = [a[0]] + ([a[1]] if event == "os.rename" else [])
        else:
            return
        for p in paths:
            if isinstance(p, (str, os.PathLike)):
                s = os.path.abspath(os.fspath(p))
                if s.startswith(watch) and not s.startswith(reports):
                    writes.append(f"{event} {s}")

    sys.addaudithook(audit)
    torch.set_num_threads(1)
    from rqat_deploy.train import distributed as du
    from rqat_deploy.quant.checkpoint import load_model
    from rqat_deploy.train.stage2 import run_stage2
    from rqat_deploy.train.teacher import CachedTeacher

    opened = du.init_distributed("cpu")
    assert opened and du.world_size() == 2
    data = _data(Path(args["model_dir"]), Path(args["conv"]))
    student, _ = load_model(args["ckpt"], form="stage2")

    def interrupt(step: int, _metrics: dict) -> None:
        if step == args.get("interrupt_at"):
            raise KeyboardInterrupt

    report = None
    try:
        rep = run_stage2(student, data, CachedTeacher(args["cache"]), _stage2_config(), state_dir=args["state_dir"],
                         resume=args["resume"], progress=True, on_step=interrupt)
        report = rep.to_dict()
    except KeyboardInterrupt:
        pass
    torch.save({"params": _trainable(student), "report": report, "writes": writes},
               os.path.join(reports, f"rank{du.rank()}.pt"))
    du.destroy_distributed()


# ---------------------------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(argv: list[str], log: Path, cwd: Path | None = None, tee: bool = False) -> str:
    """``torchrun --nproc_per_node 2 ARGV`` on 127.0.0.1 (gloo over loopback); returns its output.

    With ``tee`` every output line carries its rank's prefix (``[default0]:``, ``[default1]:``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", TORCH_CPP_LOG_LEVEL="ERROR")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *(["--tee", "3"] if tee else []), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout + proc.stderr


def _launch(args: dict, log: Path) -> None:
    _torchrun([__file__, json.dumps(args, default=str)], log)


@pytest.fixture(scope="module")
def env(tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    if not COT.exists():
        pytest.skip(f"{COT} is not available")
    from rqat_deploy.models import load_hf_model
    from rqat_deploy.train.teacher import CachedTeacher
    from rqat_deploy.train.run import quantize_rtn

    d = tmp_path_factory.mktemp("stage2_ddp")
    conv = d / "conv.jsonl"
    with conv.open("w") as f:
        for line in COT.read_text().splitlines():
            r = json.loads(line)
            value = f"<think>\n{r['code'][0]}\n</think>\n\nThe answer is $\\boxed{{{r['gt']}}}$."
            f.write(json.dumps({"conversations": [{"from": "human", "value": r["question"]}, {"from": "gpt", "value": value}]}) + "\n")
    data = _data(tiny_qwen3_dir, conv)
    teacher, _ = load_hf_model(str(tiny_qwen3_dir))
    cache = CachedTeacher.build(teacher, data, d / "cache", progress=False)
    ckpt = quantize_rtn(tiny_qwen3_dir, d / "rtn2", bits=2)
    return {"dir": d, "conv": conv, "data": data, "cache": cache, "ckpt": ckpt, "model_dir": tiny_qwen3_dir}


def _metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_two_process_ddp_equals_single_process_and_only_rank0_writes(env: dict, tmp_path: Path) -> None:
    from rqat_deploy.quant.checkpoint import load_model
    from rqat_deploy.train.stage2 import METRICS_FILE, STATE_FILE, run_stage2

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the single-process reference
        single, _ = load_model(env["ckpt"], form="stage2")
        rep1 = run_stage2(single, env["data"], env["cache"], _stage2_config(), state_dir=tmp_path / "single", progress=False)
    finally:
        torch.set_num_threads(n)
    ref = _trainable(single)
    assert rep1.steps == 4 and rep1.world_size == 1

    state_dir, reports = tmp_path / "ddp", tmp_path / "reports"
    reports.mkdir()
    args = {"model_dir": env["model_dir"], "conv": env["conv"], "ckpt": env["ckpt"], "cache": env["cache"].path,
            "state_dir": state_dir, "reports": reports, "watch": tmp_path}
    t0 = time.perf_counter()
    _launch(args | {"resume": False, "interrupt_at": INTERRUPT_AT}, tmp_path / "launch1.log")  # "Ctrl-C" after step 2
    first = [torch.load(reports / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert torch.load(state_dir / STATE_FILE, weights_only=False)["step"] == INTERRUPT_AT
    _launch(args | {"resume": True}, tmp_path / "launch2.log")  # both ranks resume from rank 0's state
    second = [torch.load(reports / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    seconds = time.perf_counter() - t0

    # the ranks agree bit for bit, and equal the single process up to float32 rounding
    worst = 0.0
    for name, want in ref.items():
        a, b = second[0]["params"][name], second[1]["params"][name]
        assert torch.equal(a, b), name
        assert not torch.equal(a, env_rtn_param(env, name)), f"{name} did not train"
        worst = max(worst, float(((a - want).abs() / want.abs().clamp_min(1e-12)).max()))
        torch.testing.assert_close(a, want, rtol=1e-5, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    print(f"2-process DDP vs 1 process: max relative difference of the scales {worst:.2e}; two launches {seconds:.1f}s")

    rep2 = second[0]["report"]
    assert rep2["world_size"] == 2 and rep2["start_step"] == INTERRUPT_AT and rep2["steps"] == rep1.steps
    assert first[0]["report"] is None  # interrupted
    for k in ("kl", "ce"):
        assert rep2["eval_before"][k] == pytest.approx(rep1.eval_before[k], rel=1e-5)
        assert rep2["eval_after"][k] == pytest.approx(rep1.eval_after[k], rel=1e-5)
    assert rep2["eval_after"]["tokens"] == rep1.eval_after["tokens"]

    # the log holds the GLOBAL loss of each step, once, across the interruption
    single_log = [m for m in _metrics(tmp_path / "single" / METRICS_FILE) if "loss" in m]
    ddp_log = [m for m in _metrics(state_dir / METRICS_FILE) if "loss" in m]
    assert [m["step"] for m in ddp_log] == [1, 2, 3, 4]
    for s, p in zip(single_log, ddp_log):
        assert p["tokens"] == s["tokens"]  # the global batch's completion tokens
        for k in ("loss", "loss_rr", "loss_topk_kl", "grad_norm"):
            assert p[k] == pytest.approx(s[k], rel=1e-5), (p["step"], k)

    # only rank 0 wrote: the state (saved on the interruption, then at the end) and the metrics
    for run in (first, second):
        assert run[1]["writes"] == []
        assert any(w.startswith("os.rename") and w.endswith(STATE_FILE) for w in run[0]["writes"])
        assert any(w.endswith(METRICS_FILE) for w in run[0]["writes"])
    assert sorted(p.name for p in state_dir.iterdir()) == [METRICS_FILE, STATE_FILE]


_LAUNCHES = {  # the documented launches, started from the checkout's root (where kernels/ could shadow HF's)
    "console-script": ["--no-python", str(Path(sys.executable).with_name("rqat-deploy"))],
    "module": ["-m", "rqat_deploy.cli"],
}


@pytest.mark.parametrize("launch", sorted(_LAUNCHES))
def test_torchrun_cli_train_writes_one_checkpoint(env: dict, tmp_path: Path, launch: str) -> None:
    """``torchrun --no-python rqat-deploy train`` and ``torchrun -m rqat_deploy.cli train``, run from the
    repository root: rank 0 initialises, both ranks train stage 2, one checkpoint is written."""
    from rqat_deploy.quant.checkpoint import load_model

    flags = ["--model", str(env["model_dir"]), "--recipe", "rqat", "--bits", "2", "--calib", str(env["conv"]),
             "--calib-samples", "8", "--calib-seq-len", "48", "--train-data", str(env["conv"]), "--train-samples", "12",
             "--train-seq-len", "80", "--stage1-epochs", "1", "--global-batch", "4", "--micro-batch", "2",
             "--stage2-epochs", "1", "--stage2-lr", "1e-3", "--out", str(tmp_path / "ck")]
    root = Path(__file__).resolve().parent.parent
    log = _torchrun([*_LAUNCHES[launch], "train", *flags], tmp_path / "train.log", cwd=root, tee=True)
    # torchrun prefixes each newline-terminated line; a tqdm bar (\r-separated frames) stays on its rank's line
    rank1 = "\n".join(line for line in log.split("\n") if line.startswith("[default1]"))
    assert "stage 2: 100%" in log and "stage 2" not in rank1  # one progress bar: rank 0's
    assert log.count("wrote ") == 1
    meta = json.loads((tmp_path / "ck" / "rqat_quant.json").read_text())
    s2 = meta["recipe"]["reports"]["stage2"]
    assert s2["world_size"] == 2 and s2["steps"] == 3 and s2["eval_after"]["kl"] < s2["eval_before"]["kl"]
    assert not (tmp_path / "ck.work").exists()  # rank 0 cleaned up after success
    model, _ = load_model(tmp_path / "ck")
    assert sum(1 for _ in model.parameters()) > 0


def test_shards_partition_the_batch_and_launch_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from rqat_deploy.train import distributed as du
    from rqat_deploy.errors import ConfigError

    for n in range(0, 12):
        for w in (1, 2, 3, 8):
            parts = [du.shard(list(range(n)), r, w) for r in range(w)]
            assert sum(parts, []) == list(range(n))  # disjoint, contiguous, in order: the single-process batch
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert du.shard([7, 8, 9], 0, 1) == [7, 8, 9] and du.world_size() == 1 and du.is_main()  # no process group
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert du.init_distributed("cpu") is False  # a plain single process
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="launch with torchrun"):
        du.init_distributed("cpu")
    assert du.backend_for("cuda") == "nccl" and du.backend_for("cpu") == "gloo"


def env_rtn_param(env: dict, name: str) -> torch.Tensor:
    """The RTN starting value of a trainable tensor (cached per module run)."""
    if "rtn_params" not in env:
        from rqat_deploy.quant.checkpoint import load_model
        from rqat_deploy.quant.surgery import select_trainable

        model, _ = load_model(env["ckpt"], form="stage2")
        env["rtn_params"] = {n: p.detach().clone() for n, p in select_trainable(model, _stage2_config().train_form)}
    return env["rtn_params"][name]


if __name__ == "__main__":  # a torchrun worker (see _torchrun)
    _worker(json.loads(sys.argv[1]))
