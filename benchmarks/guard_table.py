"""Thinking guards on the built-in int2 students: accuracy and thinking length with and without each
guard, in llama.cpp (the README's guard table; issue 14).

Usage::

    python benchmarks/guard_table.py --out runs/guards                # train if needed, export, bench, table
    python benchmarks/guard_table.py --out runs/guards --table-only   # the table of the finished runs

It takes (or, when ``OUT/rtn-int2`` / ``OUT/rqat-int2`` are absent, trains with the defaults of
``rqat-deploy train --recipe rtn`` / ``rqat-deploy train`` on the built-in teacher) the RTN and rqat
int2 students, exports each as a Q4_0 GGUF (exact for uniform int2, as the quickstart does), writes
``--per-level`` x 4 built-in held-out problems, and runs ``rqat-deploy bench`` on both GGUFs in
llama.cpp, greedy, once per guard setting (:data:`SETTINGS`), each in ``OUT/bench-<setting>/``
(finished runs are kept, so a rerun resumes). Per model and setting the table gives accuracy with
its Wilson 95 % interval, the paired accuracy difference to the same model without guards, the
mean thinking tokens and their ratio to the unguarded run, both with 95 % percentile bootstrap
intervals over problems (2,000 resamples, seed 0), the loop / unclosed fractions and how often the
guard fired. The table goes to ``OUT/guard_table.md`` and stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: Guard settings benched: name -> BenchConfig fields.
SETTINGS: dict[str, dict[str, Any]] = {
    "none": {},
    "budget 128": {"think_budget": 128},
    "budget 256": {"think_budget": 256},
    "loop breaker": {"loop_breaker": True},
    "hesitation 3.0": {"hesitation_penalty": 3.0},
    "all (256, loop, 3.0)": {"think_budget": 256, "loop_breaker": True, "hesitation_penalty": 3.0},
}
STUDENTS = {"rtn": "RTN int2", "rqat": "rqat int2"}


def _students(out: Path) -> dict[str, Path]:
    """The Q4_0 GGUF of each student, training (``rqat-deploy train``) and exporting what is missing."""
    import subprocess

    from rqat_deploy.exporters.gguf import export_gguf

    ggufs = {}
    for recipe in STUDENTS:
        ckpt, gguf_path = out / f"{recipe}-int2", out / f"{recipe}-int2-q4_0.gguf"
        if not (ckpt / "rqat_quant.json").exists():
            print(f"[guards] rqat-deploy train --recipe {recipe} --out {ckpt}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "rqat_deploy.cli", "train", "--recipe", recipe, "--out", str(ckpt)],
                           check=True)
        if not gguf_path.exists():
            export_gguf(ckpt, gguf_path, gguf_type="Q4_0")
        ggufs[recipe] = gguf_path
    return ggufs


def _bench(out: Path, ggufs: dict[str, Path], per_level: int, max_tokens: int, threads: int) -> None:
    """One ``rqat-deploy bench`` per guard setting (skipping finished ones)."""
    from rqat_deploy.builtin import synth
    from rqat_deploy.serve.bench import BenchConfig, run_bench

    heldout = out / "heldout.jsonl"
    if not heldout.exists():
        synth.write_eval_jsonl(heldout, per_level, seed=synth.DEFAULT_DATA_SEED)
    for name, fields in SETTINGS.items():
        bench_dir = out / f"bench-{_slug(name)}"
        if (bench_dir / "report.json").exists():
            continue
        print(f"[guards] bench: {name}", file=sys.stderr)
        run_bench(BenchConfig(
            models=[str(ggufs[k]) for k in STUDENTS], dataset=str(heldout), greedy=True, max_tokens=max_tokens,
            out_dir=bench_dir, speed=False, n_threads=threads, hashes=False, progress=False, **fields,
        ))


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def _pairs(rows: list[dict], base: list[dict], key: str) -> tuple[list[float], list[float]]:
    """``key`` of the problems both runs answered (greedy: one response per problem), in pairs."""
    a = {r["index"]: float(r[key]) for r in rows if r.get(key) is not None}
    b = {r["index"]: float(r[key]) for r in base if r.get(key) is not None}
    shared = sorted(set(a) & set(b))
    return [a[k] for k in shared], [b[k] for k in shared]


def table(out: Path) -> str:
    """The Markdown table of the finished runs in ``out``."""
    from rqat_deploy.serve.report import bootstrap_difference_ci, bootstrap_ratio_ci

    reports = {name: json.loads((out / f"bench-{_slug(name)}" / "report.json").read_text())
               for name in SETTINGS if (out / f"bench-{_slug(name)}" / "report.json").exists()}
    if "none" not in reports:
        raise SystemExit(f"no finished unguarded run in {out}: run without --table-only first")
    n, max_tokens = reports["none"]["dataset"]["n"], reports["none"]["config"]["max_tokens"]
    lines = [
        f"Built-in held-out problems: {n} (greedy, llama.cpp, Q4_0 GGUF = exact int2 weights, at most {max_tokens} "
        "tokens). "
        "95% intervals in brackets: Wilson for accuracy; paired bootstrap over problems (2,000 resamples) for the "
        "differences to the same model without guards.",
        "",
        "| model | guard | accuracy | Δ acc vs none (pp) | thinking tokens | ratio vs none | loop | unclosed | guard fired |",
        "|---|---|---|---|---:|---|---:|---:|---:|",
    ]
    labels = list(reports["none"]["models"])
    for label, student in zip(labels, STUDENTS.values()):
        base = reports["none"]["models"][label]["raw"]
        for name, rep in reports.items():
            m = rep["models"][label]
            acc_ci = m["accuracy_ci95"]
            cells = [student, name, f"{100 * m['accuracy']:.1f}% [{100 * acc_ci[0]:.0f}, {100 * acc_ci[1]:.0f}]"]
            if name == "none":
                cells += ["", f"{m['thinking_tokens_mean']:.1f}", ""]
            else:
                acc, acc0 = _pairs(m["raw"], base, "correct")
                lo, hi = bootstrap_difference_ci(acc, acc0)
                num, den = _pairs(m["raw"], base, "thinking_tokens")
                r_lo, r_hi = bootstrap_ratio_ci(num, den)
                cells += [f"{100 * (sum(acc) - sum(acc0)) / len(acc):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]",
                          f"{m['thinking_tokens_mean']:.1f}", f"{sum(num) / sum(den):.3f} [{r_lo:.3f}, {r_hi:.3f}]"]
            cells += [f"{100 * m['loop_fraction']:.1f}%", f"{100 * m['unclosed_thinking_fraction']:.1f}%", _fired(m)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fired(m: dict[str, Any]) -> str:
    """How often the run's guards fired, in words."""
    g = m.get("guards")
    if not g:
        return ""
    parts = []
    settings = g.get("settings") or {}
    if settings.get("budget") is not None:
        parts.append(f"budget {100 * g['budget_fired_fraction']:.0f}%")
    if settings.get("loop_breaker"):
        parts.append(f"loop {100 * g['loop_fired_fraction']:.0f}%")
    if settings.get("hesitation_penalty"):
        parts.append(f"hesitation {g['hesitation_fired']} steps")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Working directory (students, GGUFs, bench runs, table).")
    parser.add_argument("--per-level", type=int, default=50, help="Held-out problems per level (4 levels).")
    parser.add_argument("--max-tokens", type=int, default=512, help="Generation limit per response.")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads.")
    parser.add_argument("--table-only", action="store_true", help="Print the table of finished runs.")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        _bench(args.out, _students(args.out), args.per_level, args.max_tokens, args.threads)
    text = table(args.out)
    (args.out / "guard_table.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
