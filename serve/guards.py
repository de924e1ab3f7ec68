"""Decode-time guards against runaway thinking: a thinking budget, a loop breaker and a logit
penalty on hesitation tokens, one implementation for every runtime.

Settings (:class:`ThinkingGuards`, the bench's ``--think-budget``, ``--loop-breaker``,
``--hesitation-penalty``):

- **Thinking budget** (``budget=N``): once the thinking span holds ``N - k`` tokens, the closing
  text (``close_text``, default ``"\\n</think>\\n\\n"``, whose ``k`` tokens before ``</think>`` count as
  thinking) is forced token by token, so the span ends with at most ``N`` tokens (exactly ``N``
  when the budget cut it) and the model then writes its answer.
- **Loop breaker** (``loop_breaker=True``): when the thinking span loops by the definition of
  :mod:`rqat_deploy.data.thinking` (a run of ``loop_ngram`` tokens seen ``loop_repeats`` times, the
  settings the bench's ``loop_fraction`` uses), the closing text is forced the same way.
- **Hesitation penalty** (``hesitation_penalty=P``): inside the thinking span, ``P`` is subtracted
  from the logits of the hesitation tokens before sampling. The words (``hesitation_words``,
  default :data:`DEFAULT_HESITATION_WORDS`) are resolved per tokenizer: each word, lower-cased and
  capitalized, with and without a leading space, is kept where the tokenizer encodes it as one
  token (a word split into pieces is skipped and reported, never penalized by its first piece).

The thinking span is tracked on the generated ids as the bench counts it: it opens at ``<think>``
(or with the prompt, when the chat template ends inside one) and closes at ``</think>``; guards
need both tags as single tokens. Logits are edited before temperature / top-k / top-p in every
runtime, so a forced token is chosen by greedy and sampled decoding alike.

Each request gets a :class:`RequestGuard`: a callable ``guard(generated_ids, logits_row) ->
logits_row`` working on a numpy array or a torch tensor alike, plugged into each runtime's own
mechanism: llama-cpp-python's ``logits_processor``, a transformers ``LogitsProcessor``, vLLM's
logits processors (:mod:`rqat_deploy.serve.guards_vllm`) and the ONNX Runtime loop. Its
:meth:`RequestGuard.report` says what it did:

- ``budget_fired_at`` / ``loop_fired_at``: thinking tokens when the budget or the loop breaker
  started closing the span (None: never);
- ``hesitation_steps``: decoding steps the penalty was applied (thinking steps);
  ``hesitation_fired``: steps where the unpenalized most likely token was a hesitation token
  (where the penalty could change a greedy choice); ``hesitation_emitted``: hesitation tokens
  generated all the same.

With your own model (batch 1 shown; a transformers batch gets one guard per row; ``generated_ids``
are the response's ids, prompt excluded)::

    from rqat_deploy.serve.guards import ThinkingGuards
    guards = ThinkingGuards(budget=2048, loop_breaker=True, hesitation_penalty=3.0)

    # transformers
    proc = guards.transformers_processor(tokenizer, input_ids)
    model.generate(input_ids, logits_processor=LogitsProcessorList([proc]), ...)
    proc.guards[0].report(generated_ids)

    # llama-cpp-python
    proc = guards.llama_cpp_processor(llm, prompt_tokens)
    llm.create_completion(prompt_tokens, logits_processor=LogitsProcessorList([proc]), ...)
    proc.guard.report(generated_ids)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from rqat_deploy.data.thinking import DEFAULT_LOOP_NGRAM, DEFAULT_LOOP_REPEATS, LoopDetector
from rqat_deploy.errors import ConfigError

__all__ = [
    "DEFAULT_CLOSE_TEXT",
    "DEFAULT_HESITATION_WORDS",
    "GuardPlan",
    "LlamaCppGuardProcessor",
    "RequestGuard",
    "SlotGuards",
    "ThinkingGuards",
    "VLLM_EXTRA_ARGS_KEY",
    "guard_from_params",
    "starts_in_thinking_ids",
    "summarize_guard_reports",
    "transformers_logits_processor",
    "vllm_extra_args",
]

#: Hesitation markers that reopen a settled problem in reasoning traces ("Wait", "Alternatively"...).
DEFAULT_HESITATION_WORDS: tuple[str, ...] = (
    "Wait", "Hmm", "Alternatively", "But", "However", "Actually", "Perhaps", "Maybe", "Hold", "Oh",
)
#: What the budget and the loop breaker force: the tokens of this text, ``</think>`` among them.
DEFAULT_CLOSE_TEXT = "\n</think>\n\n"
_THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class ThinkingGuards:
    """Which guards run, with which settings (see the module docstring).

    Attributes:
        budget: most thinking tokens per response (None: no budget) (``--think-budget``).
        loop_breaker: close the thinking span when it loops (``--loop-breaker``).
        loop_ngram: run length of a loop, in tokens (``--loop-ngram``).
        loop_repeats: occurrences of a run that make a loop (``--loop-repeats``).
        hesitation_penalty: subtracted from hesitation-token logits inside thinking; 0 disables
            (``--hesitation-penalty``).
        hesitation_words: the words penalized, resolved per tokenizer (``--hesitation-words``).
        close_text: the text forced to close thinking; must contain ``</think>``.

    Raises:
        ConfigError: a value out of range, naming its flag.
    """

    budget: int | None = None
    loop_breaker: bool = False
    loop_ngram: int = DEFAULT_LOOP_NGRAM
    loop_repeats: int = DEFAULT_LOOP_REPEATS
    hesitation_penalty: float = 0.0
    hesitation_words: tuple[str, ...] = DEFAULT_HESITATION_WORDS
    close_text: str = DEFAULT_CLOSE_TEXT

    def __post_init__(self) -> None:
        object.__setattr__(self, "hesitation_words", tuple(w.strip() for w in self.hesitation_words if w.strip()))
        checks = (
            (self.budget is None or self.budget >= 1, "--think-budget", f"must be >= 1, got {self.budget}"),
            (self.loop_ngram >= 1, "--loop-ngram", f"must be >= 1, got {self.loop_ngram}"),
            (self.loop_repeats >= 2, "--loop-repeats", f"must be >= 2, got {self.loop_repeats}"),
            (math.isfinite(self.hesitation_penalty) and self.hesitation_penalty >= 0, "--hesitation-penalty",
             f"must be a finite number >= 0, got {self.hesitation_penalty}"),
            (not self.hesitation_penalty or bool(self.hesitation_words), "--hesitation-words",
             "is empty: name the words to penalize, or drop --hesitation-penalty"),
            (_THINK_CLOSE in self.close_text, "close_text", f"must contain {_THINK_CLOSE!r}, got {self.close_text!r}"),
        )
        for ok, flag, problem in checks:
            if not ok:
                raise ConfigError(f"{flag} {problem}")

    @property
    def active(self) -> bool:
        """Whether any guard runs."""
        return self.budget is not None or self.loop_breaker or self.hesitation_penalty > 0

    def settings(self) -> dict[str, Any]:
        """The settings, for reports (inactive guards left out)."""
        out: dict[str, Any] = {"budget": self.budget, "loop_breaker": self.loop_breaker}
        if self.loop_breaker:
            out.update(loop_ngram=self.loop_ngram, loop_repeats=self.loop_repeats)
        out["hesitation_penalty"] = self.hesitation_penalty
        if self.hesitation_penalty:
            out["hesitation_words"] = list(self.hesitation_words)
        if self.budget is not None or self.loop_breaker:
            out["close_text"] = self.close_text
        return out

    def bind(self, encode: Callable[[str], Sequence[int]], think_ids: tuple[int, int] | None) -> "GuardPlan":
        """Resolve the guards for one tokenizer.

        Args:
            encode: text -> token ids, special tokens parsed (``"</think>"`` is one id), none added.
            think_ids: ids of ``<think>`` and ``</think>`` (None: not single tokens).

        Returns:
            The :class:`GuardPlan`.

        Raises:
            ConfigError: the tags are not single tokens, or the closing text does not encode ``</think>``.
        """
        if think_ids is None:
            raise ConfigError(
                "thinking guards need <think> and </think> as single tokens of the model's vocabulary, and this "
                "tokenizer splits them; run without --think-budget / --loop-breaker / --hesitation-penalty"
            )
        open_id, close_id = think_ids
        close_ids = tuple(int(t) for t in encode(self.close_text))
        if close_id not in close_ids:
            raise ConfigError(f"close_text {self.close_text!r} does not encode to the </think> token ({close_id}); fix it")
        resolved, skipped = _resolve_words(self.hesitation_words, encode) if self.hesitation_penalty else ({}, [])
        ids = tuple(sorted({i for word_ids in resolved.values() for i in word_ids} - {open_id, close_id}))
        return GuardPlan(self, int(open_id), int(close_id), close_ids, close_ids.index(close_id), ids, resolved, skipped)

    def llama_cpp_processor(self, llm: Any, prompt_tokens: Sequence[int]) -> "LlamaCppGuardProcessor":
        """A llama-cpp-python ``logits_processor`` guarding one completion of ``prompt_tokens``.

        Args:
            llm: the ``llama_cpp.Llama`` (its vocabulary resolves the words and tags).
            prompt_tokens: the prompt's token ids, exactly as given to the completion.
        """
        def encode(text: str) -> list[int]:
            return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

        plan = self.bind(encode, _single_ids(encode))
        return LlamaCppGuardProcessor(plan.new_request(prompt_tokens), len(prompt_tokens))

    def transformers_processor(self, tokenizer: Any, input_ids: Any) -> Any:
        """A transformers ``LogitsProcessor`` guarding ``model.generate(input_ids, ...)``, one guard per row.

        Args:
            tokenizer: the model's Hugging Face tokenizer.
            input_ids: the prompt ids given to ``generate`` (``[batch, prompt_len]``, left-padded).
        """
        def encode(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        plan = self.bind(encode, _single_ids(encode))
        rows = [list(map(int, row)) for row in input_ids.tolist()]
        return transformers_logits_processor([plan.new_request(r) for r in rows], len(rows[0]))


def _single_ids(encode: Callable[[str], Sequence[int]]) -> tuple[int, int] | None:
    """The ids of ``<think>`` and ``</think>`` when each is one token."""
    o, c = list(encode("<think>")), list(encode(_THINK_CLOSE))
    return (int(o[0]), int(c[0])) if len(o) == 1 and len(c) == 1 else None


def _resolve_words(words: Sequence[str], encode: Callable[[str], Sequence[int]]) -> tuple[dict[str, list[int]], list[str]]:
    """Each word's single-token ids (capitalized / lower-case, with / without a leading space), and
    the words none of whose forms is a single token."""
    resolved: dict[str, list[int]] = {}
    skipped: list[str] = []
    for word in dict.fromkeys(words):
        forms = dict.fromkeys(f"{space}{w}" for w in (word, word[:1].upper() + word[1:], word.lower()) for space in ("", " "))
        ids = sorted({int(e[0]) for e in (list(encode(f)) for f in forms) if len(e) == 1})
        if ids:
            resolved[word] = ids
        else:
            skipped.append(word)
    return resolved, skipped


@dataclass(frozen=True)
class GuardPlan:
    """:class:`ThinkingGuards` resolved for one tokenizer.

    Attributes:
        guards: the settings.
        open_id: ``<think>``'s id.
        close_id: ``</think>``'s id.
        close_ids: the ids forced to close thinking (``close_text`` encoded).
        close_at: position of ``close_id`` in ``close_ids`` (tokens forced inside the span).
        hesitation_ids: the penalized ids.
        hesitation_resolved: each word's ids.
        hesitation_skipped: words with no single-token form in this tokenizer.
    """

    guards: ThinkingGuards
    open_id: int
    close_id: int
    close_ids: tuple[int, ...]
    close_at: int
    hesitation_ids: tuple[int, ...] = ()
    hesitation_resolved: dict[str, list[int]] = field(default_factory=dict)
    hesitation_skipped: list[str] = field(default_factory=list)

    def new_request(self, prompt_ids: Sequence[int]) -> "RequestGuard":
        """A fresh guard for one response to ``prompt_ids``."""
        return RequestGuard(self, starts_in_thinking_ids(prompt_ids, self.open_id, self.close_id))

    def describe(self) -> dict[str, Any]:
        """Settings and their resolution for this tokenizer, for reports."""
        out = self.guards.settings()
        out.update(think_ids=[self.open_id, self.close_id])
        if self.guards.budget is not None or self.guards.loop_breaker:
            out["close_ids"] = list(self.close_ids)
        if self.guards.hesitation_penalty:
            out.update(hesitation_ids=list(self.hesitation_ids), hesitation_resolved=self.hesitation_resolved,
                       hesitation_skipped=self.hesitation_skipped)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable form (vLLM carries it to its engine in ``SamplingParams.extra_args``)."""
        d = asdict(self)
        d["guards"]["hesitation_words"] = list(self.guards.hesitation_words)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GuardPlan":
        """The plan :meth:`to_dict` wrote."""
        g = dict(d["guards"])
        g["hesitation_words"] = tuple(g["hesitation_words"])
        return cls(**{**d, "guards": ThinkingGuards(**g), "close_ids": tuple(d["close_ids"]),
                      "hesitation_ids": tuple(d["hesitation_ids"])})


