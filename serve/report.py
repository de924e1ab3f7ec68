"""Benchmark reports: per-model summaries, ``report.json``, ``report.md`` and PNG plots.

``report.json`` (DESIGN.md 9) holds, per model under ``models[<label>]``, at least ``accuracy``,
``n``, ``thinking_tokens_mean``, ``thinking_tokens_correct_mean``, ``thinking_tokens_incorrect_mean``,
``truncated_fraction`` and, for runtimes that generate, ``ttft_s``, ``prefill_tokens_per_s``,
``decode_tokens_per_s`` (medians of the speed runs, or of the evaluation generations when no speed
run was made). Besides: the accuracy confidence interval over seeds, per-seed accuracies, restart
counts, every raw per-response measurement (``raw``; the texts are in the responses JSONL), the
speed repetitions, the model's files and sha256, the environment and package versions, with
several models, ratios to a baseline (``compare``), and, with ``--reference``, ``kl_to_reference_mean``
and ``top1_agreement`` per model (with ``fidelity`` details) and the reference under ``reference``. Every file is written to a temporary name in the
same directory and renamed, so a report is never half-written.

**Inflation** (DESIGN.md 9; every report, every runtime and grade-only mode), per model and
gathered under ``inflation`` with the baseline (``--baseline``, default the first model):

- ``thinking_tokens_ratio``: mean thinking tokens over the problems both the model and the
  baseline answered (each problem's responses averaged over seeds first), divided by the
  baseline's mean over the same problems; ``thinking_tokens_ratio_ci``: its 95 % percentile
  bootstrap interval, problems resampled with replacement (:data:`BOOTSTRAP_RESAMPLES` resamples,
  seed :data:`BOOTSTRAP_SEED`); ``thinking_tokens_ratio_n``: the problems paired; the baseline's
  own ratio is 1 [1, 1].
- ``loop_fraction``: responses whose thinking loops; ``unclosed_thinking_fraction``: responses whose
  thinking never closes; ``truncated_fraction``: responses that hit the token limit (over all
  responses); ``answer_seen_then_lost_fraction``: graded responses that are wrong although a
  candidate answer inside their thinking equals the gold answer (``..._of_incorrect``: over the
  wrong ones). Definitions: :mod:`rqat_deploy.data.thinking`.

With thinking guards, ``guards`` holds each model's settings (resolved for its tokenizer) and how
often each guard fired (:func:`rqat_deploy.serve.guards.summarize_guard_reports`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import statistics
import sys
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

from rqat_deploy.files import atomic_write_bytes, atomic_write_text
from rqat_deploy.serve.guards import summarize_guard_reports

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "COMPARE_FIELDS",
    "INFLATION_FIELDS",
    "PACKAGES",
    "accuracy_interval",
    "add_inflation",
    "bootstrap_difference_ci",
    "bootstrap_ratio_ci",
    "compare_models",
    "environment_info",
    "file_hashes",
    "model_info",
    "package_versions",
    "render_markdown",
    "spread_stats",
    "summarize_model",
    "write_plots",
    "write_report",
    "write_training_curves",
]

#: Packages whose versions every report records (absent ones are recorded as None).
PACKAGES: tuple[str, ...] = (
    "rqat-deploy", "torch", "transformers", "tokenizers", "datasets", "safetensors", "gguf",
    "llama-cpp-python", "vllm", "compressed-tensors", "math-verify", "numpy", "matplotlib",
)
#: Per-model fields that ``compare`` divides by the baseline's.
COMPARE_FIELDS: tuple[str, ...] = (
    "accuracy", "thinking_tokens_mean", "thinking_tokens_correct_mean", "thinking_tokens_incorrect_mean",
    "truncated_fraction", "restarts_mean", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s",
)
#: Per-model inflation keys (DESIGN.md 9), gathered under the report's ``inflation``.
INFLATION_FIELDS: tuple[str, ...] = (
    "thinking_tokens_mean", "thinking_tokens_ratio", "thinking_tokens_ratio_ci", "loop_fraction",
    "unclosed_thinking_fraction", "truncated_fraction", "answer_seen_then_lost_fraction",
    "answer_seen_then_lost_of_incorrect",
)
#: Bootstrap resamples of the thinking-token ratio's interval, and their seed.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# Two-sided 95 % Student-t quantiles for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
    2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
    2.045, 2.042,
)
_HASHED_SUFFIXES = (".gguf", ".safetensors", ".bin", ".json", ".model", ".txt", ".jinja")


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def _mean(values: Iterable[float | int | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _median(values: Iterable[float | int | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _the_one(values: Iterable[str | None]) -> str | list[str] | None:
    """The value all records share, the sorted distinct values when they differ, None when none has one."""
    distinct = sorted({v for v in values if v})
    return distinct[0] if len(distinct) == 1 else (distinct or None)


def spread_stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """Median, min, max, standard deviation and count of repeated measurements."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"median": None, "min": None, "max": None, "std": None, "n": 0}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95 % Student-t interval of two or more values.

    Args:
        values: the samples (e.g. per-seed accuracies or paired differences).

    Returns:
        ``(mean, low, high)``.

    Raises:
        ValueError: fewer than two values.
    """
    k = len(values)
    if k < 2:
        raise ValueError(f"a t-interval needs two or more values, got {k}")
    mean = sum(values) / k
    t = _T975[k - 2] if k - 1 <= len(_T975) else 1.96
    half = t * statistics.stdev(values) / math.sqrt(k)
    return mean, mean - half, mean + half


def accuracy_interval(per_seed: Sequence[float], n_correct: int, n_total: int) -> dict[str, Any]:
    """95 % confidence interval of the accuracy.

    With two or more seeds: mean of the per-seed accuracies +- Student-t quantile x standard error
    (the spread between sampling seeds, as the paper reports). With one seed: the Wilson score
    interval of ``n_correct / n_total`` (the sampling error over questions).

    Args:
        per_seed: accuracy of each seed.
        n_correct: correct responses over all seeds.
        n_total: graded responses over all seeds.

    Returns:
        ``{"low", "high", "std", "method"}`` (None values when nothing was graded).
    """
    if n_total == 0:
        return {"low": None, "high": None, "std": None, "method": None}
    if len(per_seed) >= 2:
        _, low, high = t_interval(per_seed)
        std = statistics.stdev(per_seed)
        return {"low": max(0.0, low), "high": min(1.0, high), "std": std, "method": f"t over {len(per_seed)} seeds"}
    z = 1.959964
    p = n_correct / n_total
    denom = 1 + z * z / n_total
    center = (p + z * z / (2 * n_total)) / denom
    half = z * math.sqrt(p * (1 - p) / n_total + z * z / (4 * n_total * n_total)) / denom
    return {"low": max(0.0, center - half), "high": min(1.0, center + half), "std": None, "method": f"wilson over {n_total} responses"}


def summarize_model(
    records: Sequence[dict[str, Any]],
    *,
    speed: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Summarize one model's per-response records.

    Args:
        records: one dict per response with at least ``index``, ``seed``, ``correct`` (None when the
            question has no gold answer), ``thinking_tokens``, ``truncated``, ``restarts``; and,
            from runtimes, ``ttft_s``, ``prefill_tokens_per_s``, ``decode_tokens_per_s``. The
            ``grader`` of the graded records becomes the summary's ``grader`` (the one that decided
            every score; a sorted list if they differ).
        speed: the runtime's speed measurement (see ``Runtime.speed``), if one was made.
        info: model description (path, runtime, bits, hashes...) merged into the summary.

    Returns:
        The per-model entry of ``report.json``.
    """
    graded = [r for r in records if r.get("correct") is not None]
    correct = [r for r in graded if r["correct"]]
    incorrect = [r for r in graded if not r["correct"]]
    seeds = sorted({r.get("seed", 0) for r in graded})
    per_seed = {}
    for s in seeds:
        rs = [r for r in graded if r.get("seed", 0) == s]
        per_seed[str(s)] = sum(bool(r["correct"]) for r in rs) / len(rs)
    ci = accuracy_interval(list(per_seed.values()), len(correct), len(graded))
    think = [r.get("thinking_tokens") for r in records]
    think_vals = sorted(float(t) for t in think if t is not None)
    out: dict[str, Any] = dict(info or {})
    out.update(
        {
            "n": len({r["index"] for r in records}),
            "n_responses": len(records),
            "n_graded": len(graded),
            "seeds": seeds,
            "accuracy": len(correct) / len(graded) if graded else None,
            "accuracy_per_seed": per_seed,
            "accuracy_std": ci["std"],
            "accuracy_ci95": [ci["low"], ci["high"]],
            "accuracy_ci_method": ci["method"],
            "grader": _the_one(r.get("grader") for r in graded),
            "answer_found_fraction": _mean(r.get("extracted") is not None for r in graded),
            "thinking_tokens_mean": _mean(think),
            "thinking_tokens_median": _median(think),
            "thinking_tokens_p90": think_vals[min(len(think_vals) - 1, math.ceil(0.9 * len(think_vals)) - 1)] if think_vals else None,
            "thinking_tokens_correct_mean": _mean(r.get("thinking_tokens") for r in correct),
            "thinking_tokens_incorrect_mean": _mean(r.get("thinking_tokens") for r in incorrect),
            "thinking_token_unit": _the_one(r.get("thinking_token_unit") for r in records),
            "thinking_closed_fraction": _mean(r.get("thinking_closed") for r in records if r.get("has_thinking")),
            "truncated_fraction": _mean(r.get("truncated") for r in records),
            "loop_fraction": _mean(r.get("loop") for r in records),
            "unclosed_thinking_fraction": _mean(r.get("unclosed_thinking") for r in records),
            "answer_seen_then_lost_fraction": _mean(r.get("answer_seen_then_lost") for r in graded),
            "answer_seen_then_lost_of_incorrect": _mean(r.get("answer_seen_then_lost") for r in incorrect),
            "restarts_mean": _mean(r.get("restarts") for r in records),
            "restarts_correct_mean": _mean(r.get("restarts") for r in correct),
            "restarts_incorrect_mean": _mean(r.get("restarts") for r in incorrect),
            "completion_tokens_mean": _mean(r.get("n_completion_tokens") for r in records),
        }
    )
    gen_timing = {
        key: spread_stats([r[key] for r in records if r.get(key) is not None])
        for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s")
    }
    if any(v["n"] for v in gen_timing.values()):
        out["generation_timing"] = gen_timing
    for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
        from_speed = (speed or {}).get(key, {})
        value = from_speed.get("median") if isinstance(from_speed, dict) else None
        if value is None and gen_timing[key]["n"]:
            value = gen_timing[key]["median"]
        out[key] = value
    if speed is not None:
        out["speed"] = speed
    guard_reports = [r.get("guards") for r in records]
    if out.get("guards") or any(guard_reports):
        out["guards"] = {"settings": out.get("guards"), **summarize_guard_reports(guard_reports)}
    out["raw"] = [{k: v for k, v in r.items() if k not in ("response", "question")} for r in records]
    return out


