"""Fidelity to a reference model: ``rqat-deploy bench --reference MODEL``.

What is compared, precisely:

- **Positions**: every next-token prediction over each prompt's rendered tokens, teacher-forced.
  A prompt is the dataset question (+ instruction) rendered with the model's chat template and
  tokenized by the model's runtime (no BOS added; the template writes the special tokens), giving
  ids ``t_0 .. t_{n-1}``. Both models are fed exactly these ids in one forward pass; the logits at
  position ``i`` are each model's distribution of the token after ``t_0 .. t_i``, so a prompt gives
  ``n`` compared positions (the last one predicts the first response token). Generated responses
  are not compared (each model's differ).
- **KL**: ``KL(reference || model) = sum_v p_ref(v) (log p_ref(v) - log p_model(v))`` over the full
  vocabulary, from log-softmax of the raw logits in float64 (no temperature, no top-k).
  ``kl_to_reference_mean`` is the mean over all positions of all prompts (each position weighs
  the same, so longer prompts weigh more).
- **Top-1 agreement**: the fraction of those positions where both argmaxes are the same token
  (ties go to the lowest id, as ``numpy.argmax`` does).
- **Vocabulary**: the reference must tokenize every rendered prompt into the same ids and give
  logits of the same width; otherwise :class:`~rqat_deploy.errors.ConfigError` (the comparison
  would be meaningless).

Runtimes that expose logits: llama.cpp (``logits_all`` contexts, per-token scores), transformers,
ONNX Runtime (the ``onnxruntime`` engine). vLLM returns only top-k prompt log-probabilities, not full
distributions, so it cannot be compared (see ``VLLMRuntime.logits``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rqat_deploy.errors import ConfigError
from rqat_deploy.serve.runtimes import Runtime

__all__ = ["FIDELITY_DEFINITION", "compare_to_reference", "next_token_divergence"]

#: One line for report.json: which positions and which divergence.
FIDELITY_DEFINITION = (
    "teacher-forced next-token predictions at every position of each rendered prompt (same ids in both "
    "models); KL(reference || model) over the full vocabulary in float64; top-1 = same argmax"
)
_CHUNK = 128  # positions per float64 block (bounds memory at 2 x 128 x vocab doubles)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def next_token_divergence(reference: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-position ``KL(reference || model)`` and top-1 agreement of two logits arrays.

    Args:
        reference: the reference's logits ``[positions, vocab]``.
        logits: the model's logits, same shape.

    Returns:
        ``(kl, agree)``: float64 ``[positions]`` (0 where the distributions are equal) and bool
        ``[positions]``.

    Raises:
        ConfigError: the shapes differ.
    """
    if reference.shape != logits.shape:
        raise ConfigError(f"logits of shape {tuple(logits.shape)} cannot be compared with the reference's {tuple(reference.shape)}")
    kl = np.empty(reference.shape[0], dtype=np.float64)
    for start in range(0, reference.shape[0], _CHUNK):
        end = start + _CHUNK
        lr, lm = _log_softmax(reference[start:end]), _log_softmax(logits[start:end])
        p = np.exp(lr)
        kl[start:end] = np.where(p > 0, p * (lr - lm), 0.0).sum(axis=-1)
    agree = np.argmax(reference, axis=-1) == np.argmax(logits, axis=-1)
    return kl, agree


def _prompt_divergence(model: Runtime, reference: Runtime, prompt: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """KL and agreement over one rendered prompt, after checking both tokenize it alike."""
    ids = model.tokenize(prompt)
    ref_ids = reference.tokenize(prompt)
    if ids != ref_ids:
        at = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
        raise ConfigError(
            f"--reference: the reference's vocabulary differs from the model's: prompt {index} tokenizes to "
            f"different ids from token {at} ({ids[at:at + 4]} vs {ref_ids[at:at + 4]}); give a reference with the "
            "model's tokenizer (its base model, or another export of it)"
        )
    lm, lr = np.asarray(model.logits(ids)), np.asarray(reference.logits(ids))
    if lm.shape[-1] != lr.shape[-1]:
        raise ConfigError(
            f"--reference: the reference's vocabulary differs from the model's: {lr.shape[-1]} logits vs the "
            f"model's {lm.shape[-1]}; give a reference with the model's vocabulary (its base model, or another "
            "export of it)"
        )
    return next_token_divergence(lr, lm)


def compare_to_reference(model: Runtime, reference: Runtime, prompts: Sequence[str]) -> dict[str, Any]:
    """Mean next-token KL to the reference and top-1 agreement over rendered prompts.

    Args:
        model: the benchmarked model's runtime.
        reference: the reference's runtime.
        prompts: rendered prompts (:meth:`Runtime.render_prompt` of the model).

    Returns:
        ``{"kl_to_reference_mean", "top1_agreement", "fidelity": {...}}``; ``fidelity`` holds
        ``n_prompts``, ``n_positions``, ``kl_to_reference_median`` / ``_max``,
        ``kl_per_prompt`` (the mean of each prompt) and :data:`FIDELITY_DEFINITION`.

    Raises:
        ConfigError: a runtime without logits, or a reference of another vocabulary.
    """
    kls, agrees, per_prompt = [], [], []
    for i, prompt in enumerate(prompts):
        kl, agree = _prompt_divergence(model, reference, prompt, i)
        kls.append(kl)
        agrees.append(agree)
        per_prompt.append(float(kl.mean()) if kl.size else None)
    kl_all = np.concatenate(kls) if kls else np.zeros(0)
    agree_all = np.concatenate(agrees) if agrees else np.zeros(0, dtype=bool)
    empty = kl_all.size == 0
    return {
        "kl_to_reference_mean": None if empty else float(kl_all.mean()),
        "top1_agreement": None if empty else float(agree_all.mean()),
        "fidelity": {
            "n_prompts": len(prompts),
            "n_positions": int(kl_all.size),
            "kl_to_reference_median": None if empty else float(np.median(kl_all)),
            "kl_to_reference_max": None if empty else float(kl_all.max()),
            "kl_per_prompt": per_prompt,
            "definition": FIDELITY_DEFINITION,
        },
    }
