"""The transformers runtime: Hugging Face model directories / Hub ids, quantized checkpoints
(``rqat_quant.json``, loaded dequantized) and compressed-tensors exports, generated with
``model.generate`` under the rules of :mod:`rqat_deploy.serve.runtimes`; thinking guards run as a
``LogitsProcessor`` (transformers applies custom processors before its temperature / top-k / top-p).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from rqat_deploy.errors import BackendError, ConfigError, ModelLoadError
from rqat_deploy.serve.guards import transformers_logits_processor
from rqat_deploy.serve.runtimes import Generation, Runtime, SamplingParams, token_ids

__all__ = ["TransformersRuntime"]


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
        self._use_hf_tokenizer(self.tokenizer)
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
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
        gc_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids = token_ids([gc_eos, self.tokenizer.eos_token_id])
        if not ids:
            raise ModelLoadError(f"{self.model_path}: neither the tokenizer nor generation_config names an eos token")
        return ids

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
        guard = self.request_guard(sampling, prompt_ids)
        processors = [transformers_logits_processor([guard], len(prompt_ids))] if guard else None
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
                logits_processor=processors,
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
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        gen = Generation.timed_from_first_token(text, ids, len(prompt_ids), finish, ttft, total, n_gen - 1)
        gen.guards = guard.report(ids) if guard else None
        return gen

    def logits(self, prompt_ids: Sequence[int]) -> Any:
        """Per-position logits ``[len(prompt_ids), vocab]`` (float32 numpy); see :meth:`Runtime.logits`."""
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
            **self._prompt_info(),
            "eos_ids": self.eos_ids,
        }

    def close(self) -> None:
        self.model = None
        self._torch.set_num_threads(self._threads_before)
