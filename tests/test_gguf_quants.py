"""GGUF block packers and uniform -> GGUF mappings (exporters/gguf_quants.py).

The oracle is gguf-py's own ``gguf.quants.dequantize`` (independent of our packers), and the float32
formulas of DESIGN.md 3 as implemented by the core (``rqat_deploy.quant.reference``): packing a
checkpoint's fields must decode to exactly the checkpoint's weight.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from rqat_deploy.errors import ConfigError, ShapeError
from rqat_deploy.exporters import gguf_quants as gq
from rqat_deploy.quant.grids import kquant as kq
from rqat_deploy.quant.grids.uniform import dequantize_uniform

ROWS, N = 16, 1024  # 4 super-blocks per row, 64 blocks in all


def _fp16_full_range(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random fp16 values over the whole finite range: both signs, subnormals, zeros, extremes."""
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    x = bits.view(np.float16)
    x = np.where(np.isfinite(x), x, np.float16(0.5)).astype(np.float16)
    flat = x.reshape(-1)
    flat[:6] = [0.0, -0.0, 65504.0, -65504.0, 6e-8, -6e-8]  # zeros, fp16 max, smallest subnormal
    return x


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-level equality of float32 arrays (NaN == NaN where both arise from inf*0)."""
    return np.array_equal(a.view(np.uint32), b.view(np.uint32)) or np.array_equal(a, b, equal_nan=True)


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------------------------------
# packers: bit-exact against gguf's dequantizer and DESIGN.md 3
# ------------------------------------------------------------------------------------------------


def test_pack_q2_k_bit_exact(rng: np.random.Generator) -> None:
    q = rng.integers(0, 4, (ROWS, N), dtype=np.uint8)
    d = _fp16_full_range(rng, (ROWS, N // 256))
    dmin = _fp16_full_range(rng, (ROWS, N // 256))
    sc = rng.integers(0, 16, (ROWS, N // 16), dtype=np.uint8)
    mn = rng.integers(0, 16, (ROWS, N // 16), dtype=np.uint8)
    sc[0, :2], mn[0, :2] = [0, 15], [15, 0]
    assert set(np.unique(sc)) == set(range(16)) and set(np.unique(mn)) == set(range(16))
    assert (dmin < 0).any() and (d < 0).any()

    packed = gq.pack_q2_k(q, d, dmin, sc, mn)
    assert packed.dtype == np.uint8 and packed.shape == (ROWS, N // 256 * 84)
    got = dequantize(packed, T.Q2_K)
    want = kq.dequantize_q2_k(*(torch.from_numpy(a) for a in (q, d, dmin, sc, mn))).numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        assert _same(got, want)
        assert _same(got, gq.dequant_q2_k_fields(q, d, dmin, sc, mn))


def test_pack_q3_k_bit_exact(rng: np.random.Generator) -> None:
    q = rng.integers(0, 8, (ROWS, N), dtype=np.uint8)
    d = _fp16_full_range(rng, (ROWS, N // 256))
    s = rng.integers(-32, 32, (ROWS, N // 16), dtype=np.int8)
    s[0, :2] = [-32, 31]
    assert set(np.unique(s)) == set(range(-32, 32)) and set(np.unique(q)) == set(range(8))

    packed = gq.pack_q3_k(q, d, s)
    assert packed.shape == (ROWS, N // 256 * 110)
    got = dequantize(packed, T.Q3_K)
    want = kq.dequantize_q3_k(*(torch.from_numpy(a) for a in (q, d, s))).numpy()
    assert _same(got, want)


def test_pack_q3_k_byte_layout() -> None:
    """One hand-checked block: hmask bit = code >= 4, 6-bit scales split low nibbles / high pairs."""
    q = np.zeros((1, 256), dtype=np.uint8)
    q[0, 0], q[0, 33], q[0, 255] = 7, 4, 5  # weight 33 = plane 1, lane 1; weight 255 = plane 7, lane 31
    s = np.zeros((1, 16), dtype=np.int8)
    s[0, 0], s[0, 15] = 31, -32  # stored as 63 and 0
    block = gq.pack_q3_k(q, np.array([[1.0]], dtype=np.float16), s)[0]
    hmask, qs, scales = block[:32], block[32:96], block[96:108]
    assert hmask[0] == 0b1 and hmask[1] == 0b10 and hmask[31] == 0b1000_0000
    assert qs[0] & 3 == 3 and (qs[1] >> 2) & 3 == 0  # 7 & 3 ; weight 33 = half 0, shift 1, lane 1
    assert scales[0] & 15 == 15 and scales[8] & 3 == 3  # u0 = 63
    assert scales[7] >> 4 == 0 and scales[11] >> 6 == 0  # u15 = 0
    assert scales[1] == (32 & 15) | ((32 & 15) << 4)  # u1 = u9 = 32 (S = 0)
    assert np.frombuffer(block[108:110].tobytes(), dtype="<f2")[0] == 1.0


def test_pack_q4_k_bit_exact(rng: np.random.Generator) -> None:
    q = rng.integers(0, 16, (ROWS, N), dtype=np.uint8)
    d, dmin = _fp16_full_range(rng, (ROWS, N // 256)), _fp16_full_range(rng, (ROWS, N // 256))
    sc = rng.integers(0, 64, (ROWS, N // 32), dtype=np.uint8)
    mn = rng.integers(0, 64, (ROWS, N // 32), dtype=np.uint8)
    assert set(np.unique(sc)) == set(range(64))
    packed = gq.pack_q4_k(q, d, dmin, sc, mn)
    assert packed.shape == (ROWS, N // 256 * 144)
    with np.errstate(invalid="ignore", over="ignore"):
        assert _same(dequantize(packed, T.Q4_K), gq.dequant_q4_k_fields(q, d, dmin, sc, mn))


@pytest.mark.parametrize(("pack", "qtype", "lo", "hi"), [(gq.pack_q4_0, T.Q4_0, -8, 7), (gq.pack_q8_0, T.Q8_0, -128, 127)])
def test_pack_q4_0_q8_0_bit_exact(rng: np.random.Generator, pack, qtype: T, lo: int, hi: int) -> None:
    x = rng.integers(lo, hi + 1, (ROWS, N), dtype=np.int8)
    d = _fp16_full_range(rng, (ROWS, N // 32))
    got = dequantize(pack(x, d), qtype)
    assert _same(got, np.repeat(d.astype(np.float32), 32, axis=1) * x.astype(np.float32))


def test_packers_reject_bad_input(rng: np.random.Generator) -> None:
    q = rng.integers(0, 4, (2, 256), dtype=np.uint8)
    d = np.ones((2, 1), dtype=np.float16)
    sc = np.ones((2, 16), dtype=np.uint8)
    with pytest.raises(ShapeError, match="0..3"):
        gq.pack_q2_k(q + 1, d, d, sc, sc)  # code 4
    with pytest.raises(ShapeError, match="0..15"):
        gq.pack_q2_k(q, d, d, sc * 16, sc)
    with pytest.raises(ShapeError, match="dtype"):
        gq.pack_q2_k(q, d.astype(np.float32), d, sc, sc)
    with pytest.raises(ShapeError, match="multiple of the block size 256"):
        gq.pack_q3_k(q[:, :128], d, sc[:, :8].astype(np.int8))
    with pytest.raises(ShapeError, match="-32..31"):
        gq.pack_q3_k(q, d, np.full((2, 16), 40, dtype=np.int8))
    with pytest.raises(ShapeError, match="-8..7"):
        gq.pack_q4_0(np.full((2, 32), 8, dtype=np.int8), np.ones((2, 1), dtype=np.float16))


# ------------------------------------------------------------------------------------------------
# uniform grid -> GGUF
# ------------------------------------------------------------------------------------------------


def _rtn_uniform(rng: np.random.Generator, bits: int, rows: int = 64, n: int = 1024, g: int = 128):
    """Min-max RTN uniform-grid fields of a random Gaussian weight (the paper's grid)."""
    w = rng.standard_normal((rows, n)).astype(np.float32) * 0.02
    wg = w.reshape(rows, n // g, g)
    lo, hi = wg.min(-1), wg.max(-1)
    qmax = 2**bits - 1
    s = ((hi - lo) / qmax).astype(np.float16)
    z = np.clip(np.rint(-lo / s.astype(np.float32)), 0, qmax).astype(np.uint8)
    q = np.clip(np.rint(wg / s.astype(np.float32)[..., None]) + z[..., None], 0, qmax).astype(np.uint8)
    return q.reshape(rows, n), s, z, g


def _uniform_ref(q: np.ndarray, s: np.ndarray, z: np.ndarray, g: int) -> np.ndarray:
    return dequantize_uniform(torch.from_numpy(q), torch.from_numpy(s), torch.from_numpy(z), g).numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.mark.parametrize(("bits", "gtype"), [(2, "Q4_0"), (3, "Q4_0"), (2, "Q8_0"), (3, "Q8_0"), (4, "Q8_0"), (3, "F32")])
def test_uniform_exact_types(rng: np.random.Generator, bits: int, gtype: str) -> None:
    q, s, z, g = _rtn_uniform(rng, bits)
    z[0, 0], z[1, 0] = 0, 2**bits - 1  # extreme zero points: q - z spans the whole signed range
    mt = gq.map_uniform(q, s, z, g, bits, gtype)
    assert mt.exact and mt.qtype.name == gtype
    got = mt.data if gtype == "F32" else dequantize(mt.data, mt.qtype)
    assert _same(got, _uniform_ref(q, s, z, g))


@pytest.mark.parametrize(("bits", "gtype", "bound"), [(2, "Q2_K", 2e-2), (2, "Q3_K", 5e-3), (3, "Q3_K", 2e-2), (2, "Q4_K", 3e-3), (3, "Q4_K", 3e-3), (4, "Q4_K", 3e-3)])
def test_uniform_to_kquant_measured_error(rng: np.random.Generator, bits: int, gtype: str, bound: float) -> None:
    q, s, z, g = _rtn_uniform(rng, bits)
    ref = _uniform_ref(q, s, z, g)
    mt = gq.map_uniform(q, s, z, g, bits, gtype)
    assert mt.qtype.name == gtype and not mt.exact
    decoded_by_gguf = dequantize(mt.data, mt.qtype)
    assert _same(decoded_by_gguf, mt.decoded)  # the error we report is the error of the bytes written
    err = _rel(mt.decoded, ref)
    assert 0 < err < bound


def _naive_q2_k(q: np.ndarray, s: np.ndarray, z: np.ndarray, g: int) -> np.ndarray:
    """Baseline: d = max(s)/15, dmin = max(s*z)/15 per super-block, sub-values rounded."""
    rows, n = q.shape
    s16 = np.repeat(s.astype(np.float32), g // 16, axis=1).reshape(rows, n // 256, 16)
    t16 = s16 * np.repeat(z.astype(np.float32), g // 16, axis=1).reshape(rows, n // 256, 16)
    d = (s16.max(-1) / 15).astype(np.float16)
    dmin = (t16.max(-1) / 15).astype(np.float16)
    sc = np.clip(np.rint(s16 / np.maximum(d.astype(np.float32), 1e-30)[..., None]), 0, 15).astype(np.uint8)
    mn = np.clip(np.rint(t16 / np.maximum(dmin.astype(np.float32), 1e-30)[..., None]), 0, 15).astype(np.uint8)
    return gq.dequant_q2_k_fields(q, d, dmin, sc.reshape(rows, -1), mn.reshape(rows, -1))


def test_uniform_to_q2_k_beats_naive_scales(rng: np.random.Generator) -> None:
    q, s, z, g = _rtn_uniform(rng, 2, rows=128)
    ref = _uniform_ref(q, s, z, g)
    ours = _rel(gq.map_uniform(q, s, z, g, 2, "Q2_K").decoded, ref)
    naive = _rel(_naive_q2_k(q, s, z, g), ref)
    assert ours < 0.8 * naive


def test_uniform_to_q2_k_finds_exact_solution() -> None:
    """When the two groups of a super-block fit Q2_K's integers exactly, the mapping is lossless."""
    rng = np.random.default_rng(7)
    d = np.float16(1.5 * 2**-10)
    q = rng.integers(0, 4, (8, 256), dtype=np.uint8)
    s = np.tile(np.array([15 * d, 7 * d], dtype=np.float16), (8, 1))  # sub-scales 15 and 7
    z = np.tile(np.array([1, 2], dtype=np.uint8), (8, 1))  # s*z = 15d and 14d: sub-mins 15, 14
    mt = gq.map_uniform(q, s, z, 128, 2, "Q2_K")
    assert _same(dequantize(mt.data, T.Q2_K), _uniform_ref(q, s, z, 128))


def test_uniform_to_q3_k_reflects_codes() -> None:
    """3-bit codes with z = 3 span q - z in -3..4: only the sign-flipped sub-scale holds them exactly."""
    rng = np.random.default_rng(8)
    q = rng.integers(0, 8, (8, 256), dtype=np.uint8)
    q[:, 0], q[:, 128] = 7, 0  # both ends in each group
    s = np.full((8, 2), np.float16(2**-9) * 5, dtype=np.float16)  # = d * 5 for d = 2**-9
    z = np.full((8, 2), 3, dtype=np.uint8)
    mt = gq.map_uniform(q, s, z, 128, 3, "Q3_K")
    assert _same(dequantize(mt.data, T.Q3_K), _uniform_ref(q, s, z, 128))


def test_uniform_fallbacks_are_exact_and_reported(rng: np.random.Generator) -> None:
    q, s, z, g = _rtn_uniform(rng, 2, n=384)  # 384 = 3 groups of 128: no 256 super-block
    mt = gq.map_uniform(q, s, z, g, 2, "Q2_K")
    assert mt.exact and mt.qtype == T.Q4_0 and "Q2_K" in mt.note and "384" in mt.note
    assert _same(dequantize(mt.data, T.Q4_0), _uniform_ref(q, s, z, g))
    q, s, z, g = _rtn_uniform(rng, 4, n=256, g=16)  # 4-bit, group 16: neither Q4_K nor Q8_0 exact
    mt = gq.map_uniform(q, s, z, g, 4, "Q4_K")
    assert mt.exact and mt.qtype == T.F32 and mt.note
    assert _same(mt.data, _uniform_ref(q, s, z, g))


def test_uniform_type_choices_refuse_impossible(rng: np.random.Generator) -> None:
    q, s, z, g = _rtn_uniform(rng, 3)
    with pytest.raises(ConfigError, match="Q2_K"):
        gq.map_uniform(q, s, z, g, 3, "Q2_K")  # 3-bit codes do not fit 2 bits
    q, s, z, g = _rtn_uniform(rng, 4)
    with pytest.raises(ConfigError, match="Q4_0"):
        gq.map_uniform(q, s, z, g, 4, "Q4_0")  # q - z reaches +-15, outside -8..7
    assert gq.uniform_type_choices(2)[0] == "Q2_K" and gq.uniform_type_choices(3)[0] == "Q3_K"


@pytest.mark.parametrize("bits", [2, 3])
def test_pack_native_kquant_exact(rng: np.random.Generator, bits: int) -> None:
    if bits == 2:
        fields = {
            "qcodes": rng.integers(0, 4, (8, 512), dtype=np.uint8),
            "d": _fp16_full_range(rng, (8, 2)), "dmin": _fp16_full_range(rng, (8, 2)),
            "sub_scales": rng.integers(0, 16, (8, 32), dtype=np.uint8),
            "sub_mins": rng.integers(0, 16, (8, 32), dtype=np.uint8),
        }
        want = kq.dequantize_q2_k(*(torch.from_numpy(fields[k]) for k in ("qcodes", "d", "dmin", "sub_scales", "sub_mins")))
    else:
        fields = {
            "qcodes": rng.integers(0, 8, (8, 512), dtype=np.uint8),
            "d": _fp16_full_range(rng, (8, 2)),
            "sub_scales": rng.integers(-32, 32, (8, 32), dtype=np.int8),
        }
        want = kq.dequantize_q3_k(*(torch.from_numpy(fields[k]) for k in ("qcodes", "d", "sub_scales")))
    mt = gq.pack_native(f"Q{bits}_K", fields)
    assert mt.exact and mt.qtype.name == f"Q{bits}_K"
    with np.errstate(invalid="ignore", over="ignore"):
        assert _same(dequantize(mt.data, mt.qtype), want.numpy())
    with pytest.raises(ConfigError, match="Q4_0"):
        gq.pack_native("Q4_0", fields)
