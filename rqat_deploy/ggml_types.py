"""GGML types newer than the installed ``gguf`` package: llama.cpp's Q2_0, taught to ``gguf``.

Q2_0 (ggml type 42, llama.cpp since mid-2026; llama-cpp-python 0.3.36 runs it) stores blocks of
64 weights in 18 bytes, 2.25 bits per weight::

    offset  size  field
    0       2     d    fp16 scale
    2       16    qs   64 two-bit codes, four per byte, lowest bits first:
                       weight j of the block is (qs[j // 4] >> 2*(j % 4)) & 3

    w_j = d * (q_j - 1),   q_j in 0..3   ->   levels {-d, 0, d, 2d}

PyPI's ``gguf`` 0.19.0 has no enum value, size or decoder for it: its ``GGUFReader`` raises
``ValueError: 42 is not a valid GGMLQuantizationType`` on any file holding a Q2_0 tensor, and
``GGUFWriter`` cannot take it as ``raw_dtype``. :func:`register` adds what is missing (the enum
member, the ``GGML_QUANT_SIZES`` entry, ``LlamaFileType.MOSTLY_Q2_0`` and a dequantizer for
``gguf.quants.dequantize``), so every reader and writer of the project handles Q2_0 through the
real library; a ``gguf`` that already knows the type is left alone (its sizes are checked). The
decoder here is tested bit for bit against ggml's own (``dequantize_row_q2_0`` through ctypes).

Import this module (it registers on import) before reading or writing GGUF files that may hold
Q2_0 tensors.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

Q2_0_TYPE = 42  # GGML_TYPE_Q2_0
Q2_0_FTYPE = 41  # LLAMA_FTYPE_MOSTLY_Q2_0 (general.file_type)
QK2_0 = 64  # weights per block
Q2_0_BYTES = 2 + QK2_0 // 4  # fp16 d + 16 bytes of codes = 18

__all__ = ["Q2_0_BYTES", "Q2_0_FTYPE", "Q2_0_TYPE", "QK2_0", "dequantize_q2_0_blocks", "register"]


def dequantize_q2_0_blocks(blocks: np.ndarray) -> np.ndarray:
    """Decode Q2_0 blocks ``uint8 [n, 18]`` to float32 ``[n, 64]`` (``d * (q - 1)`` in float32)."""
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [n, 1]
    qs = blocks[:, 2:]  # [n, 16]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    q = (qs[:, :, None] >> shifts) & 3  # [n, 16, 4]: weight 4*i + k at bits 2k of byte i
    return d * (q.reshape(len(blocks), QK2_0).astype(np.float32) - np.float32(1.0))


def _add_member(cls: type[enum.Enum], name: str, value: int) -> Any:
    """Add member ``name = value`` to an existing IntEnum (for types a released ``gguf`` lacks)."""
    member = int.__new__(cls, value)  # type: ignore[call-overload]
    member._name_, member._value_ = name, value
    member._sort_order_ = len(cls._member_names_)
    type.__setattr__(cls, name, member)
    cls._member_map_[name] = member
    cls._value2member_map_[value] = member
    cls._member_names_.append(name)  # type: ignore[attr-defined]
    return member


def register() -> None:
    """Teach the installed ``gguf`` package Q2_0 (idempotent; a no-op where it knows the type).

    Raises:
        RuntimeError: the installed ``gguf`` knows Q2_0 with other block sizes than llama.cpp's.
    """
    import gguf
    from gguf import quants

    qtype = gguf.GGMLQuantizationType
    if "Q2_0" not in qtype.__members__:
        _add_member(qtype, "Q2_0", Q2_0_TYPE)
    t = qtype["Q2_0"]
    sizes = gguf.GGML_QUANT_SIZES.setdefault(t, (QK2_0, Q2_0_BYTES))
    if tuple(sizes) != (QK2_0, Q2_0_BYTES):
        raise RuntimeError(f"gguf {gguf.__name__} knows Q2_0 as {sizes}, not ({QK2_0}, {Q2_0_BYTES}) blocks")
    if "MOSTLY_Q2_0" not in gguf.LlamaFileType.__members__:
        _add_member(gguf.LlamaFileType, "MOSTLY_Q2_0", Q2_0_FTYPE)
    if t not in quants._type_traits:
        base = getattr(quants, "__Quant")  # gguf's (module-level) base class of its type decoders

        class _Q2_0(base, qtype=t):  # type: ignore[misc, valid-type, call-arg]  # registers itself
            @classmethod
            def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
                return dequantize_q2_0_blocks(blocks)

            @classmethod
            def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
                raise NotImplementedError("rqat-deploy packs Q2_0 from trained codes (exporters/gguf_quants.py)")


register()
