"""Triton kernels vs the pure-PyTorch reference, bit for bit.

Under ``TRITON_INTERPRET=1`` (set by ``conftest.py``) the kernels run on CPU tensors through Triton's
interpreter; on a machine with CUDA and without the interpreter the same tests run on the GPU. Every
float32 result is compared bitwise (``view(torch.int32)``), which is stricter than ``torch.equal``
(it also tells ``-0.0`` from ``0.0``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from rqat_deploy.quant import reference as ref  # noqa: E402
from rqat_deploy.errors import BackendError, ShapeError  # noqa: E402
from rqat_deploy.kernels import dequant as dq  # noqa: E402
from rqat_deploy.kernels import fake_quant as fq  # noqa: E402

INTERPRET = fq.interpreting(fq._fake_quant_fwd_kernel)
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

# (kind, gs, qmax): every group size with every bit width on the uniform grid; the k-quant-like
# forms at their own gs=16 and at a larger gs, with their own and another qmax.
CASES = (
    [("uniform", gs, qmax) for gs in (16, 32, 64, 128, 256) for qmax in (3, 7, 15)]
    + [("q2k", 16, 3), ("q2k", 64, 3), ("q2k", 16, 7)]
    + [("q3k", 16, 7), ("q3k", 128, 7), ("q3k", 16, 3)]
)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float32 tensor, on CPU (bitwise comparison)."""
    assert x.dtype == torch.float32
    return x.detach().cpu().contiguous().view(torch.int32)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = bits(got), bits(want)
    bad = (g != w).nonzero()
    if bad.numel():
        at = tuple(bad[0].tolist())
        pytest.fail(
            f"{what}: {bad.shape[0]} of {g.numel()} values differ, first at {at}: "
            f"{got.detach().cpu()[at].item()!r} vs {want.detach().cpu()[at].item()!r}"
        )


def make_case(
    kind: str, rows: int, n_groups: int, gs: int, qmax: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``w [R, K]`` and group params ``s, z, o [R, K/gs]`` (float32, CPU) of one grid's shape.

    ``w`` is drawn so that ``(w + o)/s + z`` spans ``[-3, qmax + 3]``: inside values and values
    clamped on both sides.

    - uniform: ``s > 0`` fp16-rounded, ``z`` integers ``0..qmax``, ``o = 0``;
    - q2k (Q2_K-like): ``s = fp16(d) * sc`` with ``sc`` in 0..15 (some ``s == 0``), ``z = 0``,
      ``o = fp16(dmin) * m`` with ``m`` in 0..15 and ``dmin`` of both signs (some ``o < 0``);
    - q3k (Q3_K-like): ``s = fp16(d) * sc`` with ``sc`` in -32..31 (both signs, some 0), ``z = 4``, ``o = 0``.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, n_groups)
    if kind == "uniform":
        s = ref.fp16_round(torch.rand(shape, generator=gen) * 0.1 + 0.005)
        z = torch.randint(0, qmax + 1, shape, generator=gen).float()
        o = torch.zeros(shape)
    elif kind == "q2k":
        d = ref.fp16_round(torch.rand(rows, 1, generator=gen) * 0.01 + 0.001)
        dmin = ref.fp16_round(torch.randn(rows, 1, generator=gen) * 0.01)
        s = d * torch.randint(0, 16, shape, generator=gen).float()
        z = torch.zeros(shape)
        o = dmin * torch.randint(0, 16, shape, generator=gen).float()
    elif kind == "q3k":
        d = ref.fp16_round(torch.rand(rows, 1, generator=gen) * 0.01 + 0.001)
        s = d * torch.randint(-32, 32, shape, generator=gen).float()
        z = torch.full(shape, 4.0)
        o = torch.zeros(shape)
    else:
        raise ValueError(kind)
    k = n_groups * gs
    target = torch.rand(rows, k, generator=gen) * (qmax + 6) - 3  # wanted (w + o)/s + z
    se, ze, oe = (ref.expand_groups(p, gs) for p in (s, z, o))  # [R, K]
    w = (target - ze) * torch.where(se == 0, torch.full_like(se, 0.01), se) - oe  # [R, K]
    return w, s, z, o


def to_dev(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in ts]


