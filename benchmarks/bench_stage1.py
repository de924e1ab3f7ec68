"""Throughput and peak memory of stage 1 (block-wise calibration) on the tiny model.

    python benchmarks/bench_stage1.py                      # CPU, uniform int2, 68 x 128 tokens
    python benchmarks/bench_stage1.py --grid kquant --bits 3 --store disk
    python benchmarks/bench_stage1.py --device cuda --samples 256 --seq-len 2048 --json out.json

Prints tokens/s (training tokens through forward + backward per second, end to end and inside the
optimizer loops) and the peak memory: on CPU the peak resident set size of this process during the
stage (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), on CUDA the peak allocated
GPU memory. The tiny model is built locally (no network).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from rqat_deploy.quant.spec import QuantSpec
from rqat_deploy.train.stage1 import Stage1Config, run_stage1
from rqat_deploy.builtin.tiny import build_tiny_model


def _rss_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux ``clear_refs`` 5); ``False`` if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="uniform", choices=["uniform", "kquant"])
    ap.add_argument("--bits", type=int, default=2, choices=[2, 3, 4])
    ap.add_argument("--samples", type=int, default=68, help="calibration sequences (incl. --val)")
    ap.add_argument("--val", type=int, default=4, help="held-out sequences")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks of the tiny model")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--store", default="memory", choices=["memory", "disk", "auto"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--repeat", type=int, default=3, help="runs; the fastest is reported (shared machines are noisy)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="rqat-bench-") as tmp:
        model_dir = build_tiny_model(
            Path(tmp) / "model", "qwen3", num_layers=args.layers, hidden_size=args.hidden,
            intermediate_size=args.intermediate,
        )
        ids = torch.randint(0, 1024, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
        spec = QuantSpec(bits=args.bits, grid=args.grid)
        cfg = Stage1Config(epochs=args.epochs, batch_size=args.batch_size, val_samples=args.val, store=args.store)
        runs = []
        for r in range(max(1, args.repeat)):
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, args.dtype)).eval()
            rss0 = _rss_bytes("VmRSS")
            reset = _reset_peak_rss()
            t0 = time.perf_counter()
            rep = run_stage1(
                model, spec, ids, cfg, work_dir=Path(tmp) / f"work{r}", device=args.device, progress=False
            )
            wall = time.perf_counter() - t0
            on_cpu_with_reset = not args.device.startswith("cuda") and reset
            peak = _rss_bytes("VmHWM") if on_cpu_with_reset else rep.peak_memory_bytes
            runs.append((wall, rep, peak, rss0))
            del model
        wall, rep, peak, rss0 = min(runs, key=lambda t: t[0])
        all_walls = sorted(round(t[0], 3) for t in runs)

    cpu = platform.processor() or platform.machine()
    result = {
        "device": args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads, {cpu})",
        "torch": torch.__version__,
        "model": f"tiny qwen3: {args.layers} blocks, hidden {args.hidden}, "
        f"intermediate {args.intermediate}, {args.dtype}",
        "spec": spec.to_dict(),
        "n_train": rep.n_train,
        "n_val": rep.n_val,
        "seq_len": rep.seq_len,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "store": rep.store_mode,
        "train_tokens": rep.train_tokens,
        "seconds": round(wall, 3),
        "seconds_all_runs": all_walls,
        "train_seconds": round(rep.train_seconds, 3),
        "tokens_per_second": round(rep.train_tokens / wall, 1),
        "train_tokens_per_second": round(rep.train_tokens_per_second, 1),
        "peak_memory_mib": round(peak / 2**20, 1),
        "rss_before_mib": round(rss0 / 2**20, 1),
        "activation_store_mib": round(rep.store_bytes / 2**20, 2),
        "blocks": [
            {"block": b.index, "val_mse_rtn": b.val_loss_init, "val_mse": b.val_loss, "seconds": round(b.seconds, 3)}
            for b in rep.blocks
        ],
    }
    print(json.dumps(result, indent=2))
    print(
        f"\nstage 1 ({spec.grid} int{spec.bits}, {result['device']}): "
        f"{result['tokens_per_second']} tokens/s end to end, "
        f"{result['train_tokens_per_second']} tokens/s in training steps, peak memory {result['peak_memory_mib']} MiB"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
