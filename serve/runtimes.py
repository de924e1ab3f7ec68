"""Runtimes behind one small interface: llama.cpp (llama-cpp-python), transformers, vLLM, ONNX Runtime.

Every runtime does the same things the same way, so their numbers can be compared:

- **Prompt**: the user message (question + instruction) rendered with the model's own chat template
  (the tokenizer's for a model directory, ``tokenizer.chat_template`` of a GGUF file) through one
  renderer (:func:`rqat_deploy.data.chat.render_prompt`, transformers' Jinja renderer), ``add_generation_prompt=True``,
  ``enable_thinking=True`` by default (Qwen3 templates read it, others ignore it). The rendered text
  is tokenized without adding special tokens (the template writes them), as transformers'
  ``apply_chat_template`` does.
- **Sampling**: temperature, top-k, top-p (no min-p, no repetition penalty) from
  :class:`SamplingParams`; the paper's temperature 0.6, top-k 20 by default; ``greedy`` for
  deterministic runs. Each prompt gets its own seed. Known difference: llama.cpp applies top-p
  before the temperature, transformers and vLLM after; it only matters when top-p < 1 (default 1).
- **Stopping**: at an end-of-generation token (not counted, not in the text) or at ``max_tokens``
  (``finish_reason = "length"``). The end-of-generation ids of a model directory / ONNX export are
  those of its ``generation_config.json`` and its tokenizer (ONNX: plus ``genai_config.json``'s).
- **Counting**: completion tokens are generated ids; thinking tokens are counted on the ids by
  :mod:`rqat_deploy.data.thinking` with the ``<think>`` / ``</think>`` ids when the vocabulary has
  them as single tokens. The text is decoded with special tokens kept, so the tags stay visible.
- **Timing** (per generation and in :meth:`Runtime.speed`): ``ttft_s`` = wall time from the call
  to the first generated token; ``prefill_tokens_per_s`` = prompt tokens / prefill time (llama.cpp:
  its own prompt-eval timer; transformers / vLLM / ONNX Runtime: the TTFT); ``decode_tokens_per_s`` = tokens after
  the first / the time after the first.

``generate`` runs the prompts one at a time (vLLM: in chunks); Ctrl-C raises
:class:`GenerationInterrupted`, a ``KeyboardInterrupt`` that carries the finished generations.
"""

from __future__ import annotations

import abc
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rqat_deploy.data.chat import ends_in_thinking, render_prompt
from rqat_deploy.errors import BackendError, ConfigError, ModelLoadError

__all__ = [
    "DEFAULT_INSTRUCTION",
    "RUNTIMES",
    "Generation",
    "GenerationInterrupted",
    "LlamaCppRuntime",
    "OnnxRuntime",
    "Runtime",
    "SamplingParams",
    "TransformersRuntime",
    "VLLMRuntime",
    "detect_runtime",
    "generation_record",
    "load_runtime",
]