def shape_for(case_index: int, gs: int) -> tuple[int, int, int, int]:
    """``(rows, n_groups, block_r, ng)``: random odd sizes, so rows are not a multiple of ``block_r``
    and groups not a multiple of ``ng``: every case has several tiles per dimension, partial ones
    included (kept few, as the interpreter runs programs one by one)."""
    gen = torch.Generator().manual_seed(1000 + case_index)
    rows = int(torch.randint(9, 24, (1,), generator=gen)) | 1  # 9..23, odd
    n_groups = int(torch.randint(3, 10, (1,), generator=gen)) | 1  # 3..9, odd
    return rows, n_groups, 8, 2


def check_stage1(w, s, z, o, qmax, gs, g, **blocks) -> None:
    """Forward output, codes and the four gradients of the Triton path equal the reference."""
    wd, sd, zd, od, gd = to_dev(w, s, z, o, g)
    want_codes = ref.quantize_codes(w, s, z, o, qmax, gs)  # [R, K]
    want_out = ref.dequant(want_codes, s, z, o, gs)  # [R, K]
    codes = fq.fake_quant_codes(wd, sd, zd, od, qmax, gs, **blocks)
    assert codes.dtype == torch.uint8
    assert torch.equal(codes.cpu(), want_codes.to(torch.uint8)), "codes differ"
    assert_bits_equal(fq.fake_quant_fwd(wd, sd, zd, od, qmax, gs, **blocks), want_out, "fake_quant_fwd")
    got = fq.fake_quant_bwd(gd, wd, sd, zd, od, qmax, gs, **blocks)
    want = ref.fake_quant_backward(g, w, s, z, o, qmax, gs)
    for name, a, b in zip(("grad_w", "grad_s", "grad_z", "grad_o"), got, want):
        assert_bits_equal(a, b, name)


# ---------------------------------------------------------------------------------------------
# stage 1: fake quant forward / backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "gs", "qmax"), CASES)
def test_stage1_matches_reference(kind: str, gs: int, qmax: int) -> None:
    idx = CASES.index((kind, gs, qmax))
    rows, n_groups, block_r, ng = shape_for(idx, gs)
    w, s, z, o = make_case(kind, rows, n_groups, gs, qmax, seed=idx)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(99 + idx))
    # the case really exercises clamping on both sides and (for k-quant forms) s == 0 groups
    codes = ref.quantize_codes(w, s, z, o, qmax, gs)
    assert (codes == 0).any() and (codes == qmax).any()
    if kind != "uniform":
        assert (s == 0).any()
    if kind == "q2k":
        assert (o < 0).any() and (o > 0).any()
    if kind == "q3k":
        assert (s < 0).any() and (s > 0).any()
    check_stage1(w, s, z, o, qmax, gs, g, block_r=block_r, ng=ng)


@pytest.mark.parametrize("gs", [16, 256, 1024])
def test_stage1_default_tiles(gs: int) -> None:
    """The launchers' own tile choice (one or many programs) gives the same bits."""
    w, s, z, o = make_case("uniform", 9, 3, gs, 7, seed=gs)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(gs))
    check_stage1(w, s, z, o, 7, gs, g)


@pytest.mark.parametrize(("kind", "qmax"), [("uniform", 3), ("q2k", 3), ("q3k", 7)])
def test_stage1_rounding_ties(kind: str, qmax: int) -> None:
    """``(w + o)/s`` exactly ``k + 0.5``: the codes round half to even like ``torch.round``."""
    gs, rows, n_groups = 32, 19, 5
    gen = torch.Generator().manual_seed(7)
    _, s, z, o = make_case(kind, rows, n_groups, gs, qmax, seed=3)
    # exactly representable scales (m * 2^-e) and offsets (multiples of s), so u is exactly k + 1/2
    m = torch.randint(1, 4, (rows, n_groups), generator=gen).float() * 2 - 1  # 1, 3, 5
    s = torch.sign(s) * m * 2.0 ** -torch.randint(3, 8, (rows, n_groups), generator=gen).float()
    s[0, 0] = 0.0 if kind != "uniform" else s[0, 0]
    if kind == "q2k":
        o = s * torch.randint(-3, 4, (rows, n_groups), generator=gen).float()
    se, oe = ref.expand_groups(s, gs), ref.expand_groups(o, gs)  # [R, K]
    k = torch.randint(-4, qmax + 5, (rows, n_groups * gs), generator=gen).float()  # [R, K]
    w = (k + 0.5) * se - oe  # [R, K]
    u = (w + oe) / torch.where(se == 0, torch.ones_like(se), se)
    ties = (u - torch.floor(u) == 0.5) & (se != 0)
    assert ties.sum() > 0.9 * (se != 0).sum()
    # half to even differs from half away from zero on about half of the ties
    assert (torch.round(u) != torch.trunc(u + torch.sign(u) * 0.5))[ties].any()
    g = torch.randn(w.shape, generator=gen)
    check_stage1(w, s, z, o, qmax, gs, g, block_r=8, ng=2)


