"""The ``rqat-deploy`` command line.

Commands parse their options, build a config, and call one library function. torch and
transformers are imported inside the commands so ``rqat-deploy --help`` stays instant.
Option values come from: defaults < ``--config FILE`` (JSON, TOML or YAML) < flags.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
import tomllib
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import click

from rqat_deploy import __version__
from rqat_deploy.data.thinking import DEFAULT_LOOP_NGRAM, DEFAULT_LOOP_REPEATS
from rqat_deploy.errors import RqatError
from rqat_deploy.serve.guards import DEFAULT_HESITATION_WORDS
from rqat_deploy.train.recipes import RECIPES

#: set to 1 to see the traceback of any error (same as ``rqat-deploy --debug``)
DEBUG_ENV = "RQAT_DEPLOY_DEBUG"
_OS_FIXES = {
    errno.ENOSPC: "no space left on the device: free some space or choose another --out",
    errno.EDQUOT: "disk quota exceeded: free some space or choose another --out",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.EACCES: "permission denied: choose a path you can write (or read)",
    errno.EPERM: "operation not permitted: choose a path you can write (or read)",
    errno.ENOENT: "no such file or directory: check the path",
    errno.ENOTDIR: "a component of the path is not a directory: check the path",
    errno.EISDIR: "it is a directory, a file was expected: check the path",
}


def _load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Eager ``--config`` callback: the file's keys become the command's defaults."""
    if not value:
        return value
    path = Path(value)
    if not path.exists():
        raise click.BadParameter(f"config file {value!r} does not exist", param_hint="--config")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes a usage error
        raise click.BadParameter(f"cannot parse {value}: {e}", param_hint="--config") from e
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must hold a mapping of option names to values", param_hint="--config")
    known = {p.name for p in ctx.command.params if p.name}
    norm = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(norm) - known)
    if unknown:
        from rqat_deploy.errors import did_you_mean

        hints = "; ".join(f"{k!r}{did_you_mean(k, sorted(known))}" for k in unknown)
        raise click.BadParameter(f"unknown keys in {value}: {hints}", param_hint="--config")
    ctx.default_map = {**(ctx.default_map or {}), **norm}
    return value


def config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config FILE`` (processed first, so flags still override it)."""
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        callback=_load_config_file,
        is_eager=True,
        expose_value=False,
        help="JSON/TOML/YAML file of option values (flags override it).",
    )(f)


def describe_error(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code the CLI prints for an error.

    rqat-deploy's own errors and the operating system's (disk full, read-only, permissions...) are
    bad input or environment: exit code 2, with the file and the fix. Anything else is an internal
    error: exit code 1, and the traceback is behind ``--debug`` / ``RQAT_DEPLOY_DEBUG=1``.
    """
    if isinstance(exc, RqatError):
        return str(exc), 2
    if isinstance(exc, OSError) and exc.errno is not None:
        where = exc.filename if exc.filename is not None else "an input or output"
        fix = _OS_FIXES.get(exc.errno, f"{exc.strerror or exc}")
        return f"{where}: {fix}", 2
    if isinstance(exc, MemoryError):
        return "out of memory: use a smaller model, batch or sequence length", 2
    first = str(exc).splitlines()[0] if str(exc) else ""
    return (
        f"internal error: {type(exc).__name__}: {first} (rerun with `rqat-deploy --debug ...` or {DEBUG_ENV}=1 for "
        "the traceback, and please report it)",
        1,
    )


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.params.get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


