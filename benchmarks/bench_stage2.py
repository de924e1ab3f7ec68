"""Stage-2 throughput (tokens/s) and peak memory on the tiny Qwen3, live and cached teacher.

Usage::

    python benchmarks/bench_stage2.py                       # CPU, tiny Qwen3, 2-bit uniform
    python benchmarks/bench_stage2.py --device cuda --seq-len 1024 --steps 20
    python benchmarks/bench_stage2.py --grid kquant --json out.json

Each configuration runs in a fresh subprocess (so the peak resident memory it reports is its own):
it builds the tiny model (or uses ``--model-dir``), an RTN checkpoint, stage-2 samples from a JSONL
spec (default: the chain-of-thought samples of ``../shared/data/math_cot_100.jsonl`` rendered as
conversations), then times ``--steps`` optimizer steps of :func:`rqat_deploy.train.stage2.run_stage2`
(held-out evaluation off). It prints a Markdown table: completion tokens/s (the trained tokens),
all tokens/s (prompt included, what the forward processes), seconds per step, peak memory (CUDA:
``max_memory_allocated``; CPU: peak RSS of the process and its growth over the RSS before training).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COT = Path(__file__).resolve().parents[2] / "shared" / "data" / "math_cot_100.jsonl"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _conversations(out: Path) -> Path:
    """The math_cot_100 samples as ShareGPT conversations with a <think> trace."""
    rows = [json.loads(line) for line in COT.read_text().splitlines()]
    with out.open("w") as f:
        for r in rows:
            value = f"<think>\n{r['code'][0]}\n</think>\n\nThe answer is $\\boxed{{{r['gt']}}}$."
            f.write(json.dumps({"conversations": [{"from": "human", "value": r["question"]}, {"from": "gpt", "value": value}]}) + "\n")
    return out


def worker(args: argparse.Namespace) -> dict:
    """Run one configuration in this process and return its measurements."""
    import torch

    from rqat_deploy.quant.checkpoint import load_model
    from rqat_deploy.data.sft import build_sft
    from rqat_deploy.models import load_hf_model
    from rqat_deploy.train.stage2 import Stage2Config, run_stage2
    from rqat_deploy.train.teacher import CachedTeacher, LiveTeacher
    from rqat_deploy.builtin.tiny import build_tiny_model
    from rqat_deploy.train.run import quantize_rtn

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    model_dir = Path(args.model_dir) if args.model_dir else work / "tiny"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir, "qwen3")
    ckpt = work / f"rtn-{args.grid}-{args.bits}"
    if not ckpt.exists():
        quantize_rtn(model_dir, ckpt, bits=args.bits, grid=args.grid)
    spec = args.data or str(_conversations(work / "conv.jsonl"))
    teacher_model, tok = load_hf_model(str(model_dir), device=args.device)
    n = args.global_batch * args.steps
    data = build_sft(tok, spec, n, args.seq_len, seed=0)
    if args.teacher == "cached":
        t0 = time.perf_counter()
        teacher = CachedTeacher.build(teacher_model, data, work / f"cache-{args.seq_len}-{n}", progress=False)
        cache_s = time.perf_counter() - t0
        del teacher_model
    else:
        teacher, cache_s = LiveTeacher(teacher_model), None
    student, _ = load_model(ckpt, form="stage2", device=args.device)
    cfg = Stage2Config(
        lr=1e-4, epochs=1, global_batch=args.global_batch, micro_batch=args.micro_batch, eval_samples=0,
        loss_chunk=args.loss_chunk, save_every=0,  # autocast_dtype: bf16 on CUDA, none on CPU (the default)
    )
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_bytes()
    rep = run_stage2(student, data, teacher, cfg, progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    all_tokens = int(data.attention_mask.sum())
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "teacher": args.teacher,
        "device": args.device,
        "grid": f"{args.grid}-int{args.bits}",
        "seq_len": args.seq_len,
        "samples": n,
        "steps": rep.steps,
        "completion_tokens": rep.tokens,
        "all_tokens": all_tokens,
        "seconds": rep.seconds,
        "completion_tokens_per_s": rep.tokens / rep.seconds,
        "all_tokens_per_s": all_tokens / rep.seconds,
        "s_per_step": rep.seconds / rep.steps,
        "cache_build_s": cache_s,
        "peak_cuda_bytes": rep.peak_memory_bytes,
        "peak_rss_bytes": peak_rss,
        "rss_growth_bytes": max(peak_rss - rss0, 0),
        "threads": torch.get_num_threads(),
    }


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--grid", default="uniform", choices=["uniform", "kquant"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--teachers", default="live,cached", help="comma-separated: live, cached")
    p.add_argument("--model-dir", default=None, help="a model directory instead of the tiny Qwen3")
    p.add_argument("--data", default=None, help="a data spec instead of math_cot_100 conversations")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        args.teacher = args._worker
        print("RESULT " + json.dumps(worker(args)))
        return
    if args.data is None and not COT.exists():
        sys.exit(f"{COT} not found: pass --data SPEC")
    tmp = tempfile.TemporaryDirectory(prefix="bench-stage2-") if args.workdir is None else None
    workdir = args.workdir if tmp is None else tmp.name
    rows = []
    for teacher in args.teachers.split(","):
        cmd = [sys.executable, __file__, "--_worker", teacher, "--workdir", workdir]
        for name in ("device", "bits", "grid", "seq_len", "steps", "global_batch", "micro_batch", "loss_chunk", "threads", "model_dir", "data"):
            value = getattr(args, name)
            if value is not None:
                cmd += [f"--{name.replace('_', '-')}", str(value)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"worker failed:\n{out.stderr[-4000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
    print("| teacher | device | grid | seq | steps | compl. tok/s | all tok/s | s/step | peak CUDA MiB | peak RSS MiB | RSS growth MiB | threads |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['teacher']} | {r['device']} | {r['grid']} | {r['seq_len']} | {r['steps']} | "
            f"{r['completion_tokens_per_s']:.0f} | {r['all_tokens_per_s']:.0f} | {r['s_per_step']:.2f} | "
            f"{_mib(r['peak_cuda_bytes'])} | {_mib(r['peak_rss_bytes'])} | {_mib(r['rss_growth_bytes'])} | {r['threads']} |"
        )
    for r in rows:
        if r["cache_build_s"] is not None:
            print(f"teacher cache build: {r['cache_build_s']:.2f} s for {r['samples']} samples")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