def test_stage1_special_values() -> None:
    """Huge values (|u| >= 2^23, already integral), signed zeros, and all-clamped groups."""
    gs, qmax = 16, 7
    w, s, z, o = make_case("q3k", 4, 4, gs, qmax, seed=11)
    w[0, :8] = torch.tensor([3e30, -3e30, 1e7, -1e7, 0.0, -0.0, 8388607.5, -8388608.5])
    w[1, :16] = 1e6  # whole group clamped high
    w[2, :16] = -1e6  # whole group clamped low
    s[0, 0] = 0.5
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    check_stage1(w, s, z, o, qmax, gs, g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stage1_half_weights(dtype: torch.dtype) -> None:
    """16-bit weights: float32 math inside, codes and group gradients exact, output cast at the end."""
    gs, qmax = 64, 15
    w, s, z, o = make_case("uniform", 21, 5, gs, qmax, seed=21)
    w16 = w.to(dtype)
    g16 = torch.randn(w.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    wd, sd, zd, od, gd = to_dev(w16, s, z, o, g16)
    w32, g32 = w16.float(), g16.float()
    want_codes = ref.quantize_codes(w32, s, z, o, qmax, gs).to(torch.uint8)  # [R, K]
    assert torch.equal(fq.fake_quant_codes(wd, sd, zd, od, qmax, gs).cpu(), want_codes)
    out = fq.fake_quant_fwd(wd, sd, zd, od, qmax, gs).cpu()
    assert out.dtype == dtype
    want32 = ref.FakeQuantFn.apply(w32, s, z, o, qmax, gs)
    rne = want32.to(dtype)
    if dtype == torch.bfloat16 and INTERPRET:
        # the interpreter truncates float32 -> bf16 (DESIGN.md 8): accept that or round-to-nearest
        trunc = (bits(want32) & -65536).view(torch.float32).to(dtype)
        assert bool(((out == rne) | (out == trunc)).all())
    else:
        assert torch.equal(out, rne)
    gw, g_s, g_z, g_o = fq.fake_quant_bwd(gd, wd, sd, zd, od, qmax, gs)
    rw, r_s, r_z, r_o = ref.fake_quant_backward(g32, w32, s, z, o, qmax, gs)
    assert gw.dtype == dtype and torch.equal(gw.cpu(), rw.to(dtype))
    for name, a, b in (("grad_s", g_s, r_s), ("grad_z", g_z, r_z), ("grad_o", g_o, r_o)):
        assert_bits_equal(a, b, name)


@pytest.mark.parametrize(("kind", "qmax"), [("uniform", 3), ("q2k", 3), ("q3k", 7)])
def test_fake_quant_autograd_matches_reference(kind: str, qmax: int) -> None:
    gs = 16
    w, s, z, o = make_case(kind, 13, 6, gs, qmax, seed=31)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(4))
    leaves_ref = [t.clone().requires_grad_(True) for t in (w, s, z, o)]
    leaves_tri = [t.to(DEVICE).requires_grad_(True) for t in (w, s, z, o)]
    out_ref = ref.FakeQuantFn.apply(*leaves_ref, qmax, gs)
    out_tri = fq.FakeQuantTritonFn.apply(*leaves_tri, qmax, gs)
    assert_bits_equal(out_tri, out_ref, "forward")
    # a non-contiguous upstream gradient exercises the .contiguous() in backward
    (out_ref * g).sum().backward()
    (out_tri * g.to(DEVICE).t().contiguous().t()).sum().backward()
    for name, a, b in zip("wszo", leaves_tri, leaves_ref):
        assert a.grad is not None and b.grad is not None
        assert_bits_equal(a.grad, b.grad, f"grad_{name}")


def test_fake_quant_autograd_partial_requires_grad() -> None:
    """Only the inputs that require grad receive one (e.g. frozen offsets)."""
    w, s, z, o = make_case("uniform", 5, 2, 16, 3, seed=1)
    wt, st = w.to(DEVICE).requires_grad_(True), s.to(DEVICE).requires_grad_(True)
    zt, ot = z.to(DEVICE), o.to(DEVICE)
    fq.FakeQuantTritonFn.apply(wt, st, zt, ot, 3, 16).sum().backward()
    assert wt.grad is not None and st.grad is not None and zt.grad is None and ot.grad is None


# ---------------------------------------------------------------------------------------------
# stage 2: dequant from frozen codes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "gs", "qmax", "code_dtype"),
    [("uniform", 128, 3, torch.uint8), ("uniform", 32, 15, torch.float32), ("q2k", 16, 3, torch.uint8),
     ("q3k", 16, 7, torch.uint8), ("uniform", 256, 7, torch.uint8), ("uniform", 64, 7, torch.float32)],
)  # fmt: skip
def test_stage2_matches_reference(kind: str, gs: int, qmax: int, code_dtype: torch.dtype) -> None:
    rows, n_groups, block_r, ng = shape_for(50 + gs + qmax, gs)
    w, s, z, o = make_case(kind, rows, n_groups, gs, qmax, seed=gs * qmax)
    q = ref.quantize_codes(w, s, z, o, qmax, gs)  # [R, K] float codes
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(gs))
    qd, sd, zd, od, gd = to_dev(q.to(code_dtype), s, z, o, g)
    out = dq.dequant_fwd(qd, sd, zd, od, gs, block_r=block_r, ng=ng)
    assert_bits_equal(out, ref.dequant(q, s, z, o, gs), "dequant_fwd")
    # the stage-2 weight is the stage-1 forward for the same codes
    assert_bits_equal(out, ref.FakeQuantFn.apply(w, s, z, o, qmax, gs), "dequant_fwd vs fake quant")
    got = dq.dequant_bwd(gd, qd, zd, gs, block_r=block_r, ng=ng)
    want = ref.dequant_backward(g, q, z, gs)
    for name, a, b in zip(("grad_s", "grad_o"), got, want):
        assert_bits_equal(a, b, name)


