"""``rqat-deploy bench``: speed, accuracy and thinking length of models, or grading of saved responses.

Two modes (DESIGN.md 9):

- **generate** (``models`` given): each model is loaded in its runtime; a speed run (TTFT, prefill and
  decode tokens/s at batch 1, warm-up excluded, several repetitions) is made first; then every
  question of the dataset is answered once per seed. Each response is appended to
  ``OUT/responses/<label>.jsonl`` as soon as it finishes (that file is itself a valid
  ``--responses`` input), so Ctrl-C (or SIGTERM) keeps everything that finished: the report is then
  written from the finished responses and marked ``"interrupted": true``.
- **grade only** (``responses`` given): score existing JSONL files of responses from any tool, one
  object per line with ``response`` and optionally ``index`` (0-based row of the dataset; rows
  without one follow the dataset's order), ``model`` (groups rows into models; default the file's
  name), ``seed``, and ``finish_reason`` / ``truncated`` / ``n_completion_tokens`` for truncation.

With a reference model (``--reference``), each model's next-token distributions are also compared with
the reference's over the dataset's prompts (mean KL and top-1 agreement; :mod:`rqat_deploy.serve.fidelity`
defines the positions). Both write ``OUT/report.json``, ``OUT/report.md`` and PNG plots (see
:mod:`rqat_deploy.serve.report`), with the inflation of thinking against a baseline model (the first,
or ``--baseline``) and, when generating with thinking guards (``--think-budget``, ``--loop-breaker``,
``--hesitation-penalty``; :mod:`rqat_deploy.serve.guards`), which guards ran and how often each fired.
A run is one :class:`BenchConfig` (checked when built), given to :func:`run_bench`.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from rqat_deploy.data.evalset import EvalExample, load_eval_set
from rqat_deploy.data.grading import GRADERS, grade_response, resolve_grader
from rqat_deploy.data.thinking import (
    DEFAULT_LOOP_NGRAM,
    DEFAULT_LOOP_REPEATS,
    DEFAULT_RESTART_PATTERNS,
    analyze_response,
    answer_seen_then_lost,
    is_truncated,
    split_thinking,
)
from rqat_deploy.errors import ConfigError, DataError
from rqat_deploy.serve.fidelity import compare_to_reference
from rqat_deploy.files import check_no_overlap, check_output, staged_dir
from rqat_deploy.models import check_device
from rqat_deploy.serve.guards import DEFAULT_HESITATION_WORDS, ThinkingGuards
from rqat_deploy.serve.report import (
    add_inflation,
    compare_models,
    environment_info,
    model_info,
    now_iso,
    package_versions,
    summarize_model,
    write_report,
)
from rqat_deploy.serve.runtimes import (
    DEFAULT_INSTRUCTION,
    RUNTIMES,
    Generation,
    Runtime,
    SamplingParams,
    detect_runtime,
    load_runtime,
)

__all__ = ["DEFAULT_SPEED_TEXT", "BenchConfig", "model_labels", "run_bench", "score_response"]

#: Speed-run prompt text when no dataset is given.
DEFAULT_SPEED_TEXT = (
    "A train leaves the station at 9:00 and travels at 80 km/h; a second train leaves at 10:30 at "
    "120 km/h on the same track. When does the second train catch up with the first? "
)
REPORT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class BenchConfig:
    """One ``rqat-deploy bench`` run (DESIGN.md 9), checked when built.

    Attributes:
        models: model paths (GGUF files, model / checkpoint / export directories, Hub ids); empty
            in grade-only mode (``--model``, repeatable).
        dataset: evaluation SPEC (``source[:weight]``, comma-separated); None runs only the speed
            measurement (generate mode) or takes gold answers from the rows' ``gold`` field
            (grade-only mode) (``--dataset``).
        responses: JSONL file(s) of responses to grade instead of generating (``--responses``).
        limit: at most this many questions (``--limit``).
        max_tokens: generated-token limit per response, also the truncation limit when grading rows
            that report ``n_completion_tokens`` (``--max-tokens``).
        runtime: ``llama.cpp`` / ``transformers`` / ``vllm`` / ``onnxruntime``; None picks by file
            type (:func:`~rqat_deploy.serve.runtimes.detect_runtime`) (``--runtime``).
        seeds: sampling seeds 0..seeds-1, the accuracy interval is over them (``--seeds``).
        out_dir: output directory: ``report.json``, ``report.md``, plots, ``responses/`` (``--out``).
        baseline: label or path of the model the ratios are computed against (default the first)
            (``--baseline``).
        reference: a model (GGUF file, model / checkpoint / export directory) each model's next-token
            distributions are compared with over the dataset's prompts, in the runtime its file type
            picks: ``kl_to_reference_mean`` and ``top1_agreement`` per model (``--reference``).
        compare: ask for the side-by-side comparison, which needs two or more models (``--compare``;
            the comparison is made whenever there are two or more).
        greedy: greedy decoding instead of sampling (``--greedy``).
        temperature: sampling temperature, paper 0.6 (``--temperature``).
        top_k: top-k, paper 20; 0 disables (``--top-k``).
        top_p: top-p; 1.0 disables (``--top-p``).
        enable_thinking: thinking mode in the chat template (``--no-thinking`` clears it).
        instruction: appended to each question (None: nothing).
        question_field: dataset question column, detected when None (``--question-field``).
        answer_field: dataset answer column, detected when None (``--answer-field``).
        split: split of Hub / directory datasets.
        grader: ``auto`` (math-verify when installed, else the fallback) / ``fallback`` /
            ``math-verify`` (``--grader``).
        restart_patterns: self-verification phrases (default
            :data:`~rqat_deploy.data.thinking.DEFAULT_RESTART_PATTERNS`).
        think_budget: thinking-token budget per response, a guard (``--think-budget``).
        loop_breaker: close looping thinking, a guard (``--loop-breaker``).
        loop_ngram: run length of a loop, for ``loop_fraction`` and the loop breaker (``--loop-ngram``).
        loop_repeats: occurrences of a run that make a loop (``--loop-repeats``).
        hesitation_penalty: logit penalty on hesitation tokens inside thinking, a guard; 0 disables
            (``--hesitation-penalty``).
        hesitation_words: the penalized words (``--hesitation-words``).
        tokenizer: grade-only: a tokenizer (directory or Hub id) to count thinking tokens with.
        speed: make the speed run in generate mode (``--no-speed`` clears it).
        speed_prompt_tokens: prompt length of the speed run.
        speed_tokens: tokens generated per speed repetition.
        speed_repeats: measured speed repetitions (after one warm-up).
        concurrency: sequences at once for the throughput measurement, > 1 where supported
            (``--concurrency``).
        n_threads: CPU threads of the runtime (``--threads``).
        device: ``cpu`` / ``cuda`` (``--device``).
        runtime_options: extra keyword arguments of the runtime class.
        hashes: record sha256 of the model files.
        plots: write PNG plots (when matplotlib is importable).
        progress: show tqdm progress bars.
        force: replace an existing ``out_dir`` (``--force``); without it an existing one is refused.

    Raises:
        ConfigError: (when built) a value out of range or inconsistent with another, naming its flag.
    """

    models: Sequence[str] = ()
    dataset: str | None = None
    responses: str | Sequence[str] | None = None
    limit: int | None = None
    max_tokens: int = 32768
    runtime: str | None = None
    seeds: int = 1
    out_dir: str | os.PathLike[str] = "bench"
    baseline: str | None = None
    reference: str | None = None
    compare: bool = False
    greedy: bool = False
    temperature: float = 0.6
    top_k: int = 20
    top_p: float = 1.0
    enable_thinking: bool = True
    instruction: str | None = DEFAULT_INSTRUCTION
    question_field: str | None = None
    answer_field: str | None = None
    split: str | None = None
    grader: str = "auto"
    restart_patterns: Sequence[str] = DEFAULT_RESTART_PATTERNS
    think_budget: int | None = None
    loop_breaker: bool = False
    loop_ngram: int = DEFAULT_LOOP_NGRAM
    loop_repeats: int = DEFAULT_LOOP_REPEATS
    hesitation_penalty: float = 0.0
    hesitation_words: Sequence[str] = DEFAULT_HESITATION_WORDS
    tokenizer: str | None = None
    speed: bool = True
    speed_prompt_tokens: int = 512
    speed_tokens: int = 128
    speed_repeats: int = 3
    concurrency: int = 1
    n_threads: int | None = None
    device: str | None = None
    runtime_options: Mapping[str, Any] = field(default_factory=dict)
    hashes: bool = True
    plots: bool = True
    progress: bool = True
    force: bool = False

    def __post_init__(self) -> None:
        fix = object.__setattr__  # frozen: normalize the containers once, here
        fix(self, "models", tuple(str(m) for m in self.models))
        if self.responses is not None:
            fix(self, "responses", (self.responses,) if isinstance(self.responses, str) else tuple(self.responses))
        fix(self, "restart_patterns", tuple(self.restart_patterns))
        fix(self, "hesitation_words", tuple(self.hesitation_words))
        fix(self, "runtime_options", dict(self.runtime_options))
        fix(self, "out_dir", Path(self.out_dir))
        if self.responses is not None and self.models:
            raise ConfigError("give either models to run (--model) or responses to grade (--responses), not both")
        if self.responses is None and not self.models:
            raise ConfigError("nothing to benchmark: give --model PATH (one or more) or --responses FILE.jsonl")
        checks = (
            (not self.compare or len(self.models) >= 2, "--compare", f"needs two or more --model, got {len(self.models)}"),
            (self.seeds >= 1, "--seeds", f"must be >= 1, got {self.seeds}"),
            (self.max_tokens >= 1, "--max-tokens", f"must be >= 1, got {self.max_tokens}"),
            (self.limit is None or self.limit >= 1, "--limit", f"must be >= 1, got {self.limit}"),
            (self.runtime is None or self.runtime in RUNTIMES, "--runtime", f"must be one of {list(RUNTIMES)}, got {self.runtime!r}"),
            (self.greedy or self.temperature > 0, "--temperature", f"must be > 0, got {self.temperature} (or decode with --greedy)"),
            (self.top_k >= 0, "--top-k", f"must be >= 0 (0 disables it), got {self.top_k}"),
            (0 < self.top_p <= 1, "--top-p", f"must be in (0, 1], got {self.top_p}"),
            (self.grader in GRADERS, "--grader", f"must be one of {list(GRADERS)}, got {self.grader!r}"),
            (self.concurrency >= 1, "--concurrency", f"must be >= 1, got {self.concurrency}"),
            (self.n_threads is None or self.n_threads >= 1, "--threads", f"must be >= 1, got {self.n_threads}"),
            (self.speed_prompt_tokens >= 1, "speed_prompt_tokens", f"must be >= 1, got {self.speed_prompt_tokens}"),
            (self.speed_tokens >= 2, "speed_tokens", f"must be >= 2, got {self.speed_tokens}"),
            (self.speed_repeats >= 1, "speed_repeats", f"must be >= 1, got {self.speed_repeats}"),
            (self.reference is None or not self.grade_only, "--reference",
             "compares the models the bench runs; it cannot grade --responses (give --model)"),
            (self.reference is None or self.dataset is not None, "--reference",
             "needs --dataset: its prompts are the positions compared"),
            (self.reference is None or self.runtime != "vllm", "--reference",
             "needs full next-token distributions, which vLLM does not return (only top-k prompt log-probabilities); "
             "use --runtime transformers or llama.cpp"),
        )
        for ok, flag, problem in checks:
            if not ok:
                raise ConfigError(f"{flag} {problem}")
        if self.guards and self.grade_only:  # building the guards checks their flags
            raise ConfigError("--think-budget, --loop-breaker and --hesitation-penalty act while generating; "
                              "they cannot apply to --responses (give --model)")
        try:
            resolve_grader(self.grader)
        except ConfigError as exc:
            raise ConfigError(f"--grader {self.grader}: {exc}") from exc

    @property
    def grade_only(self) -> bool:
        """Grading saved responses rather than running models."""
        return self.responses is not None

    @property
    def guards(self) -> ThinkingGuards | None:
        """The thinking guards that run (None when none does).

        Raises:
            ConfigError: a guard flag out of range, naming it.
        """
        guards = ThinkingGuards(
            budget=self.think_budget, loop_breaker=self.loop_breaker, loop_ngram=self.loop_ngram,
            loop_repeats=self.loop_repeats, hesitation_penalty=self.hesitation_penalty,
            hesitation_words=tuple(self.hesitation_words),
        )
        return guards if guards.active else None

    def sampling(self, seed: int) -> SamplingParams:
        """The sampling settings of one seed."""
        return SamplingParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, max_tokens=self.max_tokens,
            greedy=self.greedy, seed=seed, guards=self.guards,
        )

    def report_config(self) -> dict[str, Any]:
        """The settings ``report.json`` records under ``config``."""
        keys = (
            "runtime", "max_tokens", "seeds", "greedy", "temperature", "top_k", "top_p", "enable_thinking",
            "instruction", "grader", "restart_patterns", "speed", "speed_prompt_tokens", "speed_tokens",
            "speed_repeats", "concurrency", "n_threads", "device", "runtime_options", "hashes", "limit", "reference",
            "loop_ngram", "loop_repeats",
        )
        out = {k: getattr(self, k) for k in keys}
        out["restart_patterns"] = list(self.restart_patterns)
        out["guards"] = self.guards.settings() if self.guards else None
        return out


def model_labels(models: Sequence[str]) -> list[str]:
    """Short unique labels for model paths: the file / directory name, then ``parent/name``, then ``#i``."""
    names = [Path(str(m).rstrip("/")).name or str(m) for m in models]
    longer = [
        "/".join(Path(str(m).rstrip("/")).parts[-2:]) if names.count(n) > 1 else n for m, n in zip(models, names)
    ]
    out = []
    for i, label in enumerate(longer):
        out.append(label if longer.count(label) == 1 else f"{label}#{i}")
    return out


