"""GRPO on the built-in tiny reasoner: KD alone vs KD + GRPO vs zero-RL from RTN (CPU, offline).

Usage::

    python benchmarks/grpo_micro.py --out runs/grpo                  # 2 bits, seeds 0-2 (resumes)
    python benchmarks/grpo_micro.py --out runs/grpo --table-only     # the README table of finished runs
    python benchmarks/grpo_micro.py --out runs/grpo-v2 --model DIR   # the same on another teacher

Arms, at 2 bits (uniform grid, group 128), from the teacher and its built-in data, with the
defaults of ``rqat-deploy train`` without ``--model`` (:func:`rqat_deploy.train.recipes.option_defaults`):

- ``RTN``: round to nearest (one run, seed-independent);
- ``KD``: ``--recipe reasoning-qat-kd`` (GPTQ, then full-vocabulary KD of the latent weights), per seed;
- ``KD + GRPO``: ``--recipe reasoning-qat`` (the same KD, then GRPO on the latent weights the KD left,
  in one run). Not ``--recipe grpo --init-from`` the KD checkpoint: a checkpoint holds codes, so its
  latent weights restart at their grid points, and 16 GRPO steps (at 1e-4 or 1e-3) moved none across a
  rounding boundary (0 of 3,145,728 codes changed, measured);
- ``RTN + GRPO (zero-RL)``: ``--recipe grpo --init-from`` the RTN checkpoint;
- each GRPO arm again with the length-aware reward (``--length-penalty 0.5``: thinking beyond the
  teacher's greedy length for the same prompt).

GRPO trains what the form says: the latent weights after KD (which trained them), the scales from
RTN. Every model is graded greedily on ``--per-level`` x 4 held-out problems with PyTorch on the
dequantized weights (replicate_micro's evaluation). Each finished run is one line of
``OUT/results.jsonl``; rerunning skips them, so an interrupted benchmark resumes. The table gives
mean accuracy and thinking length over seeds, paired differences with t-intervals, and the wall
time per GRPO step; ``OUT/grpo_curves.png`` plots reward, response length and entropy per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replicate_micro as micro  # noqa: E402  (the shared evaluation and interval helpers)

LENGTH_PENALTY = 0.5
ARMS = ("RTN", "KD", "KD + GRPO", "KD + GRPO + length", "RTN + GRPO (zero-RL)", "RTN + GRPO + length")
PAIRS = (("KD + GRPO", "KD"), ("KD + GRPO + length", "KD"), ("KD + GRPO + length", "KD + GRPO"),
         ("RTN + GRPO (zero-RL)", "RTN"), ("RTN + GRPO + length", "RTN + GRPO (zero-RL)"))


def _train(out: Path, model: str | None, **kw: Any) -> dict[str, Any]:
    """One ``rqat-deploy train`` run with the built-in defaults; its recorded recipe."""
    from rqat_deploy.train.recipes import option_defaults
    from rqat_deploy.train.run import TrainConfig, run_train

    if not (out / "rqat_quant.json").exists():  # another teacher (--model) runs at the built-in model's defaults too
        sizes = option_defaults(kw["recipe"], builtin=True)
        run_train(TrainConfig(out=str(out), model=model, force=True, **(sizes | kw)), progress=False)
    return json.loads((out / "rqat_quant.json").read_text())["recipe"]


def run(out: Path, seeds: list[int], per_level: int, model: str | None, grpo_steps: int | None) -> None:
    """Train and grade every missing run."""
    results, work = out / "results.jsonl", out / "work"
    done = micro._done(results)
    extra = {"grpo_steps": grpo_steps} if grpo_steps else {}

    def arm(method: str, seed: int, path: Path, recipe: dict[str, Any]) -> None:
        if (method, 2, seed) in done:
            return
        t = time.perf_counter()
        row = {"method": method, "bits": 2, "seed": seed, **micro._evaluate(path, per_level)}
        row["seconds"] = round(time.perf_counter() - t, 1)
        grpo = recipe.get("reports", {}).get("grpo")
        if grpo:
            row["grpo"] = {k: grpo[k] for k in ("seconds_per_step", "steps", "trains", "history", "sampling")}
        micro._record(results, row)
        done.add((method, 2, seed))

    rtn = work / "rtn"
    arm("RTN", 0, rtn, _train(rtn, model, recipe="rtn"))
    for seed in seeds:
        kd = work / f"kd-s{seed}"
        arm("KD", seed, kd, _train(kd, model, recipe="reasoning-qat-kd", seed=seed))
        for length, suffix in ((0.0, ""), (LENGTH_PENALTY, "+len")):
            name = "KD + GRPO" + (" + length" if length else "")
            path = work / f"kd-grpo{suffix}-s{seed}"  # one run: KD, then GRPO on the KD's latent weights
            arm(name, seed, path, _train(path, model, recipe="reasoning-qat", seed=seed, length_penalty=length, **extra))
            name = "RTN + GRPO" + (" + length" if length else " (zero-RL)")
            path = work / f"rtn-grpo{suffix}-s{seed}"
            arm(name, seed, path, _train(path, model, recipe="grpo", init_from=str(rtn), seed=seed,
                                         length_penalty=length, **extra))


def _rows(out: Path) -> dict[str, list[dict[str, Any]]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        by.setdefault(r["method"], []).append(r)
    return by


def _rtn_as_seeds(by: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The one RTN run repeated for every seed of the zero-RL arm (RTN has no seed), for paired differences."""
    rtn = by.get("RTN", [])
    return [dict(rtn[0], seed=r["seed"]) for r in by.get("RTN + GRPO (zero-RL)", [])] if rtn else []