def _per_problem_thinking(model: dict[str, Any]) -> dict[Any, float]:
    """A model's mean thinking tokens per problem (over its seeds), from its ``raw`` records."""
    by_problem: dict[Any, list[float]] = {}
    for r in model.get("raw", []):
        if r.get("thinking_tokens") is not None and r.get("index") is not None:
            by_problem.setdefault(r["index"], []).append(float(r["thinking_tokens"]))
    return {k: sum(v) / len(v) for k, v in by_problem.items()}


def _resampled_means(
    a: Sequence[float], b: Sequence[float], resamples: int, seed: int
) -> tuple[Any, Any] | None:
    """Means of ``a`` and of ``b`` over ``resamples`` bootstrap draws of their paired items (None with
    fewer than two items)."""
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"paired values differ in length: {len(x)} vs {len(y)}")
    if len(x) < 2:
        return None
    rng, mx, my = np.random.default_rng(seed), [], []
    for start in range(0, resamples, 256):  # bounded memory on large datasets
        draws = rng.integers(0, len(x), size=(min(256, resamples - start), len(x)))
        mx.append(x[draws].mean(axis=1))
        my.append(y[draws].mean(axis=1))
    return np.concatenate(mx), np.concatenate(my)


def _percentile_interval(values: Any, level: float) -> tuple[float, float] | None:
    import numpy as np

    if not len(values):
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ratio_ci(
    numer: Sequence[float], denom: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``mean(numer) / mean(denom)`` over paired items.

    Args:
        numer: the model's value per item (problem).
        denom: the baseline's value for the same items.
        resamples: bootstrap resamples (items drawn with replacement, pairs kept together).
        seed: the generator's seed.
        level: coverage.

    Returns:
        ``(low, high)``, or None with fewer than two items or when every resample's denominator is 0.
    """
    means = _resampled_means(numer, denom, resamples, seed)
    if means is None:
        return None
    num, den = means
    return _percentile_interval(num[den > 0] / den[den > 0], level)


def bootstrap_difference_ci(
    a: Sequence[float], b: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``mean(a) - mean(b)`` over paired items (arguments as
    :func:`bootstrap_ratio_ci`; None with fewer than two items)."""
    means = _resampled_means(a, b, resamples, seed)
    return None if means is None else _percentile_interval(means[0] - means[1], level)


def add_inflation(models: dict[str, dict[str, Any]], baseline: str) -> dict[str, Any]:
    """Add each model's thinking-token ratio to the baseline (with its bootstrap interval) to its
    summary, and gather the inflation keys (see the module docstring).

    Args:
        models: per-model summaries by label (updated in place).
        baseline: the label of the baseline.

    Returns:
        The report's ``inflation`` section: ``{"baseline", "method", "models": {label: {key: value}}}``.
    """
    base = _per_problem_thinking(models[baseline])
    for label, m in models.items():
        own = _per_problem_thinking(m)
        shared = sorted(set(own) & set(base), key=str)
        numer, denom = [own[k] for k in shared], [base[k] for k in shared]
        ratio = sum(numer) / sum(denom) if shared and sum(denom) > 0 else None
        ci = [1.0, 1.0] if label == baseline and ratio is not None else bootstrap_ratio_ci(numer, denom)
        m.update(thinking_tokens_ratio=ratio, thinking_tokens_ratio_ci=list(ci) if ratio is not None and ci else None,
                 thinking_tokens_ratio_n=len(shared))
    return {
        "baseline": baseline,
        "method": f"ratio of mean thinking tokens over shared problems; 95% percentile bootstrap over problems "
                  f"({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED})",
        "models": {label: {k: m.get(k) for k in (*INFLATION_FIELDS, "thinking_tokens_ratio_n")} for label, m in models.items()},
    }


def compare_models(models: dict[str, dict[str, Any]], baseline: str) -> dict[str, Any]:
    """Ratios of each model's headline numbers to a baseline model's.

    Args:
        models: per-model summaries by label.
        baseline: the label of the baseline.

    Returns:
        ``{"baseline": label, "ratios": {label: {field: value / baseline value or None}}}``; a
        ratio is None when either value is missing or the baseline's is 0.
    """
    base = models[baseline]
    ratios: dict[str, dict[str, float | None]] = {}
    for label, m in models.items():
        row = {}
        for key in COMPARE_FIELDS:
            a, b = m.get(key), base.get(key)
            row[key] = (a / b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b != 0 else None
        ratios[label] = row
    return {"baseline": baseline, "fields": list(COMPARE_FIELDS), "ratios": ratios}


# --------------------------------------------------------------------------------------------------
# Environment, versions, model files
# --------------------------------------------------------------------------------------------------


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None when not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = _metadata.version(name)
        except _metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment_info() -> dict[str, Any]:
    """Where the benchmark ran: OS, Python, CPU, thread counts, accelerator."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = bool(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except Exception:  # torch missing or broken: the report still gets written
        info["cuda_available"] = None
    return info


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(path: str | os.PathLike[str]) -> dict[str, Any]:
    """sha256 and size of a model file, or of every weight / config / tokenizer file of a directory.

    Args:
        path: a file (``.gguf``) or a model directory.

    Returns:
        ``{relative name: {"sha256", "bytes"}}`` (empty for a Hub id that is not on disk).
    """
    p = Path(path)
    if p.is_file():
        return {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}}
    if not p.is_dir():
        return {}
    out = {}
    for f in sorted(p.rglob("*")):
        if f.is_file() and f.suffix in _HASHED_SUFFIXES:
            out[str(f.relative_to(p))] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
    return out


_GGUF_NOMINAL_BITS = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8, "Q6_K": 6, "Q5_K": 5, "Q5_0": 5, "Q5_1": 5,
                      "Q4_K": 4, "Q4_0": 4, "Q4_1": 4, "Q3_K": 3, "Q2_K": 2, "TQ2_0": 2, "TQ1_0": 1.6}


def _gguf_bits(path: Path) -> dict[str, Any]:
    """Nominal bits and effective bits per weight of the decoder-block matrices of a GGUF file."""
    try:
        import gguf
    except ImportError:
        return {}
    reader = gguf.GGUFReader(str(path))
    by_type: dict[str, int] = {}
    n_el = n_bytes = 0
    for t in reader.tensors:
        if not t.name.startswith("blk.") or len(t.shape) < 2:
            continue
        name = t.tensor_type.name
        by_type[name] = by_type.get(name, 0) + int(t.n_elements)
        n_el += int(t.n_elements)
        n_bytes += int(t.n_bytes)
    if not n_el:
        return {}
    main = max(by_type, key=lambda k: by_type[k])
    return {
        "bits": _GGUF_NOMINAL_BITS.get(main),
        "bits_per_weight": 8.0 * n_bytes / n_el,
        "weight_types": by_type,
    }


def _dir_bits(path: Path) -> dict[str, Any]:
    """Bits of a quantized checkpoint, a compressed-tensors / GPTQ export or a float model directory."""
    quant = path / "rqat_quant.json"
    if quant.exists():
        meta = json.loads(quant.read_text())
        from rqat_deploy.quant.grids import grid_for

        bits, grid, g = int(meta["bits"]), meta.get("grid", "uniform"), int(meta.get("group_size", 128))
        return {"bits": bits, "bits_per_weight": grid_for(grid, bits, g).bits_per_weight(), "grid": grid, "group_size": g}
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        return {}
    cfg = json.loads(cfg_path.read_text())
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict):
        bits = qc.get("bits")
        group = qc.get("group_size")
        for group_cfg in (qc.get("config_groups") or {}).values():
            weights = (group_cfg or {}).get("weights") or {}
            bits, group = weights.get("num_bits", bits), weights.get("group_size", group)
        if bits:
            bpw = bits + (16 + bits) / group if group else float(bits)
            return {"bits": int(bits), "bits_per_weight": bpw, "quant_method": qc.get("quant_method")}
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "")
    width = {"float32": 32, "bfloat16": 16, "float16": 16}.get(dtype)
    return {"bits": width, "bits_per_weight": float(width) if width else None}


def _grpo_history(path: Path) -> dict[str, list[float]] | None:
    """The per-step GRPO metrics a checkpoint's recipe records (reward, response length, entropy...), or None."""
    try:
        recipe = json.loads((path / "rqat_quant.json").read_text()).get("recipe") or {}
        history = recipe.get("reports", {}).get("grpo", {}).get("history")
    except (OSError, ValueError, AttributeError):
        return None
    return history if isinstance(history, dict) and history else None


def model_info(path: str, *, hashes: bool = True) -> dict[str, Any]:
    """Describe a model for the report: path, kind, bits, file hashes.

    Args:
        path: a GGUF file, a model directory or a Hub id.
        hashes: compute sha256 of the model files.

    Returns:
        ``{"path", "kind", "bits", "bits_per_weight", "files", ...}``.
    """
    p = Path(path)
    info: dict[str, Any] = {"path": str(path)}
    try:
        if p.is_file() and p.suffix.lower() == ".gguf":
            info["kind"] = "gguf"
            info.update(_gguf_bits(p))
        elif p.is_dir():
            info["kind"] = "checkpoint" if (p / "rqat_quant.json").exists() else "hf"
            info.update(_dir_bits(p))
        else:
            info["kind"] = "hub"
    except Exception as exc:  # a bits guess must never stop a benchmark
        info["bits_error"] = f"{type(exc).__name__}: {exc}"
    if info.get("kind") == "checkpoint":
        history = _grpo_history(p)
        if history:
            info["grpo_history"] = history
    info.setdefault("bits", None)
    info.setdefault("bits_per_weight", None)
    if hashes:
        info["files"] = file_hashes(p)
    return info


# --------------------------------------------------------------------------------------------------
# Markdown and plots
# --------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    """A table cell: ``–`` for missing, fixed decimals for ordinary floats, ``g`` format for extremes."""
    if value is None:
        return "–"
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def _listed(value: Any) -> Any:
    """A list as ``a, b``; anything else as it is."""
    return ", ".join(map(str, value)) if isinstance(value, list) else value


def render_markdown(report: dict[str, Any]) -> str:
    """The ``report.md`` text: one row per model, the comparison to the baseline, the environment."""
    lines = ["# rqat-deploy bench", ""]
    ds = report.get("dataset") or {}
    lines.append(f"Dataset: `{ds.get('spec')}` ({ds.get('n')} questions); created {report.get('created')}.")
    cfg = report.get("config") or {}
    if cfg:
        shown = ", ".join(
            f"{k}={cfg[k] if cfg[k] is not None else 'auto'}"
            for k in ("runtime", "max_tokens", "seeds", "temperature", "top_k", "top_p", "greedy", "grader")
            if k in cfg
        )
        lines.append(f"Settings: {shown}.")
    if report.get("interrupted"):
        lines.append("**Interrupted**: the numbers cover the responses that finished.")
    lines += [
        "",
        "| model | runtime | bits/w | n | accuracy | 95% CI | grader | think tok | think (correct) | think (incorrect) | truncated | restarts | TTFT s | prefill tok/s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in report.get("models", {}).items():
        ci = m.get("accuracy_ci95") or [None, None]
        bits = m.get("bits_per_weight") if m.get("bits_per_weight") is not None else m.get("bits")
        lines.append(
            "| " + " | ".join(
                [
                    f"`{label}`", str(m.get("runtime") or "–"), _fmt(bits), str(m.get("n")), _fmt(m.get("accuracy")),
                    f"{_fmt(ci[0])}–{_fmt(ci[1])}" if ci[0] is not None else "–", _fmt(_listed(m.get("grader"))),
                    _fmt(m.get("thinking_tokens_mean"), 1), _fmt(m.get("thinking_tokens_correct_mean"), 1),
                    _fmt(m.get("thinking_tokens_incorrect_mean"), 1), _fmt(m.get("truncated_fraction")),
                    _fmt(m.get("restarts_mean"), 2), _fmt(m.get("ttft_s")), _fmt(m.get("prefill_tokens_per_s"), 1),
                    _fmt(m.get("decode_tokens_per_s"), 1),
                ]
            ) + " |"
        )
    units = {m.get("thinking_token_unit") for m in report.get("models", {}).values()} - {None}
    if units:
        lines.append("")
        lines.append(f"Thinking tokens counted as: {', '.join(sorted(map(str, units)))}.")
    lines += _inflation_lines(report)
    lines += _guard_lines(report)
    lines += _fidelity_lines(report)
    comp = report.get("compare")
    if comp:
        lines += ["", f"## Ratios to `{comp['baseline']}`", ""]
        fields = comp["fields"]
        lines.append("| model | " + " | ".join(fields) + " |")
        lines.append("|---|" + "---|" * len(fields))
        for label, row in comp["ratios"].items():
            lines.append(f"| `{label}` | " + " | ".join(_fmt(row.get(f), 3) for f in fields) + " |")
    env = report.get("environment") or {}
    if env:
        lines += ["", "## Environment", ""]
        for key in ("platform", "python", "cpu", "cpu_count", "torch_threads", "gpu"):
            if env.get(key) is not None:
                lines.append(f"- {key}: {env[key]}")
        versions = {k: v for k, v in (report.get("packages") or {}).items() if v}
        if versions:
            lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines) + "\n"


def _pct(value: Any) -> str:
    """A fraction as a percentage cell (``–`` when missing)."""
    return "–" if value is None else f"{100 * value:.1f}%"


def _inflation_lines(report: dict[str, Any]) -> list[str]:
    """The inflation section of ``report.md`` (thinking-length ratio and failure fractions)."""
    inf = report.get("inflation")
    if not inf:
        return []
    lines = [
        "", f"## Thinking inflation vs `{inf['baseline']}`", "",
        f"Ratio: {inf['method']}. Loop: a run of {report.get('config', {}).get('loop_ngram')} thinking tokens seen "
        f"{report.get('config', {}).get('loop_repeats')} times. Seen-then-lost: wrong, yet the gold answer appears in "
        "the thinking (over graded responses).", "",
        "| model | think tok | ratio | 95% CI | loop | unclosed | truncated | seen-then-lost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, m in inf["models"].items():
        ci = m.get("thinking_tokens_ratio_ci")
        lines.append(
            f"| `{label}` | {_fmt(m.get('thinking_tokens_mean'), 1)} | {_fmt(m.get('thinking_tokens_ratio'), 3)} | "
            f"{f'{_fmt(ci[0], 3)}–{_fmt(ci[1], 3)}' if ci else '–'} | {_pct(m.get('loop_fraction'))} | "
            f"{_pct(m.get('unclosed_thinking_fraction'))} | {_pct(m.get('truncated_fraction'))} | "
            f"{_pct(m.get('answer_seen_then_lost_fraction'))} |"
        )
    return lines


def _guard_lines(report: dict[str, Any]) -> list[str]:
    """The thinking-guards section of ``report.md`` (empty when no guard ran)."""
    rows = {label: m["guards"] for label, m in report.get("models", {}).items() if m.get("guards")}
    if not rows:
        return []
    lines = [
        "", "## Thinking guards", "",
        "| model | settings | budget fired | loop breaker fired | hesitation fired (steps) | forced tokens |",
        "|---|---|---|---|---|---|",
    ]
    for label, g in rows.items():
        settings = g.get("settings") or {}
        shown = ", ".join(f"{k}={settings[k]}" for k in ("budget", "loop_breaker", "hesitation_penalty") if k in settings)
        lines.append(
            f"| `{label}` | {shown or '–'} | {g['budget_fired']} ({_pct(g['budget_fired_fraction'])}) | "
            f"{g['loop_fired']} ({_pct(g['loop_fired_fraction'])}) | {_fmt(g['hesitation_fired'])} | {_fmt(g['forced_tokens'])} |"
        )
    return lines


def _fidelity_lines(report: dict[str, Any]) -> list[str]:
    """The ``--reference`` section of ``report.md`` (empty without a reference)."""
    ref = report.get("reference")
    if not ref:
        return []
    lines = [
        "", f"## Fidelity to `{ref.get('path')}` ({ref.get('runtime')})", "",
        "Teacher-forced next-token predictions at every position of each rendered prompt; "
        "KL(reference ‖ model) over the full vocabulary (float64); top-1 = same argmax.", "",
        "| model | KL mean | KL median | KL max | top-1 agreement | positions |",
        "|---|---|---|---|---|---|",
    ]
    for label, m in report.get("models", {}).items():
        fid = m.get("fidelity") or {}
        lines.append(
            f"| `{label}` | {_fmt(m.get('kl_to_reference_mean'), 4)} | {_fmt(fid.get('kl_to_reference_median'), 4)} | "
            f"{_fmt(fid.get('kl_to_reference_max'), 4)} | {_fmt(m.get('top1_agreement'), 4)} | {fid.get('n_positions', '–')} |"
        )
    return lines


def _figure_png(fig: Any) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def write_plots(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """PNG plots, when matplotlib is importable (no global pyplot state is touched).

    - ``thinking_tokens.png``: the distribution of thinking tokens per response, one histogram per
      model (step outlines on shared bins), means marked.
    - ``thinking_tokens_by_model.png``: one box per model (quartiles, whiskers at 1.5 IQR, every
      response a dot, the mean a diamond), labelled with the ratio to the baseline and its interval.
    - ``accuracy_vs_bits.png``: accuracy (with its 95 % interval) against bits per weight, for the
      models whose bits are known.

    Args:
        report: the report dict.
        out_dir: where to write.

    Returns:
        The files written (empty without matplotlib or data).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return []
    out = Path(out_dir)
    written: list[Path] = []
    models = report.get("models", {})
    series = {
        label: [r["thinking_tokens"] for r in m.get("raw", []) if r.get("thinking_tokens") is not None]
        for label, m in models.items()
    }
    series = {k: v for k, v in series.items() if v}
    if series:
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot(1, 1, 1)
        hi = max(max(v) for v in series.values())
        bins = [hi * i / 30 for i in range(31)] if hi > 0 else [0, 1]
        for i, (label, vals) in enumerate(series.items()):
            color = f"C{i % 10}"
            ax.hist(vals, bins=bins, histtype="step", linewidth=1.6, color=color, label=f"{label} (mean {sum(vals) / len(vals):.0f})")
            ax.axvline(sum(vals) / len(vals), color=color, linestyle="--", linewidth=1)
        unit = {m.get("thinking_token_unit") for m in models.values()} - {None}
        ax.set_xlabel(f"thinking tokens per response ({', '.join(map(str, unit)) or 'tokens'})")
        ax.set_ylabel("responses")
        ax.set_title("Thinking length")
        ax.legend(fontsize=8)
        written.append(atomic_write_bytes(out / "thinking_tokens.png", _figure_png(fig)))
        written.append(atomic_write_bytes(out / "thinking_tokens_by_model.png", _figure_png(_thinking_by_model(report, series))))
    points = []
    for label, m in models.items():
        bits = m.get("bits_per_weight") if m.get("bits_per_weight") is not None else m.get("bits")
        if bits is not None and m.get("accuracy") is not None:
            points.append((label, float(bits), m["accuracy"], m.get("accuracy_ci95") or [None, None]))
    if points:
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot(1, 1, 1)
        for i, (label, bits, acc, ci) in enumerate(points):
            err = None
            if ci[0] is not None and ci[1] is not None:
                err = [[max(0.0, acc - ci[0])], [max(0.0, ci[1] - acc)]]
            ax.errorbar([bits], [acc], yerr=err, fmt="o", capsize=4, color=f"C{i % 10}", label=label)
        xs = [b for _, b, _, _ in points]
        if min(xs) > 0 and max(xs) / min(xs) > 4:
            ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("Accuracy vs bits")
        ax.legend(fontsize=8)
        written.append(atomic_write_bytes(out / "accuracy_vs_bits.png", _figure_png(fig)))
    runs = {label: m["grpo_history"] for label, m in models.items() if m.get("grpo_history")}
    if runs:
        written.append(write_training_curves(runs, out / "grpo_training.png"))
    return written


#: the training curves :func:`write_training_curves` draws, with their axis labels
TRAINING_PANELS = (("reward", "mean reward"), ("response_length", "response tokens"), ("entropy", "entropy (nats/token)"))


def write_training_curves(runs: dict[str, dict[str, list[float]]], path: str | os.PathLike[str]) -> Path:
    """One PNG of per-step training metrics: reward, response length and entropy, one line per run.

    Args:
        runs: per run label, its per-step series by name (a GRPO report's ``history``).
        path: the PNG file (written atomically).

    Returns:
        ``path``.

    Raises:
        ConfigError: matplotlib is not installed (the ``bench`` extra).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        from rqat_deploy.errors import ConfigError

        raise ConfigError("plots need matplotlib: pip install 'rqat-deploy[bench]'") from e
    fig = Figure(figsize=(12, 3.6))
    for k, (key, label) in enumerate(TRAINING_PANELS):
        ax = fig.add_subplot(1, len(TRAINING_PANELS), k + 1)
        for i, (name, series) in enumerate(runs.items()):
            values = series.get(key) or []
            ax.plot(range(1, len(values) + 1), values, color=f"C{i % 10}", linewidth=1.2, label=name)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(label)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle("GRPO training")
    return atomic_write_bytes(Path(path), _figure_png(fig))


def _version(text: str) -> tuple[int, ...]:
    """The leading numbers of a version string (``"3.11.2"`` -> ``(3, 11, 2)``)."""
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def _thinking_by_model(report: dict[str, Any], series: dict[str, list[float]]) -> Any:
    """The figure of ``thinking_tokens_by_model.png`` (see :func:`write_plots`)."""
    from matplotlib.figure import Figure

    models = report.get("models", {})
    labels = list(series)
    fig = Figure(figsize=(7, 1.2 + 0.6 * len(labels)))
    ax = fig.add_subplot(1, 1, 1)
    import matplotlib

    horizontal = {"orientation": "horizontal"} if _version(matplotlib.__version__) >= (3, 10) else {"vert": False}
    ax.boxplot([series[k] for k in labels], showfliers=False, widths=0.5, **horizontal)
    for i, label in enumerate(labels, 1):
        vals = series[label]
        jitter = [i + 0.18 * ((j * 0.618) % 1 - 0.5) for j in range(len(vals))]
        ax.scatter(vals, jitter, s=6, alpha=0.35, color=f"C{(i - 1) % 10}")
        ax.scatter([sum(vals) / len(vals)], [i], marker="D", color="black", zorder=3)
    names = []
    for label in labels:
        m = models.get(label, {})
        ratio, ci = m.get("thinking_tokens_ratio"), m.get("thinking_tokens_ratio_ci")
        names.append(label if ratio is None else f"{label}\nx{ratio:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
    ax.set_yticks(range(1, len(labels) + 1), names, fontsize=8)
    ax.invert_yaxis()  # the first model (the default baseline) on top
    unit = {m.get("thinking_token_unit") for m in models.values()} - {None}
    ax.set_xlabel(f"thinking tokens per response ({', '.join(map(str, unit)) or 'tokens'})")
    base = (report.get("inflation") or {}).get("baseline")
    ax.set_title("Thinking length per model" + (f" (ratio to {base})" if base else ""))
    return fig


def write_report(report: dict[str, Any], out_dir: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the plots into ``out_dir`` (atomically, file by file).

    Args:
        report: the report dict (JSON-serializable).
        out_dir: output directory (created).
        plots: also write PNG plots when matplotlib is importable.

    Returns:
        ``{"json": path, "markdown": path, "plots": [paths]}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {
        "json": atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str, allow_nan=True) + "\n"),
        "markdown": atomic_write_text(out / "report.md", render_markdown(report)),
    }
    paths["plots"] = write_plots(report, out) if plots else []
    return paths


def now_iso() -> str:
    """Current UTC time, ISO 8601, seconds precision."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
