"""Runtimes behind one small interface: llama.cpp (llama-cpp-python), transformers, vLLM, ONNX Runtime.

This module holds what they share (:class:`SamplingParams`, :class:`Generation`, the :class:`Runtime`
base) and picks one (:func:`detect_runtime`, :func:`load_runtime`); each runtime lives in its own module
(``runtime_llamacpp``, ``runtime_transformers``, ``runtime_vllm``, ``runtime_onnx``), imported only when
loaded, so llama_cpp, transformers, vllm and onnxruntime are imported only by the runtime that uses them.

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
- **Guards** (:mod:`rqat_deploy.serve.guards`, ``SamplingParams.guards``): a thinking budget, a
  loop breaker and a hesitation-token penalty, one :class:`~rqat_deploy.serve.guards.RequestGuard`
  per response plugged into the runtime's own logits-processor mechanism; what each did is
  ``Generation.guards``.
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
import importlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from rqat_deploy.data.chat import ends_in_thinking, render_prompt
from rqat_deploy.errors import BackendError, ConfigError
from rqat_deploy.serve.guards import GuardPlan, RequestGuard, ThinkingGuards

__all__ = [
    "DEFAULT_INSTRUCTION",
    "GENAI_CONFIG",
    "ONNX_FILE",
    "RUNTIMES",
    "Generation",
    "GenerationInterrupted",
    "Runtime",
    "SamplingParams",
    "detect_runtime",
    "generation_record",
    "import_backend",
    "is_onnx_export",
    "load_runtime",
    "runtime_class",
    "token_ids",
    "token_rate",
]

#: Each ``--runtime`` name -> (its module in ``rqat_deploy.serve``, its :class:`Runtime` class).
_REGISTRY: dict[str, tuple[str, str]] = {
    "llama.cpp": ("runtime_llamacpp", "LlamaCppRuntime"),
    "transformers": ("runtime_transformers", "TransformersRuntime"),
    "vllm": ("runtime_vllm", "VLLMRuntime"),
    "onnxruntime": ("runtime_onnx", "OnnxRuntime"),
}
#: The names ``--runtime`` accepts.
RUNTIMES: tuple[str, ...] = tuple(_REGISTRY)
#: The files that make a directory an ONNX export (``rqat-deploy export --format onnx``).
ONNX_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
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
        guards: decode-time thinking guards (None: none run).
    """

    temperature: float = 0.6
    top_k: int = 20
    top_p: float = 1.0
    max_tokens: int = 32768
    greedy: bool = False
    seed: int = 0
    guards: ThinkingGuards | None = None

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
        guards: what the thinking guards did (:meth:`RequestGuard.report`; None when none ran).
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
    guards: dict[str, Any] | None = None

    @classmethod
    def timed_from_first_token(
        cls, text: str, ids: list[int], n_prompt: int, finish_reason: str, ttft_s: float | None, total_s: float,
        n_after_first: int,
    ) -> "Generation":
        """A generation whose speeds come from its first-token time (transformers, vLLM, ONNX Runtime):
        prefill = prompt tokens / TTFT, decode = ``n_after_first`` tokens / the time after the first."""
        decode_s = total_s - ttft_s if ttft_s is not None else None
        return cls(
            text=text, token_ids=ids, n_prompt_tokens=n_prompt, n_completion_tokens=len(ids),
            finish_reason=finish_reason, ttft_s=ttft_s, total_s=total_s,
            prefill_tokens_per_s=token_rate(n_prompt, ttft_s), decode_tokens_per_s=token_rate(n_after_first, decode_s),
        )


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`Runtime.generate`; ``results`` holds the generations that finished."""

    def __init__(self, results: list[Generation]) -> None:
        super().__init__(f"interrupted after {len(results)} generations")
        self.results = results


def token_rate(tokens: int | None, seconds: float | None) -> float | None:
    """Tokens per second, or None when either is unknown or not positive."""
    if tokens is None or seconds is None or tokens <= 0 or seconds <= 0:
        return None
    return tokens / seconds


class Runtime(abc.ABC):
    """A loaded model that renders prompts, generates, and measures speed.

    Subclasses implement :meth:`_generate_one` and :meth:`describe`, and either give a Hugging Face
    tokenizer to :meth:`_use_hf_tokenizer` or implement :meth:`tokenize`; the rest (prompt rendering,
    seeding, Ctrl-C handling, speed repetitions) is shared.
    """

    name: str = "runtime"

    def __init__(self, model_path: str, *, enable_thinking: bool = True) -> None:
        self.model_path = str(model_path)
        self.enable_thinking = enable_thinking
        self.chat_template: str | None = None
        self.special_tokens: dict[str, str | None] = {}
        self.think_ids: tuple[int, int] | None = None
        self.tokenizer: Any = None
        self._guard_plans: dict[ThinkingGuards, GuardPlan] = {}

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

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (no special tokens added; the template wrote them).

        This default uses the Hugging Face tokenizer given to :meth:`_use_hf_tokenizer`.
        """
        if self.tokenizer is None:
            raise NotImplementedError(f"{type(self).__name__} has no tokenizer: override tokenize()")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _use_hf_tokenizer(self, tokenizer: Any) -> None:
        """Render and tokenize with a Hugging Face tokenizer: its chat template, special tokens, think ids."""
        self.tokenizer = tokenizer
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self.special_tokens = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.think_ids = self._find_think_ids()

    def _find_think_ids(self) -> tuple[int, int] | None:
        try:
            o, c = self.tokenize("<think>"), self.tokenize("</think>")
        except Exception:
            return None
        return (o[0], c[0]) if len(o) == 1 and len(c) == 1 else None

    # -- guards ------------------------------------------------------------------------------------

    def guard_plan(self, guards: ThinkingGuards) -> GuardPlan:
        """The guards resolved for this runtime's tokenizer (cached).

        Raises:
            ConfigError: ``<think>`` / ``</think>`` are not single tokens of the vocabulary.
        """
        if guards not in self._guard_plans:
            self._guard_plans[guards] = guards.bind(self.tokenize, self.think_ids)
        return self._guard_plans[guards]

    def request_guard(self, sampling: SamplingParams, prompt_ids: Sequence[int]) -> RequestGuard | None:
        """A fresh guard for one response to ``prompt_ids`` (None when ``sampling`` runs none)."""
        if sampling.guards is None or not sampling.guards.active:
            return None
        return self.guard_plan(sampling.guards).new_request(prompt_ids)

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

    # -- logits ------------------------------------------------------------------------------------

    def logits(self, prompt_ids: Sequence[int]) -> Any:
        """Per-position logits ``[len(prompt_ids), vocab]`` (float32 numpy) of one teacher-forced pass:
        row ``i`` is the next-token distribution after ``prompt_ids[: i + 1]`` (``bench --reference``).

        Raises:
            ConfigError: this runtime does not expose logits.
        """
        raise ConfigError(
            f"the {self.name} runtime does not expose per-token logits, which --reference needs; bench the model "
            "with --runtime llama.cpp (GGUF), transformers or onnxruntime"
        )

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

    def _prompt_info(self) -> dict[str, Any]:
        """How prompts are rendered and thinking is counted, for :meth:`describe`."""
        return {
            "chat_template": bool(self.chat_template),
            "enable_thinking": self.enable_thinking,
            "think_ids": list(self.think_ids) if self.think_ids else None,
        }

    def close(self) -> None:
        """Free the model (optional)."""