def table(out: Path) -> str:
    """Markdown table of the finished runs."""
    by = _rows(out)
    n = next(iter(by.values()))[0]["n"]
    lines = [
        f"Greedy accuracy on {n} held-out problems, 2 bits; mean over seeds [95% CI: t over seeds, Wilson over "
        "problems for the single RTN run]; thinking tokens per response; GRPO s/step: wall time per GRPO step.",
        "",
        "| method | seeds | accuracy | 95% CI | thinking tokens | GRPO s/step |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for method in ARMS:
        rs = sorted(by.get(method, []), key=lambda r: r["seed"])
        if not rs:
            continue
        accs = [r["accuracy"] for r in rs]
        lo, hi = micro._interval(accs, sum(r["n_correct"] for r in rs), sum(r["n"] for r in rs))
        secs = [r["grpo"]["seconds_per_step"] for r in rs if r.get("grpo")]
        spd = f"{statistics.mean(secs):.1f}" if secs else ""
        lines.append(f"| {method} | {len(rs)} | {statistics.mean(accs):.1%} | [{lo:.1%}, {hi:.1%}] | "
                     f"{statistics.mean(r['thinking_tokens'] for r in rs):.1f} | {spd} |")
    lines += ["", "Paired differences (same seed, same problems; mean [95% t-interval over seeds]):", ""]
    by_paired = dict(by, RTN=_rtn_as_seeds(by))
    for a, b in PAIRS:
        acc = micro._paired(by_paired.get(a, []), by_paired.get(b, []))
        think = micro._paired(by_paired.get(a, []), by_paired.get(b, []), key="thinking_tokens", scale=1.0)
        if acc:
            lines.append(f"- {a} - {b}: accuracy {acc} (pp); thinking tokens {think}")
    return "\n".join(lines)


def curves(out: Path) -> Path | None:
    """``OUT/grpo_curves.png``: reward, response length and entropy per step, one line per GRPO run."""
    from rqat_deploy.serve.report import write_training_curves

    runs = {f"{r['method']} s{r['seed']}": r["grpo"]["history"] for rs in _rows(out).values() for r in rs if r.get("grpo")}
    return write_training_curves(runs, out / "grpo_curves.png") if runs else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/grpo"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-level", type=int, default=50, help="held-out problems per level (4 levels)")
    parser.add_argument("--model", default=None, help="the teacher directory (default: the built-in tiny reasoner)")
    parser.add_argument("--grpo-steps", type=int, default=None, help="override the built-in preset's GRPO steps")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        import torch

        torch.set_num_threads(1)
        run(args.out, args.seeds, args.per_level, args.model, args.grpo_steps)
    text = table(args.out)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    png = curves(args.out)
    if png is not None:
        print(f"curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
