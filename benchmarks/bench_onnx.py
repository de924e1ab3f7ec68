"""ONNX Runtime CPU decode speed: the int2 ONNX export vs an fp32 ONNX of the same model.

A random Qwen3 (default hidden 1024, 8 layers, intermediate 3072, head_dim 128, 8 query / 2 KV heads)
is built locally, RTN-quantized to 2 bits (uniform grid, G=128), exported with
``export_onnx`` at accuracy level 4 (int8 activations, the default; ``--levels 4,0`` adds fp32
activations, which onnxruntime 1.32 runs ~50x slower at 2 bits), and its dequantized weights are exported as a float32 ONNX model with the same graph builder. Each model
decodes ``--n-tokens`` greedy tokens after a ``--prompt-tokens`` prompt, batch 1, with the KV cache.

    python benchmarks/bench_onnx.py --threads 2 --json bench_onnx.json

Prints a Markdown table (decode tok/s, prefill tok/s, size) and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the results dict."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=3072)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--bits", type=int, default=2, choices=(2, 3, 4))
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--n-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    ap.add_argument("--engines", default="genai,onnxruntime", help="comma list of OnnxCausalLM engines")
    ap.add_argument("--levels", default="4", help="comma list of MatMulNBits accuracy levels to export (0 is very slow at 2 bits)")
    ap.add_argument("--work-dir", default=None, help="keep the models here (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)

    import onnxruntime

    from rqat_deploy.exporters.onnx import export_onnx, export_onnx_dense, onnx_available
    from rqat_deploy.serve.runtime_onnx import OnnxCausalLM
    from rqat_deploy.builtin.tiny import build_tiny_model
    from rqat_deploy.train.run import quantize_rtn

    ok, why = onnx_available()
    if not ok:
        raise SystemExit(f"bench_onnx: {why}")
    work_ctx = tempfile.TemporaryDirectory(prefix="bench_onnx-") if args.work_dir is None else None
    work = Path(args.work_dir or work_ctx.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = build_tiny_model(
        work / "base", "qwen3", hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, head_dim=128, intermediate_size=args.intermediate,
    )
    ckpt = quantize_rtn(base, work / f"int{args.bits}", bits=args.bits, grid="uniform", force=True)
    models: dict[str, Path] = {}
    reports: dict[str, Any] = {}
    for level in [int(x) for x in args.levels.split(",") if x.strip()]:
        name = f"int{args.bits} (accuracy_level {level})"
        rep = export_onnx(ckpt, work / f"onnx_int{args.bits}_l{level}", accuracy_level=level, force=True)
        models[name], reports[name] = Path(rep.out_dir), rep.to_json()
    models["fp32"] = export_onnx_dense(ckpt, work / "onnx_fp32", force=True)
    build_s = time.perf_counter() - t0

    prompt = [(i * 131 + 7) % 1000 for i in range(args.prompt_tokens)]
    rows = []
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        for name, path in models.items():
            with OnnxCausalLM(path, engine=engine, threads=args.threads) as lm:
                sp = lm.speed(prompt, args.n_tokens, repeats=args.repeats, warmup=1)
            rows.append({
                "model": name, "engine": engine, "decode_tokens_per_s": sp["decode_tokens_per_s"],
                "prefill_tokens_per_s": sp["prefill_tokens_per_s"], "ttft_s": sp["ttft_s"],
                "bytes": _dir_bytes(path),
            })
            print(f"  {engine:12s} {name:28s} decode {sp['decode_tokens_per_s']:8.1f} tok/s", flush=True)
    result = {
        "config": vars(args),
        "onnxruntime": onnxruntime.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "build_seconds": build_s,
        "rows": rows,
        "export_reports": reports,
    }
    fp32 = {r["engine"]: r["decode_tokens_per_s"] for r in rows if r["model"] == "fp32"}
    print(f"\nqwen3 random, hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}; "
          f"prompt {args.prompt_tokens}, decode {args.n_tokens} tokens, threads {args.threads or 'default'}, "
          f"onnxruntime {onnxruntime.__version__}\n")
    print("| model | engine | decode tok/s | vs fp32 | prefill tok/s | size MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rel = r["decode_tokens_per_s"] / fp32[r["engine"]] if r["engine"] in fp32 else float("nan")
        print(f"| {r['model']} | {r['engine']} | {r['decode_tokens_per_s']:.1f} | {rel:.2f}x | "
              f"{r['prefill_tokens_per_s']:.1f} | {r['bytes'] / 1e6:.1f} |")
    for name, rep in reports.items():
        print(f"\n{name}: logits rel. error {rep['logits_rel_error']}, argmax agreement {rep['argmax_agreement']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if work_ctx is not None:
        work_ctx.cleanup()
    return result


if __name__ == "__main__":
    main()