#: The names ``--runtime`` accepts.
RUNTIMES: tuple[str, ...] = ("llama.cpp", "transformers", "vllm", "onnxruntime")
#: Appended to each question (Qwen's math evaluation prompt).
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings shared by every runtime.

    Attributes:
        temperature: softmax temperature (paper: 0.6).
        top_k: keep the k most likely tokens (paper: 20); 0 disables.
        top_p: nucleus mass (1.0 disables; seed 002's setup uses 0.95).
        max_tokens: generated-token limit per response.
        greedy: argmax decoding (temperature, top-k, top-p ignored).
        seed: base seed; prompt i of seed s is sampled with :meth:`seed_for`.
    """

    temperature: float = 0.6
    top_k: int = 20
    top_p: float = 1.0
    max_tokens: int = 32768
    greedy: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (got {self.temperature}); use greedy decoding instead")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    def seed_for(self, index: int) -> int:
        """The seed of prompt ``index`` (independent of batching and of the other prompts)."""
        return (self.seed * 1_000_003 + index) % (2**31 - 1)


@dataclass
class Generation:
    """One generated response with its counts and timings.

    Attributes:
        text: the generated text (special tokens kept, the stop token left out).
        token_ids: the generated ids (the stop token left out).
        n_prompt_tokens: prompt length in tokens.
        n_completion_tokens: generated tokens (the stop token not counted).
        finish_reason: ``"stop"`` (end-of-generation token) or ``"length"`` (hit ``max_tokens``).
        ttft_s: seconds to the first generated token.
        total_s: seconds for the whole generation.
        prefill_tokens_per_s: prompt tokens per second of prefill.
        decode_tokens_per_s: generated tokens per second after the first.
        starts_in_thinking: the rendered prompt ended inside an opened ``<think>``.
        think_ids: ids of ``<think>`` and ``</think>`` when they are single tokens.
        seed: the seed it was sampled with.
    """

    text: str
    token_ids: list[int]
    n_prompt_tokens: int
    n_completion_tokens: int
    finish_reason: str
    ttft_s: float | None = None
    total_s: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    starts_in_thinking: bool = False
    think_ids: tuple[int, int] | None = None
    seed: int | None = None


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`Runtime.generate`; ``results`` holds the generations that finished."""

    def __init__(self, results: list[Generation]) -> None:
        super().__init__(f"interrupted after {len(results)} generations")
        self.results = results


def _rate(tokens: int | None, seconds: float | None) -> float | None:
    if tokens is None or seconds is None or tokens <= 0 or seconds <= 0:
        return None
    return tokens / seconds


class Runtime(abc.ABC):
    """A loaded model that renders prompts, generates, and measures speed.

    Subclasses implement :meth:`tokenize`, :meth:`_generate_one` and :meth:`describe`; the rest
    (prompt rendering, seeding, Ctrl-C handling, speed repetitions) is shared.
    """

    name: str = "runtime"

    def __init__(self, model_path: str, *, enable_thinking: bool = True) -> None:
        self.model_path = str(model_path)
        self.enable_thinking = enable_thinking
        self.chat_template: str | None = None
        self.special_tokens: dict[str, str | None] = {}
        self.think_ids: tuple[int, int] | None = None

    # -- prompts -----------------------------------------------------------------------------------

    def render_prompt(self, question: str, instruction: str | None = DEFAULT_INSTRUCTION) -> str:
        """The prompt text for a question: question + instruction through the chat template.

        Args:
            question: the question.
            instruction: appended on a new line (None: nothing appended).

        Returns:
            The rendered prompt.
        """
        message = question if not instruction else f"{question}\n{instruction}"
        return render_prompt(
            self.chat_template, message, special_tokens=self.special_tokens, enable_thinking=self.enable_thinking
        )

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (no special tokens added; the template wrote them)."""

    def _find_think_ids(self) -> tuple[int, int] | None:
        try:
            o, c = self.tokenize("<think>"), self.tokenize("</think>")
        except Exception:
            return None
        return (o[0], c[0]) if len(o) == 1 and len(c) == 1 else None

    # -- generation --------------------------------------------------------------------------------

    @abc.abstractmethod
    def _generate_one(
        self, prompt_ids: list[int], sampling: SamplingParams, seed: int, *, ignore_eos: bool = False
    ) -> Generation:
        """Generate one response from prompt ids."""

    def generate(
        self,
        prompts: Sequence[str],
        sampling: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        on_result: Callable[[int, Generation], None] | None = None,
    ) -> list[Generation]:
        """Generate one response per rendered prompt.

        Args:
            prompts: rendered prompts (see :meth:`render_prompt`).
            sampling: sampling settings.
            seeds: one seed per prompt (default ``sampling.seed_for(i)``).
            on_result: called with ``(i, generation)`` as each one finishes (to save it at once).

        Returns:
            The generations, in prompt order.

        Raises:
            GenerationInterrupted: on Ctrl-C, carrying the generations that finished.
        """
        results: list[Generation] = []
        try:
            for i, prompt in enumerate(prompts):
                seed = sampling.seed_for(i) if seeds is None else int(seeds[i])
                gen = self._generate_one(self.tokenize(prompt), sampling, seed)
                gen.starts_in_thinking = ends_in_thinking(prompt)
                gen.think_ids = self.think_ids
                gen.seed = seed
                results.append(gen)
                if on_result is not None:
                    on_result(i, gen)
        except GenerationInterrupted:
            raise
        except KeyboardInterrupt as exc:
            raise GenerationInterrupted(results) from exc
        return results

    # -- speed -------------------------------------------------------------------------------------

    def _speed_prompt(self, prompt: str, n_prompt_tokens: int) -> list[int]:
        ids = self.tokenize(prompt)
        if not ids:
            raise ConfigError("the speed prompt is empty; give some text")
        reps = -(-n_prompt_tokens // len(ids))
        return (ids * reps)[:n_prompt_tokens]

    def _throughput(self, prompt_ids: list[int], n_tokens: int, concurrency: int) -> dict[str, Any] | None:
        """Generated tokens per second with ``concurrency`` sequences at once (None: unsupported)."""
        return None

    def speed(
        self,
        prompt: str,
        *,
        n_prompt_tokens: int = 512,
        n_tokens: int = 128,
        repeats: int = 3,
        warmup: int = 1,
        concurrency: int = 1,
    ) -> dict[str, Any]:
        """Measure TTFT, prefill and decode speed at batch 1 (and throughput at a concurrency).

        The prompt's tokens are repeated / cut to exactly ``n_prompt_tokens``; decoding is greedy and
        ignores end-of-generation tokens, so every repetition generates exactly ``n_tokens``.
        ``warmup`` runs are made first and not counted.

        Args:
            prompt: text the prompt is made of.
            n_prompt_tokens: prompt length.
            n_tokens: tokens generated per repetition.
            repeats: measured repetitions.
            warmup: unmeasured runs first.
            concurrency: sequences at once for the throughput run (> 1 where supported).

        Returns:
            ``{"ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s"}`` each
            ``{"median", "min", "max", "std", "n"}``, ``"repetitions"`` (raw), the settings, and
            ``"throughput"`` (None when not run or unsupported).
        """
        from rqat_deploy.serve.report import spread_stats

        if repeats < 1 or n_tokens < 2 or n_prompt_tokens < 1:
            raise ConfigError("speed needs repeats >= 1, n_tokens >= 2 and n_prompt_tokens >= 1")
        ids = self._speed_prompt(prompt, n_prompt_tokens)
        sampling = SamplingParams(greedy=True, max_tokens=n_tokens)
        for _ in range(warmup):
            self._generate_one(ids, sampling, 0, ignore_eos=True)
        reps = []
        for _ in range(repeats):
            g = self._generate_one(ids, sampling, 0, ignore_eos=True)
            reps.append(
                {
                    "ttft_s": g.ttft_s,
                    "total_s": g.total_s,
                    "prompt_tokens": g.n_prompt_tokens,
                    "completion_tokens": g.n_completion_tokens,
                    "prefill_tokens_per_s": g.prefill_tokens_per_s,
                    "decode_tokens_per_s": g.decode_tokens_per_s,
                }
            )
        out: dict[str, Any] = {
            key: spread_stats([r[key] for r in reps]) for key in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s")
        }
        out.update(
            {
                "n_prompt_tokens": n_prompt_tokens,
                "n_tokens": n_tokens,
                "repeats": repeats,
                "warmup": warmup,
                "repetitions": reps,
                "throughput": self._throughput(ids, n_tokens, concurrency) if concurrency > 1 else None,
            }
        )
        return out

    # -- description -------------------------------------------------------------------------------

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Runtime name, device, threads and settings, for the report."""

    def close(self) -> None:
        """Free the model (optional)."""


# ==================================================================================================
# llama.cpp
# ==================================================================================================


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
        try:
            import llama_cpp
        except ImportError as exc:
            raise BackendError(
                "the llama.cpp runtime needs llama-cpp-python: `pip install llama-cpp-python` "
                "(or the `llamacpp` extra)"
            ) from exc
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

    def _token_text(self, token_id: Any) -> str | None:
        if token_id is None:
            return None
        try:
            return self._vocab_llm._model.token_get_text(int(token_id))
        except Exception:
            return None

    def tokenize(self, text: str) -> list[int]:
        return list(self._vocab_llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def _ensure_context(self, needed: int) -> Any:
        size = self._fixed_ctx or max(512, -(-needed // 256) * 256)
        if self.n_ctx_train and not self._fixed_ctx:
            size = min(size, self.n_ctx_train)
        if self._llm is not None and self._ctx_size >= size:
            return self._llm
        if self._llm is not None:
            self._llm.close()
        kwargs: dict[str, Any] = {}
        if self.f32_kv_cache:
            kwargs["type_k"] = kwargs["type_v"] = self._lib.GGML_TYPE_F32
        self._llm = self._lib.Llama(
            model_path=self.model_path,
            n_ctx=size,
            n_batch=self.n_batch,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            n_gpu_layers=self.n_gpu_layers,
            verbose=False,
            **kwargs,
        )
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
        ids: list[int] = []
        finish = "length"
        t0 = time.perf_counter()
        ttft = None
        for token in llm.generate(
            prompt_ids, top_k=sampling.top_k, top_p=sampling.top_p, min_p=0.0, typical_p=1.0, temp=temp,
            repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, reset=True,
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
            prefill_tokens_per_s=_rate(perf.n_p_eval, perf.t_p_eval_ms / 1000.0),
            decode_tokens_per_s=_rate(perf.n_eval, perf.t_eval_ms / 1000.0),
        )

    def logits(self, prompt_ids: Sequence[int]) -> Any:
        """Per-position logits ``[len(prompt_ids), vocab]`` (float32 numpy), for agreement tests."""
        import numpy as np

        llm = self._lib.Llama(
            model_path=self.model_path, n_ctx=max(512, len(prompt_ids)), logits_all=True,
            n_threads=self.n_threads, verbose=False,
            **({"type_k": self._lib.GGML_TYPE_F32, "type_v": self._lib.GGML_TYPE_F32} if self.f32_kv_cache else {}),
        )
        try:
            llm.eval(list(prompt_ids))
            return np.array(llm.scores[: len(prompt_ids)], dtype=np.float32)
        finally:
            llm.close()

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
            "chat_template": bool(self.chat_template),
            "enable_thinking": self.enable_thinking,
            "think_ids": list(self.think_ids) if self.think_ids else None,
            "system_info": self._lib.llama_print_system_info().decode("utf-8", errors="replace").strip(),
        }

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
        self._vocab_llm.close()


# ==================================================================================================
# transformers
# ==================================================================================================


class _TimingStreamer:
    """A transformers streamer that only records when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.first_token_at is None:  # call 1 is the prompt
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def _is_compressed_tensors(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.exists():
        return False
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors"


class TransformersRuntime(Runtime):
    """A Hugging Face model directory / Hub id, a quantized checkpoint (``rqat_quant.json``, loaded
    dequantized through :func:`rqat_deploy.quant.checkpoint.load_model`) or a compressed-tensors export
    (loaded with ``run_compressed=False``)."""

    name = "transformers"

    def __init__(
        self,
        model_path: str,
        *,
        enable_thinking: bool = True,
        device: str | None = None,
        dtype: str | None = None,
        n_threads: int | None = None,
    ) -> None:
        super().__init__(model_path, enable_thinking=enable_thinking)
        import torch

        from rqat_deploy.models import torch_dtype

        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        self._threads_before = torch.get_num_threads()
        if n_threads:
            torch.set_num_threads(n_threads)  # process-wide: close() restores it
        path = Path(model_path)
        if (path / "rqat_quant.json").exists():
            from rqat_deploy.quant.checkpoint import load_model

            self.kind = "checkpoint"
            self.model, self.tokenizer = load_model(path, dtype=torch_dtype(self.dtype), device=self.device)
            if self.tokenizer is None:
                raise ModelLoadError(f"{path} has no tokenizer files: copy them from the base model")
        elif path.is_dir() and _is_compressed_tensors(path):
            self.kind = "compressed-tensors"
            self.model, self.tokenizer = self._load_compressed(path)
        else:
            from rqat_deploy.models import load_hf_model

            self.kind = "hf"
            self.model, self.tokenizer = load_hf_model(str(model_path), dtype=self.dtype, device=self.device)
        self.chat_template = getattr(self.tokenizer, "chat_template", None)
        self.special_tokens = {
            k: getattr(self.tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.think_ids = self._find_think_ids()
        # transformers fills every unset generation field from the model's generation_config.json
        # (Qwen3's says top_p 0.95...) and then from global defaults (top_k 50): replace the model's
        # with a neutral one and set every sampling field in _generation_config, so the sampling is
        # exactly SamplingParams, as in the other runtimes.
        from transformers import GenerationConfig

        original = getattr(self.model, "generation_config", None)
        self.model_generation_config = original.to_dict() if original is not None else None
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids, pad_token_id=self.pad_id)

    def _load_compressed(self, path: Path) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rqat_deploy.models import torch_dtype

        try:
            from transformers import CompressedTensorsConfig

            qconf = CompressedTensorsConfig(run_compressed=False)
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(self.dtype), quantization_config=qconf)
        except ImportError as exc:
            raise BackendError("loading a compressed-tensors export needs `pip install compressed-tensors`") from exc
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"transformers cannot load the compressed-tensors export {path}: {exc}") from exc
        return model.to(self.device).eval(), AutoTokenizer.from_pretrained(str(path))

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gc_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gc_eos, self.tokenizer.eos_token_id):
            if value is None:
                continue
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if int(v) not in ids:
                    ids.append(int(v))
        if not ids:
            raise ModelLoadError(f"{self.model_path}: neither the tokenizer nor generation_config names an eos token")
        return ids

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _generation_config(self, sampling: SamplingParams, max_new: int, ignore_eos: bool) -> Any:
        from transformers import GenerationConfig

        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "eos_token_id": self.eos_ids,
            "pad_token_id": self.pad_id,
            "repetition_penalty": 1.0,
            "num_beams": 1,
        }
        if ignore_eos:
            kwargs["min_new_tokens"] = max_new
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=1.0, top_k=0, top_p=1.0)
        else:  # top_k 0 disables it in transformers (None would become the global default 50)
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        return GenerationConfig(**kwargs)

    def _generate_one(
        self, prompt_ids: list[int], sampling: SamplingParams, seed: int, *, ignore_eos: bool = False
    ) -> Generation:
        torch = self._torch
        limit = getattr(self.model.config, "max_position_embeddings", None)
        max_new = sampling.max_tokens if not limit else min(sampling.max_tokens, limit - len(prompt_ids))
        if max_new < 1:
            raise ConfigError(f"the prompt ({len(prompt_ids)} tokens) fills the model's context ({limit}); shorten it")
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        streamer = _TimingStreamer()
        torch.manual_seed(seed)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self._generation_config(sampling, max_new, ignore_eos),
                streamer=streamer,
            )
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        ids = [int(t) for t in out[0, len(prompt_ids) :].tolist()]
        finish = "length"
        if not ignore_eos and ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
            finish = "stop"
        elif not ignore_eos:
            cut = next((k for k, t in enumerate(ids) if t in self.eos_ids), None)
            if cut is not None:  # never expected: generate stops at the first eos
                ids, finish = ids[:cut], "stop"
        ttft = streamer.first_token_at - t0 if streamer.first_token_at is not None else None
        n_gen = len(out[0]) - len(prompt_ids)
        decode_s = total - ttft if ttft is not None else None
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return Generation(
            text=text,
            token_ids=ids,
            n_prompt_tokens=len(prompt_ids),
            n_completion_tokens=len(ids),
            finish_reason=finish,
            ttft_s=ttft,
            total_s=total,
            prefill_tokens_per_s=_rate(len(prompt_ids), ttft),
            decode_tokens_per_s=_rate(n_gen - 1, decode_s),
        )

    def logits(self, prompt_ids: Sequence[int]) -> Any:
        """Per-position logits ``[len(prompt_ids), vocab]`` (float32 numpy), for agreement tests."""
        torch = self._torch
        with torch.inference_mode():
            ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
            return self.model(input_ids=ids).logits[0].float().cpu().numpy()

    def _throughput(self, prompt_ids: list[int], n_tokens: int, concurrency: int) -> dict[str, Any] | None:
        torch = self._torch
        ids = torch.tensor([prompt_ids] * concurrency, dtype=torch.long, device=self.device)
        gc = self._generation_config(SamplingParams(greedy=True, max_tokens=n_tokens), n_tokens, ignore_eos=True)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        generated = (out.shape[1] - len(prompt_ids)) * concurrency
        return {"concurrency": concurrency, "seconds": seconds, "generated_tokens": generated, "tokens_per_s": generated / seconds}

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "kind": self.kind,
            "device": self.device,
            "dtype": self.dtype,
            "n_threads": self._torch.get_num_threads(),
            "chat_template": bool(self.chat_template),
            "enable_thinking": self.enable_thinking,
            "think_ids": list(self.think_ids) if self.think_ids else None,
            "eos_ids": self.eos_ids,
        }

    def close(self) -> None:
        self.model = None
        self._torch.set_num_threads(self._threads_before)


# ==================================================================================================
# vLLM
# ==================================================================================================


class VLLMRuntime(Runtime):
    """vLLM's offline ``LLM`` API (CUDA only): HF directories, compressed-tensors exports, GGUF.

    Prompts are generated in chunks (``chunk_size``) so Ctrl-C keeps the finished chunks.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        enable_thinking: bool = True,
        tokenizer: str | None = None,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        chunk_size: int = 64,
        **llm_kwargs: Any,
    ) -> None:
        super().__init__(model_path, enable_thinking=enable_thinking)
        try:
            import vllm
        except ImportError as exc:
            raise BackendError(
                "the vllm runtime needs vLLM (`pip install vllm`, Linux + CUDA GPU); on this machine use "
                "--runtime llama.cpp (GGUF) or --runtime transformers"
            ) from exc
        import torch

        if not torch.cuda.is_available():
            raise BackendError("the vllm runtime needs a CUDA GPU and none is visible; use --runtime llama.cpp or transformers")
        self._vllm = vllm
        self.chunk_size = chunk_size
        kwargs: dict[str, Any] = {"model": str(model_path), "gpu_memory_utilization": gpu_memory_utilization}
        if tokenizer:
            kwargs["tokenizer"] = tokenizer
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(llm_kwargs)
        try:
            self._llm = vllm.LLM(**kwargs)
        except Exception as exc:
            raise ModelLoadError(f"vLLM cannot load {model_path!r}: {type(exc).__name__}: {exc}") from exc
        self.tokenizer = self._llm.get_tokenizer()
        self.chat_template = getattr(self.tokenizer, "chat_template", None)
        self.special_tokens = {k: getattr(self.tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.think_ids = self._find_think_ids()

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _params(self, sampling: SamplingParams, seed: int, ignore_eos: bool) -> Any:
        sp = self._vllm.SamplingParams
        if sampling.greedy:
            return sp(temperature=0.0, max_tokens=sampling.max_tokens, seed=seed, ignore_eos=ignore_eos)
        return sp(
            temperature=sampling.temperature, top_k=sampling.top_k if sampling.top_k > 0 else -1, top_p=sampling.top_p,
            min_p=0.0, repetition_penalty=1.0, max_tokens=sampling.max_tokens, seed=seed, ignore_eos=ignore_eos,
        )

    def _to_generation(self, out: Any, n_prompt: int, wall: float) -> Generation:
        comp = out.outputs[0]
        ids = [int(t) for t in comp.token_ids]
        finish = "length" if comp.finish_reason == "length" else "stop"
        # vLLM keeps the stop token in token_ids: the eos (stop_reason None) or a stop id (an int).
        stop_ids = {getattr(self.tokenizer, "eos_token_id", None), getattr(comp, "stop_reason", None)}
        if finish == "stop" and ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        ttft = None
        metrics = getattr(out, "metrics", None)
        first, arrival = getattr(metrics, "first_token_time", None), getattr(metrics, "arrival_time", None)
        if first is not None and arrival is not None:
            ttft = first - arrival
        decode = (wall - ttft) if ttft is not None else None
        return Generation(
            text=self.tokenizer.decode(ids, skip_special_tokens=False),
            token_ids=ids,
            n_prompt_tokens=n_prompt,
            n_completion_tokens=len(ids),
            finish_reason=finish,
            ttft_s=ttft,
            total_s=wall,
            prefill_tokens_per_s=_rate(n_prompt, ttft),
            decode_tokens_per_s=_rate(len(ids) - 1, decode),
        )

    def _run(self, prompt_ids: list[list[int]], params: list[Any]) -> tuple[list[Any], float]:
        t0 = time.perf_counter()
        outs = self._llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        return outs, time.perf_counter() - t0

    def _generate_one(
        self, prompt_ids: list[int], sampling: SamplingParams, seed: int, *, ignore_eos: bool = False
    ) -> Generation:
        outs, wall = self._run([prompt_ids], [self._params(sampling, seed, ignore_eos)])
        return self._to_generation(outs[0], len(prompt_ids), wall)

    def generate(
        self,
        prompts: Sequence[str],
        sampling: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
        on_result: Callable[[int, Generation], None] | None = None,
    ) -> list[Generation]:
        results: list[Generation] = []
        try:
            for start in range(0, len(prompts), self.chunk_size):
                chunk = list(range(start, min(len(prompts), start + self.chunk_size)))
                ids = [self.tokenize(prompts[i]) for i in chunk]
                chunk_seeds = [sampling.seed_for(i) if seeds is None else int(seeds[i]) for i in chunk]
                outs, wall = self._run(ids, [self._params(sampling, s, False) for s in chunk_seeds])
                for i, out, p, s in zip(chunk, outs, ids, chunk_seeds):
                    gen = self._to_generation(out, len(p), wall)
                    gen.starts_in_thinking = ends_in_thinking(prompts[i])
                    gen.think_ids, gen.seed = self.think_ids, s
                    results.append(gen)
                    if on_result is not None:
                        on_result(i, gen)
        except KeyboardInterrupt as exc:
            raise GenerationInterrupted(results) from exc
        return results

    def _throughput(self, prompt_ids: list[int], n_tokens: int, concurrency: int) -> dict[str, Any] | None:
        params = [self._params(SamplingParams(greedy=True, max_tokens=n_tokens), 0, True)] * concurrency
        outs, wall = self._run([prompt_ids] * concurrency, params)
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"concurrency": concurrency, "seconds": wall, "generated_tokens": generated, "tokens_per_s": generated / wall}

    def describe(self) -> dict[str, Any]:
        import torch

        return {
            "runtime": self.name,
            "device": torch.cuda.get_device_name(0),
            "chat_template": bool(self.chat_template),
            "enable_thinking": self.enable_thinking,
            "think_ids": list(self.think_ids) if self.think_ids else None,
        }


# ==================================================================================================
# ONNX Runtime
# ==================================================================================================


def _is_onnx_export(path: Path) -> bool:
    """A directory written by ``rqat-deploy export --format onnx`` (``model.onnx`` + ``genai_config.json``)."""
    return path.is_dir() and (path / "model.onnx").is_file() and (path / "genai_config.json").is_file()


class OnnxRuntime(Runtime):
    """An ONNX export directory (``model.onnx`` + ``genai_config.json`` + tokenizer files) run on the
    CPU by :class:`rqat_deploy.exporters.onnx.OnnxCausalLM`, with the KV cache, batch 1.

    The prompt is rendered and tokenized with the export's own tokenizer files, as the transformers
    runtime does with a model directory. The default engine is ``"onnxruntime"`` (a plain
    ``InferenceSession`` loop whose sampler applies temperature, then top-k, then top-p, as
    transformers does); ``"genai"`` runs ``onnxruntime_genai.Generator``, whose ``OnnxCausalLM``
    loop asks for ``min_length = max_length`` and so never stops at an end-of-generation token
    (fine for the speed run; answering questions with it raises :class:`ConfigError`).

    Args:
        model_path: the export directory.
        enable_thinking: thinking mode in the chat template.
        n_threads: ORT intra-op threads (None: ORT's default, all cores).
        device: ``cpu`` or None (the export runs on ORT's CPU execution provider only).
        engine: ``"onnxruntime"``, ``"genai"`` or ``"auto"`` (see :class:`OnnxCausalLM`).
        accuracy_level: run every ``MatMulNBits`` at this level instead of the written one
            (``onnxruntime`` engine; 0 = fp32 activations, 4 = int8).

    Raises:
        BackendError: onnxruntime (or onnxruntime-genai for ``engine="genai"``) is not installed.
        ConfigError: a CUDA device, or ``accuracy_level`` with the genai engine.
        ModelLoadError: the directory is not an ONNX export or has no tokenizer.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model_path: str,
        *,
        enable_thinking: bool = True,
        n_threads: int | None = None,
        device: str | None = None,
        engine: str = "onnxruntime",
        accuracy_level: int | None = None,
    ) -> None:
        super().__init__(model_path, enable_thinking=enable_thinking)
        try:
            import onnxruntime
        except ImportError as exc:
            raise BackendError(
                "the onnxruntime runtime needs ONNX Runtime: `pip install onnxruntime onnxruntime-genai` "
                "(or the `onnx` extra), or bench the checkpoint with --runtime transformers"
            ) from exc
        if device and not device.startswith("cpu"):
            raise ConfigError(f"the onnxruntime runtime runs ONNX exports on the CPU only; got device {device!r} (drop --device)")
        path = Path(model_path)
        if not _is_onnx_export(path):
            raise ModelLoadError(
                f"{model_path!r} is not an ONNX export (a directory with model.onnx and genai_config.json); "
                "write one with `rqat-deploy export --format onnx`"
            )
        from transformers import AutoTokenizer

        from rqat_deploy.exporters.onnx import OnnxCausalLM

        self._ort_version = onnxruntime.__version__
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path} has no usable tokenizer files ({exc}): re-export it") from exc
        self.model = OnnxCausalLM(path, engine=engine, threads=n_threads, accuracy_level=accuracy_level)
        self.n_threads, self.accuracy_level = n_threads, accuracy_level
        self.chat_template = getattr(self.tokenizer, "chat_template", None)
        self.special_tokens = {
            k: getattr(self.tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        self.eos_ids = self._eos_ids(path)
        self.think_ids = self._find_think_ids()
        report = path / "rqat_export.json"
        self.export_report: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {}

    def _eos_ids(self, path: Path) -> list[int]:
        """End-of-generation ids: ``generation_config.json``, then the tokenizer, then ``genai_config.json``."""
        values: list[Any] = []
        gen_cfg = path / "generation_config.json"
        if gen_cfg.exists():
            values.append(json.loads(gen_cfg.read_text()).get("eos_token_id"))
        values.append(self.tokenizer.eos_token_id)
        values.append(json.loads((path / "genai_config.json").read_text()).get("model", {}).get("eos_token_id"))
        ids: list[int] = []
        for value in values:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None and int(v) not in ids:
                    ids.append(int(v))
        if not ids:
            raise ModelLoadError(f"{self.model_path}: no eos token in generation_config.json, the tokenizer or genai_config.json")
        return ids

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _generate_one(
        self, prompt_ids: list[int], sampling: SamplingParams, seed: int, *, ignore_eos: bool = False
    ) -> Generation:
        if self.model.engine == "genai" and not ignore_eos:
            raise ConfigError(
                "the genai engine of OnnxCausalLM never stops at an end-of-generation token (it sets min_length); "
                "answer questions with engine='onnxruntime' (the default) and use genai for speed-only runs"
            )
        if sampling.greedy:
            temperature, top_k, top_p = 0.0, 0, 1.0
        else:
            temperature, top_k, top_p = sampling.temperature, sampling.top_k, sampling.top_p
        out = self.model.generate(
            prompt_ids, sampling.max_tokens, stop_ids=() if ignore_eos else self.eos_ids,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        )
        ids = list(out.token_ids)
        # Count as transformers does: every token computed after the first, a stop token included.
        n_gen = len(ids) + (1 if out.finish_reason == "stop" else 0)
        return Generation(
            text=self.tokenizer.decode(ids, skip_special_tokens=False),
            token_ids=ids,
            n_prompt_tokens=len(prompt_ids),
            n_completion_tokens=len(ids),
            finish_reason=out.finish_reason,
            ttft_s=out.ttft_s,
            total_s=out.total_s,
            prefill_tokens_per_s=_rate(len(prompt_ids), out.ttft_s),
            decode_tokens_per_s=_rate(n_gen - 1, out.total_s - out.ttft_s),
        )

    def logits(self, prompt_ids: Sequence[int]) -> Any:
        """Per-position logits ``[len(prompt_ids), vocab]`` (float32 numpy), for agreement tests."""
        return self.model.logits(list(prompt_ids))

    def describe(self) -> dict[str, Any]:
        rep = self.export_report
        written = rep.get("accuracy_level")
        info: dict[str, Any] = {
            "runtime": self.name,
            "kind": "onnx",
            "device": "cpu",
            "engine": self.model.engine if self.model is not None else None,
            "n_threads": self.n_threads,
            "accuracy_level": self.accuracy_level if self.accuracy_level is not None else written,
            "onnxruntime_version": self._ort_version,
            "context_length": self.model.context_length if self.model is not None else None,
            "chat_template": bool(self.chat_template),
            "enable_thinking": self.enable_thinking,
            "think_ids": list(self.think_ids) if self.think_ids else None,
            "eos_ids": self.eos_ids,
        }
        if rep.get("bits"):  # the export's config.json reads as a float model; its report knows better
            info.update(bits=int(rep["bits"]), container_bits=rep.get("container_bits"),
                        group_size=rep.get("group_size"), bits_per_weight=None)
        return info

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None


# ==================================================================================================
# Choosing a runtime
# ==================================================================================================


def detect_runtime(model: str) -> str:
    """The default runtime of a model: ``llama.cpp`` for ``.gguf`` files, ``onnxruntime`` for ONNX
    export directories (``model.onnx`` + ``genai_config.json``), ``transformers`` otherwise."""
    if str(model).lower().endswith(".gguf"):
        return "llama.cpp"
    return "onnxruntime" if _is_onnx_export(Path(model)) else "transformers"


def load_runtime(
    model: str,
    runtime: str | None = None,
    *,
    enable_thinking: bool = True,
    n_threads: int | None = None,
    device: str | None = None,
    **kwargs: Any,
) -> Runtime:
    """Load a model in a runtime.

    Args:
        model: a GGUF file, a model / checkpoint / export directory, or a Hub id.
        runtime: ``llama.cpp``, ``transformers``, ``vllm`` or ``onnxruntime``; None picks by
            :func:`detect_runtime`.
        enable_thinking: thinking mode in the chat template.
        n_threads: CPU threads (llama.cpp, transformers, onnxruntime).
        device: ``cpu`` / ``cuda`` (transformers); ``cuda`` offloads all llama.cpp layers.
        **kwargs: runtime-specific options (see each class).

    Returns:
        The loaded :class:`Runtime`.

    Raises:
        ConfigError: an unknown runtime, a GGUF file given to transformers, or a non-ONNX model given
            to onnxruntime.
        BackendError: the runtime is not installed or has no device.
        ModelLoadError: the model cannot be loaded.
    """
    name = runtime or detect_runtime(model)
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime {name!r}; choose one of {list(RUNTIMES)}")
    if name == "llama.cpp":
        if not str(model).lower().endswith(".gguf"):
            raise ConfigError(f"the llama.cpp runtime reads GGUF files; {model!r} is not one (export it with `rqat-deploy export --format gguf`)")
        if device and device.startswith("cuda"):
            kwargs.setdefault("n_gpu_layers", -1)
        return LlamaCppRuntime(model, enable_thinking=enable_thinking, n_threads=n_threads, **kwargs)
    if name in ("transformers", "vllm") and _is_onnx_export(Path(model)):
        raise ConfigError(f"{model!r} is an ONNX export: run it with --runtime onnxruntime")
    if name == "transformers":
        if str(model).lower().endswith(".gguf"):
            raise ConfigError("give the transformers runtime a model directory, not a GGUF file (use --runtime llama.cpp)")
        return TransformersRuntime(model, enable_thinking=enable_thinking, device=device, n_threads=n_threads, **kwargs)
    if name == "onnxruntime":
        if not _is_onnx_export(Path(model)):
            raise ConfigError(
                f"the onnxruntime runtime reads ONNX export directories (model.onnx + genai_config.json); {model!r} "
                "is not one (export it with `rqat-deploy export --format onnx`)"
            )
        return OnnxRuntime(model, enable_thinking=enable_thinking, n_threads=n_threads, device=device, **kwargs)
    return VLLMRuntime(model, enable_thinking=enable_thinking, **kwargs)


def generation_record(gen: Generation) -> dict[str, Any]:
    """A JSON-serializable dict of a :class:`Generation` (for responses files)."""
    d = asdict(gen)
    d["think_ids"] = list(gen.think_ids) if gen.think_ids else None
    return d
