"""Side by side with llama.cpp's own quantizers, on the built-in teacher, every model run in llama.cpp.

Usage::

    # llama.cpp's tools, built from the sources inside the llama-cpp-python sdist (a few minutes):
    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
    cmake -S /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/lcp/build -DLLAMA_CURL=OFF
    cmake --build /tmp/lcp/build -j 2 --target llama-quantize llama-imatrix
    python benchmarks/llamacpp_side_by_side.py --llama-bin /tmp/lcp/build/bin --out runs/sbs

Rows (2 bits; ``--bits 3`` adds the Q3_K rows):

- llama.cpp's ``llama-quantize`` on the F16 teacher: Q2_0, Q2_K, IQ2_XXS, IQ2_S, each with an
  importance matrix from ``llama-imatrix`` on the built-in calibration data (Q2_0 ignores it);
- ours, trained with ``rqat-deploy train`` on the built-in data and exported exactly: RTN, GPTQ and
  the flagship ``rqat`` on the q2_0 grid (Q2_0) and on the kquant grid (Q2_K);
- the teacher itself (F32 GGUF, the reference of the fidelity columns; and F16) and llama.cpp's Q4_0
  of it, for the decode speed of the common formats.

Columns: bits per weight of the decoder's quantized matrices (file bytes / weights, embeddings and
norms excluded), file MB, greedy accuracy on ``--per-level`` x 4 held-out problems with a 95 %
Wilson interval, mean thinking tokens, mean KL divergence to the teacher and top-1 agreement
(``bench --reference``: every next-token prediction over the held-out prompts, teacher-forced),
and decode tokens/s. The Markdown table goes to ``OUT/side_by_side.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

LLAMA_TYPES_2BIT = ("Q2_0", "Q2_K", "IQ2_XXS", "IQ2_S")
OURS_2BIT = {"q2_0": ("q2_0", 2), "Q2_K": ("kquant", 2)}
OURS_3BIT = {"Q3_K": ("kquant", 3)}


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def calibration_text(out: Path, n_docs: int = 256) -> Path:
    """The built-in calibration mix (80 % rendered reasoning traces, 20 % text) as one text file."""
    from rqat_deploy.builtin import synth
    from rqat_deploy.data.calib import build_calibration
    from rqat_deploy.models import load_hf_model

    _, tok = load_hf_model(str(synth.default_model_dir()))
    ids = build_calibration(tok, synth.default_data("calib"), n_docs, 512, seed=0).input_ids
    path = out / "calibration.txt"
    path.write_text("".join(tok.decode(row) for row in ids), encoding="utf-8")
    return path


def quantized_bits_per_weight(path: Path) -> float:
    """File bits per weight of the decoder blocks' matrices (``blk.*`` 2-D tensors) of a GGUF."""
    import gguf

    import rqat_deploy.ggml_types  # noqa: F401  (the reader then knows Q2_0)

    bits = weights = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            bits += 8 * int(t.n_bytes)
            weights += int(t.n_elements)
    return bits / weights


def llamacpp_quantize(bin_dir: Path, teacher_f16: Path, imatrix: Path, qtype: str, out: Path, log: Path) -> Path:
    path = out / f"llamacpp-{qtype}.gguf"
    if not path.exists():
        cmd = [str(bin_dir / "llama-quantize")] + ([] if qtype == "Q2_0" else ["--imatrix", str(imatrix)])
        _run(cmd + [str(teacher_f16), str(path), qtype, "1"], log)
    return path