def test_stage2_default_tiles_and_dtypes() -> None:
    gs, qmax = 16, 3
    w, s, z, o = make_case("q2k", 23, 33, gs, qmax, seed=8)
    q = ref.quantize_codes(w, s, z, o, qmax, gs)
    qd, sd, zd, od = to_dev(q.to(torch.uint8), s, z, o)
    want = ref.dequant(q, s, z, o, gs)
    assert_bits_equal(dq.dequant_fwd(qd, sd, zd, od, gs), want, "default tiles")
    out16 = dq.dequant_fwd(qd, sd, zd, od, gs, torch.float16)
    assert out16.dtype == torch.float16 and torch.equal(out16.cpu(), want.half())
    outbf = dq.dequant_fwd(qd, sd, zd, od, gs, torch.bfloat16).cpu()
    trunc = (bits(want) & -65536).view(torch.float32).to(torch.bfloat16)
    ok = (outbf == want.bfloat16()) | (outbf == trunc) if INTERPRET else outbf == want.bfloat16()
    assert outbf.dtype == torch.bfloat16 and bool(ok.all())
    # a bf16 upstream gradient: float32 products and sums; grad_s equals the reference exactly
    g16 = torch.randn(w.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    g_s, g_o = dq.dequant_bwd(g16.to(DEVICE), qd, zd, gs)
    r_s, _ = ref.dequant_backward(g16, q, z, gs)
    assert_bits_equal(g_s, r_s, "grad_s (bf16 g)")
    assert_bits_equal(g_o, ref.group_sum(-g16.float(), gs), "grad_o (bf16 g, float32 sums)")


def test_dequant_autograd_matches_reference() -> None:
    gs, qmax = 16, 7
    w, s, z, o = make_case("q3k", 11, 9, gs, qmax, seed=12)
    q = ref.quantize_codes(w, s, z, o, qmax, gs)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(6))
    s_ref, o_ref = s.clone().requires_grad_(True), o.clone().requires_grad_(True)
    s_tri, o_tri = s.to(DEVICE).requires_grad_(True), o.to(DEVICE).requires_grad_(True)
    out_ref = ref.DequantFn.apply(q, s_ref, z, o_ref, gs)
    out_tri = dq.DequantTritonFn.apply(q.to(torch.uint8).to(DEVICE), s_tri, z.to(DEVICE), o_tri, gs)
    assert_bits_equal(out_tri, out_ref, "forward")
    (out_ref * g).sum().backward()
    (out_tri * g.to(DEVICE)).sum().backward()
    assert_bits_equal(s_tri.grad, s_ref.grad, "grad_s")
    assert_bits_equal(o_tri.grad, o_ref.grad, "grad_o")
    # optional out_dtype argument
    out16 = dq.DequantTritonFn.apply(q.to(DEVICE), s.to(DEVICE), z.to(DEVICE), o.to(DEVICE), gs, torch.float16)
    assert out16.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------


