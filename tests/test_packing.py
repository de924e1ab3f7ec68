"""Dense little-endian bit-stream packing (exporters/packing.py)."""

from __future__ import annotations

import pytest
import torch

from rqat_deploy.errors import ShapeError
from rqat_deploy.exporters.packing import pack_bits, packed_length, unpack_bits


def _codes(shape: tuple[int, int], bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, shape, generator=g, dtype=torch.uint8)


def _as_uint32(x: torch.Tensor) -> list[int]:
    return [int(v) & 0xFFFFFFFF for v in x.flatten()]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("shape", [(3, 32), (5, 45), (64, 256), (33, 7)])
def test_round_trip(bits: int, dim: int, shape: tuple[int, int]) -> None:
    codes = _codes(shape, bits, seed=bits * 10 + len(shape))
    packed = pack_bits(codes, bits, dim)
    n = shape[dim]
    expect = list(shape)
    expect[dim] = packed_length(n, bits)
    assert packed.dtype == torch.int32 and list(packed.shape) == expect
    assert torch.equal(unpack_bits(packed, bits, n, dim), codes)


def test_packed_length_is_dense() -> None:
    assert packed_length(128, 3) == 12  # 384 bits, no padding bits between codes
    assert packed_length(100, 3) == 10  # ceil(300 / 32)
    assert packed_length(256, 2) == 16
    assert packed_length(1, 8) == 1


def test_three_bit_code_straddles_words() -> None:
    # code index 10 occupies stream bits 30, 31 (word 0) and 32 (bit 0 of word 1)
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b111
    words = _as_uint32(pack_bits(codes, 3, dim=1))
    assert words == [0xC0000000, 0x00000001, 0]
    # code 21 occupies stream bits 63 (word 1 bit 31) and 64, 65 (word 2 bits 0, 1)
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 21] = 0b101  # low bit 1 -> word1 bit31; high bits 0b10 -> word2 bits 0..1 = 0b10
    assert _as_uint32(pack_bits(codes, 3, dim=1)) == [0, 0x80000000, 0b10]
    # the last code (31) sits at bits 29..31 of word 2
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 31] = 0b011
    assert _as_uint32(pack_bits(codes, 3, dim=1)) == [0, 0, 0b011 << 29]


def test_two_and_four_bit_positions() -> None:
    codes = torch.tensor([[1, 2, 3, 0] + [0] * 12 + [3]], dtype=torch.uint8)  # 17 codes -> 2 words
    assert _as_uint32(pack_bits(codes, 2, dim=1)) == [0b111001, 0b11]
    codes = torch.tensor([[0xA, 0x5] + [0] * 6 + [0xF]], dtype=torch.uint8)
    assert _as_uint32(pack_bits(codes, 4, dim=1)) == [0x5A, 0xF]


def test_high_bit_becomes_negative_int32() -> None:
    codes = torch.zeros(1, 16, dtype=torch.uint8)
    codes[0, 15] = 2  # bit 31 of the word
    assert pack_bits(codes, 2, dim=1).tolist() == [[-(2**31)]]


def test_dim0_packs_columns() -> None:
    codes = _codes((64, 5), 3, seed=7)
    assert torch.equal(pack_bits(codes, 3, dim=0), pack_bits(codes.t(), 3, dim=1).t())


def test_matches_compressed_tensors_packer() -> None:
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for bits in (2, 3, 4):
        for dim in (0, 1):
            codes = _codes((40, 96), bits, seed=bits + 3 * dim)
            signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)  # compressed-tensors' offset codes
            ours = pack_bits(codes, bits, dim)
            assert torch.equal(ours, ct.pack_to_int32(signed, bits, packed_dim=dim))
            back = ct.unpack_from_int32(ours, bits, torch.Size(codes.shape), packed_dim=dim)
            assert torch.equal(back.to(torch.int16) + 2 ** (bits - 1), codes.to(torch.int16))


def test_rejects_bad_input() -> None:
    with pytest.raises(ShapeError, match="outside the 2-bit range"):
        pack_bits(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(ShapeError, match="integer codes"):
        pack_bits(torch.zeros(2, 32), 2)
    with pytest.raises(ShapeError, match="2-D"):
        pack_bits(torch.zeros(32, dtype=torch.uint8), 2)
    with pytest.raises(ShapeError, match="1..8"):
        pack_bits(torch.zeros(1, 32, dtype=torch.uint8), 9)
    with pytest.raises(ShapeError, match="take 3 words"):
        unpack_bits(torch.zeros(1, 2, dtype=torch.int32), 3, 32)
    with pytest.raises(ShapeError, match="int32"):
        unpack_bits(torch.zeros(1, 3, dtype=torch.int64), 3, 32)
