"""``rqat-deploy quickstart``: the whole pipeline on the built-in tiny reasoner, offline, on a CPU.

One call does what a user of the toolkit does with a real model::

    teacher (built-in, fp16) ──► RTN int2 ─────────────────► GGUF Q2_K ─┐
                             └─► rqat int2 (stage 1 + 2) ───► GGUF Q2_K ─┤
    teacher ──► GGUF F16 ──► llama.cpp's own quantizer ─────► GGUF Q2_K ─┼─► llama.cpp bench on held-out
    teacher ──► GGUF F16 ────────────────────────────────────────────────┘   problems

The students are trained on a grid llama.cpp stores exactly and written in its native 2-bit (or
3-bit) type, so the file *is* the trained model at ~2.6 bits per weight: the kquant grid as Q2_K
(Q3_K at 3 bits) by default, or llama.cpp's Q2_0 (2.25 bits per weight) with ``grid="q2_0"``. Q2_K
is the default because it measured faster and more accurate here: on this x86 CPU llama.cpp runs
Q2_0 through its scalar fallback kernel (~6x slower decode than Q2_K on the built-in model), and
RTN on the Q2_K grid keeps more accuracy than RTN on Q2_0 (README). The row "llama.cpp <type>" is
the teacher quantized by llama.cpp itself to the same type (``llama_model_quantize``, no importance
matrix): the runtime's own quantizer, the baseline a user would otherwise pick. The held-out
problems come from the split the teacher and the training data never saw
(:mod:`rqat_deploy.builtin.synth`).

Outputs under ``out``: ``rtn-int2/`` and ``rqat-int2/`` (checkpoints), ``*.gguf``,
``heldout.jsonl``, ``bench/`` (``report.json``, ``report.md``, plots, responses) and
``quickstart.json`` / ``quickstart.md`` (the table).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rqat_deploy.errors import BackendError, ConfigError, OutputExistsError

__all__ = ["QuickstartConfig", "run_quickstart", "format_table"]

#: the llama.cpp file type its own quantizer is asked for, by the students' grid: the type of most
#: tensors in the file (llama.cpp keeps a few wider, as its quantize tool does)
LLAMACPP_FTYPE_OF = {"kquant": {2: "Q2_K", 3: "Q3_K_S"}, "q2_0": {2: "Q2_0"}}


@dataclass(frozen=True)
class QuickstartConfig:
    """Settings of :func:`run_quickstart` (defaults: the README run, ~5 min on two CPU cores).

    Attributes:
        out: output directory (must not exist unless ``force``).
        bits: weight bit width of the students (2 or 3).
        grid: the students' grid: ``kquant`` (Q2_K / Q3_K) or ``q2_0`` (Q2_0, 2 bits only).
        per_level: held-out problems per difficulty level (4 levels).
        max_tokens: generation limit per answer.
        threads: CPU threads for training and llama.cpp (None: torch's default for training and
            one llama.cpp thread: at hidden size 256, synchronizing two threads costs more than it
            saves, 334 vs ~3,600 decode tok/s measured on two cores).
        calib_samples, calib_seq_len, train_samples, train_seq_len, stage1_epochs, stage2_lr,
            global_batch: training settings; None = the built-in model's defaults
            (:data:`rqat_deploy.train.recipes.BUILTIN_PRESET`; ``train_seq_len`` None: whole samples).
            Smaller values make a smoke run.
        speed: also run the fixed-length decode-speed measurement.
        seed: training seed.
        force: replace an existing ``out``.
    """

    out: str = "quickstart"
    bits: int = 2
    grid: str = "kquant"
    per_level: int = 25
    max_tokens: int = 512
    threads: int | None = None
    calib_samples: int | None = None
    calib_seq_len: int | None = None
    train_samples: int | None = None
    train_seq_len: int | None = None
    stage1_epochs: int | None = None
    stage2_lr: float | None = None
    global_batch: int | None = None
    speed: bool = True
    seed: int = 0
    force: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (2, 3):
            raise ConfigError(f"quickstart bits must be 2 or 3, got {self.bits}")
        if self.grid not in LLAMACPP_FTYPE_OF:
            raise ConfigError(f"quickstart grid must be one of {sorted(LLAMACPP_FTYPE_OF)}, got {self.grid!r}")
        self.spec.grid_def  # the grid exists at this width (q2_0 is 2-bit only)
        if self.per_level < 1 or self.max_tokens < 16:
            raise ConfigError("per_level must be >= 1 and max_tokens >= 16")

    @property
    def spec(self) -> Any:
        """The students' :class:`~rqat_deploy.quant.spec.QuantSpec`."""
        from rqat_deploy.quant.spec import QuantSpec

        return QuantSpec(bits=self.bits, grid=self.grid)

    def train_overrides(self) -> dict[str, Any]:
        """:class:`~rqat_deploy.train.run.TrainConfig` fields: the built-in preset, then the fields set here."""
        from rqat_deploy.train.recipes import BUILTIN_PRESET

        mine = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        keys = set(BUILTIN_PRESET) | {"stage1_epochs", "train_seq_len"}
        return dict(BUILTIN_PRESET) | {k: mine[k] for k in keys if mine.get(k) is not None}


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def run_quickstart(cfg: QuickstartConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train RTN and rqat students of the built-in teacher, export all three to GGUF, bench them.

    Args:
        cfg: the settings.
        progress: print steps and progress bars.

    Returns:
        ``{"rows": [per-model table row], "outputs": {...}, "seconds": {...}}`` (also written to
        ``out/quickstart.json``; the table to ``out/quickstart.md``).

    Raises:
        OutputExistsError: ``cfg.out`` exists and ``cfg.force`` is false.
        ConfigError: the built-in model is missing.
        BackendError: llama-cpp-python is not installed.
    """
    import importlib.util
    import shutil

    import torch

    from rqat_deploy.builtin import synth
    from rqat_deploy.exporters.gguf import export_gguf
    from rqat_deploy.files import atomic_write_text
    from rqat_deploy.serve.bench import BenchConfig, run_bench
    from rqat_deploy.serve.runtime_llamacpp import llamacpp_quantize
    from rqat_deploy.train.run import TrainConfig, run_train

    if importlib.util.find_spec("llama_cpp") is None:  # fail before minutes of training, not after
        raise BackendError('quickstart runs the models in llama.cpp: pip install -e ".[llamacpp]" (see README)')
    out = Path(cfg.out)
    if out.exists():
        if not cfg.force:
            raise OutputExistsError(f"{out} already exists: choose another --out or pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    teacher = synth.default_model_dir()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    heldout = synth.write_eval_jsonl(out / "heldout.jsonl", cfg.per_level, seed=synth.DEFAULT_DATA_SEED)
    spec = cfg.spec
    qtype = spec.gguf_type  # the students' native GGUF type: exact
    tag = f"int{cfg.bits}"
    students = {}
    for recipe in ("rtn", "rqat"):
        _say(progress, f"[quickstart] training {recipe} {tag} on the built-in teacher ...")
        t = time.perf_counter()
        tcfg = TrainConfig(out=str(out / f"{recipe}-{tag}"), recipe=recipe, quant=spec, seed=cfg.seed,
                           **cfg.train_overrides())
        students[recipe] = run_train(tcfg, progress=progress)
        seconds[f"train_{recipe}"] = round(time.perf_counter() - t, 1)

    _say(progress, f"[quickstart] exporting GGUF (teacher F16; students {qtype}, exact) and quantizing the "
                   f"teacher with llama.cpp's own {qtype} quantizer ...")
    t = time.perf_counter()
    f16 = export_gguf(teacher, out / "teacher-f16.gguf", embed_type="F16")
    own = llamacpp_quantize(f16.path, out / f"teacher-llamacpp-{qtype.lower()}.gguf",
                            LLAMACPP_FTYPE_OF[cfg.grid][cfg.bits], threads=cfg.threads or 1)
    files: dict[str, tuple[str, str, bool]] = {  # row -> (GGUF path, type, exact)
        "teacher": (f16.path, "F16", all(x.exact for x in f16.tensors)),
        "llamacpp": (str(own), LLAMACPP_FTYPE_OF[cfg.grid][cfg.bits], False),
    }
    for recipe, ckpt in students.items():
        exp = export_gguf(ckpt, out / f"{recipe}-{tag}-{qtype.lower()}.gguf")
        files[recipe] = (exp.path, exp.gguf_type, all(x.exact for x in exp.tensors))
    seconds["export"] = round(time.perf_counter() - t, 1)

    _say(progress, f"[quickstart] benchmarking in llama.cpp on {4 * cfg.per_level} held-out problems ...")
    t = time.perf_counter()
    paths = [files[k][0] for k in ("teacher", "llamacpp", "rtn", "rqat")]
    report = run_bench(BenchConfig(
        models=paths, dataset=str(heldout), max_tokens=cfg.max_tokens, greedy=True, out_dir=out / "bench",
        baseline=paths[0], speed=cfg.speed, speed_prompt_tokens=128, speed_tokens=64, n_threads=cfg.threads or 1,
        hashes=False, progress=progress,
    ))
    seconds["bench"] = round(time.perf_counter() - t, 1)
    seconds["total"] = round(time.perf_counter() - t0, 1)

    rows = []
    labels = {"teacher": "teacher (fp16)", "llamacpp": f"llama.cpp's own {qtype}", "rtn": f"RTN {tag}",
              "rqat": f"rqat {tag}"}
    for name, summary in zip(("teacher", "llamacpp", "rtn", "rqat"), report["models"].values()):
        path, gtype, exact = files[name]
        ci = summary.get("accuracy_ci95") or [None, None]
        rows.append({
            "model": labels[name],
            "gguf": Path(path).name,
            "gguf_type": gtype,
            "bits_per_weight": summary.get("bits_per_weight"),
            "file_mb": round(Path(path).stat().st_size / 1e6, 2),
            "exact": exact,
            "accuracy": summary["accuracy"],
            "accuracy_ci95": ci,
            "thinking_tokens": summary["thinking_tokens_mean"],
            "thinking_tokens_ratio": summary.get("thinking_tokens_ratio"),
            "thinking_tokens_ratio_ci": summary.get("thinking_tokens_ratio_ci"),
            "decode_tok_s": summary.get("decode_tokens_per_s"),
        })
    result = {
        "rows": rows,
        "n_problems": 4 * cfg.per_level,
        "seconds": seconds,
        "outputs": {
            "dir": str(out), "bench_report": report["outputs"]["markdown"],
            "checkpoints": {k: str(v) for k, v in students.items()}, "gguf": {k: v[0] for k, v in files.items()},
        },
        "config": dataclasses.asdict(cfg),
    }
    atomic_write_text(out / "quickstart.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(out / "quickstart.md", format_table(result) + "\n")
    return result


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(result: dict[str, Any]) -> str:
    """The quickstart table as Markdown (what the CLI prints).

    Args:
        result: the return value of :func:`run_quickstart`.

    Returns:
        The table and the locations of the reports.
    """
    lines = [
        f"Held-out problems: {result['n_problems']} (greedy, llama.cpp). Accuracy 95% CI in brackets; bits/weight "
        "over the decoder's matrices (embeddings and norms excluded); thinking x teacher: mean thinking tokens over "
        "the teacher's, 95% bootstrap CI over problems.",
        "",
        "| model | GGUF | bits/weight | file MB | accuracy | thinking tokens | thinking x teacher | decode tok/s |",
        "|---|---|---:|---:|---|---:|---|---:|",
    ]
    for r in result["rows"]:
        lo, hi = r["accuracy_ci95"]
        ci = f" [{lo:.0%}, {hi:.0%}]" if lo is not None and hi is not None else ""
        kind = r["gguf_type"] + (" (exact)" if r["exact"] else "")
        rci = r.get("thinking_tokens_ratio_ci")
        ratio = _num(r.get("thinking_tokens_ratio"), ".2f") + (f" [{rci[0]:.2f}, {rci[1]:.2f}]" if rci else "")
        lines.append(
            f"| {r['model']} | {kind} | {_num(r['bits_per_weight'], '.2f')} | {r['file_mb']:.2f} | "
            f"{_num(r['accuracy'], '.1%')}{ci} | {_num(r['thinking_tokens'], '.1f')} | {ratio} | "
            f"{_num(r['decode_tok_s'], '.0f')} |"
        )
    s, o = result["seconds"], result["outputs"]
    lines += [
        "",
        f"Time: {s['total']:.0f} s (train RTN {s['train_rtn']:.0f} s, rqat {s['train_rqat']:.0f} s, "
        f"export {s['export']:.0f} s, bench {s['bench']:.0f} s).",
        f"Reports: {o['bench_report']} (per-response answers in {Path(o['bench_report']).parent / 'responses'}); "
        f"checkpoints and GGUF files in {o['dir']}{os.sep}",
    ]
    return "\n".join(lines)
