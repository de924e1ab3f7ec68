"""``rqat-deploy train``: turn a full-precision causal LM into a quantized checkpoint.

The recipes are named in DESIGN.md 9. This version implements ``rtn`` (round-to-nearest in either
grid: min-max for uniform, the k-quant search for kquant); the training recipes arrive with the
training core.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rqat_deploy import __version__
from rqat_deploy.errors import ConfigError
from rqat_deploy.spec import QuantSpec, did_you_mean

RECIPES = ("rqat", "rqat-released", "rtn", "gptq", "efficientqat", "reasoning-qat")
IMPLEMENTED_RECIPES = ("rtn",)


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``rqat-deploy train`` needs; built by the CLI from defaults < ``--config`` < flags.

    Attributes:
        model: Hub id or local directory of the full-precision model.
        out: checkpoint directory to write.
        recipe: one of :data:`RECIPES`.
        quant: the quantization spec.
        device: ``cpu`` or ``cuda``.
        dtype: dtype the model is loaded in.
        seed: random seed.
        force: overwrite ``out``.
        trust_remote_code: allow the model repository's own code.
        backend: kernel backend (``auto`` | ``triton`` | ``reference``).
    """

    model: str
    out: str
    recipe: str = "rqat"
    quant: QuantSpec = field(default_factory=QuantSpec)
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    force: bool = False
    trust_remote_code: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}{did_you_mean(self.recipe, RECIPES)}; choose one of {RECIPES}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    def to_recipe(self) -> dict[str, Any]:
        """The full resolved recipe recorded in ``rqat_quant.json``."""
        d = dataclasses.asdict(self)
        d["quant"] = self.quant.to_dict()
        d.pop("force")
        d.pop("out")
        d["name"] = d.pop("recipe")
        d["rqat_deploy_version"] = __version__
        return d


def run_train(cfg: TrainConfig, *, progress: bool = True) -> Path:
    """Run the recipe in ``cfg`` and write the checkpoint.

    Args:
        cfg: the resolved training configuration.
        progress: show progress bars.

    Returns:
        The checkpoint directory.

    Raises:
        ConfigError: a recipe this version does not implement yet.
        OutputExistsError: ``cfg.out`` exists and ``cfg.force`` is false.
        ModelLoadError: the model cannot be loaded.
    """
    if cfg.recipe not in IMPLEMENTED_RECIPES:
        raise ConfigError(
            f"recipe {cfg.recipe!r} is not implemented in rqat-deploy {__version__} yet; "
            f"available now: {IMPLEMENTED_RECIPES} (use --recipe rtn)"
        )
    return _train_rtn(cfg, progress=progress)


def _train_rtn(cfg: TrainConfig, *, progress: bool) -> Path:
    import torch

    from rqat_deploy.checkpoint import prepare_output_dir, save_checkpoint
    from rqat_deploy.models import load_hf_model
    from rqat_deploy.surgery import prepare_model

    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        prepare_output_dir(out, cfg.force)  # raises OutputExistsError before any expensive work
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model, tok = load_hf_model(cfg.model, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    prepare_model(model, cfg.quant, backend=cfg.backend, progress=progress)
    recipe = cfg.to_recipe() | {"stages": [], "seconds": round(time.perf_counter() - t0, 3)}
    base = cfg.model if not os.path.isdir(cfg.model) else os.path.basename(os.path.normpath(cfg.model))
    return save_checkpoint(model, out, tokenizer=tok, base_model=base, recipe=recipe, force=cfg.force)


def quantize_rtn(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    bits: int = 2,
    grid: str = "uniform",
    group_size: int = 128,
    exclude: tuple[str, ...] = (),
    force: bool = False,
) -> Path:
    """Round-to-nearest quantized checkpoint of a model (library shortcut of ``train --recipe rtn``).

    Args:
        model_dir: Hub id or local directory of the model.
        out_dir: checkpoint directory to write.
        bits, grid, group_size, exclude: the :class:`QuantSpec` fields.
        force: overwrite ``out_dir``.

    Returns:
        The checkpoint directory.
    """
    spec = QuantSpec(bits=bits, grid=grid, group_size=group_size, exclude=tuple(exclude))
    cfg = TrainConfig(model=str(model_dir), out=str(out_dir), recipe="rtn", quant=spec, force=force)
    return run_train(cfg, progress=False)