def starts_in_thinking_ids(prompt_ids: Sequence[int], open_id: int, close_id: int) -> bool:
    """Whether a prompt ends inside an opened thinking span: its last ``<think>`` comes after its last ``</think>``."""
    ids = list(prompt_ids)
    last_open = len(ids) - 1 - ids[::-1].index(open_id) if open_id in ids else -1
    last_close = len(ids) - 1 - ids[::-1].index(close_id) if close_id in ids else -1
    return last_open > last_close


class RequestGuard:
    """The guards of one response: call it with the ids generated so far and the next token's logits.

    Args:
        plan: the resolved guards.
        starts_in_thinking: the prompt ended inside an opened thinking span.
    """

    def __init__(self, plan: GuardPlan, starts_in_thinking: bool = False) -> None:
        self.plan = plan
        g = plan.guards
        self._in_thinking = starts_in_thinking
        self._done = False  # the span closed (or was never opened before the answer)
        self._seen = 0
        self._queue: list[int] = []
        self._loop = LoopDetector(g.loop_ngram, g.loop_repeats) if g.loop_breaker else None
        self._loop_pending = False
        self._hesitation = set(plan.hesitation_ids)
        self.thinking_tokens = 0
        self.budget_fired_at: int | None = None
        self.loop_fired_at: int | None = None
        self.hesitation_steps = 0
        self.hesitation_fired = 0
        self.hesitation_emitted = 0
        self.forced_tokens = 0
        self._replayed = False

    # -- the sequence ------------------------------------------------------------------------------

    def observe(self, token: int) -> None:
        """Account for the next generated token."""
        token = int(token)
        self._seen += 1
        if self._queue:
            if token == self._queue[0]:
                self._queue.pop(0)
                self.forced_tokens += 1
            else:  # the runtime did not take the forced token: stop forcing
                self._queue.clear()
        if self._done:
            return
        if not self._in_thinking:
            self._in_thinking = token == self.plan.open_id
            return
        if token == self.plan.close_id:
            self._in_thinking, self._done = False, True
            return
        self.thinking_tokens += 1
        if token in self._hesitation:
            self.hesitation_emitted += 1
        if self._loop is not None and self._loop.add(token):
            self._loop_pending = True

    def sync(self, generated: Sequence[int]) -> None:
        """Observe the tokens of ``generated`` (all generated ids so far) not yet seen."""
        for token in generated[self._seen :]:
            self.observe(int(token))

    # -- the next token --------------------------------------------------------------------------

    def __call__(self, generated: Sequence[int], logits: Any) -> Any:
        """Edit the next token's logits (in place; also returned) after ``generated``.

        Args:
            generated: every id generated so far for this response (the prompt excluded).
            logits: the next token's logits, ``[vocab]``, a numpy array or a torch tensor.
        """
        self.sync(generated)
        forced = self._next_forced()
        if forced is not None:
            logits[:] = -math.inf
            logits[forced] = 0.0
        elif self._in_thinking and self._hesitation and self.plan.guards.hesitation_penalty:
            self.hesitation_steps += 1
            if int(logits.argmax()) in self._hesitation:
                self.hesitation_fired += 1
            logits[list(self.plan.hesitation_ids)] -= self.plan.guards.hesitation_penalty
        return logits

    def _next_forced(self) -> int | None:
        """The token to force next, starting the closing text when the budget or a loop says so."""
        if not self._queue and self._in_thinking:
            budget = self.plan.guards.budget
            if budget is not None and self.thinking_tokens + self.plan.close_at >= budget:
                self.budget_fired_at = self.thinking_tokens
                self._queue = list(self.plan.close_ids)
            elif self._loop_pending:
                self.loop_fired_at = self.thinking_tokens
                self._queue = list(self.plan.close_ids)
            self._loop_pending = False
        return self._queue[0] if self._queue else None

    def replay(self, generated: Sequence[int]) -> "RequestGuard":
        """Re-run the decisions on finished ids without logits (for runtimes whose guard ran out of
        reach, vLLM's engine process): the budget and loop events come out as they happened; the
        hesitation counts need logits and are left at 0 (reported as None)."""
        for token in generated:
            self._next_forced()
            self.observe(int(token))
        self._replayed = True
        return self

    def report(self, generated: Sequence[int] = ()) -> dict[str, Any]:
        """What the guards did (see the module docstring).

        Args:
            generated: the finished response's ids; those not yet seen are observed first (the last
                token is sampled after the guard's last call, so without it a response cut by the
                token limit counts one thinking token short).
        """
        self.sync(generated)
        replayed = self._replayed
        return {
            "budget_fired_at": self.budget_fired_at,
            "loop_fired_at": self.loop_fired_at,
            "hesitation_steps": None if replayed else self.hesitation_steps,
            "hesitation_fired": None if replayed else self.hesitation_fired,
            "hesitation_emitted": self.hesitation_emitted,
            "forced_tokens": self.forced_tokens,
            "thinking_tokens": self.thinking_tokens,
        }


