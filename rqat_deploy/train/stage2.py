"""Stage 2: end-to-end training of a quantized student against the full-precision teacher.

What trains is the student's *training form* (:func:`rqat_deploy.quant.surgery.select_trainable`,
``train_form``): ``scales`` (the paper's stage 2: QuantLinear with frozen integer codes; only the
quantization scales train, uniform ``scale``, Q2_K ``d``, ``dmin``, Q3_K ``d``, optionally the integer
k-quant sub-scales through straight-through rounding) or ``weights`` (Reasoning-QAT's KD and the
released code of the paper: the latent float weights train through the straight-through estimator,
the grid parameters stay, and the checkpoint's codes are re-derived from the trained weights when it
is written), plus any parameter named in ``extra_trainable``. The student may come in either form.

One optimizer *step* consumes a global batch of ``global_batch`` samples (paper: 64), split into
micro-batches of ``micro_batch`` samples whose gradients accumulate; every loss term is divided by
the completion-token count of the whole global batch, so the accumulated gradient is the global
per-token mean whatever the micro-batch size. Samples are whole traces of very different lengths:
a step's samples (a rank's share of them under DDP) are sorted by length, longest first, before
they are cut into micro-batches, so a micro-batch pads its samples to a similar length (length
buckets within the global batch; the batch itself, its normalisation and its order of steps do not
change). AdamW, linear warm-up then cosine (or linear) decay
(:func:`rqat_deploy.train.schedule.lr_at`), gradient-norm clipping. :class:`Stage2Trainer` is the run
(setup and resume, one :meth:`~Stage2Trainer.step`, snapshots, evaluation); :func:`run_stage2` starts it.

Long runs: ``state_dir`` receives ``stage2_state.pt`` every ``save_every`` steps, at the end and on
Ctrl-C (trainable parameters, optimizer, scheduler, RNG states, step = data position, the
held-out metrics before training); ``resume=True`` continues from it to the same result, bit for
bit, as an uninterrupted run (the data order of each epoch is a fixed function of ``seed`` and the
epoch). A non-finite loss, gradient or scale stops the run with :class:`NonFiniteError` naming the
step and module; the state on disk stays the last good one. Metrics go to a JSONL file (and to
TensorBoard when installed).

Multi-GPU (data parallel, PyTorch's own engine): launch one process per device with ``torchrun``::

    torchrun --nproc_per_node 8 --no-python rqat-deploy train --model Qwen/Qwen3-8B --bits 2 --device cuda --out q8b-int2
    torchrun --nproc_per_node 8 --no-python rqat-deploy train ... --resume     # after an interruption

(``torchrun -m rqat_deploy.cli`` works too; pass ``--device cuda``, never
``cuda:N``: each process uses ``cuda:LOCAL_RANK``). :func:`rqat_deploy.train.run.run_train` opens the
process group (:func:`rqat_deploy.train.distributed.init_distributed`: ``nccl`` on CUDA, ``gloo`` on
CPU) and :func:`run_stage2` notices it by itself. What is distributed:

* stage 2 only. The student is wrapped in :class:`torch.nn.parallel.DistributedDataParallel`,
  which all-reduces the gradients of the trainable scales only (frozen parameters and buffers,
  the integer codes included, are neither broadcast nor synchronised). Every optimizer step's
  global batch (the same ``global_batch`` samples in the same order as a single process) is cut
  into contiguous, disjoint per-rank shards (each sorted by length on its rank); each rank accumulates
  over its own micro-batches and
  the all-reduce runs once, on its last micro-batch. Every loss term is divided by the global
  batch's completion-token count (each rank holds the whole data set, so it knows that count; the
  ranks' token counts are all-reduced with the step's metrics and checked against it), and each
  rank's loss is multiplied by the world size to undo DDP's averaging: the gradient is the single
  process's, up to float rounding. A rank whose shard is empty (a short last batch) joins the
  all-reduce with a zero-weighted micro-batch. The clipped gradients, the AdamW step and the
  schedule are then identical on every rank, so the scales stay equal without further traffic.
  The held-out evaluation is sharded the same way and its sums all-reduced.
* not stage 1, GPTQ or RTN, nor the teacher cache: rank 0 runs them on its own device (stage 1 stays
  single-device per process) while the other ranks wait, then every rank loads rank 0's
  result. The teacher (live or cached) serves each rank's own samples.

Only rank 0 writes the state, the metrics, TensorBoard and progress bars; on ``resume`` every rank
reads the same ``stage2_state.pt`` (so ``state_dir`` must be visible to all ranks: one node, or a
shared filesystem), and the ranks check that they hold the same data, resume point and trainable
tensors before training. A non-finite loss on any rank stops every rank with the same message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from rqat_deploy.train import distributed as dist_utils
from rqat_deploy.data.sft import SFTSet
from rqat_deploy.errors import CheckpointError, ConfigError, DivergenceError, NonFiniteError, RqatError, settings_diff
from rqat_deploy.files import staged_file
from rqat_deploy.train.losses import LossConfig, TeacherTargets, chunked_loss, token_metrics
from rqat_deploy.quant.reference import FP16_MAX
from rqat_deploy.quant.surgery import TRAIN_FORMS, quant_linears, select_trainable
from rqat_deploy.train.precision import autocast
from rqat_deploy.train.schedule import SHAPES, lr_at
from rqat_deploy.train.teacher import Teacher, decoder_and_head

STATE_FILE = "stage2_state.pt"
METRICS_FILE = "stage2_metrics.jsonl"
#: config fields that may change between an interrupted run and its resumption
_RESUME_FREE = ("save_every", "log_every", "tensorboard", "log_path", "divergence_factor")
#: losses below this count as this much when testing for divergence (a near-zero start is no yardstick)
_LOSS_FLOOR = 1e-2
_SMALL_MODEL_PARAMS = 3e9  # "1.7B" vs "larger models" in the paper's learning rates


@dataclass(frozen=True)
class Stage2Config:
    """Stage-2 hyperparameters; defaults are the paper's (DESIGN.md 5).

    Attributes:
        epochs: passes over the training samples; ``None`` = paper default (3 for 2-bit models up
            to ~2B parameters, else 1).
        lr: peak learning rate; ``None`` = paper default: 1e-6 at 3 (and 4) bits, 5e-6 at 2 bits for
            models up to ~2B parameters, 1e-4 at 2 bits for larger ones.
        global_batch: samples per optimizer step (paper 64).
        micro_batch: samples per forward/backward (gradient accumulation over global/micro).
        loss_terms: loss term names or preset (:mod:`rqat_deploy.train.losses`; paper ``rr+topk_kl``).
        alpha: weight of CE-type terms (paper 0.2).
        beta: weight of divergence terms (paper 1.0).
        top_k: teacher top-k (paper 20).
        train_form: what trains (:data:`rqat_deploy.quant.surgery.TRAIN_FORMS`): ``scales`` (the
            paper) or ``weights`` (latent weights through the straight-through estimator).
        loss_chunk: completion tokens per logits chunk.
        schedule: ``cosine`` (paper), ``linear`` (released code) or ``constant`` after warm-up.
        warmup_ratio: fraction of steps of linear warm-up (the paper gives none; 3 %).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        weight_decay: AdamW weight decay (0: scales are not decayed).
        betas, eps: AdamW moments.
        max_grad_norm: gradient-norm clipping threshold; ``None`` disables clipping.
        train_sub_scales: k-quant grid: also train the integer sub-scales (straight-through).
        extra_trainable: ``fnmatch`` patterns of further parameter names to train (e.g.
            ``"*norm*"``, ``"lm_head.weight"``: the released code's variant).
        eval_samples: samples held out from the end of the data for the before/after KL.
        max_steps: stop after this many steps (the schedule spans the capped run).
        save_every: steps between states written to ``state_dir`` (0: only at the end / Ctrl-C).
        log_every: steps between metric lines.
        seed: data-order and RNG seed.
        autocast_dtype: ``"bfloat16"``/``"float16"`` autocast on CUDA, ``None`` for none.
        gradient_checkpointing: recompute decoder-block activations in the backward (Hugging Face
            gradient checkpointing, non-reentrant): far less activation memory for long sequences,
            same result.
        tensorboard: also log to TensorBoard when it is installed and a log directory exists.
        log_path: JSONL metrics file; default ``state_dir/stage2_metrics.jsonl`` (none without a state dir).
        relative_lr: scale each quantization parameter's learning rate by its grid's ratio
            (:meth:`~rqat_deploy.quant.grids.GridQuantizer.scale_lr_ratios`: the k-quants' ``d`` /
            ``dmin`` multiply integer sub-scales of ~10, so the same absolute AdamW step moves the
            effective scales ~10x further, relatively, than the uniform grid's ``scale``).
        keep_better: if training raised the held-out KL, end with the initial trainable tensors
            (the report says so), so stage 2 never leaves the model farther from the teacher on
            held-out data than it started.
        lr_search: multipliers of ``lr`` to probe before training (e.g. ``(1, 1/3, 1/10, 1/30)``): each
            runs the first ``lr_search_fraction`` of the steps from the initial state and is scored by
            the held-out KL; the run then trains with the best. How far a grid's initialisation sits
            from the stage-2 optimum (crude min-max uniform scales vs searched k-quant / GPTQ ones)
            decides the right rate more than the grid's parametrisation does.
        lr_search_fraction: the share of the run's steps each probe takes (at least 2 steps).
        divergence_factor: stop the run (:class:`DivergenceError`) when a step's loss exceeds this many
            times the first step's (at least 0.01); ``None`` never stops on the loss. Scales pinned at
            the fp16 limit always stop it.
    """

    epochs: int | None = None
    lr: float | None = None
    global_batch: int = 64
    micro_batch: int = 1
    loss_terms: str = "rr+topk_kl"
    alpha: float = 0.2
    beta: float = 1.0
    top_k: int = 20
    train_form: str = "scales"
    loss_chunk: int = 1024
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    train_sub_scales: bool = False
    extra_trainable: tuple[str, ...] = ()
    eval_samples: int = 64
    max_steps: int | None = None
    save_every: int = 100
    log_every: int = 1
    seed: int = 0
    autocast_dtype: str | None = "bfloat16"
    gradient_checkpointing: bool = False
    tensorboard: bool = True
    log_path: str | None = None
    relative_lr: bool = False
    keep_better: bool = False
    lr_search: tuple[float, ...] = ()
    lr_search_fraction: float = 0.1
    divergence_factor: float | None = 10.0

    def __post_init__(self) -> None:
        if self.schedule not in SHAPES:
            raise ConfigError(f"schedule must be one of {SHAPES}, got {self.schedule!r}")
        if self.train_form not in TRAIN_FORMS:
            raise ConfigError(f"train_form must be one of {TRAIN_FORMS}, got {self.train_form!r}")
        for name in ("global_batch", "micro_batch", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch > self.global_batch:
            raise ConfigError(f"micro_batch ({self.micro_batch}) cannot exceed global_batch ({self.global_batch})")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.divergence_factor is not None and not self.divergence_factor > 1:
            raise ConfigError(f"divergence_factor must be > 1 (or None), got {self.divergence_factor}")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")
        if self.eval_samples < 0 or self.save_every < 0:
            raise ConfigError("eval_samples and save_every must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if not all(f > 0 for f in self.lr_search) or not 0 < self.lr_search_fraction <= 1:
            raise ConfigError("lr_search multipliers must be > 0 and lr_search_fraction in (0, 1]")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ConfigError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {self.autocast_dtype!r}")
        self.loss_config()  # validates loss_terms, top_k, loss_chunk

    def loss_config(self) -> LossConfig:
        """The :class:`LossConfig` these settings describe."""
        return LossConfig(self.loss_terms, self.alpha, self.beta, self.top_k, self.loss_chunk)

    def resolved(self, student: nn.Module) -> ResolvedStage2Config:
        """Fill ``lr`` and ``epochs`` with the paper's values for the student's bit width and size."""
        bits = {m.spec.bits for _, m in quant_linears(student)}
        b = min(bits) if bits else 4
        n_params = sum(p.numel() for p in student.parameters()) + sum(
            m.qcodes.numel() for _, m in quant_linears(student) if m.qcodes is not None
        )
        small = n_params <= _SMALL_MODEL_PARAMS
        lr = self.lr if self.lr is not None else (1e-6 if b >= 3 else (5e-6 if small else 1e-4))
        epochs = self.epochs if self.epochs is not None else (3 if b == 2 and small else 1)
        fixed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return ResolvedStage2Config(**(fixed | {"lr": lr, "epochs": epochs}))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (what the state file and the report record)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["extra_trainable"] = list(self.extra_trainable)
        d["lr_search"] = list(self.lr_search)
        return d


@dataclass(frozen=True)
class ResolvedStage2Config(Stage2Config):
    """A :class:`Stage2Config` whose ``lr`` and ``epochs`` are decided (:meth:`Stage2Config.resolved`)."""

    epochs: int = dataclasses.field(kw_only=True)
    lr: float = dataclasses.field(kw_only=True)


@dataclass
class Stage2Report:
    """What a stage-2 run did.

    Attributes:
        steps: optimizer steps of the whole run; ``start_step``: where this call began (resume).
        epochs, lr: the resolved values.
        tokens: completion tokens trained in this call; ``seconds``, ``tokens_per_s`` over this call.
        eval_before, eval_after: held-out ``kl`` (teacher top-k + tail bucket, per token), ``ce``,
            and ``kl_full`` with a live teacher.
        final_loss: loss of the last step.
        trainable: number of trainable tensors and of their elements.
        config: the resolved :class:`Stage2Config` as a dict.
        log_path, state_path: files written (or ``None``).
        peak_memory_bytes: peak CUDA memory allocated (CUDA only; this process's device).
        world_size: processes that trained together (data parallel; 1 for a single process).
        kept_initial: ``keep_better`` restored the initial tensors (training raised the held-out KL;
            ``eval_after`` is then the initial model's).
        lr_search: ``lr_search``'s held-out KL per probed multiplier of the configured rate (``lr``
            is the chosen one).
    """

    steps: int
    start_step: int
    epochs: int
    lr: float
    tokens: int
    seconds: float
    tokens_per_s: float
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    final_loss: float | None
    trainable: dict[str, int]
    config: dict[str, Any]
    log_path: str | None = None
    state_path: str | None = None
    peak_memory_bytes: int | None = None
    world_size: int = 1
    kept_initial: bool = False
    lr_search: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training-sample order of ``epoch``: a permutation fixed by ``seed`` and ``epoch``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _micro_batches(indices: Sequence[int], size: int, lengths: Sequence[int]) -> Iterator[list[int]]:
    """``indices`` sorted by sample length (longest first, ties in their order), in runs of ``size``."""
    ordered = sorted(indices, key=lambda i: -lengths[i])  # stable
    for a in range(0, len(ordered), size):
        yield ordered[a : a + size]


def _batch(data: SFTSet, idx: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask, labels = data.subset(idx).padded()  # padded to the longest sample of the micro-batch
    return ids.to(device), mask.to(device), labels.to(device)


def _student_hidden(base: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # [B, T, H]


def _select(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states predicting each completion token and those tokens, ``[N, H]`` and ``[N]`` (row-major)."""
    sel = labels[:, 1:] != -100  # [B, T-1]
    return hidden[:, :-1][sel], labels[:, 1:][sel]


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".quantizer.", 1)[0] if ".quantizer." in param_name else param_name


def _named(names: list[str]) -> str:
    """``a (scale), b (d) ...``: at most five parameters, by module and parameter."""
    shown = [f"{_module_of(n)} ({n.rsplit('.', 1)[-1]})" for n in names[:5]]
    return ", ".join(shown) + (" ..." if len(names) > 5 else "")


def check_finite(params: list[tuple[str, nn.Parameter]], what: str, step: int, hint: str) -> None:
    """Raise :class:`NonFiniteError` naming the tensors whose ``what`` (``"gradient"`` or the values) holds NaN/inf."""
    bad = []
    for name, p in params:
        t = p.grad if what == "gradient" else p
        if t is not None and not torch.isfinite(t).all():
            bad.append(name)
    if bad:
        raise NonFiniteError(f"non-finite {what} at step {step} in {len(bad)} tensor(s): {_named(bad)}; {hint}")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs, then deliver them (main thread only).

    An interrupt in the middle of an optimizer update would leave parameters of one step with the
    step counter of the previous one: the state saved on Ctrl-C must be a whole step.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def check_pinned(params: list[tuple[str, nn.Parameter]], step: int, hint: str) -> None:
    """A quantization scale at the fp16 limit is no trained value: the run has diverged."""
    pinned = [n for n, p in params if ".quantizer." in n and bool((p.detach().abs() >= FP16_MAX).any())]
    if pinned:
        raise DivergenceError(
            f"stage 2 diverged at step {step}: {len(pinned)} scale tensor(s) reached the fp16 limit {FP16_MAX:g}, "
            f"{_named(pinned)}; {hint}"
        )


@torch.no_grad()
def evaluate(
    student: nn.Module,
    data: SFTSet,
    indices: Sequence[int],
    teacher: Teacher,
    *,
    micro_batch: int = 1,
    chunk_size: int = 1024,
    autocast_dtype: str | None = None,
    distributed: bool = False,
) -> dict[str, float]:
    """Per-token held-out ``kl`` (teacher top-k + tail bucket), ``ce`` and (live teacher) ``kl_full``.

    Args:
        distributed: every rank of the process group calls this with the same ``indices``; each
            evaluates its contiguous share and the sums are all-reduced (same result on all ranks).

    Returns:
        ``{"kl": .., "ce": .., "tokens": ..}`` (+ ``"kl_full"``); empty when ``indices`` is empty.
    """
    if not len(indices):
        return {}
    base, head = decoder_and_head(student)
    device = next(student.parameters()).device
    live = hasattr(teacher, "sample_targets")
    keys = ("tokens", "ce", "kl_topk_tail") + (("kl_full",) if live else ())
    sums: dict[str, float] = dict.fromkeys(keys, 0.0)
    was_training = student.training
    student.eval()
    local = dist_utils.shard(list(indices)) if distributed else list(indices)
    for mb in _micro_batches(local, micro_batch, data.lengths().tolist()):
        ids, mask, labels = _batch(data, mb, device)
        t = teacher.targets(mb, ids, mask, labels, with_hidden=live).to(device)
        with autocast(device, autocast_dtype):
            hidden = _student_hidden(base, ids, mask)
        h, y = _select(hidden, labels)
        for k, v in token_metrics(h, head.weight, getattr(head, "bias", None), y, t, chunk_size).items():
            sums[k] = sums.get(k, 0.0) + v
    student.train(was_training)
    if distributed:
        total = dist_utils.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device))
        sums = dict(zip(keys, total.tolist()))
    n = max(sums.get("tokens", 0.0), 1.0)
    out = {"kl": sums["kl_topk_tail"] / n, "ce": sums["ce"] / n, "tokens": sums["tokens"]}
    if "kl_full" in sums:
        out["kl_full"] = sums["kl_full"] / n
    return out