def score_response(
    example: EvalExample | None,
    text: str,
    *,
    seed: int = 0,
    grader: str = "auto",
    restart_patterns: Sequence[str] = DEFAULT_RESTART_PATTERNS,
    tokenizer: Any | None = None,
    token_ids: Sequence[int] | None = None,
    think_ids: tuple[int, int] | None = None,
    starts_in_thinking: bool = False,
    finish_reason: str | None = None,
    truncated: bool | None = None,
    n_completion_tokens: int | None = None,
    max_tokens: int | None = None,
    gold: str | None = None,
    loop_ngram: int = DEFAULT_LOOP_NGRAM,
    loop_repeats: int = DEFAULT_LOOP_REPEATS,
    guards: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Grade one response and measure its thinking: the per-response record of the report.

    The thinking measures are those of :mod:`rqat_deploy.data.thinking`: ``thinking_tokens``,
    ``loop`` / ``loop_at``, ``unclosed_thinking``, ``answer_seen_then_lost``, ``truncated``.

    Args:
        example: the question answered (None when only ``gold`` is known).
        text: the response text.
        seed: the sampling seed.
        grader: equivalence backend (``auto``, ``fallback``, ``math-verify``); the record names the
            one that decided (``auto`` resolves to math-verify when installed, else the fallback).
        restart_patterns: self-verification phrases to count.
        tokenizer: tokenizer for thinking counts of text (None: the regex-words unit).
        token_ids: generated ids (exact thinking counts with ``think_ids``).
        think_ids: ``(<think> id, </think> id)``.
        starts_in_thinking: the prompt ended inside ``<think>``.
        finish_reason: the runtime's finish reason, when known.
        truncated: an explicit truncation flag (used when ``finish_reason`` is unknown).
        n_completion_tokens: generated tokens, when known.
        max_tokens: the token limit, when known.
        gold: gold answer overriding the example's.
        loop_ngram: run length of a loop, in thinking units.
        loop_repeats: occurrences of a run that make a loop.
        guards: what the thinking guards did while generating it (kept as they are).

    Returns:
        The record (JSON-serializable).
    """
    gold_answer = gold if gold is not None else (example.answer if example is not None else None)
    grade = grade_response(text, gold_answer, backend=grader) if gold_answer is not None else None  # type: ignore[arg-type]
    stats = analyze_response(
        text, token_ids=token_ids, think_ids=think_ids, tokenizer=tokenizer,
        restart_patterns=restart_patterns, starts_in_thinking=starts_in_thinking,
        loop_ngram=loop_ngram, loop_repeats=loop_repeats,
    )
    thinking = split_thinking(text, starts_in_thinking=starts_in_thinking).thinking
    lost = answer_seen_then_lost(thinking, gold_answer, grade.correct) if grade else None
    if finish_reason is None and truncated is not None:
        trunc = bool(truncated)
    else:
        trunc = is_truncated(
            finish_reason=finish_reason, n_completion_tokens=n_completion_tokens, max_tokens=max_tokens,
            closed=stats.closed,
        )
    return {
        "index": example.index if example is not None else None,
        "source": example.source if example is not None else None,
        "source_index": example.source_index if example is not None else None,
        "seed": seed,
        "gold": gold_answer,
        "extracted": grade.extracted if grade else None,
        "extract_method": grade.method if grade else None,
        "correct": grade.correct if grade else None,
        "grader": grade.grader if grade else None,
        "thinking_tokens": stats.thinking_tokens,
        "thinking_token_unit": stats.unit,
        "has_thinking": stats.has_thinking,
        "thinking_closed": stats.closed,
        "unclosed_thinking": stats.unclosed,
        "loop": stats.loop,
        "loop_at": stats.loop_at,
        "answer_seen_then_lost": lost,
        "restarts": stats.restarts,
        "truncated": trunc,
        "guards": guards,
        "finish_reason": finish_reason,
        "n_completion_tokens": n_completion_tokens,
        "response": text,
    }


def _generation_record(example: EvalExample, gen: Generation, seed: int, cfg: BenchConfig) -> dict[str, Any]:
    rec = score_response(
        example, gen.text, seed=seed, grader=cfg.grader, restart_patterns=cfg.restart_patterns,
        token_ids=gen.token_ids, think_ids=gen.think_ids, starts_in_thinking=gen.starts_in_thinking,
        finish_reason=gen.finish_reason, n_completion_tokens=gen.n_completion_tokens, max_tokens=cfg.max_tokens,
        loop_ngram=cfg.loop_ngram, loop_repeats=cfg.loop_repeats, guards=gen.guards,
    )
    rec.update(
        {
            "sampling_seed": gen.seed,
            "n_prompt_tokens": gen.n_prompt_tokens,
            "ttft_s": gen.ttft_s,
            "total_s": gen.total_s,
            "prefill_tokens_per_s": gen.prefill_tokens_per_s,
            "decode_tokens_per_s": gen.decode_tokens_per_s,
        }
    )
    return rec


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="resp", disable=not enabled, dynamic_ncols=True)


def _load_reference(cfg: BenchConfig) -> Runtime | None:
    """The ``--reference`` model in the runtime its file type picks (None without one)."""
    if cfg.reference is None:
        return None
    return load_runtime(cfg.reference, None, enable_thinking=cfg.enable_thinking, n_threads=cfg.n_threads, device=cfg.device)


def _append_jsonl(fh: Any, obj: dict[str, Any]) -> None:
    fh.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
    fh.flush()


def _bench_model(
    model: str,
    label: str,
    examples: list[EvalExample],
    cfg: BenchConfig,
    responses_path: Path,
    reference: Runtime | None = None,
) -> tuple[dict[str, Any], bool]:
    """Speed run, fidelity to ``reference`` (when given) and evaluation of one model; returns
    (summary, interrupted)."""
    options = dict(cfg.runtime_options)
    if cfg.guards and (cfg.runtime or detect_runtime(model)) == "vllm":
        options.setdefault("enable_guards", True)  # vLLM registers logits processors when it loads
    runtime = load_runtime(
        model, cfg.runtime, enable_thinking=cfg.enable_thinking, n_threads=cfg.n_threads, device=cfg.device, **options,
    )
    records: list[dict[str, Any]] = []
    speed_result = None
    fidelity: dict[str, Any] = {}
    interrupted = False
    info: dict[str, Any] = {"path": str(model), "label": label}
    try:
        info.update(model_info(model, hashes=cfg.hashes))
        info.update(runtime.describe())
        if cfg.guards:  # resolved for this model's tokenizer before any work; refused when it cannot run
            info["guards"] = runtime.guard_plan(cfg.guards).describe()
        if cfg.speed:
            text = examples[0].question if examples else DEFAULT_SPEED_TEXT
            speed_result = runtime.speed(
                runtime.render_prompt(text, cfg.instruction), n_prompt_tokens=cfg.speed_prompt_tokens,
                n_tokens=cfg.speed_tokens, repeats=cfg.speed_repeats, warmup=1, concurrency=cfg.concurrency,
            )
        prompts = [runtime.render_prompt(ex.question, cfg.instruction) for ex in examples]
        if reference is not None:
            fidelity = compare_to_reference(runtime, reference, prompts)
            fidelity["fidelity"].update(reference=cfg.reference, reference_runtime=reference.name)
        responses_path.parent.mkdir(parents=True, exist_ok=True)
        with open(responses_path, "w", encoding="utf-8") as fh, _progress(
            len(examples) * cfg.seeds, label, cfg.progress
        ) as bar:
            for seed in range(cfg.seeds):
                sampling = cfg.sampling(seed)

                def on_result(i: int, gen: Generation, seed: int = seed) -> None:
                    rec = _generation_record(examples[i], gen, seed, cfg)
                    records.append(rec)
                    _append_jsonl(fh, {"model": label, **rec})
                    bar.update(1)
                    if rec["correct"] is not None:
                        done = [r for r in records if r["correct"] is not None]
                        bar.set_postfix(acc=f"{sum(r['correct'] for r in done) / len(done):.3f}")

                runtime.generate(prompts, sampling, seeds=[sampling.seed_for(ex.index) for ex in examples], on_result=on_result)
    except KeyboardInterrupt:  # GenerationInterrupted included: keep what finished
        interrupted = True
    finally:
        info.update(runtime.describe())  # again: the context size is known only after generating
        runtime.close()
    return {**summarize_model(records, speed=speed_result, info=info), **fidelity}, interrupted


def _read_responses(paths: Sequence[str]) -> "OrderedDict[str, list[dict[str, Any]]]":
    groups: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"responses file {p} does not exist")
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: not a JSON object ({exc})") from exc
            if not isinstance(row, dict) or not isinstance(row.get("response"), str):
                raise DataError(f"{p}:{lineno}: each line needs a string `response` field")
            row["_where"] = f"{p}:{lineno}"
            groups.setdefault(str(row.get("model") or p.stem), []).append(row)
    if not groups:
        raise DataError(f"no responses in {list(paths)}")
    return groups


def _grade_rows(
    rows: list[dict[str, Any]], examples: list[EvalExample] | None, cfg: BenchConfig, tokenizer: Any
) -> list[dict[str, Any]]:
    position: dict[int, int] = {}
    answered: dict[tuple[int, int], str] = {}
    records = []
    for row in rows:
        seed = _row_int(row, "seed", 0)
        index = _row_int(row, "index", position.get(seed, 0))
        position[seed] = index + 1
        if (seed, index) in answered:
            raise DataError(
                f"{row['_where']}: index {index} (seed {seed}) was already answered at {answered[seed, index]}: give one "
                "response per question and seed (use `seed` for repeated samples, `model` for other models)"
            )
        answered[seed, index] = row["_where"]
        example = None
        if examples is not None:
            if not 0 <= index < len(examples):
                raise DataError(f"{row['_where']}: index {index} is outside the dataset (0..{len(examples) - 1})")
            example = examples[index]
        gold = row.get("gold") if example is None else None
        if example is None and gold is None:
            raise DataError(f"{row['_where']}: no dataset given and the row has no `gold` answer; pass --dataset")
        rec = score_response(
            example, row["response"], seed=seed, grader=cfg.grader, restart_patterns=cfg.restart_patterns,
            tokenizer=tokenizer, finish_reason=row.get("finish_reason"), truncated=row.get("truncated"),
            n_completion_tokens=row.get("n_completion_tokens"), max_tokens=cfg.max_tokens,
            gold=str(gold) if gold is not None else None, loop_ngram=cfg.loop_ngram, loop_repeats=cfg.loop_repeats,
            guards=row.get("guards") if isinstance(row.get("guards"), dict) else None,
        )
        if example is None:
            rec["index"] = index
        records.append(rec)
    return records


def _row_int(row: dict[str, Any], key: str, default: int) -> int:
    """An integer field of a responses row (``default`` when absent or null); anything else is refused.

    Raises:
        DataError: a string, fraction, boolean... (naming the line).
    """
    value = row.get(key)
    if value is None:
        return default
    if type(value) is not int:
        raise DataError(f"{row['_where']}: `{key}` must be an integer, got {json.dumps(value)}")
    return value


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Benchmark models (generate mode) or grade saved responses (grade-only mode).

    Args:
        cfg: the run (see :class:`BenchConfig`; it was checked when built).

    Returns:
        The report dict, as written to ``cfg.out_dir/report.json``; ``report["interrupted"]`` is
        True when Ctrl-C stopped the run (the report covers what finished).

    The report directory is written like every output (:func:`rqat_deploy.files.staged_dir`): under a
    temporary name created before any model runs (so an unwritable ``--out`` fails at once), renamed
    into place at the end (also after Ctrl-C / SIGTERM, with what finished), replacing an existing
    one only with ``force``.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``force`` is false.
        OutputError: ``out_dir`` overlaps a model or responses file, is being written, or is not writable.
        ConfigError: a baseline that is not one of the models, or a CUDA device that is not there.
        DataError: unreadable dataset or responses.
        BackendError / ModelLoadError: a runtime or model that cannot be loaded.
    """
    out = Path(cfg.out_dir)
    check_device(cfg.device)
    inputs = {**{m: "model" for m in cfg.models}, **{r: "responses file" for r in cfg.responses or ()}}
    check_no_overlap(out, inputs)
    check_output(out, cfg.force)
    examples = (
        load_eval_set(cfg.dataset, limit=cfg.limit, question_field=cfg.question_field, answer_field=cfg.answer_field,
                      split=cfg.split)
        if cfg.dataset
        else None
    )
    with staged_dir(out, cfg.force, inputs=inputs) as tmp:  # checked writable before any model runs
        report = _run(cfg, examples, tmp)
        written = write_report(report, tmp, plots=cfg.plots)
    report["outputs"] = {
        "json": str(out / written["json"].name), "markdown": str(out / written["markdown"].name),
        "plots": [str(out / p.name) for p in written["plots"]],
    }
    return report


def _run(cfg: BenchConfig, examples: list[EvalExample] | None, out: Path) -> dict[str, Any]:
    """The report of the run, its responses written under ``out`` (the staged output directory)."""
    report: dict[str, Any] = {
        "format_version": REPORT_FORMAT_VERSION,
        "tool": "rqat-deploy bench",
        "created": now_iso(),
        "mode": "grade" if cfg.grade_only else "generate",
        "config": cfg.report_config(),
        "dataset": {
            "spec": cfg.dataset,
            "n": len(examples) if examples is not None else None,
            "sources": _source_counts(examples),
        },
        "environment": environment_info(),
        "packages": package_versions(),
        "models": {},
        "interrupted": False,
        "responses_files": {},
    }
    summaries: dict[str, dict[str, Any]] = {}
    if cfg.responses is not None:
        paths = list(cfg.responses)
        tok = _load_tokenizer(cfg.tokenizer)
        for label, rows in _read_responses(paths).items():
            records = _grade_rows(rows, examples, cfg, tok)
            summaries[label] = summarize_model(
                records, info={"label": label, "responses": paths, "runtime": None, "thinking_tokenizer": cfg.tokenizer}
            )
    else:
        reference = _load_reference(cfg)
        try:
            if reference is not None:
                report["reference"] = {**model_info(str(cfg.reference), hashes=cfg.hashes), **reference.describe()}
            for model, label in zip(cfg.models, model_labels(cfg.models)):
                path = out / "responses" / f"{_safe(label)}.jsonl"
                try:
                    summary, interrupted = _bench_model(model, label, examples or [], cfg, path, reference)
                except KeyboardInterrupt:  # while loading the model: report the models that finished
                    report["interrupted"] = True
                    break
                summaries[label] = summary
                report["responses_files"][label] = str(path.relative_to(out))
                if interrupted:
                    report["interrupted"] = True
                    break
        finally:
            if reference is not None:
                reference.close()
    report["models"] = summaries
    if summaries:
        baseline = _baseline_label(cfg.baseline, cfg.models, summaries)
        report["inflation"] = add_inflation(summaries, baseline)
        if len(summaries) >= 2:
            report["compare"] = compare_models(summaries, baseline)
    return report


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.#" else "_" for ch in label)


def _source_counts(examples: list[EvalExample] | None) -> dict[str, int] | None:
    if examples is None:
        return None
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.source] = counts.get(ex.source, 0) + 1
    return counts


def _baseline_label(baseline: str | None, models: Sequence[str], summaries: dict[str, Any]) -> str:
    labels = list(summaries)
    if baseline is None:
        return labels[0]
    if baseline in summaries:
        return baseline
    for model, label in zip(models, model_labels(models)):
        if os.path.normpath(str(model)) == os.path.normpath(baseline) and label in summaries:
            return label
    raise ConfigError(f"baseline {baseline!r} is not one of the models {labels}")


def _load_tokenizer(name: str | None) -> Any:
    if name is None:
        return None
    from transformers import AutoTokenizer

    from rqat_deploy.errors import ModelLoadError

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load tokenizer {name!r} for thinking counts: {exc}") from exc
