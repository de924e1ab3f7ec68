"""The vLLM runtime: vLLM's offline ``LLM`` API on a CUDA GPU (HF directories, compressed-tensors
exports, GGUF), under the rules of :mod:`rqat_deploy.serve.runtimes`. Thinking guards run as vLLM
logits processors (:mod:`rqat_deploy.serve.guards_vllm`), registered when the model is loaded with
``enable_guards=True`` (the bench does so when guards are asked for); what they did is replayed
from the generated ids (the hesitation counts, which need logits, are None).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from rqat_deploy.data.chat import ends_in_thinking
from rqat_deploy.errors import BackendError, ConfigError, ModelLoadError
from rqat_deploy.serve.guards import vllm_extra_args
from rqat_deploy.serve.runtimes import Generation, GenerationInterrupted, Runtime, SamplingParams, import_backend

__all__ = ["VLLMRuntime"]


class VLLMRuntime(Runtime):
    """vLLM's offline ``LLM`` API (CUDA only): HF directories, compressed-tensors exports, GGUF.

    Prompts are generated in chunks (``chunk_size``) so Ctrl-C keeps the finished chunks.
    ``enable_guards`` registers the thinking-guard logits processor with the engine (needed for
    ``SamplingParams.guards``; vLLM refuses custom logits processors with speculative decoding).
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
        enable_guards: bool = False,
        **llm_kwargs: Any,
    ) -> None:
        super().__init__(model_path, enable_thinking=enable_thinking)
        vllm = import_backend(
            "vllm", "the vllm runtime needs vLLM (`pip install vllm`, Linux + CUDA GPU); on this machine use "
            "--runtime llama.cpp (GGUF) or --runtime transformers",
        )
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
        self.enable_guards = enable_guards
        if enable_guards:
            from rqat_deploy.serve.guards_vllm import processor_class

            kwargs["logits_processors"] = [*kwargs.get("logits_processors", []), processor_class()]
        kwargs.update(llm_kwargs)
        try:
            self._llm = vllm.LLM(**kwargs)
        except Exception as exc:
            raise ModelLoadError(f"vLLM cannot load {model_path!r}: {type(exc).__name__}: {exc}") from exc
        self._use_hf_tokenizer(self._llm.get_tokenizer())

    def _params(self, sampling: SamplingParams, seed: int, ignore_eos: bool, prompt_ids: list[int]) -> Any:
        sp = self._vllm.SamplingParams
        common: dict[str, Any] = {"max_tokens": sampling.max_tokens, "seed": seed, "ignore_eos": ignore_eos}
        if sampling.guards is not None and sampling.guards.active:
            if not self.enable_guards:
                raise ConfigError("thinking guards in vLLM need the model loaded with enable_guards=True (the bench does it)")
            common["extra_args"] = vllm_extra_args(self.guard_plan(sampling.guards), prompt_ids)
        if sampling.greedy:
            return sp(temperature=0.0, **common)
        return sp(
            temperature=sampling.temperature, top_k=sampling.top_k if sampling.top_k > 0 else -1, top_p=sampling.top_p,
            min_p=0.0, repetition_penalty=1.0, **common,
        )

    def _to_generation(self, out: Any, prompt_ids: list[int], wall: float, sampling: SamplingParams) -> Generation:
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
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        gen = Generation.timed_from_first_token(text, ids, len(prompt_ids), finish, ttft, wall, len(ids) - 1)
        guard = self.request_guard(sampling, prompt_ids)
        gen.guards = guard.replay(ids).report() if guard else None
        return gen

    def _run(self, prompt_ids: list[list[int]], params: list[Any]) -> tuple[list[Any], float]:
        t0 = time.perf_counter()
        outs = self._llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        return outs, time.perf_counter() - t0

    def _generate_one(
        self, prompt_ids: list[int], sampling: SamplingParams, seed: int, *, ignore_eos: bool = False
    ) -> Generation:
        outs, wall = self._run([prompt_ids], [self._params(sampling, seed, ignore_eos, prompt_ids)])
        return self._to_generation(outs[0], prompt_ids, wall, sampling)

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
                outs, wall = self._run(ids, [self._params(sampling, s, False, p) for s, p in zip(chunk_seeds, ids)])
                for i, out, p, s in zip(chunk, outs, ids, chunk_seeds):
                    gen = self._to_generation(out, p, wall, sampling)
                    gen.starts_in_thinking = ends_in_thinking(prompts[i])
                    gen.think_ids, gen.seed = self.think_ids, s
                    results.append(gen)
                    if on_result is not None:
                        on_result(i, gen)
        except KeyboardInterrupt as exc:
            raise GenerationInterrupted(results) from exc
        return results

    def _throughput(self, prompt_ids: list[int], n_tokens: int, concurrency: int) -> dict[str, Any] | None:
        params = [self._params(SamplingParams(greedy=True, max_tokens=n_tokens), 0, True, prompt_ids)] * concurrency
        outs, wall = self._run([prompt_ids] * concurrency, params)
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"concurrency": concurrency, "seconds": wall, "generated_tokens": generated, "tokens_per_s": generated / wall}

    def logits(self, prompt_ids: Sequence[int]) -> Any:
        """Not available: vLLM returns prompt log-probabilities only for the top-k tokens of each
        position (``SamplingParams(prompt_logprobs=k)``, k capped by ``max_logprobs``, 20 by default),
        not the full next-token distributions that ``bench --reference`` compares.

        Raises:
            ConfigError: always, naming the runtimes that can.
        """
        raise ConfigError(
            "the vllm runtime cannot give --reference full next-token distributions (vLLM returns top-k prompt "
            "log-probabilities only); bench the same model with --runtime transformers (model directory, "
            "checkpoint, compressed-tensors export) or --runtime llama.cpp (GGUF)"
        )

    def describe(self) -> dict[str, Any]:
        import torch

        return {
            "runtime": self.name,
            "device": torch.cuda.get_device_name(0),
            **self._prompt_info(),
        }
