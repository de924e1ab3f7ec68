"""``rqat-deploy train``: turn a full-precision causal LM into a quantized checkpoint.

:class:`TrainConfig` holds the resolved options; :func:`run_train` runs the recipe
(:mod:`rqat_deploy.train.recipes`): the initialisation (RTN, GPTQ, AWQ or stage 1), then stage 2.
``--loss`` replaces the stage-2 loss terms (``ce``, ``rr``, ``topk_kl``... :mod:`rqat_deploy.train.losses`);
the paper's ablation rows ``S``, ``R``, ``C``, ``C+S``, ``C+R`` are recipes.

Work in progress lives in ``<out>.work/``: stage 1 saves each finished block, the initialised
model is saved as a checkpoint, stage 2 saves its state every ``save_every`` steps and on Ctrl-C.
``--resume`` continues from there to the same result as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rqat_deploy import __version__
from rqat_deploy.errors import CheckpointError, ConfigError, OutputExistsError, did_you_mean, settings_diff
from rqat_deploy.files import atomic_write_json, check_no_overlap, check_output, output_lock, read_json
from rqat_deploy.quant.spec import QuantSpec
from rqat_deploy.train.recipes import RECIPE_TABLE, RECIPES, Recipe, option_defaults


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``rqat-deploy train`` needs; built by the CLI from defaults < ``--config`` < flags.

    Attributes:
        model: Hub id or local directory of the full-precision model; ``None`` = the built-in tiny
            reasoner (:func:`rqat_deploy.builtin.synth.default_model_dir`), whose default data is the
            built-in synthetic data (:func:`rqat_deploy.builtin.synth.default_data`).
        out: checkpoint directory to write.
        recipe: one of :data:`RECIPES`.
        quant: the quantization spec.
        calib: calibration SPEC (stage 1 / GPTQ / AWQ); ``None`` = the recipe's: the paper's 80/20
            mix, or math (NuminaMath-1.5) for ``gptq``, ``awq`` and ``reasoning-qat`` (the built-in
            data for the built-in model).
        calib_samples, calib_seq_len: calibration sequences and their length (paper 4,096 x 2,048;
            128 for ``gptq`` / ``awq`` / ``reasoning-qat``).
        train_data: stage-2 SPEC; ``None`` = the recipe's: reasoning traces (OpenThoughts3), or
            OpenR1-Math for ``reasoning-qat`` (built-in traces for the built-in model).
        train_samples: stage-2 samples (paper 32,768).
        train_seq_len: a cap on stage-2 sample length; ``None``: whole samples up to the model's
            context length (the paper trains whole traces).
        stage1_epochs: stage-1 epochs per block (paper 2).
        stage2_epochs, stage2_lr: ``None`` = the recipe's, else the paper's per-bit-width values.
        loss, alpha, beta: stage-2 loss terms override and weights (paper ``rr+topk_kl``, 0.2, 1.0).
        global_batch, micro_batch: stage-2 samples per optimizer step / per forward.
        max_steps: cap on stage-2 optimizer steps.
        Options left ``None`` in :data:`rqat_deploy.train.recipes.GLOBAL_DEFAULTS` take the recipe's
        value (:func:`rqat_deploy.train.recipes.option_defaults`; the built-in model's preset
        without ``model``) when the config is built.
        init_from: a quantized checkpoint (same spec) to start stage 2 (or GRPO) from instead of running
            the recipe's initialisation, e.g. one ``--recipe stage1`` result shared by several stage-2
            ablations; ``--recipe grpo`` requires it.
        grpo_steps, grpo_lr, grpo_batch, grpo_max_tokens: the GRPO stage's steps, peak learning rate,
            rollouts per step and rollout token budget (paper 250, 5e-7, 64, 32,768).
        grpo_trains: what GRPO trains: ``auto`` (the checkpoint's training form), ``weights``, ``scales``.
        length_penalty: weight of GRPO's length-aware reward (0: off; :mod:`rqat_deploy.train.rewards`).
        grpo_options: further :class:`~rqat_deploy.train.grpo.GRPOConfig` fields (library use; e.g.
            ``{"kl_beta": 0.01, "reward": {"format_weight": 0.2}}``).
        stage1_options, stage2_options: :class:`~rqat_deploy.train.stage1.Stage1Config` /
            :class:`~rqat_deploy.train.stage2.Stage2Config` fields set over the recipe's (library use
            and ``--config`` files; e.g. ``{"loss_space": "block"}``).
        teacher_cache: precompute teacher top-k log-probs on disk (frees the teacher for stage 2).
        work_dir: where resumable state lives (default ``<out>.work``).
        keep_work: keep the work directory after success.
        device, dtype, seed, force, resume, trust_remote_code, backend: as the CLI flags.
    """

    out: str
    model: str | None = None
    recipe: str = "rqat"
    quant: QuantSpec = field(default_factory=QuantSpec)
    calib: str | None = None
    calib_samples: int | None = None
    calib_seq_len: int | None = None
    train_data: str | None = None
    train_samples: int | None = None
    train_seq_len: int | None = None
    stage1_epochs: int = 2
    stage2_epochs: int | None = None
    stage2_lr: float | None = None
    loss: str | None = None
    alpha: float = 0.2
    beta: float = 1.0
    global_batch: int | None = None
    micro_batch: int = 1
    max_steps: int | None = None
    init_from: str | None = None
    stage1_options: dict[str, Any] = field(default_factory=dict)
    stage2_options: dict[str, Any] = field(default_factory=dict)
    grpo_steps: int | None = None
    grpo_lr: float | None = None
    grpo_batch: int | None = None
    grpo_max_tokens: int | None = None
    grpo_trains: str = "auto"
    length_penalty: float = 0.0
    grpo_options: dict[str, Any] = field(default_factory=dict)
    teacher_cache: bool = True
    work_dir: str | None = None
    keep_work: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    force: bool = False
    resume: bool = False
    trust_remote_code: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        """Check every value before any work (a bad flag is refused in a second, not after an hour).

        Raises:
            ConfigError: naming the flag.
        """
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}{did_you_mean(self.recipe, RECIPES)}; choose one of {RECIPES}")
        for name, value in option_defaults(self.recipe, builtin=self.model is None).items():
            if getattr(self, name) is None:  # left unset: the recipe's default (frozen: set once, here)
                object.__setattr__(self, name, value)
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("calib_samples", "calib_seq_len", "train_samples", "train_seq_len", "stage1_epochs", "global_batch",
                     "micro_batch", "stage2_epochs", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.stage2_lr is not None and not (math.isfinite(self.stage2_lr) and self.stage2_lr > 0):
            raise ConfigError(f"--stage2-lr must be a positive number, got {self.stage2_lr}")
        for name in ("alpha", "beta"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"--{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.init_from is not None and self.plan.loss is None and self.plan.grpo is None:
            raise ConfigError(f"--init-from starts stage 2 or GRPO, which recipe {self.recipe!r} does not have; use --recipe rqat "
                              "or --recipe grpo")
        if self.plan.init == "checkpoint" and self.init_from is None:
            raise ConfigError(f"--recipe {self.recipe} trains a quantized checkpoint: pass it with --init-from CKPT")
        if self.init_from is not None and self.plan.init in ("rtn",) and self.plan.paper_row:
            raise ConfigError(f"--recipe {self.recipe} starts from round-to-nearest by definition: drop --init-from")
        self.stage2_config()  # the stage-2 settings (loss terms, batch sizes) are checked now too
        self.grpo_config()

    def stage2_config(self) -> Any:
        """The :class:`rqat_deploy.train.stage2.Stage2Config` of this run, or None without a stage 2.

        Raises:
            ConfigError: an invalid stage-2 setting.
        """
        plan = self.plan
        if plan.loss is None:
            return None
        from rqat_deploy.train.stage2 import Stage2Config

        return Stage2Config(
            epochs=self.stage2_epochs, lr=self.stage2_lr, global_batch=self.global_batch, micro_batch=self.micro_batch,
            loss_terms=plan.loss, alpha=self.alpha, beta=self.beta, max_steps=self.max_steps, seed=self.seed,
            eval_samples=min(64, max(1, self.train_samples // 8)), **plan.stage2,
        )

    def grpo_config(self) -> Any:
        """The :class:`rqat_deploy.train.grpo.GRPOConfig` of this run, or None without a GRPO stage.

        Raises:
            ConfigError: an invalid GRPO setting.
        """
        plan = self.plan
        if plan.grpo is None:
            return None
        from rqat_deploy.train.grpo import GRPOConfig

        options = plan.grpo | self.grpo_options
        reward = {"length_weight": self.length_penalty} | dict(options.pop("reward", {}))
        return GRPOConfig(**({"steps": self.grpo_steps, "lr": self.grpo_lr, "global_batch": self.grpo_batch,
                              "max_new_tokens": self.grpo_max_tokens, "trains": self.grpo_trains, "seed": self.seed}
                             | options), reward=reward)

    def prompt_spec(self) -> str:
        """GRPO prompts: ``train_data`` (``builtin``: the built-in problems), else OpenR1-Math (built-in for the built-in model)."""
        from rqat_deploy.builtin.synth import resolve_spec
        from rqat_deploy.data.prompts import DEFAULT_RL_SPEC
        from rqat_deploy.data.spec import BUILTIN

        return resolve_spec(self.train_data, "train", BUILTIN if self.model is None else DEFAULT_RL_SPEC)

    def inputs(self) -> dict[str, str]:
        """The local directories this run reads, ``{path: what}``: outputs must lie outside them."""
        found = {self.model_path: "base model"}
        if self.init_from is not None:
            found[self.init_from] = "--init-from checkpoint"
        return {p: what for p, what in found.items() if os.path.isdir(p)}

    @property
    def plan(self) -> Recipe:
        """The recipe with ``--loss`` and the stage options applied."""
        r = RECIPE_TABLE[self.recipe]
        r = dataclasses.replace(r, stage1=r.stage1 | self.stage1_options, stage2=r.stage2 | self.stage2_options)
        if self.loss is not None:
            if r.loss is None:
                raise ConfigError(f"--loss applies to recipes with a stage 2; {self.recipe!r} has none")
            if r.paper_row:
                raise ConfigError(
                    f"--recipe {self.recipe} is the paper's ablation row as the paper ran it (loss {r.loss}): drop --loss, "
                    "or use --recipe rqat (or efficientqat) with --loss"
                )
            r = dataclasses.replace(r, loss=self.loss)
        return r

    @property
    def needs_work_dir(self) -> bool:
        """Whether the run keeps resumable state (everything but a plain RTN, which takes seconds)."""
        return self.plan.init != "rtn" or self.plan.loss is not None

    @property
    def model_path(self) -> str:
        """``model``, or the built-in tiny reasoner's directory."""
        if self.model is not None:
            return self.model
        from rqat_deploy.builtin.synth import default_model_dir

        return str(default_model_dir())

    def calib_spec(self) -> str:
        """``calib`` (``builtin``: the built-in 80/20 files), else the recipe's calibration data: the 80/20
        mix, or math problems (NuminaMath-1.5; the built-in traces for the built-in model)."""
        from rqat_deploy.builtin.synth import default_data, resolve_spec
        from rqat_deploy.data.calib import DEFAULT_CALIB_SPEC, MATH_CALIB_SPEC
        from rqat_deploy.data.spec import BUILTIN

        if self.calib is None and self.plan.calib_domain == "math":
            return default_data("train") if self.model is None else MATH_CALIB_SPEC
        return resolve_spec(self.calib, "calib", BUILTIN if self.model is None else DEFAULT_CALIB_SPEC)

    def train_spec(self) -> str:
        """``train_data`` (``builtin``: the built-in traces), else the recipe's traces: OpenThoughts3, or
        OpenR1-Math for ``reasoning-qat`` (built-in traces for the built-in model)."""
        from rqat_deploy.builtin.synth import resolve_spec
        from rqat_deploy.data.sft import DEFAULT_TRAIN_SPEC, MATH_TRAIN_SPEC
        from rqat_deploy.data.spec import BUILTIN

        hub = MATH_TRAIN_SPEC if self.plan.train_domain == "math" else DEFAULT_TRAIN_SPEC
        return resolve_spec(self.train_data, "train", BUILTIN if self.model is None else hub)

    @property
    def work_path(self) -> Path:
        """Directory of resumable state."""
        return Path(self.work_dir) if self.work_dir else Path(f"{os.path.normpath(self.out)}.work")

    def to_recipe(self) -> dict[str, Any]:
        """The full resolved recipe recorded in ``rqat_quant.json``."""
        d = dataclasses.asdict(self)
        for transient in ("force", "out", "resume", "work_dir", "keep_work"):
            d.pop(transient)
        d["quant"] = self.quant.to_dict()
        d["name"] = d.pop("recipe")
        d["plan"] = dataclasses.asdict(self.plan)
        if self.plan.grpo is not None:
            d["grpo"] = self.grpo_config().to_dict()
        d["rqat_deploy_version"] = __version__
        return d


def _check_resume(cfg: TrainConfig) -> None:
    """Create the work dir, or check on ``--resume`` that it belongs to the same run."""
    work, stamp = cfg.work_path, cfg.work_path / "run.json"
    recipe = json.loads(json.dumps(cfg.to_recipe(), default=list))
    if stamp.exists():
        if not cfg.resume:
            raise OutputExistsError(
                f"{work} holds an interrupted run: pass --resume to continue it, or remove the directory to start over"
            )
        old = read_json(stamp, error=CheckpointError)
        diff = settings_diff(old, recipe)
        if diff:
            raise ConfigError(
                f"--resume with different settings than the interrupted run in {work}: {diff}; resume with the same "
                "flags, or remove the work directory to start over"
            )
        return
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, recipe)


def run_train(cfg: TrainConfig, *, progress: bool = True) -> Path:
    """Run the recipe in ``cfg`` and write the checkpoint.

    Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE > 1``) one process runs per device: rank 0
    alone initialises (stage 1 / GPTQ / RTN), builds the teacher cache and writes every file, the
    others wait and then load its results; stage 2 trains data-parallel on all of them
    (:mod:`rqat_deploy.train.stage2`).

    Args:
        cfg: the resolved training configuration.
        progress: show progress bars.

    Returns:
        The checkpoint directory.

    Raises:
        OutputExistsError: ``cfg.out`` exists and ``cfg.force`` is false.
        OutputError: ``cfg.out`` or the work directory overlaps the model, is locked by another run,
            or cannot be written (all checked before any work).
        ConfigError: a CUDA device that is not there, or a ``--resume`` with other settings.
        ModelLoadError: the model cannot be loaded.
        DataError: calibration or training data cannot be built.
        NonFiniteError / DivergenceError: stage 2 diverged (the last good state stays in the work directory).
    """
    from rqat_deploy.models import check_device
    from rqat_deploy.train import distributed as dist_utils

    check_device(cfg.device)
    inputs = cfg.inputs()
    check_no_overlap(cfg.out, inputs)
    check_no_overlap(cfg.work_path, {**inputs, cfg.out: "--out directory"})
    check_output(cfg.out, cfg.force)
    opened = dist_utils.init_distributed(cfg.device)
    try:
        dist_utils.barrier()  # every rank has checked --out before rank 0 may write it
        with _locked(cfg, dist_utils.is_main()):
            return _run_train(cfg, progress=progress and dist_utils.is_main())
    finally:
        if opened:
            dist_utils.destroy_distributed()


@contextlib.contextmanager
def _locked(cfg: TrainConfig, main: bool) -> Iterator[None]:
    """Rank 0 holds the locks of ``--out`` and of the work directory for the whole run: a second run
    on either is refused at once (and an unwritable ``--out`` is found before any training)."""
    if not main:
        yield
        return
    with output_lock(cfg.out), output_lock(cfg.work_path):
        yield


def _run_train(cfg: TrainConfig, *, progress: bool) -> Path:
    import torch

    from rqat_deploy.train import distributed as dist_utils
    from rqat_deploy.quant.checkpoint import save_checkpoint
    from rqat_deploy.models import load_hf_model
    from rqat_deploy.quant.surgery import prepare_model

    out, plan = Path(cfg.out), cfg.plan  # --out was checked by run_train
    if cfg.needs_work_dir and dist_utils.is_main():
        _check_resume(cfg)  # before loading anything: a mismatched --resume is refused at once
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model_path = cfg.model_path
    try:
        model, tok = load_hf_model(model_path, dtype=cfg.dtype, device=cfg.device,
                                   trust_remote_code=cfg.trust_remote_code)
    except BaseException:
        _drop_empty_work(cfg)
        raise
    base = model_path if not os.path.isdir(model_path) else os.path.basename(os.path.normpath(model_path))
    reports: dict[str, Any] = {}
    if not cfg.needs_work_dir:  # plain RTN: quantize the model itself
        prepare_model(model, cfg.quant, backend=cfg.backend, progress=progress)
        student = model
    else:
        try:
            student = _initialise(cfg, model, tok, reports, progress=progress)
            if plan.loss is not None:
                reports["stage2"] = _stage2(cfg, student, model, tok, reports, progress=progress)
            if plan.grpo is not None:
                reports["grpo"] = grpo_stage(cfg, student, model, tok, reports, progress=progress)
        except BaseException:
            _drop_empty_work(cfg)
            raise
    recipe = cfg.to_recipe() | {"reports": reports, "seconds": round(time.perf_counter() - t0, 3)}
    if getattr(model.config, "rqat_teacher_version", None):  # the built-in teacher names its version
        recipe["teacher_version"] = model.config.rqat_teacher_version
    trained = _trained_form(student, reports, plan)
    if trained is not None:  # the training form, which a later GRPO run follows (rqat_deploy.train.grpo.recorded_form)
        recipe["trains"] = trained
    if not dist_utils.is_main():
        return out
    path = save_checkpoint(student, out, tokenizer=tok, base_model=base, recipe=recipe, force=cfg.force)
    if cfg.needs_work_dir and not cfg.keep_work:
        shutil.rmtree(cfg.work_path, ignore_errors=True)
    return path


def _trained_form(student: Any, reports: dict[str, Any], plan: Recipe) -> str | None:
    """What the run's last training stage trained: ``weights`` (latent, the student still holds them)
    or ``scales``; None when nothing trained end to end (RTN, GPTQ, stage 1 alone)."""
    from rqat_deploy.quant.surgery import quant_linears

    if "grpo" in reports:
        return reports["grpo"]["trains"]
    if plan.loss is None:
        return None
    return "weights" if any(m.form == "stage1" for _, m in quant_linears(student)) else "scales"


def _drop_empty_work(cfg: TrainConfig) -> None:
    """Remove a work directory that holds nothing worth resuming (only the run stamp)."""
    from rqat_deploy.train import distributed as dist_utils

    work = cfg.work_path
    if dist_utils.is_main() and work.is_dir() and [p.name for p in work.iterdir()] == ["run.json"]:
        shutil.rmtree(work)


def _check_init_from(cfg: TrainConfig, meta: Any) -> None:
    """``--init-from``'s checkpoint must hold the plan's spec, and for the paper's rows its initialisation.

    Raises:
        ConfigError: another grid, bits or group size; or, for a paper row (``C+S``, ``C+R``), a checkpoint
            not initialised as the row is (stage 1 in the paper's form).
    """
    if meta.spec.grid_def != cfg.quant.grid_def:  # same grid, bits and group size
        raise ConfigError(
            f"--init-from {cfg.init_from} holds {meta.bits}-bit {meta.grid} weights (group {meta.group_size}), "
            f"not {cfg.quant.bits}-bit {cfg.quant.grid} (group {cfg.quant.group_size}); "
            "pass the checkpoint's --bits/--grid/--group-size"
        )
    plan = cfg.plan
    if not plan.paper_row:
        return
    recorded = meta.recipe.get("plan") or {}
    same = recorded.get("init") == plan.init and recorded.get("loss") is None and all(
        (recorded.get("stage1") or {}).get(k) == v for k, v in plan.stage1.items()
    )
    if not same:
        raise ConfigError(
            f"--recipe {cfg.recipe} starts from stage 1 in the paper's form, but --init-from {cfg.init_from} was made by "
            f"recipe {meta.recipe.get('name')!r}; initialise with --recipe C (same --bits/--seed) and pass that"
        )


def _initialise(cfg: TrainConfig, teacher: Any, tok: Any, reports: dict[str, Any], *, progress: bool) -> Any:
    """RTN, GPTQ, AWQ or stage 1 on a copy of ``teacher``; the result is saved in the work dir for resume."""
    from rqat_deploy.train import distributed as dist_utils
    from rqat_deploy.quant.checkpoint import load_model, read_checkpoint
    from rqat_deploy.data.calib import build_calibration

    init_ckpt = cfg.work_path / "init"
    if cfg.init_from is not None:  # a finished initialisation to share between stage-2 runs
        meta = read_checkpoint(cfg.init_from).meta
        _check_init_from(cfg, meta)
        reports["init_from"] = {"path": os.path.abspath(cfg.init_from), "recipe": meta.recipe.get("name"),
                                "trains": meta.recipe.get("trains")}
        dtype = next(teacher.parameters()).dtype
        return load_model(cfg.init_from, dtype=dtype, device=cfg.device, form="stage2", backend=cfg.backend)[0]

    def reload() -> Any:  # the stage-2 form from the saved checkpoint: identical whether resumed or not
        dtype = next(teacher.parameters()).dtype
        return load_model(init_ckpt, dtype=dtype, device=cfg.device, form="stage2", backend=cfg.backend)[0]

    if not dist_utils.is_main():  # torchrun: rank 0 initialises and saves, the others load its result
        dist_utils.wait_for_main()
        reports.update(read_json(cfg.work_path / "init_reports.json", error=CheckpointError))
        return reload()
    if cfg.resume and (init_ckpt / "rqat_quant.json").exists():
        reports.update(read_json(cfg.work_path / "init_reports.json", error=CheckpointError))
        dist_utils.wait_for_main()
        return reload()
    student = copy.deepcopy(teacher)
    if cfg.plan.init == "rtn":  # the paper's S and R rows: no calibration
        from rqat_deploy.quant.surgery import prepare_model

        reports["rtn"] = {"modules": prepare_model(student, cfg.quant, backend=cfg.backend, progress=progress)}
        return _save_init(cfg, student, tok, reports, reload)
    calib = build_calibration(tok, cfg.calib_spec(), cfg.calib_samples, cfg.calib_seq_len, cfg.seed)
    reports["calibration"] = calib.report
    if cfg.plan.init == "gptq":
        from rqat_deploy.train.gptq import run_gptq

        rep = run_gptq(student, cfg.quant, calib.input_ids, device=cfg.device, work_dir=cfg.work_path / "gptq",
                       progress=progress, backend=cfg.backend)
    elif cfg.plan.init == "awq":
        from rqat_deploy.train.awq import run_awq

        rep = run_awq(student, cfg.quant, calib.input_ids, device=cfg.device, progress=progress, backend=cfg.backend)
    else:
        from rqat_deploy.train.stage1 import Stage1Config, run_stage1

        s1 = Stage1Config(epochs=cfg.stage1_epochs, seed=cfg.seed, val_samples=min(64, max(1, cfg.calib_samples // 8)),
                          **cfg.plan.stage1)
        rep = run_stage1(student, cfg.quant, calib.input_ids, s1, work_dir=cfg.work_path / "stage1", device=cfg.device,
                         progress=progress, resume=cfg.resume, backend=cfg.backend)
        if cfg.plan.gptq_guard:
            student, reports["gptq_guard"] = _gptq_guard(cfg, teacher, student, calib.input_ids, s1.val_samples,
                                                         progress=progress)
    reports[cfg.plan.init] = _jsonable(rep)
    return _save_init(cfg, student, tok, reports, reload)


def _save_init(cfg: TrainConfig, student: Any, tok: Any, reports: dict[str, Any], reload: Any) -> Any:
    """Save the initialised ``student`` and its reports in the work directory (rank 0), release the
    other ranks, and return ``reload()``: the same model whether this run resumes or not."""
    from rqat_deploy.quant.checkpoint import save_checkpoint
    from rqat_deploy.train import distributed as dist_utils

    save_checkpoint(student, cfg.work_path / "init", tokenizer=tok, force=True)
    (cfg.work_path / "init_reports.json").write_text(json.dumps(reports, default=str))
    dist_utils.wait_for_main()
    return reload()


def _gptq_guard(
    cfg: TrainConfig, teacher: Any, student: Any, ids: Any, n_val: int, *, progress: bool
) -> tuple[Any, dict[str, Any]]:
    """Plain GPTQ beside the stage-1 result; the one closer to the teacher on the held-out sequences.

    Returns:
        ``(the kept model, {"stage1_kl", "gptq_kl", "kept"})``: KL is the mean next-token
        ``KL(teacher || model)`` over the last ``n_val`` calibration sequences (stage 1's held-out ones).
    """
    from rqat_deploy.train.compare import model_kl
    from rqat_deploy.train.gptq import run_gptq

    gptq = copy.deepcopy(teacher)
    run_gptq(gptq, cfg.quant, ids, device=cfg.device, work_dir=cfg.work_path / "gptq", progress=progress,
             backend=cfg.backend, compare_rtn=False)
    held_out = ids[len(ids) - n_val:]
    kl = {"stage1_kl": model_kl(teacher, student, held_out), "gptq_kl": model_kl(teacher, gptq, held_out)}
    kept = "gptq" if kl["gptq_kl"] < kl["stage1_kl"] else "stage1"
    return (gptq if kept == "gptq" else student), kl | {"kept": kept}


def _stage2(cfg: TrainConfig, student: Any, teacher: Any, tok: Any, reports: dict[str, Any], *, progress: bool) -> dict[str, Any]:
    """End-to-end training of ``student`` against ``teacher`` (scales or latent weights, the plan's form).

    Samples are whole up to the model's context length, or cut at ``--train-seq-len`` / the recipe's
    cap; the report counts the samples cut and the tokens dropped.
    """
    from rqat_deploy.train import distributed as dist_utils
    from rqat_deploy.data.sft import build_sft
    from rqat_deploy.train.stage2 import run_stage2
    from rqat_deploy.train.teacher import CachedTeacher, LiveTeacher

    plan = cfg.plan
    s2 = cfg.stage2_config()
    caps = [c for c in (cfg.train_seq_len, plan.train_seq_len) if c is not None]
    seq_len = min([context_length(teacher), *caps])
    data = build_sft(tok, cfg.train_spec(), cfg.train_samples, seq_len, cfg.seed)
    reports["train_data"] = data.report
    if cfg.teacher_cache and not s2.loss_config().needs_full_teacher:
        cache = cfg.work_path / "teacher_cache"
        if dist_utils.is_main():  # torchrun: rank 0 builds the cache, the others open it
            CachedTeacher.build(teacher, data, cache, progress=progress)
        dist_utils.wait_for_main()
        teacher_src: Any = CachedTeacher(cache)
    else:
        teacher_src = LiveTeacher(teacher)
    rep = run_stage2(student, data, teacher_src, s2, state_dir=cfg.work_path / "stage2", resume=cfg.resume, progress=progress)
    cut = {k: data.report[k] for k in ("seq_len", "truncated", "truncated_tokens")}
    return _jsonable(rep) | {"data": cut}


def context_length(model: Any) -> int:
    """The longest sequence ``model`` was built for (``config.max_position_embeddings``).

    Raises:
        ConfigError: the config does not say; pass ``--train-seq-len``.
    """
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(
            f"{type(model).__name__}'s config has no max_position_embeddings: pass --train-seq-len to bound stage-2 samples"
        )
    return n


def grpo_stage(cfg: TrainConfig, student: Any, teacher: Any, tok: Any, reports: dict[str, Any], *, progress: bool) -> dict[str, Any]:
    """The GRPO stage on ``student``: the third step of Reasoning-QAT and the whole of ``--recipe grpo``.

    :func:`run_train` calls it after stage 2 for every recipe whose ``grpo`` is set. What trains
    follows the student's training form (``cfg.grpo_trains``, default ``auto``): a student still
    holding latent weights (QuantLinear's stage-1 form, e.g. after KD on latent weights) trains its
    weights through STE; a stage-2 student trains the weights only if ``reports["init_from"]``
    records ``"trains": "weights"``, else its scales. Prompts come from
    :meth:`TrainConfig.prompt_spec`, as many as the run takes (at most ``train_samples``), at most
    ``train_seq_len`` tokens each (the model's context length when unset); the state lives in ``<work>/grpo`` (``--resume``).

    Args:
        cfg: the run's configuration (:meth:`TrainConfig.grpo_config` gives the GRPO settings).
        student: the quantized model, either form; trained in place.
        teacher: the full-precision model (the length-aware reward's and ``kl_reference="teacher"``'s).
        tok: the tokenizer.
        reports: the run's reports so far (``grpo_prompts`` is added).
        progress: show the progress bar.

    Returns:
        The :class:`~rqat_deploy.train.grpo.GRPOReport` as a JSON-ready dict.
    """
    from rqat_deploy.data.prompts import build_prompts
    from rqat_deploy.train.grpo import run_grpo

    g = cfg.grpo_config()
    n = min(cfg.train_samples, g.steps * g.prompts_per_step)
    limit = cfg.train_seq_len or context_length(student)
    prompts = build_prompts(tok, cfg.prompt_spec(), n, cfg.seed, max_prompt_tokens=limit)
    reports["grpo_prompts"] = prompts.report
    rep = run_grpo(student, tok, prompts, g, teacher=teacher, init_recipe=reports.get("init_from"),
                   state_dir=cfg.work_path / "grpo", resume=cfg.resume, progress=progress)
    return _jsonable(rep)


def _jsonable(report: Any) -> dict[str, Any]:
    d = report.to_dict() if hasattr(report, "to_dict") else dataclasses.asdict(report)
    return json.loads(json.dumps(d, default=str))


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