# ==================================================================================================
# Runtime adapters (llama-cpp-python, transformers; vLLM in guards_vllm; ONNX Runtime in its loop)
# ==================================================================================================


class LlamaCppGuardProcessor:
    """A llama-cpp-python logits processor: ``(input_ids, scores) -> scores`` with the prompt first.

    Attributes:
        guard: the :class:`RequestGuard`.
        n_prompt: prompt tokens at the front of ``input_ids``.
    """

    def __init__(self, guard: RequestGuard, n_prompt: int) -> None:
        self.guard, self.n_prompt = guard, n_prompt

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        return self.guard(input_ids[self.n_prompt :], scores)


def transformers_logits_processor(guards: Sequence[RequestGuard], n_prompt: int) -> Any:
    """A transformers ``LogitsProcessor`` applying ``guards[b]`` to row ``b`` of the batch.

    Args:
        guards: one guard per row.
        n_prompt: the prompt width (every row's generated ids start there).
    """
    from transformers import LogitsProcessor

    class GuardLogitsProcessor(LogitsProcessor):
        """Thinking guards (:mod:`rqat_deploy.serve.guards`), one per batch row."""

        def __init__(self) -> None:
            self.guards = list(guards)

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            for b, guard in enumerate(self.guards):
                guard(input_ids[b, n_prompt:].tolist(), scores[b])
            return scores

    return GuardLogitsProcessor()


