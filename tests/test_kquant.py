"""k-quant initial parameters: the llama.cpp ports (Q2_K, Q3_K) and our search.

The comparison with ggml's own quantizer runs when llama-cpp-python is installed (its shared
libggml is called through ctypes), or when ``RQAT_LIBGGML`` names a libggml-base library.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from rqat_deploy.errors import ShapeError
from rqat_deploy.quant.grids.kquant import KQuantParams
from rqat_deploy.quant.grids.kquant_ggml import llamacpp_q2_k, llamacpp_q3_k
from rqat_deploy.quant.grids.kquant_search import init_q2_k, init_q3_k
from rqat_deploy.quant.grids import kquant as kq

PORTS = {2: llamacpp_q2_k, 3: llamacpp_q3_k}
OURS = {2: init_q2_k, 3: init_q3_k}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The matrices here are small: thread start-up dominates, and on a busy machine (or under
    pytest-xdist) intra-op threads make these many small ops 10x slower. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gaussian(g: torch.Generator) -> torch.Tensor:
    return torch.randn(64, 1024, generator=g) * 0.02


def _student_t(g: torch.Generator) -> torch.Tensor:
    z = torch.randn(64, 1024, generator=g)
    chi2 = torch.randn(64, 1024, 3, generator=g).square().sum(-1)  # 3 degrees of freedom
    return z / (chi2 / 3).sqrt() * 0.02


def _outlier_columns(g: torch.Generator) -> torch.Tensor:
    w = torch.randn(64, 1024, generator=g) * 0.02
    w[:, torch.randperm(1024, generator=g)[:12]] *= 25.0
    return w


def _special_blocks(g: torch.Generator) -> torch.Tensor:
    w = torch.randn(32, 1024, generator=g)
    w[0:4, 0:256] = 0.0  # all-zero super-blocks
    w[5, 256:512] = 0.7  # constant, positive
    w[6, 256:512] = -0.2  # constant, negative
    w[7, 512:768] = 0.0
    w[7, 600] = 3.0  # one non-zero weight
    w[8, 0:16] = 0.0  # one all-zero sub-block
    w[9, 768:1024] = torch.rand(256, generator=g) + 1.0  # all positive
    w[10, 768:1024] = -torch.rand(256, generator=g) - 1.0  # all negative
    w[11] *= 1e-6  # tiny (fp16 d underflows to subnormals)
    w[12] *= 1e4  # large
    return w


MATRICES = {
    "gaussian": _gaussian,
    "student_t": _student_t,
    "outlier_columns": _outlier_columns,
    "special_blocks": _special_blocks,
}


def _make(name: str) -> torch.Tensor:
    return MATRICES[name](torch.Generator().manual_seed(1234))


def _block_sse(w: torch.Tensor, deq: torch.Tensor) -> torch.Tensor:
    """Float64 squared error per 256-weight super-block, ``[out, in/256]``."""
    e = (deq.double() - w.double()) ** 2
    return e.reshape(w.shape[0], -1, 256).sum(-1)


_CACHE: dict[tuple[str, int, str], KQuantParams] = {}


def _params(name: str, bits: int, which: str) -> KQuantParams:
    key = (name, bits, which)
    if key not in _CACHE:
        _CACHE[key] = (PORTS if which == "port" else OURS)[bits](_make(name))
    return _CACHE[key]


def _check_fields(p: KQuantParams, w: torch.Tensor) -> None:
    out, k = w.shape
    assert p.qcodes.dtype == torch.uint8 and p.qcodes.shape == (out, k)
    assert p.d.dtype == torch.float16 and p.d.shape == (out, k // 256)
    assert torch.isfinite(p.d.float()).all()
    if p.bits == 2:
        assert int(p.qcodes.max()) <= 3
        assert p.dmin is not None and p.sub_mins is not None
        assert p.dmin.dtype == torch.float16 and p.dmin.shape == (out, k // 256)
        assert torch.isfinite(p.dmin.float()).all()
        for t in (p.sub_scales, p.sub_mins):
            assert t.dtype == torch.uint8 and t.shape == (out, k // 16) and int(t.max()) <= 15
        codes = kq.q2_k_codes(w, p.d, p.dmin, p.sub_scales, p.sub_mins)
        deq = kq.dequantize_q2_k(p.qcodes, p.d, p.dmin, p.sub_scales, p.sub_mins)
    else:
        assert int(p.qcodes.max()) <= 7
        assert p.dmin is None and p.sub_mins is None
        assert p.sub_scales.dtype == torch.int8 and p.sub_scales.shape == (out, k // 16)
        assert -32 <= int(p.sub_scales.min()) and int(p.sub_scales.max()) <= 31
        codes = kq.q3_k_codes(w, p.d, p.sub_scales)
        deq = kq.dequantize_q3_k(p.qcodes, p.d, p.sub_scales)
    assert torch.equal(p.qcodes, codes), "stored codes must be the forward's codes"
    assert torch.equal(p.dequantize(), deq)
    assert torch.isfinite(deq).all()


# ---------------------------------------------------------------------------------------------
# our search vs the llama.cpp port
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("name", list(MATRICES))
def test_ours_never_worse_than_llamacpp_per_superblock(name: str, bits: int) -> None:
    w = _make(name)
    port, ours = _params(name, bits, "port"), _params(name, bits, "ours")
    e_port, e_ours = _block_sse(w, port.dequantize()), _block_sse(w, ours.dequantize())
    assert torch.isfinite(e_ours).all()
    worse = e_ours > e_port
    assert not worse.any(), f"{int(worse.sum())} super-blocks worse than llama.cpp"
    assert e_ours.sum() < e_port.sum(), "the search should improve on llama.cpp somewhere"
    _check_fields(ours, w)
    _check_fields(port, w)


@pytest.mark.parametrize("bits, min_gain", [(2, 0.15), (3, 0.05)])
def test_ours_clearly_better_on_gaussian(bits: int, min_gain: float) -> None:
    w = _make("gaussian")
    e_port = _block_sse(w, _params("gaussian", bits, "port").dequantize()).sum()
    e_ours = _block_sse(w, _params("gaussian", bits, "ours").dequantize()).sum()
    gain = float(1 - e_ours / e_port)
    assert gain >= min_gain, f"Q{bits}_K: MSE only {gain:.1%} below llama.cpp's"


@pytest.mark.parametrize("bits", [2, 3])
def test_special_blocks_handled(bits: int) -> None:
    w = _make("special_blocks")
    p = _params("special_blocks", bits, "ours")
    e = _block_sse(w, p.dequantize())
    assert float(e[0:4, 0].max()) == 0.0  # all-zero super-blocks stay exactly zero
    assert float(e[5, 1]) <= 1e-6 * 256 * 0.7**2  # a constant block is (nearly) exact
    assert float(e[6, 1]) <= 1e-6 * 256 * 0.2**2


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1e7, 1e30])
def test_extreme_magnitudes_stay_finite(bits: int, scale: float) -> None:
    w = torch.randn(4, 512, generator=torch.Generator().manual_seed(5)) * scale
    p = OURS[bits](w)
    assert torch.isfinite(p.d.float()).all()
    assert torch.isfinite(p.dequantize()).all()
    e_port = torch.nan_to_num(_block_sse(w, PORTS[bits](w).dequantize()), nan=float("inf"))
    assert (_block_sse(w, p.dequantize()) <= e_port).all()


@pytest.mark.parametrize("bits", [2, 3])
def test_bf16_input_and_iters(bits: int) -> None:
    w = _make("gaussian")[:8].bfloat16()
    e = [_block_sse(w.float(), OURS[bits](w, iters=i).dequantize()) for i in (0, 3)]
    e_port = _block_sse(w.float(), PORTS[bits](w).dequantize())
    assert (e[0] <= e_port).all() and (e[1] <= e_port).all()


@pytest.mark.parametrize("fn", [llamacpp_q2_k, llamacpp_q3_k, init_q2_k, init_q3_k])
def test_shape_errors(fn) -> None:
    with pytest.raises(ShapeError, match=r"in_features is 384.*uniform.*unquantized"):
        fn(torch.randn(4, 384))
    with pytest.raises(ShapeError, match="2-D"):
        fn(torch.randn(512))


def test_params_validate_fields() -> None:
    p = _params("gaussian", 2, "port")
    with pytest.raises(ShapeError, match="sub_mins"):
        KQuantParams(bits=2, qcodes=p.qcodes, d=p.d, dmin=p.dmin, sub_scales=p.sub_scales, sub_mins=None)
    with pytest.raises(ShapeError, match="d must be"):
        KQuantParams(
            bits=2, qcodes=p.qcodes, d=p.d.float(), dmin=p.dmin, sub_scales=p.sub_scales, sub_mins=p.sub_mins
        )


# ---------------------------------------------------------------------------------------------
# hand-checkable properties of the ports
# ---------------------------------------------------------------------------------------------


def test_q2_port_reproduces_an_exact_q2_k_matrix() -> None:
    """Sub-block j = a_j * (0,1,2,3,...) - b_j with a_j = k_j/16, b_j = m_j/8 (max k, m = 15):
    ggml fits scale a_j and min b_j exactly, so d = fp16(max scale / 15) = 1/16,
    dmin = fp16(max min / 15) = 1/8, sub-scales k_j, sub-mins m_j, codes i % 4."""
    g = torch.Generator().manual_seed(0)
    k = torch.randint(1, 16, (2, 32), generator=g)
    m = torch.randint(0, 16, (2, 32), generator=g)
    k[:, 0] = k[:, 16] = 15  # every super-block holds the largest sub-scale and sub-min
    m[:, 1] = m[:, 17] = 15
    q = (torch.arange(512) % 4).expand(2, 512)
    w = (k / 16.0).repeat_interleave(16, 1) * q - (m / 8.0).repeat_interleave(16, 1)
    p = llamacpp_q2_k(w)
    assert torch.equal(p.d.float(), torch.full((2, 2), 1 / 16))
    assert torch.equal(p.dmin.float(), torch.full((2, 2), 1 / 8))
    assert torch.equal(p.sub_scales.long(), k) and torch.equal(p.sub_mins.long(), m)
    assert torch.equal(p.qcodes.long(), q)
    assert torch.equal(p.dequantize(), w)
    assert torch.equal(init_q2_k(w).dequantize(), w)


def test_q3_port_reproduces_an_exact_q3_k_matrix() -> None:
    """Sub-block j = a_j * (-4..3 repeated), a_j = k_j/64 (max k = 32 in each super-block):
    ggml maps the largest scale to sub-scale -32, so d = fp16(-a_max/32) = -1/64 (negative)
    and sub-scales are -k_j; codes are q + 4."""
    g = torch.Generator().manual_seed(1)
    k = torch.randint(1, 33, (2, 32), generator=g)
    k[:, 3] = k[:, 20] = 32
    q = (torch.arange(512) % 8 - 4).expand(2, 512)
    w = (k / 64.0).repeat_interleave(16, 1) * q
    p = llamacpp_q3_k(w)
    assert torch.equal(p.d.float(), torch.full((2, 2), -1 / 64))
    assert torch.equal(p.sub_scales.long(), -k)
    assert torch.equal(p.qcodes.long(), q + 4)
    assert torch.equal(p.dequantize(), w)
    assert torch.equal(init_q3_k(w).dequantize(), w)


def test_ports_on_all_zero_superblocks() -> None:
    w = torch.zeros(2, 256)
    p2, p3 = llamacpp_q2_k(w), llamacpp_q3_k(w)
    assert float(p2.d.abs().max()) == 0 and float(p2.dmin.abs().max()) == 0
    assert int(p2.sub_scales.max()) == 0 and int(p2.sub_mins.max()) == 0
    assert float(p3.d.abs().max()) == 0
    assert (p3.sub_scales == -32).all()  # ggml's zeroed scale bytes decode to -32
    assert (p3.qcodes == 4).all() and (p2.qcodes == 0).all()  # forward's codes for scale 0


def test_q2_port_d_is_fp16_of_max_scale_over_15() -> None:
    """One sub-block spanning [0, 3] (scale 1) and the rest tiny: d = fp16(1/15)."""
    w = torch.zeros(1, 256)
    w[0, :16] = torch.arange(16) % 4  # scale exactly 1, min 0
    w[0, 16:] = (torch.arange(240) % 4) * 0.25  # scale 0.25
    p = llamacpp_q2_k(w)
    assert p.d.item() == torch.tensor(1 / 15).half().item()
    assert int(p.sub_scales[0, 0]) == 15 and (p.sub_scales[0, 1:] == 4).all()  # round(15*0.25)


def test_nearest_int_matches_ggml_trick() -> None:
    from rqat_deploy.quant.grids.kquant_ggml import nearest_int

    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.49, -3.51, 1e6 + 0.5])
    assert nearest_int(x).tolist() == [-2, -2, 0, 0, 2, 2, 3, -4, 1000000]


# ---------------------------------------------------------------------------------------------
# the real ggml quantizer (needs llama-cpp-python's shared library)
# ---------------------------------------------------------------------------------------------

GGML_TYPE_Q2_K, GGML_TYPE_Q3_K = 10, 11
BLOCK_BYTES = {GGML_TYPE_Q2_K: 84, GGML_TYPE_Q3_K: 110}


def _ggml_quantize(lib: ctypes.CDLL, w: torch.Tensor, ggml_type: int) -> np.ndarray:
    x = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    out, k = x.shape
    dst = np.zeros((out, k // 256, BLOCK_BYTES[ggml_type]), dtype=np.uint8)
    n = lib.ggml_quantize_chunk(ggml_type, x.ctypes.data, dst.ctypes.data, 0, out, k, None)  # no imatrix
    assert n == dst.size
    return dst


def _unpack_low2(qs: np.ndarray) -> np.ndarray:
    """ggml's 2-bit packing: byte l of each 32-byte half holds weights l, l+32, l+64, l+96."""
    low = np.zeros(qs.shape[:-1] + (256,), dtype=np.int64)
    for half in range(2):
        for shift in range(4):
            start = 128 * half + 32 * shift
            low[..., start : start + 32] = (qs[..., 32 * half : 32 * half + 32] >> (2 * shift)) & 3
    return low


