"""Micro-scale replication of the paper's claims on the built-in tiny reasoner (CPU, offline).

Usage::

    python benchmarks/replicate_micro.py --out runs/micro                 # everything, 3 seeds
    python benchmarks/replicate_micro.py --out runs/micro --bits 2        # one bit width (run 2 and 3 in parallel)
    python benchmarks/replicate_micro.py --out runs/micro --table-only     # print the table of finished runs

For each bit width (uniform grid, group 128, the default spec) and seed it trains, from the
built-in teacher and its built-in data (train-split problems only), the paper's ablation rows as the
paper ran them (``--recipe S|R|C|C+S|C+R``: :data:`rqat_deploy.train.recipes.PAPER_ROWS`) and the
baselines:

- ``RTN``: round to nearest (no data; one run, seed-independent);
- ``GPTQ``, ``AWQ``: on 128 math samples (the built-in traces), as the paper's baselines;
- ``S``: RTN, then stage-2 scale training with plain cross-entropy (no calibration);
- ``R``: RTN, then stage 2 with the paper's loss (``rr+topk_kl``: 0.2 x teacher-rectified CE + top-20 KL);
- ``C``: stage 1 only (block-wise calibration on the 80/20 mix, from RTN, raw block MSE);
- ``C+S``: stage 1, then stage 2 with plain cross-entropy;
- ``C+R``: stage 1, then stage 2 with the paper's loss (the paper's method);
- ``Reasoning-QAT``: its KD stage (``--recipe reasoning-qat-kd``): GPTQ on 128 math samples, then KD (full-vocabulary KL) on the latent weights
  through the straight-through estimator, Adam (0.9, 0.95), cosine, 3 % warm-up (the recipe, at the
  built-in preset's sizes);
- at 2 bits only, stage 1 on the other calibration mixes: ``C, reasoning only`` (100 % traces) and
  ``C, pre-training only`` (100 % general text).

C+S and C+R of a seed start from that seed's C checkpoint (``--init-from``), so they differ only in
the loss. Every model is graded greedily on the same ``--per-level`` x 4 held-out problems (never
seen in training) with PyTorch on the dequantized weights, at most 512 new tokens. The table
reports, per method, the mean accuracy over seeds with a 95 % t-interval over seeds (Wilson over
problems for RTN and the teacher), the mean paired difference to ``C`` over seeds, the mean thinking
length, its ratio to the teacher's on the same problems with a paired 95 % bootstrap interval over
problems (issue 14: does training fight thinking inflation?), and the truncated fraction. A results
file holds runs of one teacher version (``rqat_teacher_version``); another version needs another
``--out``.

Each run appends one JSON line to ``OUT/results.jsonl``; rerunning skips finished runs, so an
interrupted replication resumes. The settings are each recipe's defaults for the built-in model
(:func:`rqat_deploy.train.recipes.option_defaults`: the built-in preset); nothing here was tuned on
held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

METHODS = ("RTN", "GPTQ", "AWQ", "S", "R", "C", "C+S", "C+R", "Reasoning-QAT")
MIX_METHODS = ("C, reasoning only", "C, pre-training only")


def _evaluate(model_dir: Path | None, per_level: int) -> dict[str, Any]:
    """Greedy held-out accuracy of a checkpoint (None: the teacher)."""
    from rqat_deploy.builtin import synth
    from rqat_deploy.quant.checkpoint import load_model
    from rqat_deploy.builtin.tiny_reasoner import evaluate

    if model_dir is None:
        ev = evaluate(synth.default_model_dir(), per_level=per_level)
    else:
        model, tok = load_model(model_dir, form="dequantized")
        ev = evaluate(model_dir, model=model, tokenizer=tok, per_level=per_level)
    return {
        "accuracy": ev["accuracy"], "n": ev["n"], "n_correct": sum(r["correct"] for r in ev["results"]),
        "thinking_tokens": ev["thinking_tokens_mean"], "truncated": ev["truncated_fraction"],
        "by_level": {k: v["accuracy"] for k, v in ev["by_level"].items()},
        "correct": [bool(r["correct"]) for r in ev["results"]],
        "thinking": [int(r["thinking_tokens"]) for r in ev["results"]],
        "teacher_version": _teacher_version(),
    }


def _teacher_version() -> str:
    from rqat_deploy.builtin.tiny_reasoner import teacher_version

    return teacher_version()


def _thinking_ratio(rows: list[dict[str, Any]], teacher: dict[str, Any] | None) -> str:
    """Mean thinking tokens over the teacher's on the same problems, with a 95 % percentile bootstrap
    interval over problems (pairs kept; a problem's value is its mean over seeds)."""
    if not teacher or any("thinking" not in r for r in rows + [teacher]):
        return ""
    from rqat_deploy.serve.report import bootstrap_ratio_ci

    per_problem = [statistics.mean(vals) for vals in zip(*(r["thinking"] for r in rows))]
    ratio = sum(per_problem) / sum(teacher["thinking"])
    ci = bootstrap_ratio_ci(per_problem, teacher["thinking"])
    return f"{ratio:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{ratio:.2f}"


def _train(out: Path, **kw: Any) -> dict[str, Any]:
    """One ``rqat-deploy train`` run on the built-in model; returns its stage reports."""
    from rqat_deploy.quant.spec import QuantSpec
    from rqat_deploy.train.run import TrainConfig, run_train

    bits = kw.pop("bits")
    cfg = TrainConfig(out=str(out), quant=QuantSpec(bits=bits), force=True, **kw)  # the recipe's built-in defaults
    run_train(cfg, progress=False)
    return json.loads((out / "rqat_quant.json").read_text())["recipe"]["reports"]


def _done(results: Path) -> set[tuple[str, int, int]]:
    if not results.exists():
        return set()
    return {(r["method"], r["bits"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())}


def _record(results: Path, row: dict[str, Any]) -> None:
    with results.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"  {row['method']:<22} {row['bits']}-bit seed {row['seed']}: {row['accuracy']:.1%} "
          f"({row['seconds']:.0f} s)", flush=True)


def run(out: Path, bits_list: list[int], seeds: list[int], per_level: int, methods: set[str] | None = None) -> None:
    """Train and grade every missing run (see the module docstring); only ``methods`` when given."""
    from rqat_deploy.builtin import synth

    results = out / "results.jsonl"
    work = out / "work"
    done = _done(results)
    version = _teacher_version()
    if results.exists():
        versions = {json.loads(line).get("teacher_version", "tiny-reasoner-v1") for line in results.read_text().splitlines()}
        if versions - {version}:
            sys.exit(f"{results} holds runs of teacher {sorted(versions)}, not {version}: choose another --out")
    synth.default_data("calib")  # writes both files of the 80/20 mix
    mixes = {"C, reasoning only": synth.default_data("train"),
             "C, pre-training only": str(synth.default_data_dir().expanduser().resolve() / "general_text.jsonl")}

    def step(method: str, bits: int, seed: int, fn: Any) -> None:
        if (method, bits, seed) in done or (methods is not None and method not in methods):
            return
        t = time.perf_counter()
        path, reports = fn()
        row = {"method": method, "bits": bits, "seed": seed, **_evaluate(path, per_level)}
        row["seconds"] = round(time.perf_counter() - t, 1)
        row["stage2"] = {k: reports.get("stage2", {}).get(k) for k in ("eval_before", "eval_after", "lr", "steps")} if reports else None
        _record(results, row)
        done.add((method, bits, seed))

    if 2 in bits_list:
        step("teacher", 16, 0, lambda: (None, None))
    for seed in seeds:
        for bits in bits_list:
            d = work / f"b{bits}-s{seed}"

            def trained(method: str, sub: str, **kw: Any) -> None:
                step(method, bits, seed, lambda: (d / sub, _train(d / sub, bits=bits, seed=seed, **kw)))

            if seed == seeds[0]:
                step("RTN", bits, 0, lambda: (d / "rtn", _train(d / "rtn", recipe="rtn", bits=bits)))
            trained("GPTQ", "gptq", recipe="gptq")
            trained("AWQ", "awq", recipe="awq")
            trained("S", "s", recipe="S")
            trained("R", "r", recipe="R")
            c = d / "c"
            wanted = [m for m in ("C", "C+S", "C+R") if methods is None or m in methods]
            if any((m, bits, seed) not in done for m in wanted) and not (c / "rqat_quant.json").exists():
                _train(c, recipe="C", bits=bits, seed=seed)
            step("C", bits, seed, lambda: (c, None))
            trained("C+S", "c_s", recipe="C+S", init_from=str(c))
            trained("C+R", "c_r", recipe="C+R", init_from=str(c))
            trained("Reasoning-QAT", "rqat_kd", recipe="reasoning-qat-kd")
            if bits == 2:
                for name, spec in mixes.items():
                    trained(name, name[3:7], recipe="C", calib=spec)
            for sub in ("rtn", "gptq", "awq", "s", "r", "c_s", "c_r", "rqat_kd", "reas", "pre-"):
                shutil.rmtree(d / sub, ignore_errors=True)  # keep disk use small; C stays for reruns


def _interval(accs: list[float], n_correct: int, n: int) -> tuple[float, float]:
    """95 % interval: t over seeds (2+ runs), Wilson over problems (1 run); as ``rqat-deploy bench``."""
    from rqat_deploy.serve.report import accuracy_interval

    ci = accuracy_interval(accs, n_correct, n)
    return ci["low"], ci["high"]


def table(out: Path) -> str:
    """Markdown table of the finished runs in ``OUT/results.jsonl``."""
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["method"], r["bits"]), []).append(r)
    n = rows[0]["n"]
    lines = [
        f"Teacher {rows[0].get('teacher_version', 'tiny-reasoner-v1')}. "
        f"Greedy accuracy on {n} held-out problems (at most 512 new tokens); mean over seeds [95% CI: t over seeds, Wilson over problems for "
        "single runs]; Δ vs C: mean paired difference to stage 1 alone (same seed); thinking x teacher: mean "
        "thinking tokens over the teacher's on the same problems, 95% bootstrap interval over problems; truncated: "
        "responses that hit the token limit.",
        "",
        "| bits | method | seeds | accuracy | 95% CI | Δ vs C (pp) | thinking tokens | thinking x teacher [95% CI] | truncated |",
        "|---|---|---:|---:|---|---:|---:|---|---:|",
    ]
    teacher = by.get(("teacher", 16))
    t = teacher[0] if teacher else None
    if t:
        lo, hi = _interval([t["accuracy"]], t["n_correct"], t["n"])
        lines.append(f"| 16 | teacher (fp16) | 1 | {t['accuracy']:.1%} | [{lo:.1%}, {hi:.1%}] | | {t['thinking_tokens']:.1f} "
                     f"| 1.00 | {t['truncated']:.1%} |")
    for bits in sorted({b for _, b in by if b != 16}):
        c_by_seed = {r["seed"]: r["accuracy"] for r in by.get(("C", bits), [])}
        for method in METHODS + MIX_METHODS:
            rs = sorted(by.get((method, bits), []), key=lambda r: r["seed"])
            if not rs:
                continue
            accs = [r["accuracy"] for r in rs]
            lo, hi = _interval(accs, sum(r["n_correct"] for r in rs), sum(r["n"] for r in rs))
            diffs = [r["accuracy"] - c_by_seed[r["seed"]] for r in rs if r["seed"] in c_by_seed and method != "C"]
            delta = f"{100 * statistics.mean(diffs):+.1f}" if diffs and method != "RTN" else ""
            think = statistics.mean(r["thinking_tokens"] for r in rs)
            truncated = statistics.mean(r["truncated"] for r in rs)
            lines.append(f"| {bits} | {method} | {len(rs)} | {statistics.mean(accs):.1%} | [{lo:.1%}, {hi:.1%}] | "
                         f"{delta} | {think:.1f} | {_thinking_ratio(rs, t)} | {truncated:.1%} |")
    lines += ["", "Paired differences (same seed, same problems; mean [95% t-interval over seeds], pp):", ""]
    for a, b, bits in (("C+R", "C+S", 2), ("C+R", "C+S", 3), ("R", "S", 2), ("R", "S", 3), ("C+S", "S", 2),
                       ("C+R", "R", 2), ("C+R", "GPTQ", 2), ("AWQ", "GPTQ", 2), ("Reasoning-QAT", "GPTQ", 2),
                       ("Reasoning-QAT", "C+R", 2), ("Reasoning-QAT", "C+R", 3),
                       ("C", "C, reasoning only", 2), ("C", "C, pre-training only", 2)):
        d = _paired(by.get((a, bits), []), by.get((b, bits), []))
        if d:
            lines.append(f"- {bits}-bit {a} - {b}: {d}")
    return "\n".join(lines)


def _paired(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], key: str = "accuracy", scale: float = 100.0) -> str:
    """Mean paired difference of ``key`` (x ``scale``: percentage points by default) over common seeds
    with a t-interval (empty if < 2 seeds)."""
    b_by_seed = {r["seed"]: r[key] for r in rows_b}
    diffs = [scale * (r[key] - b_by_seed[r["seed"]]) for r in rows_a if r["seed"] in b_by_seed]
    if len(diffs) < 2:
        return ""
    from rqat_deploy.serve.report import t_interval

    m, lo, hi = t_interval(diffs)
    return f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}] over {len(diffs)} seeds"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/micro"))
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-level", type=int, default=50, help="held-out problems per level (4 levels)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=None, choices=["teacher", *METHODS, *MIX_METHODS],
                        help="run only these methods (the others are skipped, not removed)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        import torch

        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        run(args.out, args.bits, args.seeds, args.per_level, set(args.methods) if args.methods else None)
        print(f"finished in {time.perf_counter() - t0:.0f} s")
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