# ==================================================================================================
# Reports
# ==================================================================================================


def summarize_guard_reports(reports: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """How often each guard fired over a model's responses.

    Args:
        reports: :meth:`RequestGuard.report` of each response (None where no guard ran).

    Returns:
        ``{"responses", "budget_fired", "budget_fired_fraction", "loop_fired", "loop_fired_fraction",
        "hesitation_fired", "hesitation_fired_mean", "hesitation_fired_fraction", "hesitation_steps",
        "hesitation_emitted", "forced_tokens"}`` (hesitation counts None when no response has them).
    """
    done = [r for r in reports if r]
    n = len(done)

    def total(key: str) -> int | None:
        vals = [r[key] for r in done if r.get(key) is not None]
        return sum(vals) if vals else None

    def fired(key: str) -> int:
        return sum(r.get(key) is not None for r in done)

    hes = [r["hesitation_fired"] for r in done if r.get("hesitation_fired") is not None]
    return {
        "responses": n,
        "budget_fired": fired("budget_fired_at"),
        "budget_fired_fraction": fired("budget_fired_at") / n if n else None,
        "loop_fired": fired("loop_fired_at"),
        "loop_fired_fraction": fired("loop_fired_at") / n if n else None,
        "hesitation_fired": total("hesitation_fired"),
        "hesitation_fired_mean": sum(hes) / len(hes) if hes else None,
        "hesitation_fired_fraction": sum(h > 0 for h in hes) / len(hes) if hes else None,
        "hesitation_steps": total("hesitation_steps"),
        "hesitation_emitted": total("hesitation_emitted"),
        "forced_tokens": total("forced_tokens"),
    }


# ==================================================================================================
# vLLM: per-slot guards behind its batch-level logits processors (the classes are in guards_vllm)
# ==================================================================================================

#: The ``SamplingParams.extra_args`` key that carries a request's guards to vLLM's engine.
VLLM_EXTRA_ARGS_KEY = "rqat_guards"


def vllm_extra_args(plan: GuardPlan, prompt_ids: Sequence[int]) -> dict[str, Any]:
    """``SamplingParams.extra_args`` asking :mod:`rqat_deploy.serve.guards_vllm` to guard one request."""
    return {VLLM_EXTRA_ARGS_KEY: {"plan": plan.to_dict(),
                                  "starts_in_thinking": starts_in_thinking_ids(prompt_ids, plan.open_id, plan.close_id)}}


def guard_from_params(params: Any) -> RequestGuard | None:
    """The guard a vLLM ``SamplingParams`` asks for in its ``extra_args`` (None: none)."""
    spec = (getattr(params, "extra_args", None) or {}).get(VLLM_EXTRA_ARGS_KEY)
    if not spec:
        return None
    return RequestGuard(GuardPlan.from_dict(spec["plan"]), bool(spec["starts_in_thinking"]))


class SlotGuards:
    """The guards of vLLM's persistent batch (Model Runner V2), keyed by request slot.

    Each step, a guarded row learns its newest generated token from the token fed to the model at
    that row (``input_ids``, at position ``pos``; generated when ``pos >= prompt_len``), reading any
    tokens it missed (a request resumed after preemption) from the runner's token history.
    """

    def __init__(self) -> None:
        self.guards: dict[int, RequestGuard] = {}
        self.generated: dict[int, list[int]] = {}

    def add(self, slot: int, params: Any) -> bool:
        """(Re)initialize a slot for a request; True when it is guarded."""
        guard = guard_from_params(params)
        self.guards.pop(slot, None)
        self.generated.pop(slot, None)
        if guard is None:
            return False
        self.guards[slot], self.generated[slot] = guard, []
        return True

    def apply(self, logits: Any, slots: Sequence[int], input_ids: Any, pos: Any, prompt_len: Sequence[int],
              history: Callable[[int, int, int], Sequence[int]]) -> Any:
        """Apply the guards to the rows of ``logits``.

        Args:
            logits: ``[rows, vocab]``, one row per request (no speculative decoding).
            slots: the slot of each row (host).
            input_ids: the token fed at each row (device or host).
            pos: that token's position in its sequence.
            prompt_len: the prompt length of each slot (host).
            history: ``(slot, start, end) -> ids`` of the slot's sequence positions ``start:end``.

        Raises:
            ConfigError: more logits rows than requests (speculative decoding).
        """
        rows = [i for i, s in enumerate(slots) if int(s) in self.guards]
        if not rows:
            return logits
        if logits.shape[0] != len(slots):
            raise ConfigError("thinking guards do not support speculative decoding in vLLM; disable one of them")
        fed = input_ids[rows].tolist() if hasattr(input_ids, "tolist") else [input_ids[i] for i in rows]
        at = pos[rows].tolist() if hasattr(pos, "tolist") else [pos[i] for i in rows]
        for i, token, p in zip(rows, fed, at):
            slot = int(slots[i])
            done, start = self.generated[slot], int(prompt_len[slot])
            index = int(p) - start  # index of the fed token among the generated ones
            if index > len(done):  # missed tokens: read them back
                done.extend(int(t) for t in history(slot, start + len(done), start + index))
            if index == len(done):
                done.append(int(token))
            self.guards[slot](done, logits[i])
        return logits