def import_backend(module: str, missing: str) -> Any:
    """Import a runtime's package when a model is loaded.

    Args:
        module: the module to import (``llama_cpp``, ``vllm``, ``onnxruntime``...).
        missing: the error message when it is not installed (say how to install it).

    Raises:
        BackendError: ``module`` cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendError(f"{missing} ({exc})") from exc


def token_ids(values: Iterable[Any]) -> list[int]:
    """Distinct token ids, in order, from values that are each an id, a list of ids or None.

    (End-of-generation ids are spread over ``generation_config.json``, the tokenizer and other
    configs, each holding one id, a list, or nothing.)
    """
    ids: list[int] = []
    for value in values:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


# ==================================================================================================
# Choosing a runtime
# ==================================================================================================


def is_onnx_export(path: str | Path) -> bool:
    """A directory written by ``rqat-deploy export --format onnx`` (``model.onnx`` + ``genai_config.json``)."""
    p = Path(path)
    return p.is_dir() and (p / ONNX_FILE).is_file() and (p / GENAI_CONFIG).is_file()


def runtime_class(name: str) -> type[Runtime]:
    """The :class:`Runtime` subclass of a ``--runtime`` name, its module imported on first use.

    Raises:
        ConfigError: an unknown name.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown runtime {name!r}; choose one of {list(RUNTIMES)}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(f"rqat_deploy.serve.{module}"), cls)


def detect_runtime(model: str) -> str:
    """The default runtime of a model: ``llama.cpp`` for ``.gguf`` files, ``onnxruntime`` for ONNX
    export directories (``model.onnx`` + ``genai_config.json``), ``transformers`` otherwise."""
    if str(model).lower().endswith(".gguf"):
        return "llama.cpp"
    return "onnxruntime" if is_onnx_export(model) else "transformers"


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
    cls: Callable[..., Runtime] = runtime_class(name)  # each class takes its own options
    if name == "llama.cpp":
        if not str(model).lower().endswith(".gguf"):
            raise ConfigError(f"the llama.cpp runtime reads GGUF files; {model!r} is not one (export it with `rqat-deploy export --format gguf`)")
        if device and device.startswith("cuda"):
            kwargs.setdefault("n_gpu_layers", -1)
        return cls(model, enable_thinking=enable_thinking, n_threads=n_threads, **kwargs)
    if name in ("transformers", "vllm") and is_onnx_export(model):
        raise ConfigError(f"{model!r} is an ONNX export: run it with --runtime onnxruntime")
    if name == "transformers":
        if str(model).lower().endswith(".gguf"):
            raise ConfigError("give the transformers runtime a model directory, not a GGUF file (use --runtime llama.cpp)")
        return cls(model, enable_thinking=enable_thinking, device=device, n_threads=n_threads, **kwargs)
    if name == "onnxruntime":
        if not is_onnx_export(model):
            raise ConfigError(
                f"the onnxruntime runtime reads ONNX export directories (model.onnx + genai_config.json); {model!r} "
                "is not one (export it with `rqat-deploy export --format onnx`)"
            )
        return cls(model, enable_thinking=enable_thinking, n_threads=n_threads, device=device, **kwargs)
    return cls(model, enable_thinking=enable_thinking, **kwargs)


def generation_record(gen: Generation) -> dict[str, Any]:
    """A JSON-serializable dict of a :class:`Generation` (for responses files)."""
    d = asdict(gen)
    d["think_ids"] = list(gen.think_ids) if gen.think_ids else None
    return d