def _params(rows: int = 4, k: int = 64, gs: int = 16) -> tuple[torch.Tensor, ...]:
    w, s, z, o = make_case("uniform", rows, k // gs, gs, 3, seed=0)
    return tuple(to_dev(w, s, z, o))


@pytest.mark.parametrize("gs", [8, 48, 2048, 16.0])
def test_bad_group_size(gs) -> None:
    w, s, z, o = _params()
    with pytest.raises(ShapeError, match="group size"):
        fq.fake_quant_fwd(w, s, z, o, 3, gs)
    with pytest.raises(ShapeError, match="group size"):
        dq.dequant_bwd(w, w, z, gs)


def test_shape_errors() -> None:
    w, s, z, o = _params()
    with pytest.raises(ShapeError, match="not a multiple of the group size"):
        fq.fake_quant_fwd(w[:, :40].contiguous(), s, z, o, 3, 16)
    with pytest.raises(ShapeError, match=r"\[R, K/gs\]"):
        fq.fake_quant_fwd(w, s[:, :2].contiguous(), z, o, 3, 16)
    with pytest.raises(ShapeError, match="2-D"):
        fq.fake_quant_fwd(w.flatten(), s, z, o, 3, 16)
    with pytest.raises(ShapeError, match="must have shape"):
        fq.fake_quant_bwd(w[:2].contiguous(), w, s, z, o, 3, 16)
    with pytest.raises(ShapeError, match="qmax"):
        fq.fake_quant_fwd(w, s, z, o, 256, 16)
    with pytest.raises(ShapeError, match="qmax"):
        fq.fake_quant_bwd(w, w, s, z, o, 3.0, 16)
    with pytest.raises(ShapeError, match="power of two"):
        fq.fake_quant_fwd(w, s, z, o, 3, 16, block_r=3)


def test_dtype_and_layout_errors() -> None:
    w, s, z, o = _params()
    with pytest.raises(BackendError, match="dtype"):
        fq.fake_quant_fwd(w.double(), s, z, o, 3, 16)
    with pytest.raises(BackendError, match="float32"):
        fq.fake_quant_fwd(w, s.half(), z, o, 3, 16)
    with pytest.raises(BackendError, match="contiguous"):
        wt = torch.empty(w.shape[1], w.shape[0], device=w.device).t()  # [R, K], non-contiguous
        fq.fake_quant_fwd(wt, s, z, o, 3, 16)
    with pytest.raises(BackendError, match="dtype"):
        dq.dequant_fwd(w.to(torch.int32), s, z, o, 16)
    with pytest.raises(BackendError, match="out_dtype"):
        dq.dequant_fwd(w, s, z, o, 16, torch.float64)
    with pytest.raises(BackendError, match="Tensor"):
        dq.dequant_bwd(w, w.tolist(), z, 16)


def test_empty_tensors() -> None:
    w = torch.empty(0, 32, device=DEVICE)
    p = torch.empty(0, 2, device=DEVICE)
    assert fq.fake_quant_fwd(w, p, p, p, 3, 16).shape == (0, 32)
    assert [t.shape for t in fq.fake_quant_bwd(w, w, p, p, p, 3, 16)] == [(0, 32), (0, 2), (0, 2), (0, 2)]
    assert [t.shape for t in dq.dequant_bwd(w, w, p, 16)] == [(0, 2), (0, 2)]


# ---------------------------------------------------------------------------------------------
# subprocess checks: no interpreter
# ---------------------------------------------------------------------------------------------


def _run_without_interpreter(code: str, tmp_path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def test_import_is_lazy_and_cpu_is_refused_without_interpreter(tmp_path) -> None:
    code = """
        import sys
        import torch
        import rqat_deploy, rqat_deploy.kernels
        assert "triton" not in sys.modules, "importing rqat_deploy.kernels must not import triton"
        assert "kernels" not in sys.modules
        from rqat_deploy.errors import BackendError
        from rqat_deploy.kernels.fake_quant import fake_quant_fwd
        w, p = torch.zeros(2, 16), torch.ones(2, 1)
        try:
            fake_quant_fwd(w, p, p, p, 3, 16)
        except BackendError as e:
            assert "CUDA" in str(e), e
            print("REFUSED")
    """
    res = _run_without_interpreter(code, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "REFUSED" in res.stdout


_AOT_SCRIPT = """
    import json, sys
    import triton
    from rqat_deploy.kernels import dequant as dq, fake_quant as fq
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        print("API-MISMATCH", e); sys.exit(3)

    def compile_one(kernel, ptrs, gs, **constexprs):
        # the tile the launcher picks for a 2048 x 6144 weight on the GPU
        cfg = fq.launch_config(2048, 6144 // gs, gs, interpret=False)
        constexprs.update(GS=gs, BLOCK_R=cfg.block_r, NG=cfg.ng)
        if "LOG2_GS" in kernel.arg_names:
            constexprs["LOG2_GS"] = gs.bit_length() - 1
        sig, attrs = {}, {}
        for i, p in enumerate(kernel.params):
            if p.is_constexpr:
                sig[p.name] = "constexpr"
            elif p.name in ptrs:
                sig[p.name] = "*" + ptrs[p.name]
                attrs[(i,)] = [["tt.divisibility", 16]]  # what a launch with torch tensors specializes
            else:
                sig[p.name] = "i32"
                if p.name in ("K", "KG"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        assert set(constexprs) == {p.name for p in kernel.params if p.is_constexpr}, constexprs
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
        opts = {"enable_fp_fusion": False, "num_warps": cfg.num_warps}
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        ptx = c.asm["ptx"]
        return {"ptx_div_rn": ptx.count("div.rn.f32"), "ptx_fma": ptx.count("fma.rn.f32"),
                "ptx_div_approx": ptx.count("div.full.f32") + ptx.count("div.approx"),
                "ptx_rint_add": ptx.count("0f4B000000"), "cubin_bytes": len(c.asm.get("cubin", b"")),
                "shared_bytes": c.metadata.shared}

    f32 = {n: "fp32" for n in ("w_ptr", "s_ptr", "z_ptr", "o_ptr", "out_ptr", "g_ptr", "gw_ptr",
                                "gs_ptr", "gz_ptr", "go_ptr")}
    bf16 = lambda *names: {**f32, **{n: "bf16" for n in names}}
    fwd, bwd = fq._fake_quant_fwd_kernel, fq._fake_quant_bwd_kernel
    res = {}
    res["fq_fwd_fp32_gs16"] = compile_one(fwd, {**f32, "codes_ptr": "u8"}, 16,
                                          QMAX=3.0, WRITE_OUT=True, WRITE_CODES=True)
    res["fq_fwd_bf16_gs1024"] = compile_one(fwd, {**bf16("w_ptr", "out_ptr"), "codes_ptr": "u8"}, 1024,
                                            QMAX=7.0, WRITE_OUT=True, WRITE_CODES=False)
    res["fq_bwd_fp32_gs16"] = compile_one(bwd, f32, 16, QMAX=3.0)
    res["fq_bwd_bf16_gs128"] = compile_one(bwd, bf16("w_ptr", "g_ptr", "gw_ptr"), 128, QMAX=15.0)
    res["dq_fwd_u8_gs16_bf16"] = compile_one(dq._dequant_fwd_kernel, {**bf16("out_ptr"), "q_ptr": "u8"}, 16)
    res["dq_bwd_u8_gs256"] = compile_one(dq._dequant_bwd_kernel, {**bf16("g_ptr"), "q_ptr": "u8"}, 256)
    print("RESULT " + json.dumps(res))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90(tmp_path) -> None:
    """Ahead-of-time compile every kernel for an H100 (sm_90) with the ptxas bundled in triton.

    Also checks the generated PTX: IEEE ``div.rn.f32`` for the stage-1 division, no approximate
    division, no fused multiply-add (``enable_fp_fusion=False``), and the exact rint kept.
    """
    res = _run_without_interpreter(_AOT_SCRIPT, tmp_path)
    if res.returncode == 3 or "API-MISMATCH" in res.stdout:
        pytest.skip(f"this triton has no GPUTarget/ASTSource compile API: {res.stdout.strip()}")
    if res.returncode != 0 and ("ptxas" in res.stderr and "not found" in res.stderr.lower()):
        pytest.skip("triton's bundled ptxas is missing")
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    for name, r in out.items():
        assert r["cubin_bytes"] > 0, name
        assert r["ptx_fma"] == 0 and r["ptx_div_approx"] == 0, (name, r)
        if name.startswith("fq_"):
            assert r["ptx_div_rn"] > 0 and r["ptx_rint_add"] > 0, (name, r)
    print(json.dumps(out, indent=1))
