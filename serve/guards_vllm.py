"""Thinking guards inside vLLM (imports vLLM: loaded by the vllm runtime and by vLLM's engine process).

vLLM applies custom logits processors to the whole batch; a request asks for guards through
``SamplingParams(extra_args=rqat_deploy.serve.guards.vllm_extra_args(plan, prompt_ids))`` and gets
its own :class:`~rqat_deploy.serve.guards.RequestGuard`. Two interfaces, read from vLLM's sources
(0.31-0.33 and main; not run here, no GPU):

- **Model Runner V2** (the default runner of recent vLLM): a subclass of
  ``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``; ``add_request(slot, params)``,
  ``apply(logits, ctx)`` with ``ctx.idx_mapping_np`` (row -> slot), ``ctx.input_ids`` / ``ctx.pos``
  (the token fed at each row), the runner's token history in ``req_states``. Its ``apply`` runs
  before temperature / top-k / top-p, like the other runtimes' guards; one small device-to-host
  copy per step (the fed tokens of guarded rows), one more per hesitation-penalized row (argmax).
- **Legacy V1 runner** (``VLLM_USE_V2_MODEL_RUNNER=0``): ``vllm.v1.sample.logits_processor
  .AdapterLogitsProcessor`` wrapping the per-request callable ``(output_ids, logits_row)``, which a
  :class:`RequestGuard` is.

:func:`processor_class` picks the one the running vLLM uses; pass it to ``vllm.LLM(...,
logits_processors=[processor_class()])``.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from rqat_deploy.serve.guards import SlotGuards, guard_from_params

try:  # Model Runner V2's interface (recent vLLM)
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _V2LogitsProcessor
except ImportError:  # pragma: no cover - older vLLM
    _V2LogitsProcessor = None

__all__ = ["LegacyGuardProcessor", "processor_class"]


class LegacyGuardProcessor(AdapterLogitsProcessor):
    """Thinking guards for vLLM's legacy V1 model runner: one :class:`RequestGuard` per request."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: Any) -> Any:
        return guard_from_params(params)


if _V2LogitsProcessor is not None:

    class V2GuardProcessor(_V2LogitsProcessor):
        """Thinking guards for vLLM's Model Runner V2, keyed by request slot (:class:`SlotGuards`)."""

        def __init__(self, vllm_config: Any, req_states: Any) -> None:
            self.req_states = req_states
            self.slots = SlotGuards()

        def add_request(self, req_idx: int, sampling_params: Any) -> bool:
            return self.slots.add(req_idx, sampling_params)

        def apply(self, logits: Any, ctx: Any) -> Any:
            tokens = self.req_states.all_token_ids.gpu

            def history(slot: int, start: int, end: int) -> list[int]:
                return tokens[slot, start:end].tolist()

            return self.slots.apply(logits, ctx.idx_mapping_np, ctx.input_ids, ctx.pos, self.req_states.prompt_len.np, history)

    __all__.append("V2GuardProcessor")


def processor_class() -> type:
    """The guard processor class of the model runner the installed vLLM runs."""
    import vllm.envs as envs

    try:
        use_v2 = bool(envs.VLLM_USE_V2_MODEL_RUNNER)
    except AttributeError:  # a vLLM without the switch runs the legacy runner
        use_v2 = False
    return V2GuardProcessor if use_v2 and _V2LogitsProcessor is not None else LegacyGuardProcessor
