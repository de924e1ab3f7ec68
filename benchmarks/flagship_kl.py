"""Does the flagship recipe beat its own baseline? Held-out KL to the teacher, per grid, per method.

Usage::

    python benchmarks/flagship_kl.py --out runs/flagship --model random --budget small
    python benchmarks/flagship_kl.py --out runs/flagship --model builtin --budget preset --seeds 0 1 2
    python benchmarks/flagship_kl.py --out runs/flagship --table-only

For each teacher, budget, grid (uniform G128, q2_0, kquant Q2_K, kquant Q3_K), method and seed it
trains a checkpoint with ``rqat-deploy train`` (library call) and measures its **held-out KL to the
teacher**: the mean over completion tokens of ``KL(teacher || student)``, full vocabulary, float64,
on 64 held-out reasoning conversations (problems never seen in training, rendered with the model's
chat template). Teachers:

- ``builtin``: the shipped tiny reasoner (3.7 M parameters) on its built-in data;
- ``random``: a random-weight Qwen3 (3 layers, hidden 512) on the same data.

Budgets: ``preset`` = each recipe's built-in defaults (``option_defaults``) (256 x 512 calibration tokens, 2,048 stage-2 samples);
``small`` = 32 calibration sequences of 256 tokens and 32 stage-2 samples of <= 256 tokens.
Methods (``--methods``): RTN; GPTQ; C (the paper's row: stage 1 from RTN, raw block MSE); C+R (the
paper's recipe: C then stage 2 with rr+topk_kl at one learning rate); rqat (the flagship as shipped).
The screening variants below the line start from the paper's form and change one thing each; those
on ``rqat`` also keep its GPTQ guard.
Results append to ``OUT/results.jsonl`` (reruns skip finished runs); the table gives the mean over
seeds and the paired difference of each method to GPTQ (same seed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

GRIDS = {"uniform": ("uniform", 2), "q2_0": ("q2_0", 2), "Q2_K": ("kquant", 2), "Q3_K": ("kquant", 3)}
METHODS: dict[str, dict[str, Any]] = {
    "RTN": {"recipe": "rtn"},
    "GPTQ": {"recipe": "gptq"},
    "C": {"recipe": "C"},
    "C+R": {"recipe": "C+R"},
    "rqat": {"recipe": "rqat"},
    # screening variants (one change each from the paper form)
    "C gptq-init": {"recipe": "stage1", "stage1_options": {"init": "gptq"}},
    "C next-norm": {"recipe": "stage1", "stage1_options": {"loss_space": "next_norm"}},
    "C gptq+norm+keep": {"recipe": "stage1", "stage1_options": {"init": "gptq", "loss_space": "next_norm", "keep_better": True}},
    "rqat rel-lr": {"recipe": "rqat", "stage2_options": {"relative_lr": True}},
    "rqat all": {"recipe": "rqat", "stage1_options": {"init": "gptq", "loss_space": "next_norm", "keep_better": True},
                 "stage2_options": {"relative_lr": True, "keep_better": True}},
    "rqat all-no-keep": {"recipe": "rqat", "stage1_options": {"init": "gptq", "loss_space": "next_norm"},
                         "stage2_options": {"relative_lr": True}},
    "rqat all+search": {"recipe": "rqat", "stage1_options": {"init": "gptq", "loss_space": "next_norm", "keep_better": True},
                        "stage2_options": {"relative_lr": True, "keep_better": True, "lr_search": (1.0, 1 / 3, 1 / 10, 1 / 30)}},
}
SMALL = {"calib_samples": 32, "calib_seq_len": 256, "train_samples": 32, "train_seq_len": 256, "global_batch": 8}


def _teacher(kind: str, root: Path) -> Path:
    from rqat_deploy.builtin import synth
    from rqat_deploy.builtin.tiny import build_tiny_model

    if kind == "builtin":
        return synth.default_model_dir()
    path = root / "teacher-random"
    if not (path / "config.json").exists():
        build_tiny_model(path, hidden_size=512, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=128,
                         intermediate_size=1024, seed=0)
    return path


def _heldout(root: Path) -> Path:
    from rqat_deploy.builtin.synth import write_reasoning_jsonl

    path = root / "heldout_conversations.jsonl"
    if not path.exists():
        write_reasoning_jsonl(path, 64, split="heldout", seed=12345)
    return path


def heldout_kl(teacher_dir: Path, student_dir: Path | None, data: Path) -> float:
    """Mean per-token ``KL(teacher || student)`` over the completion tokens of ``data`` (float64)."""
    import torch

    from rqat_deploy.data.sft import build_sft
    from rqat_deploy.models import load_hf_model
    from rqat_deploy.quant.checkpoint import load_model

    teacher, tok = load_hf_model(str(teacher_dir))
    student = teacher if student_dir is None else load_model(student_dir)[0]
    sft = build_sft(tok, str(data), 64, 512, 0)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(sft)):
            s = sft.subset([i])
            mask = s.labels[0, 1:] != -100  # [T-1]: positions predicting a completion token
            lt = torch.log_softmax(teacher(s.input_ids).logits[0, :-1][mask].double(), -1)  # [N, V]
            ls = torch.log_softmax(student(s.input_ids).logits[0, :-1][mask].double(), -1)
            total += float((lt.exp() * (lt - ls)).sum())
            count += int(mask.sum())
    return total / max(count, 1)


def run_one(out: Path, teacher: str, budget: str, grid: str, method: str, seed: int, root: Path) -> dict[str, Any]:
    from rqat_deploy.builtin import synth
    from rqat_deploy.quant.spec import QuantSpec
    from rqat_deploy.train.recipes import option_defaults
    from rqat_deploy.train.run import TrainConfig, run_train

    name, bits = GRIDS[grid]
    teacher_dir = _teacher(teacher, root)
    sizes = option_defaults(METHODS[method]["recipe"], builtin=True) | (SMALL if budget == "small" else {})
    ck = root / "ckpt" / f"{teacher}-{budget}-{grid}-{method.replace(' ', '_')}-s{seed}"
    t0 = time.perf_counter()
    cfg = TrainConfig(
        out=str(ck), model=str(teacher_dir), quant=QuantSpec(bits=bits, grid=name), seed=seed, force=True,
        calib=synth.default_data("calib"), train_data=synth.default_data("train"), **sizes, **METHODS[method],
    )
    run_train(cfg, progress=False)
    seconds = time.perf_counter() - t0
    kl = heldout_kl(teacher_dir, ck, _heldout(root))
    shutil.rmtree(ck, ignore_errors=True)
    return {"teacher": teacher, "budget": budget, "grid": grid, "method": method, "seed": seed,
            "kl": kl, "seconds": round(seconds, 1)}


def _done(results: Path) -> set[tuple]:
    if not results.exists():
        return set()
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(r["teacher"], r["budget"], r["grid"], r["method"], r["seed"]) for r in rows}


def table(results: Path) -> str:
    """Mean held-out KL per method and its paired difference to GPTQ (same seed), as Markdown."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    key = lambda r: (r["teacher"], r["budget"], r["grid"])  # noqa: E731
    lines = ["| teacher | budget | grid | method | seeds | held-out KL | vs GPTQ (paired, mean [min, max]) |",
             "|---|---|---|---|---:|---:|---|"]
    for k in sorted({key(r) for r in rows}):
        here = [r for r in rows if key(r) == k]
        gptq = {r["seed"]: r["kl"] for r in here if r["method"] == "GPTQ"}
        for m in METHODS:
            mine = {r["seed"]: r["kl"] for r in here if r["method"] == m}
            if not mine:
                continue
            diffs = [mine[s] - gptq[s] for s in mine if s in gptq]
            rel = f"{statistics.mean(diffs):+.4f} [{min(diffs):+.4f}, {max(diffs):+.4f}]" if diffs and m != "GPTQ" else ""
            lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {m} | {len(mine)} | {statistics.mean(mine.values()):.4f} | {rel} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/flagship"))
    ap.add_argument("--model", choices=["builtin", "random"], nargs="+", default=["random"])
    ap.add_argument("--budget", choices=["small", "preset"], nargs="+", default=["small"])
    ap.add_argument("--grids", choices=list(GRIDS), nargs="+", default=list(GRIDS))
    ap.add_argument("--methods", choices=list(METHODS), nargs="+", default=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    if not args.table_only:
        import torch

        torch.set_num_threads(args.threads)
        done = _done(results)
        for teacher in args.model:
            for budget in args.budget:
                for grid in args.grids:
                    for seed in args.seeds:
                        for method in args.methods:
                            if (teacher, budget, grid, method, seed) in done:
                                continue
                            row = run_one(args.out, teacher, budget, grid, method, seed, args.out)
                            with results.open("a") as f:
                                f.write(json.dumps(row) + "\n")
                            print(f"{teacher:8s} {budget:6s} {grid:8s} s{seed} {method:20s} KL {row['kl']:.5f} "
                                  f"({row['seconds']:.0f} s)", flush=True)
    if results.exists():
        print(table(results))


if __name__ == "__main__":
    main()
