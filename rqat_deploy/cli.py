"""The ``rqat-deploy`` command line.

Commands parse their options, build a config, and call one library function. torch and
transformers are imported inside the commands so ``rqat-deploy --help`` stays instant.
Option values come from: defaults < ``--config FILE`` (JSON, TOML or YAML) < flags.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable

import click

from rqat_deploy import __version__
from rqat_deploy.errors import RqatError

_ERRORS: tuple[type[BaseException], ...] = (RqatError,)


def _load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Eager ``--config`` callback: the file's keys become the command's defaults."""
    if not value:
        return value
    path = Path(value)
    if not path.exists():
        raise click.BadParameter(f"config file {value!r} does not exist", param_hint="--config")
    text = path.read_text()
    try:
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
        from rqat_deploy.spec import did_you_mean

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


class _Group(click.Group):
    """Prints rqat-deploy's own errors as one clean line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _ERRORS as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rqat-deploy")
def cli() -> None:
    """Train, export and benchmark ultra-low-bit (2/3-bit) reasoning LLMs.

    \b
    Examples:
      rqat-deploy train --model Qwen/Qwen3-1.7B --recipe rtn --bits 2 --out ckpt-int2
      rqat-deploy inspect ckpt-int2
      rqat-deploy export ckpt-int2 --format gguf --out model-int2.gguf
    """


@cli.command()
@config_option
@click.option("--model", required=True, help="Hub id or local directory of the full-precision model.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
@click.option("--recipe", default="rqat", show_default=True,
              type=click.Choice(["rqat", "rqat-released", "rtn", "gptq", "efficientqat", "reasoning-qat"]),
              help="Quantization recipe (this version implements rtn).")
@click.option("--bits", default=2, show_default=True, type=click.Choice(["2", "3", "4"]), help="Weight bit width.")
@click.option("--grid", default="uniform", show_default=True, type=click.Choice(["uniform", "kquant"]),
              help="uniform: asymmetric per-group (GPTQ / compressed-tensors exact); kquant: llama.cpp Q2_K/Q3_K (GGUF exact).")
@click.option("--group-size", default=128, show_default=True, type=int, help="Uniform-grid group size.")
@click.option("--exclude", multiple=True, help="Module-name pattern to keep in floating point (repeatable).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="dtype to load the model in.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "triton", "reference"]),
              help="Fake-quant kernels: Triton on CUDA, the PyTorch reference elsewhere (auto).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--trust-remote-code", is_flag=True, help="Allow the model repository's own Python code.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
def train(**kw: Any) -> None:
    """Quantize a model and write a quantized checkpoint.

    \b
    Examples:
      rqat-deploy train --model ./my-model --recipe rtn --bits 2 --grid kquant --out ckpt
      rqat-deploy train --model Qwen/Qwen3-1.7B --recipe rtn --bits 3 --group-size 64 --out ckpt3
      rqat-deploy train --config run.toml --bits 3      # flags override the file
    """
    from rqat_deploy.spec import QuantSpec
    from rqat_deploy.train import TrainConfig, run_train

    spec = QuantSpec(bits=int(kw["bits"]), grid=kw["grid"], group_size=kw["group_size"], exclude=tuple(kw["exclude"]))
    cfg = TrainConfig(
        model=kw["model"], out=kw["out"], recipe=kw["recipe"], quant=spec, device=kw["device"], dtype=kw["dtype"],
        seed=kw["seed"], force=kw["force"], trust_remote_code=kw["trust_remote_code"], backend=kw["backend"],
    )
    out = run_train(cfg)
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(path: str, as_json: bool) -> None:
    """Summarize a quantized checkpoint directory (or a GGUF file).

    \b
    Examples:
      rqat-deploy inspect ckpt-int2
      rqat-deploy inspect model.gguf --json
    """
    if path.endswith(".gguf"):
        from rqat_deploy.exporters.gguf import inspect_gguf

        info = inspect_gguf(path)
    else:
        from rqat_deploy.summary import inspect_checkpoint

        info = inspect_checkpoint(path)
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


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="rqat-deploy")


if __name__ == "__main__":  # pragma: no cover
    main()