class _Group(click.Group):
    """Prints every error as one ``error:`` line instead of a traceback (unless ``--debug``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            if _debug(ctx):
                raise
            click.secho("interrupted: temporary files were removed; rerun the command to start again", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - every failure becomes one clear line
            if _debug(ctx):
                raise
            message, code = describe_error(e)
            click.secho(f"error: {message}", fg="red", err=True)
            sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rqat-deploy")
@click.option("--debug", is_flag=True, help=f"Show the Python traceback of an error (also: {DEBUG_ENV}=1).")
def cli(debug: bool) -> None:
    """Train, export and benchmark ultra-low-bit (2/3-bit) reasoning LLMs.

    \b
    Examples:
      rqat-deploy quickstart                   # the whole pipeline on the built-in tiny reasoner, offline
      rqat-deploy train --model Qwen/Qwen3-1.7B --recipe rtn --bits 2 --out ckpt-int2
      rqat-deploy inspect ckpt-int2
      rqat-deploy export ckpt-int2 --format gguf --out model-int2.gguf
    """


@cli.command()
@config_option
@click.option("--model", default=None,
              help="Hub id or local directory of the full-precision model (default: the built-in tiny reasoner, "
                   "trained on its built-in data with smaller defaults; see README).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
@click.option("--recipe", default="rqat", show_default=True, type=click.Choice(list(RECIPES)),
              help="rqat: our flagship (stage 1 from GPTQ + scale training with rr+topk_kl, guarded); the paper's "
                   "ablation rows as the paper ran them: S (RTN, then CE), R (RTN, then rr+topk_kl), C (stage 1 only), "
                   "C+S (stage 1, then CE), C+R (stage 1, then rr+topk_kl: the paper's method); rtn, gptq, awq "
                   "(128 math samples); reasoning-qat (GPTQ on math, then KD on the latent weights); grpo (cold-start GRPO of an "
                   "--init-from checkpoint); see README.")
@click.option("--bits", default=2, show_default=True, type=click.Choice(["2", "3", "4"]), help="Weight bit width.")
@click.option("--grid", default="uniform", show_default=True, type=click.Choice(["uniform", "kquant", "q2_0"]),
              help="uniform: asymmetric per-group (GPTQ / compressed-tensors exact); kquant: llama.cpp Q2_K/Q3_K "
                   "(GGUF exact); q2_0: llama.cpp Q2_0, 2 bits in groups of 64 (exact in GGUF and safetensors).")
@click.option("--group-size", default=128, show_default=True, type=int, help="Uniform-grid group size.")
@click.option("--exclude", multiple=True, help="Module-name pattern to keep in floating point (repeatable).")
@click.option("--calib", default=None, help="Calibration SPEC 'source[:weight],...' or 'builtin' (default: the recipe's: "
                   "OpenThoughts3:0.8,FineWeb-Edu:0.2, or NuminaMath-1.5 for gptq / awq / reasoning-qat; built-in data "
                   "without --model).")
@click.option("--calib-samples", default=None, type=int,
              help="Calibration sequences (default: the recipe's: 4096, 128 for gptq / awq / reasoning-qat; 256 / 128 "
                   "without --model).")
@click.option("--calib-seq-len", default=None, type=int, help="Tokens per calibration sequence (default 2048; 512 without --model).")
@click.option("--train-data", default=None, help="Stage-2 SPEC of reasoning conversations or 'builtin' (default: the recipe's: "
                   "OpenThoughts3, or OpenR1-Math for reasoning-qat; the built-in traces without --model).")
@click.option("--train-samples", default=None, type=int,
              help="Stage-2 samples (default: the recipe's: 32768; 64064 for reasoning-qat; 2048 without --model).")
@click.option("--train-seq-len", default=None, type=int,
              help="Cap on stage-2 sample length; longer samples are cut and counted in the report (default: none, "
                   "whole samples up to the model's context length, as the paper trains; rqat-released: 1024).")
@click.option("--stage1-epochs", default=2, show_default=True, type=int)
@click.option("--stage2-epochs", default=None, type=int,
              help="Default: the recipe's, else the paper's (3 at 2-bit <=2B params, else 1); 1 without --model.")
@click.option("--stage2-lr", default=None, type=float,
              help="Default: the recipe's (reasoning-qat 1e-6), else the paper's (1e-6 3-bit, 5e-6 / 1e-4 2-bit); 1e-3 "
                   "without --model (reasoning-qat's latent weights too).")
@click.option("--loss", default=None,
              help="Stage-2 loss terms joined by '+': ce (cross-entropy), rr (teacher reward-rectified CE), dft, "
                   "topk_kl (KL over the teacher's top-20, a partial sum, not renormalised: the paper's and the released "
                   "code's), topk_kl_renorm (renormalised over the top-20), jsd, jsd_renorm, kl (full vocabulary); or a "
                   "preset: paper (= rr+topk_kl), released (= ce+jsd). The paper's ablation rows are --recipe values.")
@click.option("--alpha", default=0.2, show_default=True, type=float, help="Weight of the CE-type term.")
@click.option("--beta", default=1.0, show_default=True, type=float, help="Weight of the divergence term.")
@click.option("--global-batch", default=None, type=int,
              help="Stage-2 samples per optimizer step (default: the recipe's: 64, 32 for reasoning-qat; 16 without --model).")
@click.option("--micro-batch", default=1, show_default=True, type=int, help="Stage-2 samples per forward (accumulation).")
@click.option("--max-steps", default=None, type=int, help="Cap on stage-2 optimizer steps.")
@click.option("--init-from", default=None, type=click.Path(exists=True, file_okay=False),
              help="Start stage 2 from this quantized checkpoint (e.g. a --recipe stage1 result) instead of initialising.")
@click.option("--grpo-steps", default=250, show_default=True, type=int, help="GRPO steps (rollout batches).")
@click.option("--grpo-lr", default=5e-7, show_default=True, type=float, help="GRPO peak learning rate (Adam 0.9/0.95, cosine).")
@click.option("--grpo-batch", default=64, show_default=True, type=int, help="GRPO rollouts per step (8 per prompt).")
@click.option("--grpo-max-tokens", default=32768, show_default=True, type=int, help="GRPO rollout token budget.")
@click.option("--grpo-trains", default="auto", show_default=True, type=click.Choice(["auto", "weights", "scales"]),
              help="What GRPO trains: latent weights through STE, or scales only; auto: the checkpoint's training form.")
@click.option("--length-penalty", default=0.0, show_default=True, type=float,
              help="GRPO length-aware reward: weight of the penalty on thinking beyond the teacher's length (0: off).")
@click.option("--no-teacher-cache", is_flag=True, help="Keep the teacher live in stage 2 instead of caching its top-k.")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False), help="Resumable state (default: OUT.work).")
@click.option("--keep-work", is_flag=True, help="Keep the work directory after success.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="dtype to load the model in.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "triton", "reference"]),
              help="Fake-quant kernels: Triton on CUDA, the PyTorch reference elsewhere (auto).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its work directory.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model repository's own Python code.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
def train(**kw: Any) -> None:
    """Quantize a model and write a quantized checkpoint.

    \b
    Examples:
      rqat-deploy train --out tiny-int2 --grid kquant   # built-in tiny reasoner and data, offline, ~35 min on CPU
      rqat-deploy train --model Qwen/Qwen3-1.7B --bits 2 --out qwen3-int2            # the flagship recipe
      rqat-deploy train --model Qwen/Qwen3-1.7B --bits 2 --recipe C+R --out c-r      # the paper's method as written
      rqat-deploy train --model ./my-model --recipe rtn --bits 2 --grid kquant --out ckpt
      rqat-deploy train --model ./my-model --recipe gptq --bits 3 --calib data.jsonl --out ckpt3
      rqat-deploy train --model ./m --calib mix.jsonl --train-data traces.jsonl --loss ce+topk_kl --out kd
      rqat-deploy train --recipe grpo --init-from tiny-int2 --out tiny-int2-grpo   # cold-start GRPO
      rqat-deploy train --config run.toml --bits 3      # flags override the file
      rqat-deploy train --config run.toml --resume      # continue after Ctrl-C
    """
    from rqat_deploy.quant.spec import QuantSpec
    from rqat_deploy.train.run import TrainConfig, run_train

    spec = QuantSpec(bits=int(kw.pop("bits")), grid=kw.pop("grid"), group_size=kw.pop("group_size"),
                     exclude=tuple(kw.pop("exclude")))
    kw["teacher_cache"] = not kw.pop("no_teacher_cache")
    cfg = TrainConfig(quant=spec, **kw)
    try:
        out = run_train(cfg)
    except KeyboardInterrupt:
        click.secho(f"interrupted: progress is kept in {cfg.work_path}; rerun the same command with --resume", err=True)
        sys.exit(130)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports (the group is closed by now)
        click.echo(f"wrote {out}")


FORMATS = ("gguf", "compressed-tensors", "gptq", "onnx")


@cli.command()
@config_option
@click.argument("ckpt_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(FORMATS),
              help="gguf: llama.cpp (and vLLM's GGUF loader); compressed-tensors: vLLM / transformers; "
                   "gptq: GPTQModel / vLLM --quantization humming; onnx: ONNX Runtime.")
@click.option("--out", required=True, type=click.Path(), help="Output file (gguf) or directory (others).")
@click.option("--gguf-type", default=None,
              help="GGUF type of quantized weights (Q2_K, Q3_K, Q4_K, Q4_0, Q8_0...). Default: exact for kquant "
                   "checkpoints, Q2_K/Q3_K/Q4_K for uniform int2/int3/int4 (error reported; Q4_0 is exact for int2/int3).")
@click.option("--embed-type", default="F16", show_default=True, type=click.Choice(["F32", "F16", "BF16", "Q8_0"]),
              help="GGUF type of embeddings and the output matrix.")
@click.option("--tokenizer-pre", default=None,
              help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre), e.g. qwen2, deepseek-r1-qwen, llama-bpe, gpt-2. "
                   "Default: detected as llama.cpp's converter does (probe-text hash), else from the pre-tokenizer.")
@click.option("--zero-point", default="v2", show_default=True, type=click.Choice(["v2", "v1"]),
              help="GPTQ zero-point convention (v1 refuses zero points of 0).")
@click.option("--accuracy-level", default=None, type=int, help="ONNX MatMulNBits accuracy_level (4: int8 activations).")
@click.option("--no-verify", is_flag=True, help="Skip decoding the written files with an independent reader.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
def export(ckpt_dir: str, fmt: str, out: str, gguf_type: str | None, embed_type: str, tokenizer_pre: str | None, zero_point: str,
           accuracy_level: int | None, no_verify: bool, force: bool) -> None:
    """Write a quantized checkpoint in a runtime's format, verified by decoding it back.

    \b
    Examples:
      rqat-deploy export ckpt-q2k --format gguf --out model-q2k.gguf
      rqat-deploy export ckpt-int2 --format gguf --gguf-type Q4_0 --out model-exact.gguf
      rqat-deploy export ckpt-int2 --format compressed-tensors --out model-ct
      rqat-deploy export ckpt-int3 --format gptq --out model-gptq
      rqat-deploy export ckpt-int2 --format onnx --out model-onnx
    """
    verify = not no_verify
    if fmt == "gguf":
        from rqat_deploy.exporters.gguf import export_gguf

        report = export_gguf(ckpt_dir, out, gguf_type=gguf_type, embed_type=embed_type, tokenizer_pre=tokenizer_pre,
                             verify=verify, force=force)
    elif fmt == "compressed-tensors":
        from rqat_deploy.exporters.compressed_tensors import export_compressed_tensors

        report = export_compressed_tensors(ckpt_dir, out, verify=verify, force=force)
    elif fmt == "gptq":
        from rqat_deploy.exporters.gptq import export_gptq

        report = export_gptq(ckpt_dir, out, zero_point=zero_point, verify=verify, force=force)
    else:
        from rqat_deploy.exporters.onnx import export_onnx

        report = export_onnx(ckpt_dir, out, accuracy_level=accuracy_level, verify=verify, force=force)
    click.echo(report.summary())


@cli.command()
@config_option
@click.option("--model", "models", multiple=True, help="GGUF file, HF model dir / Hub id, quantized checkpoint or export dir (repeatable).")
@click.option("--dataset", default=None,
              help="SPEC: Hub id or local JSONL/Parquet, e.g. ../shared/data/gsm8k_test.jsonl; 'builtin': the built-in "
                   "held-out problems.")
@click.option("--responses", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Grade-only: score this JSONL of responses (fields: response, index) without running a model "
                   "(repeatable: one model per file, or per `model` field).")
@click.option("--limit", default=None, type=int, help="Use the first N problems.")
@click.option("--max-tokens", default=32768, show_default=True, type=int, help="Generation limit per response.")
@click.option("--runtime", default=None, type=click.Choice(["llama.cpp", "transformers", "vllm", "onnxruntime"]),
              help="Default: llama.cpp for .gguf files, onnxruntime for ONNX export dirs, transformers otherwise.")
@click.option("--seeds", default=1, show_default=True, type=int, help="Sampling seeds (accuracy is reported with a CI over them).")
@click.option("--greedy", is_flag=True, help="Greedy decoding instead of temperature 0.6 / top-k 20.")
@click.option("--temperature", default=0.6, show_default=True, type=float)
@click.option("--top-k", default=20, show_default=True, type=int)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--no-thinking", is_flag=True, help="Disable thinking mode in the chat template.")
@click.option("--question-field", default=None, help="Dataset field holding the question (auto-detected).")
@click.option("--answer-field", default=None, help="Dataset field holding the answer (auto-detected).")
@click.option("--grader", default="auto", show_default=True, type=click.Choice(["auto", "math-verify", "fallback"]),
              help="Answer equivalence: auto = math-verify when installed (the bench extra), else the normalizing "
                   "fallback; report.json names the grader of every score.")
@click.option("--compare", is_flag=True, help="Side-by-side table of 2+ models with ratios to --baseline.")
@click.option("--baseline", default=None, help="Label or path of the baseline model (default: the first).")
@click.option("--reference", default=None,
              help="Model to measure fidelity against (GGUF file, model / checkpoint / export dir; runtime by file type): "
                   "per model, kl_to_reference_mean = mean KL(reference || model) over the full vocabulary (float64) "
                   "and top1_agreement = fraction of same argmax, at every teacher-forced next-token position of "
                   "each rendered prompt (same ids fed to both; the vocabularies must match). Needs --dataset; "
                   "not with --runtime vllm.")
@click.option("--think-budget", default=None, type=int,
              help="Guard: at most N thinking tokens per response; then </think> is forced and the model answers.")
@click.option("--loop-breaker", is_flag=True,
              help="Guard: close the thinking when it loops (a run of --loop-ngram tokens seen --loop-repeats times).")
@click.option("--loop-ngram", default=DEFAULT_LOOP_NGRAM, show_default=True, type=int,
              help="Loop definition (loop_fraction and --loop-breaker): run length in thinking tokens.")
@click.option("--loop-repeats", default=DEFAULT_LOOP_REPEATS, show_default=True, type=int,
              help="Loop definition: occurrences of one run that make a loop.")
@click.option("--hesitation-penalty", default=0.0, show_default=True, type=float,
              help="Guard: subtract P from the logits of hesitation tokens (Wait, Hmm, Alternatively...) inside thinking.")
@click.option("--hesitation-words", default=",".join(DEFAULT_HESITATION_WORDS), show_default=True,
              help="Comma-separated words for --hesitation-penalty, each resolved to its single-token forms per "
                   "tokenizer.")
@click.option("--no-speed", is_flag=True, help="Skip the latency / throughput measurements.")
@click.option("--concurrency", default=1, show_default=True, type=int, help="Parallel requests for the throughput test.")
@click.option("--threads", default=None, type=int, help="CPU threads for llama.cpp / torch.")
@click.option("--device", default=None, help="Device for transformers (cpu, cuda).")
@click.option("--out", default="bench", show_default=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option("--force", is_flag=True, help="Replace an existing --out (its old report, plots and responses).")
def bench(models: tuple[str, ...], dataset: str | None, responses: tuple[str, ...], limit: int | None, max_tokens: int,
          runtime: str | None, seeds: int, greedy: bool, temperature: float, top_k: int, top_p: float,
          no_thinking: bool, question_field: str | None, answer_field: str | None, grader: str, compare: bool,
          baseline: str | None, reference: str | None, think_budget: int | None, loop_breaker: bool, loop_ngram: int,
          loop_repeats: int, hesitation_penalty: float, hesitation_words: str, no_speed: bool,
          concurrency: int, threads: int | None, device: str | None, out: str, force: bool) -> None:
    """Measure speed, accuracy and thinking-token length; write report.json, report.md and plots.

    \b
    Examples:
      rqat-deploy bench --model model-q2k.gguf --dataset ../shared/data/gsm8k_test.jsonl --limit 20
      rqat-deploy bench --model tiny-int2.gguf --dataset builtin --greedy --max-tokens 512
      rqat-deploy bench --model teacher/ --model ckpt-int2 --compare --dataset math500 --seeds 3
      rqat-deploy bench --model ckpt-int2 --model int2.gguf --reference teacher/ --dataset builtin --no-speed
      rqat-deploy bench --responses answers.jsonl --dataset ../shared/data/math500_test.jsonl --out graded
      rqat-deploy bench --model int2.gguf --dataset builtin --greedy --think-budget 64 --loop-breaker
    """
    import dataclasses

    from rqat_deploy.builtin.synth import resolve_spec
    from rqat_deploy.serve.bench import BenchConfig, run_bench

    cfg = BenchConfig(
        models=models, dataset=dataset, responses=responses or None, limit=limit, max_tokens=max_tokens,
        runtime=runtime, seeds=seeds, out_dir=out, baseline=baseline, reference=reference, compare=compare, greedy=greedy,
        temperature=temperature, top_k=top_k, top_p=top_p, enable_thinking=not no_thinking,
        question_field=question_field, answer_field=answer_field, grader=grader, think_budget=think_budget,
        loop_breaker=loop_breaker, loop_ngram=loop_ngram, loop_repeats=loop_repeats,
        hesitation_penalty=hesitation_penalty, hesitation_words=hesitation_words.split(","), speed=not no_speed,
        concurrency=concurrency, n_threads=threads, device=device, force=force,
    )
    report = run_bench(dataclasses.replace(cfg, dataset=resolve_spec(dataset, "eval")))  # checked before `builtin` is written
    click.echo((Path(out) / "report.md").read_text() if (Path(out) / "report.md").exists() else json.dumps(report, default=str)[:2000])
    click.echo(f"reports in {out}/ (report.json, report.md, plots)")
    if report.get("interrupted"):
        sys.exit(130)


@cli.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--verify", is_flag=True,
              help="Decode every tensor and check it (ranges, finite values; a GGUF file against the checksums stored "
                   "at export) instead of trusting the stored report.")
def inspect(path: str, as_json: bool, verify: bool) -> None:
    """Summarize a quantized checkpoint directory (or a GGUF file).

    \b
    Examples:
      rqat-deploy inspect ckpt-int2
      rqat-deploy inspect model.gguf --json
      rqat-deploy inspect model.gguf --verify
    """
    if Path(path).is_file():
        from rqat_deploy.exporters.gguf import format_inspect, inspect_gguf, verify_gguf

        info = inspect_gguf(path)
        if verify:
            info["verification"] = verify_gguf(path)
        click.echo(json.dumps(info, indent=2, default=str) if as_json else format_inspect(info))
        return
    from rqat_deploy.cli.inspect import inspect_checkpoint

    info = inspect_checkpoint(path, verify=verify)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            click.echo(f"{key}:")
            for row in value:
                click.echo("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
        else:
            click.echo(f"{key}: {value}")


@cli.command()
@config_option
@click.option("--out", default="quickstart", show_default=True, type=click.Path(file_okay=False),
              help="Output directory (checkpoints, GGUF files, bench report, table).")
@click.option("--bits", default=2, show_default=True, type=click.Choice(["2", "3"]), help="Student bit width.")
@click.option("--grid", default="kquant", show_default=True, type=click.Choice(["kquant", "q2_0"]),
              help="Students' grid: kquant (GGUF Q2_K / Q3_K, fast llama.cpp kernels) or q2_0 (GGUF Q2_0, 2.25 "
                   "bits/weight; scalar kernel on x86).")
@click.option("--per-level", default=25, show_default=True, type=int,
              help="Held-out problems per difficulty level (4 levels).")
@click.option("--max-tokens", default=512, show_default=True, type=int, help="Generation limit per answer.")
@click.option("--threads", default=None, type=int,
              help="CPU threads for training and llama.cpp (default: all cores for training, 1 for llama.cpp).")
@click.option("--calib-samples", default=None, type=int, help="Stage-1 calibration sequences (default 256).")
@click.option("--train-samples", default=None, type=int, help="Stage-2 training samples (default 2048).")
@click.option("--no-speed", is_flag=True, help="Skip the fixed-length decode-speed measurement.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--force", is_flag=True, help="Replace an existing --out.")
def quickstart(out: str, bits: str, grid: str, per_level: int, max_tokens: int, threads: int | None,
               calib_samples: int | None, train_samples: int | None, no_speed: bool, seed: int, force: bool) -> None:
    """Run the whole pipeline offline on the built-in tiny reasoner (~35 min on 2 CPU cores).

    Trains an RTN and an rqat (the flagship recipe) int2 student of the built-in teacher, writes
    them as exact 2-bit GGUF files (Q2_K; Q2_0 with --grid q2_0), quantizes the teacher with
    llama.cpp's own quantizer to the same type, runs all four models in llama.cpp on held-out
    problems and prints a table of bits per weight, accuracy, thinking tokens and decode speed.

    \b
    Examples:
      rqat-deploy quickstart
      rqat-deploy quickstart --grid q2_0 --out qs-q2_0       # llama.cpp's 2.25-bit Q2_0
      rqat-deploy quickstart --bits 3 --out qs3 --threads 2
      rqat-deploy quickstart --per-level 5 --calib-samples 32 --train-samples 128 --out smoke   # ~1 min
    """
    from rqat_deploy.cli.quickstart import QuickstartConfig, format_table, run_quickstart

    cfg = QuickstartConfig(out=out, bits=int(bits), grid=grid, per_level=per_level, max_tokens=max_tokens, threads=threads,
                           calib_samples=calib_samples, train_samples=train_samples, speed=not no_speed, seed=seed,
                           force=force)
    result = run_quickstart(cfg)
    click.echo("")
    click.echo(format_table(result))


def _terminate(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM handler: raise KeyboardInterrupt (a second SIGTERM then ends the process at once)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """Handle SIGTERM (what ``timeout``, job schedulers and torchrun send) like Ctrl-C.

    The signal becomes a KeyboardInterrupt in the main thread, so the paths Ctrl-C takes run: stage 2
    saves its state, bench writes the report of what finished, staged outputs remove their temporaries.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def main() -> None:
    """Console-script entry point."""
    install_signal_handlers()
    cli(prog_name="rqat-deploy")


if __name__ == "__main__":  # pragma: no cover
    main()