class _StudentLoss(nn.Module):
    """The student's stage-2 loss on one micro-batch, as a module: DistributedDataParallel wraps it.

    The forward runs the decoder (under autocast) and the chunked loss through ``lm_head``, so every
    trainable parameter, the head's included, is used inside the wrapped forward.
    """

    def __init__(self, student: nn.Module, loss_cfg: LossConfig, autocast_dtype: str | None) -> None:
        super().__init__()
        self.student = student
        self.loss_cfg = loss_cfg
        self.autocast_dtype = autocast_dtype

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, targets: TeacherTargets, n_norm: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        base, head = decoder_and_head(self.student)
        with autocast(ids.device, self.autocast_dtype):
            hidden = _student_hidden(base, ids, mask)  # [B, T, H]
        h, y = _select(hidden, labels)  # [N, H], [N]
        out = chunked_loss(h, head.weight, getattr(head, "bias", None), y, targets, self.loss_cfg, n_norm)
        return out.loss, out.parts


def _wrap_ddp(model: nn.Module) -> DistributedDataParallel:
    """``model`` in DistributedDataParallel, synchronising (and broadcasting at start) only what trains.

    Frozen parameters (codes are buffers; embeddings, norms...) and all buffers are left out of
    DDP's start-up broadcast and per-forward buffer sync: every rank loaded the same checkpoint,
    and the integer codes of a large model would otherwise cross the network for nothing.
    """
    ignore = [
        f"{mod_name}.{name}" if mod_name else name
        for mod_name, mod in model.named_modules()
        for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
        if not (isinstance(t, nn.Parameter) and t.requires_grad)
    ]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return DistributedDataParallel(model, device_ids=None, find_unused_parameters=False)


