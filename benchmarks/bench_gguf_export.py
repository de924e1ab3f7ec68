"""GGUF export speed and llama.cpp decode speed of the exported files.

Usage::

    python benchmarks/bench_gguf_export.py                       # both parts, ~1B export model
    python benchmarks/bench_gguf_export.py --params 0.25e9       # smaller export model
    python benchmarks/bench_gguf_export.py --skip-decode --json out.json

Part 1 (export): writes a synthetic Qwen3-shaped quantized checkpoint of about ``--params``
quantized weights (random codes and scales, hidden 2048, MLP 6144, as many layers as needed), then
times ``export_gguf`` for a 2-bit kquant checkpoint (bit-exact Q2_K: pure packing) and a 2-bit
uniform one (Q2_K with the scale re-quantization search), with and without verify-on-write, against
the floor of merely reading the checkpoint's tensors and writing the same number of output bytes.

Part 2 (decode): a smaller synthetic model (hidden 1024, 12 layers, ~150M quantized weights)
exported as Q2_K and Q3_K (kquant checkpoints), Q2_0 (a q2_0 checkpoint), Q4_0 (a uniform 2-bit
checkpoint, exact in the 4.5-bit container) and F16 (the 2-bit Q2_K weights stored in F16);
llama.cpp (llama-cpp-python) decodes ``--gen`` tokens greedily after a short prompt on
``--threads`` threads; prints tokens/s (median of ``--repeats`` runs) and file sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rqat_deploy.quant.grids import grid_for
from synthetic import random_tensors  # benchmarks/synthetic.py

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 2048, 6144, 16, 8, 128


def _linear_shapes(hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of every Linear of one Qwen3 decoder block."""
    return {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


def make_checkpoint(
    out_dir: Path, *, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int,
    bits: int, grid: str, seed: int = 0,
) -> tuple[Path, int]:
    """Write a synthetic quantized Qwen3 checkpoint (one safetensors shard per layer).

    Returns:
        (directory, number of quantized weights).
    """
    from safetensors.numpy import save_file

    from rqat_deploy.builtin.tiny import build_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)  # tokenizer.json + tokenizer_config.json (1024 tokens)
    vocab = len(tok)
    rng = np.random.default_rng(seed)
    qgrid = grid_for(grid, bits)
    shapes = _linear_shapes(hidden, inter, heads, kv_heads, head_dim)
    weight_map: dict[str, str] = {}
    modules: list[str] = []
    n_quant = 0
    total = 0
    for i in range(layers):
        tensors: dict[str, np.ndarray] = {}
        for name, (o, k) in shapes.items():
            m = f"model.layers.{i}.{name}"
            modules.append(m)
            n_quant += o * k
            tensors.update({f"{m}.{k2}": v for k2, v in random_tensors(qgrid, o, k, rng).items()})
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(hidden, dtype=np.float32)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(hidden, dtype=np.float32)
        tensors[f"model.layers.{i}.self_attn.q_norm.weight"] = np.ones(head_dim, dtype=np.float32)
        tensors[f"model.layers.{i}.self_attn.k_norm.weight"] = np.ones(head_dim, dtype=np.float32)
        fname = f"model-{i:05d}.safetensors"
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        total += sum(t.nbytes for t in tensors.values())
    rest = {
        "model.embed_tokens.weight": (rng.standard_normal((vocab, hidden)) * 0.02).astype(np.float32),
        "model.norm.weight": np.ones(hidden, dtype=np.float32),
    }
    save_file(rest, str(out_dir / "model-rest.safetensors"), metadata={"format": "pt"})
    weight_map.update({n: "model-rest.safetensors" for n in rest})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "bos_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        "hidden_act": "silu", "attention_bias": False, "dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    meta = {
        "format_version": 1, "bits": bits, "grid": grid, "group_size": qgrid.group_size,
        "modules": modules, "base_model": f"synthetic-qwen3-{layers}L", "recipe": {"name": "synthetic"},
    }
    (out_dir / "rqat_quant.json").write_text(json.dumps(meta, indent=2))
    return out_dir, n_quant


def io_floor(ckpt_dir: Path, out_bytes: int, scratch: Path) -> float:
    """Seconds to read every tensor of the checkpoint and write ``out_bytes`` bytes to a file."""
    from safetensors.numpy import load_file

    t0 = time.perf_counter()
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        load_file(str(f))
    buf = np.zeros(min(out_bytes, 64 * 2**20), dtype=np.uint8)
    with open(scratch, "wb") as fh:
        left = out_bytes
        while left > 0:
            n = min(left, buf.nbytes)
            fh.write(buf[:n].tobytes())
            left -= n
        fh.flush()
        os.fsync(fh.fileno())
    dt = time.perf_counter() - t0
    scratch.unlink()
    return dt