def train_and_export(grid: str, bits: int, recipe: str, gguf_name: str, out: Path, seed: int) -> Path:
    from rqat_deploy.exporters.gguf import export_gguf
    from rqat_deploy.quant.spec import QuantSpec
    from rqat_deploy.train.run import TrainConfig, run_train

    path = out / f"ours-{recipe}-{gguf_name}.gguf"
    if not path.exists():
        ck = out / "ckpt" / f"{recipe}-{grid}{bits}"
        cfg = TrainConfig(out=str(ck), recipe=recipe, quant=QuantSpec(bits=bits, grid=grid), seed=seed, force=True)
        run_train(cfg, progress=False)
        export_gguf(ck, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", type=Path, required=True, help="directory of llama-quantize and llama-imatrix")
    ap.add_argument("--out", type=Path, default=Path("runs/side_by_side"))
    ap.add_argument("--bits", type=int, nargs="+", default=[2], choices=[2, 3])
    ap.add_argument("--per-level", type=int, default=50, help="held-out problems per level (4 levels)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from rqat_deploy.builtin import synth
    from rqat_deploy.exporters.gguf import export_gguf
    from rqat_deploy.serve.bench import BenchConfig, run_bench

    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    t0 = time.perf_counter()
    teacher = synth.default_model_dir()
    f16, f32 = out / "teacher-f16.gguf", out / "teacher-f32.gguf"
    for path, kind in ((f16, "F16"), (f32, "F32")):
        if not path.exists():
            export_gguf(teacher, path, embed_type=kind)
    imatrix = out / "imatrix.gguf"
    if not imatrix.exists():
        _run([str(args.llama_bin / "llama-imatrix"), "-m", str(f16), "-f", str(calibration_text(out)), "-o",
              str(imatrix), "-c", "512", "-t", str(args.threads)], log)
    models: dict[str, Path] = {"teacher (F32)": f32, "teacher (F16)": f16}
    for qtype in LLAMA_TYPES_2BIT + (("Q3_K",) if 3 in args.bits else ()) + ("Q4_0",):
        label = f"llama.cpp {qtype}" + ("" if qtype == "Q2_0" else " + imatrix")
        models[label] = llamacpp_quantize(args.llama_bin, f16, imatrix, qtype, out, log)
    ours = OURS_2BIT | (OURS_3BIT if 3 in args.bits else {})
    for gguf_name, (grid, bits) in ours.items():
        for recipe in ("rtn", "gptq", "rqat"):
            models[f"ours {recipe} {gguf_name}"] = train_and_export(grid, bits, recipe, gguf_name, out, args.seed)
    heldout = synth.write_eval_jsonl(out / "heldout.jsonl", args.per_level, seed=synth.DEFAULT_DATA_SEED)
    paths = [str(p) for p in models.values()]
    report = run_bench(BenchConfig(
        models=paths, dataset=str(heldout), max_tokens=256, greedy=True, out_dir=out / "bench", reference=str(f32),
        baseline=str(f32), speed=True, speed_prompt_tokens=128, speed_tokens=64, n_threads=args.threads, hashes=False,
        progress=True, force=True,
    ))
    rows = []
    for (label, path), s in zip(models.items(), report["models"].values()):
        ci = s.get("accuracy_ci95") or [None, None]
        rows.append({
            "model": label, "bpw": quantized_bits_per_weight(path), "file_mb": path.stat().st_size / 1e6,
            "accuracy": s["accuracy"], "ci": ci, "thinking": s["thinking_tokens_mean"],
            "kl": s.get("kl_to_reference_mean"), "top1": s.get("top1_agreement"), "decode": s.get("decode_tokens_per_s"),
        })
    (out / "side_by_side.json").write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - t0}, indent=2))
    table = _table(rows, 4 * args.per_level)
    (out / "side_by_side.md").write_text(table + "\n")
    print(table)


def _table(rows: list[dict[str, Any]], n: int) -> str:
    lines = [
        f"Built-in teacher, {n} held-out problems, greedy, llama.cpp (llama-cpp-python 0.3.36), one thread.",
        "",
        "| model | bits/weight | file MB | accuracy [95% CI] | thinking tokens | KL to teacher | top-1 agreement | decode tok/s |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lo, hi = r["ci"]
        ci = f" [{lo:.1%}, {hi:.1%}]" if lo is not None else ""
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        top1 = "-" if r["top1"] is None else f"{r['top1']:.3f}"
        dec = "-" if r["decode"] is None else f"{r['decode']:.0f}"
        lines.append(f"| {r['model']} | {r['bpw']:.3f} | {r['file_mb']:.2f} | {r['accuracy']:.1%}{ci} | "
                     f"{r['thinking']:.1f} | {kl} | {top1} | {dec} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