def _decode_q2_k(b: np.ndarray) -> dict[str, np.ndarray]:
    out = b.shape[0]
    scales = b[..., :16].astype(np.int64)
    return {
        "sub_scales": (scales & 15).reshape(out, -1),
        "sub_mins": (scales >> 4).reshape(out, -1),
        "codes": _unpack_low2(b[..., 16:80]).reshape(out, -1),
        "d": b[..., 80:82].copy().view(np.uint16)[..., 0],
        "dmin": b[..., 82:84].copy().view(np.uint16)[..., 0],
    }


def _decode_q3_k(b: np.ndarray) -> dict[str, np.ndarray]:
    out, nsb = b.shape[:2]
    hmask, raw = b[..., :32].astype(np.int64), b[..., 96:108].astype(np.int64)
    sc = np.zeros((out, nsb, 16), dtype=np.int64)
    for j in range(16):
        low = raw[..., j] & 15 if j < 8 else raw[..., j - 8] >> 4
        high = (raw[..., 8 + j % 4] >> (2 * (j // 4))) & 3
        sc[..., j] = (low | (high << 4)) - 32
    codes = _unpack_low2(b[..., 32:96])
    for j in range(256):
        codes[..., j] += 4 * ((hmask[..., j % 32] >> (j // 32)) & 1)
    d = b[..., 108:110].copy().view(np.uint16)[..., 0]
    return {"sub_scales": sc.reshape(out, -1), "codes": codes.reshape(out, -1), "d": d}


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", list(MATRICES))
def test_port_matches_ggml_bytes(libggml: ctypes.CDLL, name: str) -> None:
    w = _make(name)
    for bits, ggml_type, decode in ((2, GGML_TYPE_Q2_K, _decode_q2_k), (3, GGML_TYPE_Q3_K, _decode_q3_k)):
        ref = decode(_ggml_quantize(libggml, w, ggml_type))
        p = PORTS[bits](w)
        assert np.array_equal(p.d.numpy().view(np.uint16), ref["d"]), f"Q{bits}_K d"
        assert np.array_equal(p.sub_scales.numpy().astype(np.int64), ref["sub_scales"]), f"Q{bits}_K scales"
        d_ref = torch.from_numpy(ref["d"].view(np.float16))
        sc_ref = torch.from_numpy(ref["sub_scales"])
        if bits == 2:
            assert np.array_equal(p.dmin.numpy().view(np.uint16), ref["dmin"]), "Q2_K dmin"
            assert np.array_equal(p.sub_mins.numpy().astype(np.int64), ref["sub_mins"]), "Q2_K mins"
            deq_ref = kq.dequantize_q2_k(
                torch.from_numpy(ref["codes"]),
                d_ref,
                torch.from_numpy(ref["dmin"].view(np.float16)),
                sc_ref,
                torch.from_numpy(ref["sub_mins"]),
            )
        else:
            deq_ref = kq.dequantize_q3_k(torch.from_numpy(ref["codes"]), d_ref, sc_ref)
        # ggml leaves stale codes in a sub-block whose d * sub_scale is 0 (it decodes to -dmin*m
        # whatever the codes); elsewhere the codes are identical
        live = (p.d.float().repeat_interleave(16, 1) * p.sub_scales.float() != 0).repeat_interleave(16, 1)
        assert np.array_equal(p.qcodes.long()[live].numpy(), ref["codes"][live.numpy()]), f"Q{bits}_K codes"
        assert torch.equal(p.dequantize(), deq_ref), f"Q{bits}_K dequantized values"
