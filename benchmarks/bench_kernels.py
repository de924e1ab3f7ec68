"""Time the Triton fake-quant / dequant kernels against the eager PyTorch reference.

Usage::

    python benchmarks/bench_kernels.py                      # CUDA: Triton vs eager reference
    python benchmarks/bench_kernels.py --check              # ... and check the results bit for bit
    python benchmarks/bench_kernels.py --cpu-reference      # no CUDA: time the reference on CPU
    python benchmarks/bench_kernels.py --shapes 2048x6144 --json out.json

For each weight shape ``[R, K]`` and grid it times stage-1 forward (fake-quant), stage-1 backward
(grad_w and per-group grad_s/z/o), stage-2 forward (dequantize uint8 codes) and stage-2 backward
(per-group grad_s/o), and prints a Markdown table: median milliseconds, the speed-up, and the
Triton kernel's effective bandwidth (bytes it must read and write / time). Without a CUDA device it
prints ``no CUDA device`` (and, with ``--cpu-reference``, the reference's CPU timings).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from rqat_deploy.quant import reference as ref
from rqat_deploy.quant.grids import grid_for
from synthetic import random_tensors  # benchmarks/synthetic.py

GRIDS = {  # benchmark label -> (grid name, bits) of rqat_deploy.quant.grids
    "uniform-g128-2bit": ("uniform", 2),
    "q2k-2bit": ("kquant", 2),
    "q3k-3bit": ("kquant", 3),
}


@dataclass
class Row:
    shape: str
    grid: str
    wdtype: str
    op: str
    reference_ms: float
    triton_ms: float | None
    speedup: float | None
    triton_gbps: float | None
    exact: bool | None


def make_inputs(rows: int, k: int, grid: str, device: str, wdtype: torch.dtype, seed: int = 0):
    """Random weight, group parameters, upstream gradient and frozen codes for one grid."""
    qgrid = grid_for(*GRIDS[grid], group_size=128)
    gs, qmax = qgrid.gs, qgrid.qmax
    gen = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(rows, k, generator=gen, device=device) * 0.02).to(wdtype)  # [R, K]
    fields = random_tensors(qgrid, rows, k, np.random.default_rng(seed))
    quantizer = qgrid.from_checkpoint({n: torch.from_numpy(v) for n, v in fields.items()}).to(device)
    with torch.no_grad():
        s, z, o = quantizer.group_params()  # [R, K/gs] each
    g = torch.randn(rows, k, generator=gen, device=device).to(wdtype)  # [R, K]
    q = ref.quantize_codes(w.float(), s, z, o, qmax, gs).to(torch.uint8)  # [R, K]
    return w, s, z, o, g, q, gs, qmax


def time_cuda(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` on the GPU (triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def time_cpu(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of ``fn`` on the CPU."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (float32 compared as int32; other dtypes with torch.equal)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a, b)


def bench_cuda(shapes: list[tuple[int, int]], wdtypes: list[torch.dtype], check: bool) -> list[Row]:
    from rqat_deploy.kernels.dequant import dequant_bwd, dequant_fwd
    from rqat_deploy.kernels.fake_quant import fake_quant_bwd, fake_quant_fwd

    rows_out: list[Row] = []
    for rows, k in shapes:
        for grid in GRIDS:
            for wdtype in wdtypes:
                w, s, z, o, g, q, gs, qmax = make_inputs(rows, k, grid, "cuda", wdtype)
                wf, gf = w.float(), g.float()
                eb = w.element_size()
                n = rows * k
                ops = {
                    # name: (reference, triton, bytes the kernel must move)
                    "stage1 fwd": (
                        lambda: ref.dequant(ref.quantize_codes(wf, s, z, o, qmax, gs), s, z, o, gs),
                        lambda: fake_quant_fwd(w, s, z, o, qmax, gs),
                        2 * n * eb,
                    ),
                    "stage1 bwd": (
                        lambda: ref.fake_quant_backward(gf, wf, s, z, o, qmax, gs),
                        lambda: fake_quant_bwd(g, w, s, z, o, qmax, gs),
                        3 * n * eb,
                    ),
                    "stage2 fwd": (
                        lambda: ref.dequant(q.float(), s, z, o, gs),
                        lambda: dequant_fwd(q, s, z, o, gs),
                        n * (1 + 4),
                    ),
                    "stage2 bwd": (
                        lambda: ref.dequant_backward(gf, q.float(), z, gs),
                        lambda: dequant_bwd(g, q, z, gs),
                        n * (eb + 1),
                    ),
                }
                for op, (ref_fn, tri_fn, nbytes) in ops.items():
                    exact = None
                    if check:
                        exact = _check(op, ref_fn(), tri_fn(), wdtype)
                    t_ref = time_cuda(ref_fn)
                    t_tri = time_cuda(tri_fn)
                    rows_out.append(
                        Row(f"{rows}x{k}", grid, str(wdtype).replace("torch.", ""), op, t_ref, t_tri,
                            t_ref / t_tri, nbytes / t_tri / 1e6, exact)
                    )  # fmt: skip
                    print(_fmt(rows_out[-1]), flush=True)
                del w, s, z, o, g, q, wf, gf
                torch.cuda.empty_cache()
    return rows_out


def _check(op: str, want, got, wdtype: torch.dtype) -> bool:
    """Triton result vs reference: bitwise (float32 parts); bf16/fp16 outputs vs the rounded reference."""
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    ok = True
    for a, b in zip(got, want):
        if a.dtype != b.dtype:  # 16-bit output or grad_w: the reference's float32 rounded once
            b = b.to(a.dtype)
        ok &= bits_equal(a, b)
    return bool(ok)


def bench_cpu_reference(shapes: list[tuple[int, int]], reps: int) -> list[Row]:
    rows_out: list[Row] = []
    for rows, k in shapes:
        for grid in GRIDS:
            w, s, z, o, g, q, gs, qmax = make_inputs(rows, k, grid, "cpu", torch.float32)
            ops = {
                "stage1 fwd": lambda: ref.dequant(ref.quantize_codes(w, s, z, o, qmax, gs), s, z, o, gs),
                "stage1 bwd": lambda: ref.fake_quant_backward(g, w, s, z, o, qmax, gs),
                "stage2 fwd": lambda: ref.dequant(q.float(), s, z, o, gs),
                "stage2 bwd": lambda: ref.dequant_backward(g, q.float(), z, gs),
            }
            for op, fn in ops.items():
                rows_out.append(Row(f"{rows}x{k}", grid, "float32", op, time_cpu(fn, reps), None, None, None, None))
                print(_fmt(rows_out[-1]), flush=True)
    return rows_out


HEADER = (
    "| shape | grid | w dtype | op | reference ms | triton ms | speed-up | triton GB/s | exact |\n"
    "|---|---|---|---|---:|---:|---:|---:|---|"
)


def _fmt(r: Row) -> str:
    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    exact = "-" if r.exact is None else ("yes" if r.exact else "NO")
    return (
        f"| {r.shape} | {r.grid} | {r.wdtype} | {r.op} | {r.reference_ms:.3f} | {f(r.triton_ms, '.3f')} | "
        f"{f(r.speedup, '.1f')} | {f(r.triton_gbps, '.0f')} | {exact} |"
    )


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        r, k = part.lower().split("x")
        out.append((int(r), int(k)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="2048x6144,4096x12288", help="comma-separated RxK weight shapes")
    p.add_argument("--dtypes", default="float32,bfloat16", help="weight dtypes (CUDA run)")
    p.add_argument("--check", action="store_true", help="also compare Triton and reference results bit for bit")
    p.add_argument("--cpu-reference", action="store_true", help="without CUDA, time the reference on CPU")
    p.add_argument("--reps", type=int, default=3, help="CPU repetitions (median)")
    p.add_argument("--json", help="write the rows as JSON to this path")
    args = p.parse_args(argv)
    shapes = parse_shapes(args.shapes)

    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
        print(HEADER)
        wdtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
        result = bench_cuda(shapes, wdtypes, args.check)
    else:
        print("no CUDA device")
        if not args.cpu_reference:
            return 0
        print(f"reference on CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
        print(HEADER)
        result = bench_cpu_reference(shapes, args.reps)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in result], fh, indent=1)
    if any(r.exact is False for r in result):
        print("MISMATCH between Triton and the reference (see 'exact' column)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
