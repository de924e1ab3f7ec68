"""The ONNX Runtime runtime: ONNX exports (``rqat-deploy export --format onnx``) on the CPU.

:class:`OnnxCausalLM` runs an export with the KV cache, batch 1: a plain ``onnxruntime``
``InferenceSession`` loop (logits, greedy / sampled generation with timings, decode speed), or
``onnxruntime-genai``'s ``Generator``. :class:`OnnxRuntime` puts it behind the bench's
:class:`~rqat_deploy.serve.runtimes.Runtime` interface, with the export's own tokenizer files.
onnxruntime and onnxruntime-genai are imported when a model is loaded, not with this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from rqat_deploy.errors import BackendError, ConfigError, ModelLoadError
from rqat_deploy.serve.guards import RequestGuard
from rqat_deploy.serve.runtimes import (
    GENAI_CONFIG,
    ONNX_FILE,
    Generation,
    Runtime,
    SamplingParams,
    import_backend,
    is_onnx_export,
    token_ids,
    token_rate,
)

__all__ = ["OnnxCausalLM", "OnnxGeneration", "OnnxRuntime"]


def _require(module: str) -> Any:
    """Import an ONNX Runtime package, or say how to install it."""
    return import_backend(module, f"running an ONNX export needs the Python package {module!r}: pip install 'rqat-deploy[onnx]'")


def _genai_importable() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means unavailable
        return False
    return True


@contextlib.contextmanager
def _with_accuracy_level(model_dir: Path, level: int | None) -> Iterator[Path]:
    """``model_dir/model.onnx``, or a temporary copy of its graph with every MatMulNBits at ``level``.

    The copy is written beside the original (ORT refuses external data outside the model's
    directory, symlinks resolved) and removed on exit; where ``model_dir`` is read-only, into a
    temporary directory with the data hard-linked (or copied).
    """
    if level is None:
        yield model_dir / ONNX_FILE
        return
    import onnx

    model = onnx.load(str(model_dir / ONNX_FILE), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(attrs + [onnx.helper.make_attribute("accuracy_level", level)])
    fd, name = tempfile.mkstemp(prefix=f".acc{level}-", suffix=".onnx", dir=model_dir) if os.access(model_dir, os.W_OK) else (None, "")
    if fd is not None:
        os.close(fd)
        try:
            onnx.save(model, name)
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix=".acc-") as d:
        for f in model_dir.iterdir():
            if f.name.endswith(".data"):
                try:
                    os.link(f, Path(d) / f.name)
                except OSError:
                    shutil.copy2(f, Path(d) / f.name)
        onnx.save(model, str(Path(d) / ONNX_FILE))
        yield Path(d) / ONNX_FILE


def _take_until_stop(tokens: Iterator[int], stops: set[int], max_new: int, t0: float) -> tuple[list[int], str, float]:
    """Generated tokens up to a stop id (left out) or ``max_new`` of them.

    Returns:
        ``(tokens, finish_reason, seconds from t0 to the first token)``.
    """
    out: list[int] = []
    ttft = 0.0
    for tok in tokens:
        if ttft == 0.0:
            ttft = time.perf_counter() - t0
        if tok in stops:
            return out, "stop", ttft
        out.append(tok)
        if len(out) >= max_new:
            break
    return out, "length", ttft


@dataclass
class OnnxGeneration:
    """One generation of :class:`OnnxCausalLM` (fields as :class:`rqat_deploy.serve.runtimes.Generation`).

    Attributes:
        token_ids: generated ids (a stop token left out).
        n_prompt_tokens: prompt length.
        finish_reason: ``"stop"`` or ``"length"``.
        ttft_s: seconds from the call to the first generated token (prefill included).
        total_s: seconds for the whole generation.
        prefill_tokens_per_s: prompt tokens / ttft.
        decode_tokens_per_s: tokens after the first / time after the first.
    """

    token_ids: list[int]
    n_prompt_tokens: int
    finish_reason: str
    ttft_s: float
    total_s: float
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None


def _sample(logits: np.ndarray, rng: np.random.Generator | None, temperature: float, top_k: int, top_p: float) -> int:
    """Greedy (``rng`` None) or temperature / top-k / top-p sampling from one logits row."""
    if rng is None:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(x[order] - x[order[0]])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


class OnnxCausalLM:
    """An ONNX export loaded in ONNX Runtime (batch 1), with the KV cache.

    Args:
        model_dir: a directory written by ``rqat-deploy export --format onnx`` (or
            :func:`rqat_deploy.exporters.onnx.export_onnx_dense`; any onnxruntime-genai style decoder: ``input_ids``, ``attention_mask``,
            ``past_key_values.N.key/value`` -> ``logits``, ``present.N.key/value``).
        engine: ``"onnxruntime"`` (a plain ``InferenceSession`` loop, this module's own code),
            ``"genai"`` (``onnxruntime_genai.Generator``, shared KV buffers), or ``"auto"``
            (genai when installed).
        threads: intra-op threads (None: ORT's default, all cores).
        accuracy_level: run every MatMulNBits at this level instead of the written one
            (``onnxruntime`` engine only).

    Raises:
        BackendError: the runtime package is not installed, or the directory is not an ONNX export.
        ConfigError: an unknown engine, or ``accuracy_level`` with the genai engine.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        engine: str = "auto",
        threads: int | None = None,
        accuracy_level: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        if not (self.model_dir / ONNX_FILE).exists():
            raise BackendError(f"{self.model_dir} has no {ONNX_FILE}: export it with `rqat-deploy export --format onnx`")
        if engine == "auto":
            engine = "genai" if accuracy_level is None and _genai_importable() else "onnxruntime"
        if engine not in ("onnxruntime", "genai"):
            raise ConfigError(f"engine must be 'onnxruntime', 'genai' or 'auto', got {engine!r}")
        if engine == "genai" and accuracy_level is not None:
            raise ConfigError("accuracy_level overrides need engine='onnxruntime'")
        self.engine, self.threads, self.accuracy_level = engine, threads, accuracy_level
        genai_cfg = self.model_dir / GENAI_CONFIG
        if not genai_cfg.exists():
            raise BackendError(f"{self.model_dir} has no {GENAI_CONFIG}: export it with `rqat-deploy export --format onnx`")
        model_cfg = json.loads(genai_cfg.read_text())["model"]
        #: positions the model's rotary cache covers (prompt + generated tokens)
        self.context_length = int(model_cfg["context_length"])
        self._session: Any = None
        self._model: Any = None
        if engine == "genai":
            self._load_genai()
        else:
            self._load_session(int(model_cfg["decoder"]["head_size"]))

    def _load_genai(self) -> None:
        og = _require("onnxruntime_genai")

        cfg = og.Config(str(self.model_dir))
        if self.threads:
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads}}}}))
        self._og, self._model = og, og.Model(cfg)

    def _load_session(self, head_size: int) -> None:
        ort = _require("onnxruntime")

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
        with _with_accuracy_level(self.model_dir, self.accuracy_level) as path:
            self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self._inputs = {i.name: i for i in self._session.get_inputs()}
        self._past = sorted(n for n in self._inputs if n.startswith("past_key_values."))
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._head_size = head_size
        self._kv_dtype = np.float16 if "float16" in self._inputs[self._past[0]].type else np.float32

    # -- plain onnxruntime loop --------------------------------------------------------------------

    def _empty_past(self) -> dict[str, np.ndarray]:
        feeds = {}
        for name in self._past:
            kvh = self._inputs[name].shape[1]
            feeds[name] = np.zeros((1, int(kvh), 0, self._head_size), dtype=self._kv_dtype)
        return feeds

    def _step(self, ids: Sequence[int], past: dict[str, np.ndarray], total: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run ``ids`` after ``total - len(ids)`` cached tokens; return (logits [len, V], new past)."""
        feeds: dict[str, np.ndarray] = {"input_ids": np.asarray([ids], dtype=np.int64), **past}
        if "attention_mask" in self._inputs:
            feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in self._inputs:
            feeds["position_ids"] = np.arange(total - len(ids), total, dtype=np.int64)[None]
        outs = dict(zip(self._outputs, self._session.run(self._outputs, feeds)))
        new_past = {n: outs[n.replace("past_key_values.", "present.")] for n in self._past}
        return outs["logits"][0], new_past

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Per-position logits ``[len(ids), vocab]`` (float32) of one forward pass (no cache)."""
        if self.engine != "onnxruntime":
            raise ConfigError("logits() needs engine='onnxruntime'")
        out, _ = self._step(list(ids), self._empty_past(), len(ids))
        return out.astype(np.float32)

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        stop_ids: Sequence[int] = (),
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        guard: RequestGuard | None = None,
    ) -> OnnxGeneration:
        """Generate with the KV cache: greedy when ``temperature`` is 0, else sampled.

        Args:
            prompt_ids: the prompt tokens.
            max_new_tokens: generated-token limit (cut to the context length).
            stop_ids: end-of-generation ids (left out of the result); empty = never stop early.
            temperature, top_k, top_p: sampling settings (top_k 0 / top_p 1 disable them).
            seed: sampling seed.
            guard: thinking guards (:mod:`rqat_deploy.serve.guards`) applied to each step's logits
                before sampling.

        Returns:
            The :class:`OnnxGeneration`.
        """
        if max_new_tokens < 1 or not prompt_ids:
            raise ConfigError("generate needs a non-empty prompt and max_new_tokens >= 1")
        if len(prompt_ids) >= self.context_length:
            raise ConfigError(f"the prompt ({len(prompt_ids)} tokens) fills the model's context ({self.context_length}); shorten it")
        max_new_tokens = min(max_new_tokens, self.context_length - len(prompt_ids))
        if self.engine == "genai":
            return self._generate_genai(list(prompt_ids), max_new_tokens, set(stop_ids), temperature, top_k, top_p, seed, guard)
        rng = np.random.default_rng(seed) if temperature > 0 else None
        t0 = time.perf_counter()
        tokens = self._session_tokens(list(prompt_ids), rng, temperature, top_k, top_p, guard)
        out, finish, ttft = _take_until_stop(tokens, {int(s) for s in stop_ids}, max_new_tokens, t0)
        return self._result(out, len(prompt_ids), finish, ttft, time.perf_counter() - t0)

    def _session_tokens(
        self, prompt: list[int], rng: np.random.Generator | None, temperature: float, top_k: int, top_p: float,
        guard: RequestGuard | None = None,
    ) -> Iterator[int]:
        """Generated tokens of the plain ``InferenceSession`` loop: the prompt in one pass, then one
        token per pass through the KV cache (a pass runs only when the next token is asked for)."""
        logits, past = self._step(prompt, self._empty_past(), len(prompt))
        total = len(prompt)
        generated: list[int] = []
        while True:
            row = logits[-1] if guard is None else guard(generated, logits[-1].astype(np.float32, copy=True))
            tok = _sample(row, rng, temperature, top_k, top_p)
            generated.append(tok)
            yield tok
            total += 1
            logits, past = self._step([tok], past, total)

    def _generate_genai(
        self, prompt: list[int], max_new: int, stops: set[int], temperature: float, top_k: int, top_p: float, seed: int,
        guard: RequestGuard | None = None,
    ) -> OnnxGeneration:
        og = self._og
        params = og.GeneratorParams(self._model)
        n = len(prompt) + max_new
        opts: dict[str, Any] = {"max_length": n, "min_length": n, "do_sample": temperature > 0}
        if temperature > 0:
            opts.update(temperature=temperature, top_k=top_k if top_k > 0 else 0, top_p=top_p, random_seed=seed)
        params.set_search_options(**opts)
        t0 = time.perf_counter()
        gen = og.Generator(self._model, params)
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))
        out, finish, ttft = _take_until_stop(self._genai_tokens(gen, guard), stops, max_new, t0)
        total = time.perf_counter() - t0
        del gen
        return self._result(out, len(prompt), finish, ttft, total)

    @staticmethod
    def _genai_tokens(gen: Any, guard: RequestGuard | None = None) -> Iterator[int]:
        """Generated tokens of an ``onnxruntime_genai.Generator``; a guard edits the logits the
        generator samples from (``get_logits`` / ``set_logits``)."""
        generated: list[int] = []
        while not gen.is_done():
            if guard is not None:
                logits = np.array(gen.get_logits(), dtype=np.float32)
                guard(generated, logits.reshape(-1, logits.shape[-1])[-1])
                gen.set_logits(logits)
            gen.generate_next_token()
            generated.append(int(gen.get_next_tokens()[0]))
            yield generated[-1]

    @staticmethod
    def _result(out: list[int], n_prompt: int, finish: str, ttft: float, total: float) -> OnnxGeneration:
        return OnnxGeneration(
            token_ids=out, n_prompt_tokens=n_prompt, finish_reason=finish, ttft_s=ttft, total_s=total,
            prefill_tokens_per_s=token_rate(n_prompt, ttft), decode_tokens_per_s=token_rate(len(out) - 1, total - ttft),
        )

    def speed(self, prompt_ids: Sequence[int], n_tokens: int, *, repeats: int = 3, warmup: int = 1) -> dict[str, Any]:
        """Decode speed at batch 1: greedy, never stopping early, ``n_tokens`` per repetition.

        Args:
            prompt_ids: the prompt.
            n_tokens: tokens generated per repetition (>= 2).
            repeats: measured repetitions; warmup: unmeasured runs first.

        Returns:
            ``{"decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s"}`` (medians),
            ``"repetitions"`` (raw), ``"engine"``, ``"threads"``, ``"n_prompt_tokens"``, ``"n_tokens"``.
        """
        if n_tokens < 2 or repeats < 1:
            raise ConfigError("speed needs n_tokens >= 2 and repeats >= 1")
        for _ in range(warmup):
            self.generate(prompt_ids, n_tokens)
        reps = [asdict(self.generate(prompt_ids, n_tokens)) for _ in range(repeats)]
        for r in reps:
            r.pop("token_ids")
        med = {k: float(np.median([r[k] for r in reps])) for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s")}
        return {**med, "repetitions": reps, "engine": self.engine, "threads": self.threads,
                "n_prompt_tokens": len(prompt_ids), "n_tokens": n_tokens}

    def close(self) -> None:
        """Free the session / model."""
        self._session = None
        self._model = None

    def __enter__(self) -> "OnnxCausalLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# the bench runtime
# ---------------------------------------------------------------------------------------------


class OnnxRuntime(Runtime):
    """An ONNX export directory (``model.onnx`` + ``genai_config.json`` + tokenizer files) run on the
    CPU by :class:`OnnxCausalLM`, with the KV cache, batch 1.

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
        onnxruntime = import_backend(
            "onnxruntime", "the onnxruntime runtime needs ONNX Runtime: `pip install onnxruntime onnxruntime-genai` "
            "(or the `onnx` extra), or bench the checkpoint with --runtime transformers",
        )
        if device and not device.startswith("cpu"):
            raise ConfigError(f"the onnxruntime runtime runs ONNX exports on the CPU only; got device {device!r} (drop --device)")
        path = Path(model_path)
        if not is_onnx_export(path):
            raise ModelLoadError(
                f"{model_path!r} is not an ONNX export (a directory with model.onnx and genai_config.json); "
                "write one with `rqat-deploy export --format onnx`"
            )
        from transformers import AutoTokenizer

        self._ort_version = onnxruntime.__version__
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path} has no usable tokenizer files ({exc}): re-export it") from exc
        self.model = OnnxCausalLM(path, engine=engine, threads=n_threads, accuracy_level=accuracy_level)
        self.n_threads, self.accuracy_level = n_threads, accuracy_level
        self._use_hf_tokenizer(tokenizer)
        self.eos_ids = self._eos_ids(path)
        report = path / "rqat_export.json"
        self.export_report: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {}

    def _eos_ids(self, path: Path) -> list[int]:
        """End-of-generation ids: ``generation_config.json``, then the tokenizer, then ``genai_config.json``."""
        gen_cfg = path / "generation_config.json"
        ids = token_ids([
            json.loads(gen_cfg.read_text()).get("eos_token_id") if gen_cfg.exists() else None,
            self.tokenizer.eos_token_id,
            json.loads((path / GENAI_CONFIG).read_text()).get("model", {}).get("eos_token_id"),
        ])
        if not ids:
            raise ModelLoadError(f"{self.model_path}: no eos token in generation_config.json, the tokenizer or genai_config.json")
        return ids

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
        guard = self.request_guard(sampling, prompt_ids)
        out = self.model.generate(
            prompt_ids, sampling.max_tokens, stop_ids=() if ignore_eos else self.eos_ids,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, guard=guard,
        )
        ids = list(out.token_ids)
        # Count as transformers does: every token computed after the first, a stop token included.
        n_gen = len(ids) + (1 if out.finish_reason == "stop" else 0)
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        gen = Generation.timed_from_first_token(text, ids, len(prompt_ids), out.finish_reason, out.ttft_s, out.total_s, n_gen - 1)
        gen.guards = guard.report(ids) if guard else None
        return gen

    def logits(self, prompt_ids: Sequence[int]) -> Any:
        """Per-position logits ``[len(prompt_ids), vocab]`` (float32 numpy); see :meth:`Runtime.logits`."""
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
            **self._prompt_info(),
            "eos_ids": self.eos_ids,
        }
        if rep.get("bits"):  # the export's config.json reads as a float model; its report knows better
            info.update(bits=int(rep["bits"]), container_bits=rep.get("container_bits"),
                        group_size=rep.get("group_size"), bits_per_weight=None)
        return info

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None  # type: ignore[assignment]
