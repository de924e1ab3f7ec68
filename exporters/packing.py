"""Dense little-endian bit-stream packing of 1..8-bit integer codes into int32 words.

Both safetensors layouts this package writes store codes this way (DESIGN.md 6):

- compressed-tensors ``pack-quantized`` (package >= 0.18, vLLM's ``CompressedTensorsWNA16`` and the
  Humming kernel): ``weight_packed`` packs along the input dimension, ``weight_zero_point`` along the
  output dimension;
- GPTQ (``qweight`` along K, ``qzeros`` along N), the 3-bit layout included.

Along the packed dimension, element ``i`` occupies bits ``i*b .. i*b+b-1`` of the stream, where bit
``p`` of the stream is bit ``p % 32`` of word ``p // 32`` (so a 3-bit code may straddle two words).
Each line along the packed dimension is its own stream, zero-padded to a multiple of 32 elements:
``n`` codes take ``ceil(n*b/32)`` words. Words are stored as int32 (two's complement of the uint32
bit pattern), which is what every reader expects.

The Python loops below run over the 32 positions inside a word (at most 32 iterations), never over
weights: each iteration is one vectorized operation on the whole tensor.
"""

from __future__ import annotations

import math

import torch

from rqat_deploy.errors import ShapeError

WORD_BITS = 32


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ShapeError(f"bit width must be an integer in 1..8, got {bits!r}")


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` codes of ``bits`` bits: ``ceil(n*bits/32)``."""
    _check_bits(bits)
    return math.ceil(n * bits / WORD_BITS)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> int32 with the same bits (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_bits(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack integer codes into a dense little-endian bit stream of int32 words along ``dim``.

    Args:
        codes: 2-D integer tensor with values in ``0 .. 2**bits - 1`` (any integer dtype).
        bits: code width, 1..8.
        dim: the dimension to pack along (0 or 1, negative allowed).

    Returns:
        int32 tensor, the same shape as ``codes`` except ``ceil(n*bits/32)`` along ``dim``.

    Raises:
        ShapeError: ``codes`` is not 2-D, not integer, or holds a value outside the code range.
    """
    _check_bits(bits)
    if codes.dim() != 2:
        raise ShapeError(f"pack_bits expects a 2-D tensor, got shape {list(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ShapeError(f"pack_bits expects integer codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2**bits - 1):
        raise ShapeError(
            f"codes hold values {int(codes.min())}..{int(codes.max())}, outside the {bits}-bit range 0..{2**bits - 1}"
        )
    dim = dim % 2
    v = codes.to(torch.int64)
    if dim == 0:
        v = v.t()
    rows, n = v.shape
    blocks = math.ceil(n / WORD_BITS)
    v = torch.nn.functional.pad(v, (0, blocks * WORD_BITS - n)).reshape(rows, blocks, WORD_BITS)  # [R, B, 32]
    words = torch.zeros(rows, blocks, bits, dtype=torch.int64)  # [R, B, b]: 32 codes -> b words
    for i in range(WORD_BITS):
        start = i * bits
        w, off = divmod(start, WORD_BITS)
        words[:, :, w] |= (v[:, :, i] << off) & 0xFFFFFFFF
        if off + bits > WORD_BITS:  # the code straddles into the next word
            words[:, :, w + 1] |= v[:, :, i] >> (WORD_BITS - off)
    out = _to_int32(words.reshape(rows, blocks * bits)[:, : packed_length(n, bits)])  # [R, ceil(n*b/32)]
    return (out.t() if dim == 0 else out).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the ``n`` codes of each line along ``dim``.

    Args:
        packed: 2-D int32 tensor of packed words.
        bits: code width, 1..8.
        n: number of codes per line (the unpacked length along ``dim``).
        dim: the packed dimension (0 or 1, negative allowed).

    Returns:
        uint8 tensor of codes, ``n`` long along ``dim``.

    Raises:
        ShapeError: ``packed`` is not 2-D int32 or has the wrong number of words for ``n`` codes.
    """
    _check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ShapeError(f"unpack_bits expects a 2-D int32 tensor, got {packed.dtype} {list(packed.shape)}")
    dim = dim % 2
    w32 = packed.t() if dim == 0 else packed
    rows, n_words = w32.shape
    if n_words != packed_length(n, bits):
        raise ShapeError(f"{n} codes of {bits} bits take {packed_length(n, bits)} words, got {n_words}")
    blocks = math.ceil(n / WORD_BITS)
    words = w32.to(torch.int64) & 0xFFFFFFFF  # uint32 bit patterns
    words = torch.nn.functional.pad(words, (0, blocks * bits - n_words)).reshape(rows, blocks, bits)  # [R, B, b]
    mask = (1 << bits) - 1
    codes = torch.empty(rows, blocks, WORD_BITS, dtype=torch.int64)  # [R, B, 32]
    for i in range(WORD_BITS):
        start = i * bits
        w, off = divmod(start, WORD_BITS)
        c = words[:, :, w] >> off
        if off + bits > WORD_BITS:
            c = c | (words[:, :, w + 1] << (WORD_BITS - off))
        codes[:, :, i] = c & mask
    out = codes.reshape(rows, blocks * WORD_BITS)[:, :n].to(torch.uint8)  # [R, n]
    return (out.t() if dim == 0 else out).contiguous()
