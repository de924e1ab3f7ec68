"""Does the built-in teacher's thinking length move? Issue 14's targets, measured in llama.cpp.

Usage::

    python benchmarks/teacher_thinking.py --out runs/teacher-thinking            # train, export, bench, table
    python benchmarks/teacher_thinking.py --out runs/teacher-thinking --table-only
    python benchmarks/teacher_thinking.py --out runs/tt-mine --teacher DIR      # another build of the teacher

It exports the built-in teacher as an F16 GGUF, trains (``rqat-deploy train --recipe rtn``, 2 bits,
the default uniform G128 spec) and exports its RTN int2 student as a Q4_0 GGUF (exact for uniform
int2, as the quickstart and the guard table do), then runs ``rqat-deploy bench`` on both in
llama.cpp, greedy, on ``--per-level`` x 4 built-in held-out problems with the teacher as
``--baseline``. The table gives:

- the teacher's accuracy with its Wilson 95 % interval;
- per level, the teacher's mean thinking tokens on the problems it gets right and on those it gets
  wrong, and their ratio (issue 14's target: >= 1.2 within each level), with a 95 % percentile
  bootstrap interval (2,000 resamples of the level's problems, seed 0);
- the RTN int2 student's mean thinking tokens over the teacher's on the same problems, with the
  bench's paired bootstrap interval (target: >= 1.3, interval above 1.0), the fraction of answers
  that say "Wait" (redo a step or start over), and both models' loop, truncated and unclosed
  fractions.

Finished steps are kept in ``OUT`` (a rerun resumes); the table goes to ``OUT/teacher_thinking.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from rqat_deploy.builtin import synth
from rqat_deploy.builtin.tiny_reasoner import teacher_version


def _files(out: Path, teacher_dir: Path) -> dict[str, Path]:
    """The teacher's F16 GGUF and the RTN int2 student's Q4_0 GGUF, made when missing."""
    from rqat_deploy.exporters.gguf import export_gguf

    teacher = out / "teacher-f16.gguf"
    if not teacher.exists():
        export_gguf(teacher_dir, teacher, embed_type="F16")
    ckpt, student = out / "rtn-int2", out / "rtn-int2-q4_0.gguf"
    if not (ckpt / "rqat_quant.json").exists():
        subprocess.run([sys.executable, "-m", "rqat_deploy.cli", "train", "--recipe", "rtn", "--bits", "2",
                        "--model", str(teacher_dir), "--out", str(ckpt)], check=True)
    if not student.exists():
        export_gguf(ckpt, student, gguf_type="Q4_0")
    return {"teacher": teacher, "RTN int2": student}


def _bench(out: Path, files: dict[str, Path], per_level: int, max_tokens: int, threads: int) -> dict[str, Any]:
    from rqat_deploy.builtin import synth
    from rqat_deploy.serve.bench import BenchConfig, run_bench

    report = out / "bench" / "report.json"
    if not report.exists():
        heldout = out / "heldout.jsonl"
        if not heldout.exists():
            synth.write_eval_jsonl(heldout, per_level, seed=synth.DEFAULT_DATA_SEED)
        paths = [str(p) for p in files.values()]
        run_bench(BenchConfig(models=paths, dataset=str(heldout), greedy=True, max_tokens=max_tokens, baseline=paths[0],
                              out_dir=out / "bench", speed=False, n_threads=threads, hashes=False, progress=True))
    return json.loads(report.read_text())


def _levels(out: Path) -> dict[int, int]:
    """Problem index -> level, from the held-out file the bench read."""
    rows = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines() if line.strip()]
    return {i: int(r["level"]) for i, r in enumerate(rows)}


def _wrong_over_right(rows: list[dict[str, Any]], resamples: int = 2000) -> tuple[float, float, float] | None:
    """Mean thinking when wrong / when right, with a percentile bootstrap interval over problems."""
    right = [r["thinking_tokens"] for r in rows if r["correct"]]
    wrong = [r["thinking_tokens"] for r in rows if not r["correct"]]
    if not right or not wrong:
        return None
    rng = random.Random(0)
    ratios = []
    for _ in range(resamples):
        sample = [rows[rng.randrange(len(rows))] for _ in rows]
        r = [x["thinking_tokens"] for x in sample if x["correct"]]
        w = [x["thinking_tokens"] for x in sample if not x["correct"]]
        if r and w and statistics.mean(r) > 0:
            ratios.append(statistics.mean(w) / statistics.mean(r))
    ratios.sort()
    lo, hi = ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1]
    return statistics.mean(wrong) / statistics.mean(right), lo, hi


def table(out: Path, teacher_dir: Path) -> str:
    """The Markdown tables of a finished run."""
    rep = json.loads((out / "bench" / "report.json").read_text())
    teacher, student = list(rep["models"].values())
    levels = _levels(out)
    raw = [r | {"level": levels[r["index"]]} for r in teacher["raw"]]
    acc_ci = teacher["accuracy_ci95"]
    lines = [
        f"Teacher {teacher_version(teacher_dir)}, {len(raw)} built-in held-out problems, greedy, llama.cpp (F16 GGUF), at most "
        f"{rep['config']['max_tokens']} tokens. Teacher accuracy {100 * teacher['accuracy']:.1f}% "
        f"[{100 * acc_ci[0]:.1f}%, {100 * acc_ci[1]:.1f}%] (Wilson 95%).",
        "",
        "| level | problems | right | thinking when right | thinking when wrong | wrong / right [95% CI] |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for level in sorted({r["level"] for r in raw}):
        rows = [r for r in raw if r["level"] == level]
        right = [r["thinking_tokens"] for r in rows if r["correct"]]
        wrong = [r["thinking_tokens"] for r in rows if not r["correct"]]
        ratio = _wrong_over_right(rows)
        cell = f"{ratio[0]:.2f} [{ratio[1]:.2f}, {ratio[2]:.2f}]" if ratio else ""
        lines.append(f"| {level} | {len(rows)} | {len(right)} | {statistics.mean(right) if right else float('nan'):.1f} | "
                     f"{statistics.mean(wrong) if wrong else float('nan'):.1f} | {cell} |")
    lines += [
        "",
        "| model | accuracy | thinking tokens | thinking x teacher [95% CI] | says Wait | loop | truncated | unclosed |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for label, m in zip(("teacher (F16)", "RTN int2 (Q4_0, exact)"), (teacher, student)):
        ci = m.get("thinking_tokens_ratio_ci") or [1.0, 1.0]
        a = m["accuracy_ci95"]
        wait = statistics.mean(r["restarts"] > 0 for r in m["raw"])
        lines.append(f"| {label} | {100 * m['accuracy']:.1f}% [{100 * a[0]:.0f}, {100 * a[1]:.0f}] | "
                     f"{m['thinking_tokens_mean']:.1f} | {m['thinking_tokens_ratio']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | "
                     f"{100 * wait:.1f}% | "
                     f"{100 * m['loop_fraction']:.1f}% | {100 * m['truncated_fraction']:.1f}% | "
                     f"{100 * m['unclosed_thinking_fraction']:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Working directory (GGUFs, student, bench, table).")
    parser.add_argument("--per-level", type=int, default=50, help="Held-out problems per level (4 levels).")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="Teacher checkpoint directory (default: the shipped built-in teacher).")
    parser.add_argument("--max-tokens", type=int, default=512, help="Generation limit per response.")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads.")
    parser.add_argument("--table-only", action="store_true", help="Print the table of a finished run.")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    teacher_dir = args.teacher or synth.default_model_dir()
    if not args.table_only:
        _bench(args.out, _files(args.out, teacher_dir), args.per_level, args.max_tokens, args.threads)
    text = table(args.out, teacher_dir)
    (args.out / "teacher_thinking.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