def bench_export(root: Path, params: float) -> list[dict[str, Any]]:
    from rqat_deploy.exporters.gguf import export_gguf

    per_layer = sum(o * k for o, k in _linear_shapes(HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM).values())
    layers = max(1, round(params / per_layer))
    rows = []
    for grid in ("kquant", "uniform"):
        ck, n_quant = make_checkpoint(
            root / f"ckpt-{grid}", layers=layers, hidden=HIDDEN, inter=INTER, heads=HEADS,
            kv_heads=KV_HEADS, head_dim=HEAD_DIM, bits=2, grid=grid,
        )
        for verify in (False, True):
            out = root / f"{grid}-{verify}.gguf"
            t0 = time.perf_counter()
            rep = export_gguf(ck, out, verify=verify, force=True)
            dt = time.perf_counter() - t0
            floor = io_floor(ck, rep.file_size, root / "scratch.bin")
            rows.append({
                "grid": grid, "type": rep.gguf_type, "verify": verify, "quantized_weights": n_quant,
                "layers": layers, "export_s": round(dt, 2), "io_floor_s": round(floor, 2),
                "ratio": round(dt / floor, 2), "file_mib": round(rep.file_size / 2**20, 1),
                "total_rel_error": rep.total_rel_error,
            })
            print(json.dumps(rows[-1]), flush=True)
            out.unlink()
        shutil.rmtree(ck)
    return rows


def decode_tps(path: Path, threads: int, gen: int, repeats: int) -> float:
    """Median greedy decode tokens/s of llama.cpp on ``path``, measured in a fresh process.

    A separate process keeps PyTorch's OpenMP pool (used by the export) from competing with
    llama.cpp's threads.
    """
    cmd = [sys.executable, __file__, "--_decode-one", str(path), "--threads", str(threads),
           "--gen", str(gen), "--repeats", str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["tps"])


def _decode_tps_here(path: Path, threads: int, gen: int, repeats: int) -> float:
    """Median greedy decode tokens/s of llama.cpp on ``path`` (prompt of 16 tokens excluded)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
    try:
        prompt = list(range(100, 116))
        rates = []
        for _ in range(repeats + 1):  # first run warms up
            llm.reset()
            llm.eval(prompt)
            t0 = time.perf_counter()
            n = 0
            for _tok in llm.generate(prompt, temp=0.0, top_k=1, reset=False):
                n += 1
                if n == gen:
                    break
            rates.append(gen / (time.perf_counter() - t0))
        return statistics.median(rates[1:])
    finally:
        llm.close()


def bench_decode(root: Path, threads: int, gen: int, repeats: int) -> list[dict[str, Any]]:
    from rqat_deploy.exporters.gguf import export_gguf

    dims = {"hidden": 1024, "inter": 3072, "heads": 8, "kv_heads": 4, "head_dim": 128, "layers": 12}
    rows = []
    files = {}
    for bits in (2, 3):
        ck, n_quant = make_checkpoint(root / f"small-k{bits}", bits=bits, grid="kquant", **dims)
        files[f"Q{bits}_K"] = export_gguf(ck, root / f"small-q{bits}k.gguf", force=True)
        if bits == 2:
            files["F16"] = export_gguf(ck, root / "small-f16.gguf", gguf_type="F16", force=True)
    ck, n_quant = make_checkpoint(root / "small-q2_0", bits=2, grid="q2_0", **dims)
    files["Q2_0"] = export_gguf(ck, root / "small-q2_0.gguf", force=True)  # llama.cpp's 2.25-bit type
    ck, _ = make_checkpoint(root / "small-u2", bits=2, grid="uniform", **dims)
    files["Q4_0"] = export_gguf(ck, root / "small-q4_0.gguf", gguf_type="Q4_0", force=True)  # exact 2-bit container
    for name, rep in files.items():
        tps = decode_tps(Path(rep.path), threads, gen, repeats)
        rows.append({
            "type": name, "quantized_weights": n_quant, "file_mib": round(rep.file_size / 2**20, 1),
            "decode_tok_s": round(tps, 2), "threads": threads,
        })
        print(json.dumps(rows[-1]), flush=True)
    f16 = next(r for r in rows if r["type"] == "F16")["decode_tok_s"]
    for r in rows:
        r["speedup_vs_f16"] = round(r["decode_tok_s"] / f16, 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e9, help="quantized weights of the export model (default 1e9)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--gen", type=int, default=64, help="tokens decoded per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--_decode-one", dest="decode_one", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.decode_one is not None:
        print(json.dumps({"tps": _decode_tps_here(args.decode_one, args.threads, args.gen, args.repeats)}))
        return 0
    root = Path(tempfile.mkdtemp(prefix="bench-gguf-", dir=args.workdir))
    results: dict[str, Any] = {}
    try:
        if not args.skip_export:
            results["export"] = bench_export(root, args.params)
        if not args.skip_decode:
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print("llama-cpp-python is not installed: decode benchmark skipped", file=sys.stderr)
            else:
                results["decode"] = bench_decode(root, args.threads, args.gen, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n## GGUF export")
    for r in results.get("export", []):
        print(
            f"{r['grid']:8s} -> {r['type']} verify={r['verify']!s:5s}: {r['export_s']:7.2f} s "
            f"(read+write floor {r['io_floor_s']:.2f} s, x{r['ratio']}), {r['quantized_weights'] / 1e9:.2f} B weights, "
            f"{r['file_mib']} MiB, weight error {r['total_rel_error']:.2e}"
        )
    if results.get("decode"):
        print("\n## llama.cpp decode (greedy, tokens/s)")
        for r in results["decode"]:
            print(f"{r['type']:5s}: {r['decode_tok_s']:8.2f} tok/s  x{r['speedup_vs_f16']} vs F16  ({r['file_mib']} MiB)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
