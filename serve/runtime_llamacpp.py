"""The llama.cpp runtime: GGUF files through llama-cpp-python (DESIGN.md 7 for its API facts).

Sampling, stopping, counting and timing follow :mod:`rqat_deploy.serve.runtimes`; prefill and decode
speeds come from llama.cpp's own timers (``llama_perf_context``). Thinking guards run as a
llama-cpp-python ``logits_processor`` (a custom sampler placed first in llama.cpp's sampler chain,
so it edits the raw logits).
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any, Sequence

from rqat_deploy.errors import ConfigError, ModelLoadError
from rqat_deploy.ggml_types import Q2_0_FTYPE
from rqat_deploy.serve.guards import LlamaCppGuardProcessor
from rqat_deploy.serve.runtimes import Generation, Runtime, SamplingParams, import_backend, token_rate

__all__ = ["LlamaCppRuntime", "llamacpp_quantize"]


#: the first llama-cpp-python whose llama.cpp runs GGUF Q2_0 (ggml type 42) tensors
Q2_0_MIN_VERSION = "0.3.36"


def _check_types_supported(llama_cpp: Any, model_path: str, meta: dict[str, Any]) -> None:
    """Refuse a Q2_0 file on a llama-cpp-python too old to run Q2_0, naming the upgrade.

    Raises:
        ModelLoadError: the file's ``general.file_type`` is Q2_0 and llama-cpp-python lacks it.
    """
    if str(meta.get("general.file_type", "")) == str(Q2_0_FTYPE) and not hasattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_Q2_0"):
        raise ModelLoadError(
            f"{model_path} holds Q2_0 tensors (ggml type 42), which llama-cpp-python "
            f"{getattr(llama_cpp, '__version__', '?')} cannot run: pip install 'llama-cpp-python>={Q2_0_MIN_VERSION}'"
        )


def llamacpp_quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], qtype: str, *, threads: int = 1) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``, no importance matrix) on a float GGUF.

    The baseline a user gets from ``llama-quantize SRC DST QTYPE``: llama.cpp picks its per-tensor
    types for the file type (e.g. Q2_K files keep some tensors wider), and its Q2_0 quantizer is
    ternary (``d = max|w|``).

    Args:
        src: an F16 / F32 GGUF.
        dst: the GGUF to write (replaced if it exists).
        qtype: a llama.cpp file type name: ``Q2_0``, ``Q2_K``, ``Q3_K_M``, ``Q4_0``...
        threads: quantization threads.

    Raises:
        ConfigError: an unknown type for this llama-cpp-python.
        ModelLoadError: llama.cpp failed to quantize.
    """
    llama_cpp = import_backend("llama_cpp", "llama.cpp's quantizer needs llama-cpp-python (the `llamacpp` extra)")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise ConfigError(f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} has no file type {qtype!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ModelLoadError(f"llama.cpp could not quantize {src} to {qtype} (return code {rc})")
    return Path(dst)


class LlamaCppRuntime(Runtime):
    """GGUF files through llama-cpp-python.

    The context is created lazily, as large as the longest request needs (rounded up to 256, at
    most the model's training context), and re-created when a longer one comes.
    """

    name = "llama.cpp"

    def __init__(
        self,
        model_path: str,
        *,
        enable_thinking: bool = True,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        n_batch: int = 512,
        f32_kv_cache: bool = False,
        n_ctx: int | None = None,
    ) -> None:
        super().__init__(model_path, enable_thinking=enable_thinking)
        # Beside PyTorch, llama.cpp's OpenMP workers spin-wait for seconds per call unless passive.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        llama_cpp = import_backend(
            "llama_cpp", "the llama.cpp runtime needs llama-cpp-python: `pip install llama-cpp-python` (or the `llamacpp` extra)"
        )
        if not Path(model_path).is_file():
            raise ModelLoadError(f"GGUF file {model_path!r} does not exist")
        self._lib = llama_cpp
        self.n_threads = n_threads or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
        self.n_gpu_layers = n_gpu_layers
        self.n_batch = n_batch
        self.f32_kv_cache = f32_kv_cache
        self._fixed_ctx = n_ctx
        try:
            self._vocab_llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        except Exception as exc:
            raise ModelLoadError(f"llama.cpp cannot load {model_path!r}: {exc}") from exc
        meta = self._vocab_llm.metadata
        _check_types_supported(llama_cpp, model_path, meta)
        arch = meta.get("general.architecture", "")
        self.n_ctx_train = int(meta.get(f"{arch}.context_length", 0) or 0) or None
        self.chat_template = meta.get("tokenizer.chat_template")
        self.special_tokens = {
            "bos_token": self._token_text(meta.get("tokenizer.ggml.bos_token_id")),
            "eos_token": self._token_text(meta.get("tokenizer.ggml.eos_token_id")),
            "pad_token": self._token_text(meta.get("tokenizer.ggml.padding_token_id")),
        }
        self.think_ids = self._find_think_ids()
        self._llm: Any = None
        self._ctx_size = 0
        self._logits_llm: Any = None  # a logits_all context, kept for the next logits() call
        self._logits_ctx_size = 0

    def _token_text(self, token_id: Any) -> str | None:
        if token_id is None:
            return None
        try:
            return self._vocab_llm._model.token_get_text(int(token_id))
        except Exception:
            return None

    def tokenize(self, text: str) -> list[int]:
        return list(self._vocab_llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def _context_size(self, needed: int) -> int:
        """Context length for ``needed`` tokens: rounded up to 256 (at least 512), at most the
        model's training context, or the fixed ``n_ctx``."""
        size = self._fixed_ctx or max(512, -(-needed // 256) * 256)
        if self.n_ctx_train and not self._fixed_ctx:
            size = min(size, self.n_ctx_train)
        return size

    def _new_llama(self, size: int, **extra: Any) -> Any:
        """A full llama.cpp context of ``size`` tokens with this runtime's settings."""
        kwargs: dict[str, Any] = dict(extra)
        if self.f32_kv_cache:
            kwargs["type_k"] = kwargs["type_v"] = self._lib.GGML_TYPE_F32
        return self._lib.Llama(
            model_path=self.model_path,
            n_ctx=size,
            n_batch=self.n_batch,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            n_gpu_layers=self.n_gpu_layers,
            verbose=False,
            **kwargs,
        )

    def _ensure_context(self, needed: int) -> Any:
        size = self._context_size(needed)
        if self._llm is not None and self._ctx_size >= size:
            return self._llm
        if self._llm is not None:
            self._llm.close()
        self._llm = self._new_llama(size)
        self._ctx_size = size
        return self._llm

    def _is_eog(self, llm: Any, token: int) -> bool:
        try:
            return bool(self._lib.llama_vocab_is_eog(llm._model.vocab, token))
        except Exception:
            return token == llm.token_eos()

    def _generate_one(
        self, prompt_ids: list[int], sampling: SamplingParams, seed: int, *, ignore_eos: bool = False
    ) -> Generation:
        llm = self._ensure_context(len(prompt_ids) + sampling.max_tokens)
        max_new = min(sampling.max_tokens, self._ctx_size - len(prompt_ids))
        if max_new < 1:
            raise ConfigError(
                f"the prompt ({len(prompt_ids)} tokens) fills the model's context ({self._ctx_size}); shorten it"
            )
        llm.reset()
        llm.set_seed(seed)
        ctx = llm._ctx.ctx
        self._lib.llama_perf_context_reset(ctx)
        temp = 0.0 if sampling.greedy else sampling.temperature
        guard = self.request_guard(sampling, prompt_ids)
        processors = self._lib.LogitsProcessorList([LlamaCppGuardProcessor(guard, len(prompt_ids))]) if guard else None
        ids: list[int] = []
        finish = "length"
        t0 = time.perf_counter()
        ttft = None
        for token in llm.generate(
            prompt_ids, top_k=sampling.top_k, top_p=sampling.top_p, min_p=0.0, typical_p=1.0, temp=temp,
            repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, reset=True, logits_processor=processors,
        ):
            if ttft is None:
                ttft = time.perf_counter() - t0
            if not ignore_eos and self._is_eog(llm, token):
                finish = "stop"
                break
            ids.append(int(token))
            if len(ids) >= max_new:
                break
        total = time.perf_counter() - t0
        perf = self._lib.llama_perf_context(ctx)
        text = llm.detokenize(ids, special=True).decode("utf-8", errors="replace")
        return Generation(
            text=text,
            token_ids=ids,
            n_prompt_tokens=len(prompt_ids),
            n_completion_tokens=len(ids),
            finish_reason=finish,
            ttft_s=ttft,
            total_s=total,
            prefill_tokens_per_s=token_rate(perf.n_p_eval, perf.t_p_eval_ms / 1000.0),
            decode_tokens_per_s=token_rate(perf.n_eval, perf.t_eval_ms / 1000.0),
            guards=guard.report(ids) if guard else None,
        )

    def logits(self, prompt_ids: Sequence[int]) -> Any:
        """Per-position logits ``[len(prompt_ids), vocab]`` (float32 numpy): llama.cpp's per-token
        scores of one ``eval`` of the ids in a ``logits_all`` context (kept for later calls and
        re-created when a longer prompt comes).

        Raises:
            ConfigError: the prompt is longer than the model's context.
        """
        import numpy as np

        size = self._context_size(len(prompt_ids))
        if len(prompt_ids) > size:
            raise ConfigError(f"the prompt ({len(prompt_ids)} tokens) is longer than the model's context ({size}); shorten it")
        if self._logits_llm is None or self._logits_ctx_size < size:
            if self._logits_llm is not None:
                self._logits_llm.close()
            self._logits_llm, self._logits_ctx_size = self._new_llama(size, logits_all=True), size
        llm = self._logits_llm
        llm.reset()
        llm.eval(list(prompt_ids))
        return np.array(llm.scores[: len(prompt_ids)], dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "device": "gpu" if self.n_gpu_layers else "cpu",
            "n_threads": self.n_threads,
            "n_gpu_layers": self.n_gpu_layers,
            "n_batch": self.n_batch,
            "kv_cache": "f32" if self.f32_kv_cache else "f16",
            "n_ctx": self._ctx_size or None,
            "n_ctx_train": self.n_ctx_train,
            **self._prompt_info(),
            "system_info": self._lib.llama_print_system_info().decode("utf-8", errors="replace").strip(),
        }

    def close(self) -> None:
        for llm in (self._llm, self._logits_llm):
            if llm is not None:
                llm.close()
        self._llm = self._logits_llm = None
        self._vocab_llm.close()