def _check_process_group(device: torch.device) -> None:
    """The process group's backend must serve the student's device, one device per process."""
    import torch.distributed as dist

    backend = str(dist.get_backend())
    if device.type == "cuda":
        if "nccl" not in backend:
            raise ConfigError(f"the student is on {device} but the process group uses {backend!r}: use the nccl backend on CUDA")
        if device.index is not None and device.index != torch.cuda.current_device():
            raise ConfigError(
                f"rank {dist.get_rank()}: the student is on {device}, this process's device is cuda:{torch.cuda.current_device()}; "
                "under torchrun put each rank's model on cuda:LOCAL_RANK (--device cuda)"
            )
    elif "gloo" not in backend:
        raise ConfigError(f"the student is on {device} but the process group uses {backend!r}: use the gloo backend on CPU")


def _agree(what: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` unless every rank has the same ``what`` (data, resume point...)."""
    seen = dist_utils.all_gather_object(what)
    diff = sorted(k for k in what if any(s.get(k) != seen[0].get(k) for s in seen))
    if diff:
        raise ConfigError(
            f"the ranks disagree on {diff} ({', '.join(f'{k}: {[s.get(k) for s in seen]}' for k in diff[:3])}): every rank "
            "must build the same data with the same settings and see the same state_dir (a shared filesystem)"
        )


class MetricsLogger:
    """JSONL metrics (and TensorBoard when installed, under ``stage/``).

    Args:
        path: the JSONL file (``None``: log nothing).
        tensorboard: also write TensorBoard scalars beside it.
        resume_step: keep the lines up to this step (a resumed run); ``None`` starts the file anew.
        stage: the TensorBoard tag prefix.
    """

    def __init__(self, path: Path | None, tensorboard: bool, resume_step: int | None, stage: str = "stage2") -> None:
        self.path = path
        self.stage = stage
        self.tb = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():  # drop lines past the resumed step
            keep = [
                line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in keep))
        elif resume_step is None and path.exists():
            path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (and its numbers to TensorBoard)."""
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{self.stage}/{record.get('event', 'train')}/{k}", v, step)

    def close(self) -> None:
        """Close TensorBoard's writer."""
        if self.tb is not None:
            self.tb.close()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` ``payload`` to ``path`` through a staged file (a crash never leaves half a state)."""
    with staged_file(path) as tmp:
        torch.save(payload, tmp)


def _load_state(path: Path, cfg: Stage2Config, fingerprint: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated, empty or foreign file fails in many ways
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}): the saved stage-2 state is corrupt; delete it to restart "
            "stage 2 from its beginning (earlier stages are kept)"
        ) from e
    if not isinstance(state, dict) or not {"config", "data_fingerprint", "params", "step"} <= set(state):
        raise CheckpointError(f"{path} is not a stage-2 state of rqat-deploy: delete it to restart stage 2")
    old = {k: v for k, v in state["config"].items() if k not in _RESUME_FREE}
    new = {k: v for k, v in cfg.to_dict().items() if k not in _RESUME_FREE}
    diff = settings_diff(old, new, limit=4)
    if diff:
        raise ConfigError(f"cannot resume from {path}: the settings differ in {diff}; resume with the same settings or start a new run")
    if state["data_fingerprint"] != fingerprint:
        raise ConfigError(f"cannot resume from {path}: it was trained on other data (same spec, seed and sizes are needed)")
    return state


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


class Stage2Trainer:
    """One stage-2 run (module docstring): set up or resume on construction, then :meth:`run`.

    :meth:`run` evaluates before training, calls :meth:`step` for every optimizer step,
    :meth:`snapshot` every ``save_every`` steps, at the end and on Ctrl-C, and evaluates after.
    Only rank 0 writes (the state, the metrics); every rank trains.
    """

    def __init__(
        self,
        student: nn.Module,
        data: SFTSet,
        teacher: Teacher,
        cfg: Stage2Config,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
    ) -> None:
        """Check the student, data and teacher; build the optimizer and schedule; resume from ``state_dir``.

        Args and Raises: those of :func:`run_stage2`.
        """
        self.student, self.data, self.teacher = student, data, teacher
        self.cfg = cfg.resolved(student)
        self.loss_cfg = self.cfg.loss_config()
        self.params = select_trainable(student, self.cfg.train_form, train_sub_scales=self.cfg.train_sub_scales,
                                       extra_trainable=self.cfg.extra_trainable)
        self.lengths: list[int] = data.lengths().tolist()
        decoder_and_head(student)  # a causal LM with a base model and a head, or ConfigError
        self.device = next(student.parameters()).device
        self.world = dist_utils.world_size() if dist_utils.is_distributed() else 1
        self.main = dist_utils.is_main()
        if self.world > 1:
            _check_process_group(self.device)
        if self.cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(student)
        self._split_data()
        self._make_optimizer()
        self.fingerprint = data.fingerprint()
        sdir = Path(state_dir) if state_dir is not None else None
        self.state_path = sdir / STATE_FILE if sdir is not None else None
        self.start: int = 0  # the step this call begins at: the saved one on resume
        self.last_saved: int | None = None  # the step of the state on disk
        self.eval_before: dict[str, float] | None = None
        self.start_loss: float | None = None  # the first step's loss (the divergence yardstick)
        self.lr_probe: dict[str, float] = {}  # lr_search: held-out KL of each probed multiplier
        if self.state_path is not None and self.state_path.exists():
            self._resume(self.state_path, resume)
        if self.world > 1:  # before anything is written: every rank has read the same state (or none)
            _agree({"data": self.fingerprint, "start_step": self.start, "steps": self.total,
                    "trainable": [n for n, _ in self.params]})
        self.log_path = Path(self.cfg.log_path) if self.cfg.log_path else (sdir / METRICS_FILE if sdir is not None else None)
        resumed = self.start if self.last_saved is not None else None
        self.logger = MetricsLogger(self.log_path if self.main else None, self.cfg.tensorboard, resumed)
        self.done: int = self.start  # optimizer steps done
        self.tokens: int = 0  # completion tokens trained in this call
        self.final_loss: float | None = None
        self._order_epoch: int = -1  # the epoch whose sample order ``_order`` is
        self._order: list[int] = []
        self._t0 = 0.0  # when training began (tokens_per_s)

    # -- setup ----------------------------------------------------------------------------------

    def _split_data(self) -> None:
        """Hold out the last ``eval_samples``; the run's steps and warm-up over the rest."""
        n_eval = self.cfg.eval_samples
        if len(self.data) - n_eval < 1:
            raise ConfigError(
                f"{len(self.data)} samples leave none to train on after holding out eval_samples={n_eval}: lower it or add data"
            )
        self.teacher.check(self.data, top_k=self.loss_cfg.top_k, full_vocab=self.loss_cfg.needs_full_teacher)
        self.train_idx = list(range(len(self.data) - n_eval))
        self.eval_idx = list(range(len(self.data) - n_eval, len(self.data)))
        self.per_epoch = math.ceil(len(self.train_idx) / self.cfg.global_batch)
        total = self.per_epoch * int(self.cfg.epochs)
        self.total = min(total, self.cfg.max_steps) if self.cfg.max_steps is not None else total
        self.warmup = int(self.cfg.warmup_ratio * self.total)

    def _make_optimizer(self, factor: float = 1.0) -> None:
        """AdamW over the trainable tensors at ``factor * lr``; the schedule as a multiplier of it
        (:func:`lr_at`, peak 1)."""
        c = self.cfg
        self.lr_factor = factor
        ratios = _lr_ratios(self.student) if c.relative_lr else {}
        groups: dict[float, list[nn.Parameter]] = {}
        for name, p in self.params:
            groups.setdefault(ratios.get(name, 1.0), []).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": c.lr * factor * r} for r, ps in groups.items()],
            lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay,
        )
        self.initial = {n: p.detach().clone() for n, p in self.params} if c.keep_better else {}
        total, warmup = self.total, self.warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_at(s, peak=1.0, total=total, warmup=warmup, floor=c.min_lr_ratio, shape=c.schedule),
        )

    def _resume(self, path: Path, resume: bool) -> None:
        """Load the trainable tensors, optimizer, schedule and RNG states of ``path``."""
        if not resume:
            raise ConfigError(
                f"{path} holds the state of an earlier run: pass resume=True (--resume) to continue it, "
                "or remove it (--force) to start over"
            )
        state = _load_state(path, self.cfg, self.fingerprint)
        self._make_optimizer(float(state.get("lr_factor", 1.0)))  # the rate the interrupted run chose
        self.lr_probe = state.get("lr_probe", {})
        named = dict(self.params)
        with torch.no_grad():
            for name, value in state["params"].items():
                named[name].copy_(value.to(named[name].device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.start = self.last_saved = int(state["step"])
        self.eval_before = state["eval_before"]
        self.start_loss = state.get("start_loss")

    # -- the run --------------------------------------------------------------------------------

    def run(self, *, progress: bool = True, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> Stage2Report:
        """Evaluate, train the remaining steps, save, evaluate again; arguments as :func:`run_stage2`."""
        if self.eval_before is None:
            self.eval_before = self.evaluate()
            self.logger.log({"event": "eval", "when": "before", "step": self.start, **self.eval_before})
            if self.cfg.lr_search:
                self._search_lr()
        self._start_training()
        bar = tqdm(total=self.total, initial=self.start, desc="stage 2", disable=not (progress and self.main),
                   dynamic_ncols=True)
        try:
            for step in range(self.start, self.total):
                metrics = self.step(step)
                if self.done % self.cfg.log_every == 0 or self.done == self.total:
                    self.logger.log(metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                bar.update(1)
                if self.cfg.save_every and self.done % self.cfg.save_every == 0:
                    self.snapshot()
                if on_step is not None:
                    on_step(self.done, metrics)
        except BaseException as e:  # Ctrl-C / SIGTERM saves; a stopped run (divergence...) keeps the last good state
            if isinstance(e, KeyboardInterrupt) and self.last_saved != self.done:
                self.snapshot()
            self.logger.close()
            raise
        finally:
            bar.close()  # ends the bar's line, so an error message starts a line of its own
        seconds = time.perf_counter() - self._t0
        if self.last_saved != self.done:
            self.snapshot()
        eval_after = self.evaluate()
        self.logger.log({"event": "eval", "when": "after", "step": self.done, **eval_after})
        self.logger.close()
        kept = bool(self.initial) and eval_after.get("kl", 0.0) > (self.eval_before or {}).get("kl", float("inf"))
        if kept:  # training moved away from the teacher on held-out data: end where it started
            named = dict(self.params)
            with torch.no_grad():
                for name, value in self.initial.items():
                    named[name].copy_(value)
            eval_after = dict(self.eval_before or {})
        return dataclasses.replace(self._report(seconds, eval_after), kept_initial=kept, lr_search=dict(self.lr_probe))

    def _search_lr(self) -> None:
        """Probe each ``lr_search`` multiplier for the first steps, from the initial state; keep the best.

        Every probe starts from the same tensors, optimizer state and RNG state and is scored by the
        held-out KL (a probe that diverges scores infinity); afterwards the run starts over from
        the initial state with the winning rate. The scores go to the metrics and the report.
        """
        steps = min(self.total, max(2, math.ceil(self.cfg.lr_search_fraction * self.total)))
        start = {n: p.detach().clone() for n, p in self.params}
        rng = _rng_state()
        scores: dict[float, float] = {}
        self._start_training()
        for factor in self.cfg.lr_search:
            self._make_optimizer(factor)
            try:
                for s in range(steps):
                    self.step(s)
                scores[factor] = self.evaluate()["kl"]
            except (NonFiniteError, DivergenceError):
                scores[factor] = float("inf")
            named = dict(self.params)
            with torch.no_grad():
                for name, value in start.items():
                    named[name].copy_(value)
            _set_rng_state(rng)
            self.start_loss, self.done, self.tokens, self.final_loss = None, self.start, 0, None
        best = min(scores, key=lambda f: scores[f])  # the first listed wins a tie
        self._make_optimizer(best)
        self.lr_probe = {f"{f:g}": kl for f, kl in scores.items()}
        self.logger.log({"event": "lr_search", "step": 0, "probe_steps": steps, "chosen": best,
                         **{f"kl_x{f:g}": kl for f, kl in scores.items()}})

    def _start_training(self) -> None:
        """The loss module (wrapped in DDP when data parallel), train mode, CUDA memory statistics."""
        self.counts = self.data.completion_tokens()
        self.part_names = list(self.loss_cfg.term_set)
        engine = _StudentLoss(self.student, self.loss_cfg, self.cfg.autocast_dtype)
        self.engine: _StudentLoss | DistributedDataParallel = _wrap_ddp(engine) if self.world > 1 else engine
        self.student.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()

    def step(self, step: int) -> dict[str, Any]:
        """Optimizer step ``step`` (0-based) over its global batch; returns its metrics (inside :meth:`run`).

        Raises:
            NonFiniteError: a NaN/inf loss, gradient or scale (every rank raises).
            DivergenceError: the loss far above the first step's, or scales at the fp16 limit.
        """
        epoch, idx = self._global_batch(step)
        n_norm = int(self.counts[idx].sum())  # the GLOBAL batch's completion tokens (every rank holds the data)
        loss, parts = self._accumulate(step, idx, n_norm)
        self._check_loss(step, loss)
        with signals_deferred():  # Ctrl-C / SIGTERM wait for the update: the state saved then is consistent
            grad_norm, lr_now = self._update(step)
            self.done, self.tokens, self.final_loss = step + 1, self.tokens + n_norm, loss
        elapsed = time.perf_counter() - self._t0
        return {
            "step": self.done, "epoch": epoch, "loss": loss, **{f"loss_{k}": v for k, v in parts.items()},
            "lr": lr_now, "grad_norm": grad_norm, "tokens": n_norm,
            "tokens_per_s": self.tokens / elapsed if elapsed > 0 else 0.0,
        }

    def _global_batch(self, step: int) -> tuple[int, list[int]]:
        """The epoch of ``step`` and its global batch (sample indices, the single-process order)."""
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._order_epoch:
            order = epoch_order(len(self.train_idx), self.cfg.seed, epoch)
            self._order_epoch, self._order = epoch, [self.train_idx[i] for i in order]
        return epoch, self._order[pos * self.cfg.global_batch : (pos + 1) * self.cfg.global_batch]

    def _accumulate(self, step: int, idx: list[int], n_norm: int) -> tuple[float, dict[str, float]]:
        """Forward and backward over this rank's share of ``idx``; the global batch's loss and its parts."""
        local = dist_utils.shard(idx) if self.world > 1 else idx
        # DDP averages gradients over ranks; each rank's loss is a share of the global per-token
        # mean, so scaling it by the world size makes the average the single-process gradient.
        # A rank whose share is empty (a short last batch) still joins the all-reduce with a
        # zero-weighted micro-batch.
        weight = float(self.world) if local else 0.0
        mbs = list(_micro_batches(local or idx[:1], self.cfg.micro_batch, self.lengths))
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, parts_sum, local_tokens, bad = 0.0, dict.fromkeys(self.part_names, 0.0), 0, None
        for i, mb in enumerate(mbs):
            with self._sync(last=i == len(mbs) - 1):
                ids, mask, labels = _batch(self.data, mb, self.device)
                with torch.no_grad():
                    targets = self.teacher.targets(mb, ids, mask, labels, with_hidden=self.loss_cfg.needs_full_teacher)
                    targets = targets.to(self.device)
                loss, parts = self.engine(ids, mask, labels, targets, max(n_norm, 1))
                if weight and not torch.isfinite(loss.detach()) and bad is None:
                    where = f" (rank {dist_utils.rank()})" if self.world > 1 else ""
                    bad = f"non-finite loss ({float(loss.detach())}) at step {step} on samples {mb}{where}: {parts}"
                    if self.world == 1:
                        raise NonFiniteError(f"{bad}; {self.stop_hint()}")
                (loss * weight if weight != 1.0 else loss).backward()  # all ranks back-propagate: DDP stays in step
            if weight:
                loss_sum += float(loss.detach())
                local_tokens += len(targets)
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v
        if self.world > 1:
            return self._reduce(step, loss_sum, parts_sum, local_tokens, bad, n_norm)
        return loss_sum, parts_sum

    def _check_loss(self, step: int, loss: float) -> None:
        """Stop when the loss (the same on every rank) rises far above the first step's."""
        if self.start_loss is None:
            self.start_loss = loss
            return
        factor = self.cfg.divergence_factor
        if factor is not None and loss > factor * max(self.start_loss, _LOSS_FLOOR):
            raise DivergenceError(
                f"stage 2 diverged at step {step}: the loss {loss:.4g} is more than {factor:g} times its value at "
                f"the start ({self.start_loss:.4g}); {self.stop_hint()}"
            )

    def stop_hint(self) -> str:
        """What a stopped run kept and what to change (the end of every divergence message)."""
        if self.last_saved is None or self.state_path is None:
            kept = "no state was saved"
        else:
            kept = f"the last good state (step {self.last_saved}) stays in {self.state_path.parent}"
        return (f"no checkpoint is written and {kept}; lower the stage-2 learning rate (--stage2-lr, now {self.cfg.lr:g}) "
                "and train again, or check the data")

    def _sync(self, *, last: bool) -> ContextManager[Any]:
        """DDP all-reduces the gradients once, on the ``last`` micro-batch of a step."""
        if isinstance(self.engine, DistributedDataParallel) and not last:
            return self.engine.no_sync()
        return nullcontext()

    def _reduce(
        self, step: int, loss_sum: float, parts_sum: dict[str, float], local_tokens: int, bad: str | None, n_norm: int
    ) -> tuple[float, dict[str, float]]:
        """The global loss and parts for the log; a non-finite loss on any rank stops all of them."""
        names = self.part_names
        vec = torch.tensor([loss_sum, *(parts_sum[k] for k in names), local_tokens, bad is not None],
                           dtype=torch.float64, device=self.device)
        summed: list[float] = dist_utils.all_reduce_sum(vec).tolist()
        if summed[-1]:
            msgs = [m for m in dist_utils.all_gather_object(bad) if m is not None]
            raise NonFiniteError(f"{msgs[0]}; {self.stop_hint()}")
        if int(summed[-2]) != n_norm:  # the shards must cover the global batch exactly once
            raise RqatError(f"step {step}: the ranks trained {int(summed[-2])} completion tokens, the global batch has {n_norm}")
        return summed[0], dict(zip(names, summed[1:-2]))

    def _update(self, step: int) -> tuple[float, float]:
        """Clip, step the optimizer and the schedule; the gradient norm and the learning rate used."""
        check_finite(self.params, "gradient", step, self.stop_hint())
        plist = [p for _, p in self.params]
        if self.cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(plist, self.cfg.max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in plist if p.grad is not None])))
        lr_now = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        check_finite(self.params, "scale", step, self.stop_hint())
        check_pinned(self.params, step, self.stop_hint())
        return grad_norm, lr_now

    # -- state, evaluation, report --------------------------------------------------------------

    def snapshot(self) -> None:
        """Write the resumable state after ``self.done`` steps (rank 0; no-op without ``state_dir``)."""
        if self.state_path is None:
            return
        if self.main:  # rank 0 writes; the others only note that the state now exists
            save_state(self.state_path, {
                "step": self.done,
                "params": {n: p.detach().cpu().clone() for n, p in self.params},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(),
                "config": self.cfg.to_dict(),
                "data_fingerprint": self.fingerprint,
                "eval_before": self.eval_before,
                "start_loss": self.start_loss,
                "lr_factor": self.lr_factor,
                "lr_probe": self.lr_probe,
            })
        self.last_saved = self.done

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the student now (:func:`evaluate` on the held-out samples)."""
        return evaluate(self.student, self.data, self.eval_idx, self.teacher, micro_batch=self.cfg.micro_batch,
                        chunk_size=self.cfg.loss_chunk, autocast_dtype=self.cfg.autocast_dtype, distributed=self.world > 1)

    def _report(self, seconds: float, eval_after: dict[str, float]) -> Stage2Report:
        return Stage2Report(
            steps=self.total,
            start_step=self.start,
            epochs=int(self.cfg.epochs),
            lr=float(self.cfg.lr * self.lr_factor),
            tokens=self.tokens,
            seconds=seconds,
            tokens_per_s=self.tokens / seconds if seconds > 0 else 0.0,
            eval_before=self.eval_before or {},
            eval_after=eval_after,
            final_loss=self.final_loss,
            trainable={"tensors": len(self.params), "elements": sum(p.numel() for _, p in self.params)},
            config=self.cfg.to_dict(),
            log_path=str(self.log_path) if self.log_path else None,
            state_path=str(self.state_path) if self.state_path else None,
            peak_memory_bytes=int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None,
            world_size=self.world,
        )


def _lr_ratios(student: nn.Module) -> dict[str, float]:
    """Learning-rate multipliers of the quantization parameters, by parameter name (``relative_lr``)."""
    return {
        f"{mod_name}.quantizer.{name}": ratio
        for mod_name, mod in quant_linears(student)
        for name, ratio in mod.quantizer.scale_lr_ratios().items()
    }


def _enable_gradient_checkpointing(student: nn.Module) -> None:
    """Hugging Face gradient checkpointing, non-reentrant (the transformers >= 5 name when it exists)."""
    if not getattr(student, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(student).__name__} does not support gradient checkpointing")
    if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x name
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def run_stage2(
    student: nn.Module,
    data: SFTSet,
    teacher: Teacher,
    cfg: Stage2Config,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> Stage2Report:
    """Train the student (its scales or its latent weights, ``cfg.train_form``) against the teacher (module docstring).

    Args:
        student: a quantized causal LM (QuantLinear in either form), on its training device; modified
            in place and left in the training form.
        data: stage-2 samples; the last ``cfg.eval_samples`` are held out for evaluation.
        teacher: a :class:`rqat_deploy.train.teacher.LiveTeacher` or :class:`rqat_deploy.train.teacher.CachedTeacher`.
        cfg: hyperparameters (``lr``/``epochs`` ``None`` = the paper's for this model).
        state_dir: directory for resumable state and metrics (``None``: nothing written).
        resume: continue from ``state_dir``'s state when there is one.
        progress: show a progress bar with live loss and ETA.
        on_step: called after every step with ``(steps_done, metrics)``; it may raise
            (``KeyboardInterrupt`` saves the state first, like Ctrl-C).

    Returns:
        A :class:`Stage2Report`.

    Raises:
        ConfigError: no quantized module, too few samples, a teacher that cannot serve the loss,
            a state from other settings, or a state in ``state_dir`` without ``resume``.
        NonFiniteError: a NaN/inf loss, gradient or scale (names the step and module).
    """
    trainer = Stage2Trainer(student, data, teacher, cfg, state_dir=state_dir, resume=resume)
    return trainer.run(progress=progress, on_step=on_step)
