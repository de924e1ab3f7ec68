"""Shared pytest fixtures.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, at import time
of the test session: kernel tests then run on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs under pytest-xdist (one worker per core): one torch thread per worker avoids
# oversubscription, which makes torch's many small CPU ops ~10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# llama.cpp's OpenMP threads spin-wait for seconds per call beside PyTorch's unless passive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# --- Tiny local models (rqat_deploy.builtin.tiny): built once per session, offline, deterministic. -------

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """One torch thread for the test: small ops on a shared 2-core machine run far faster without OpenMP contention."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Qwen3 (hidden 256, tied embeddings) with the tiny Qwen-style tokenizer."""
    from rqat_deploy.builtin.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Qwen2 (q/k/v biases, tied embeddings) with the tiny tokenizer."""
    from rqat_deploy.builtin.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with an untied ``lm_head`` (covers a separate output matrix)."""
    from rqat_deploy.builtin.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", tie_word_embeddings=False)


# --- ggml itself, through ctypes: the shared library inside llama-cpp-python (or RQAT_LIBGGML). ----------

import ctypes  # noqa: E402
import importlib.util  # noqa: E402


def _load_libggml() -> ctypes.CDLL | None:
    """libggml with ``ggml_quantize_chunk``: from ``RQAT_LIBGGML`` or llama_cpp's package dir."""
    candidates: list[Path] = []
    if os.environ.get("RQAT_LIBGGML"):
        candidates.append(Path(os.environ["RQAT_LIBGGML"]))
    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.origin is not None:
        pkg = Path(spec.origin).parent
        for pattern in ("libggml-base*", "ggml-base*.dll", "libggml.*", "ggml.dll"):
            candidates += sorted(pkg.rglob(pattern))
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        if hasattr(lib, "ggml_quantize_chunk"):
            fn = lib.ggml_quantize_chunk
            fn.restype = ctypes.c_size_t
            # (type, src, dst, start, nrows, n_per_row, imatrix)
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
            fn.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_void_p]
            return lib
    return None


@pytest.fixture(scope="session")
def libggml() -> ctypes.CDLL:
    """ggml's own quantizers and dequantizers (skips when llama-cpp-python is not installed)."""
    lib = _load_libggml()
    if lib is None:
        pytest.skip("llama-cpp-python is not installed (its libggml runs ggml's own quantizers)")
    return lib
