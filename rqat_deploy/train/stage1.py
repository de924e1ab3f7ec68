"""Stage 1: block-wise calibration (EfficientQAT Block-AP), DESIGN.md 5.

For each decoder block ``k`` in turn:

1. targets: the full-precision block applied to the full-precision inputs (the FP model's own
   hidden states, as in the authors' code), written in place over the FP inputs;
2. the block's selected Linears become stage-1 :class:`~rqat_deploy.quant.qlinear.QuantLinear` modules
   (RTN / k-quant search start);
3. the latent weights and the quantization parameters train together (two AdamW parameter groups,
   cosine schedule to ``lr / min_lr_factor``) to minimise the MSE between the quantized block's
   output on the *student* inputs (outputs of the already-quantized blocks ``0..k-1``) and the
   targets; gradients are clipped by their global norm; a held-out set of sequences gives the
   validation MSE at the RTN start and after every epoch;
4. the trained block is saved in the work directory, and the student inputs are replaced in
   place by its outputs.

Two activation stores (FP stream, student stream) ``[N, L, H]`` live in RAM or on disk
(:mod:`rqat_deploy.train.activations`). An interrupted run resumes at the next unfinished block with the
same result: the trained blocks are reloaded and, unless the disk stores are known to be complete,
both activation streams are recomputed through the finished blocks with the same batches.

Differences from the authors' released code, on purpose: gradient clipping is applied (their
``--clip_grad 0.3`` is parsed but never passed to the optimizer step), the training order is
shuffled per epoch with a fixed seed (theirs is unshuffled), and the last ``val_samples`` of the
calibration set are held out from the same set. Like theirs, norm weights train with the weights
(their parameter filter takes every name containing ``weight``); ``train_norms=False`` turns that off.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from rqat_deploy.train.activations import (
    ActivationStore,
    LayerInputs,
    capture_layer_inputs,
    choose_store_mode,
    find_decoder_layers,
    paired_batches,
    run_layer,
    store_nbytes,
)
from rqat_deploy.errors import CheckpointError, ConfigError, NonFiniteError, ShapeError
from rqat_deploy.files import atomic_write_json, read_json, staged_file
from rqat_deploy.quant.qlinear import QuantLinear
from rqat_deploy.quant.spec import QuantSpec
from rqat_deploy.quant.surgery import select_linears, set_submodule
from rqat_deploy.train.gptq import gptq_block
from rqat_deploy.shards import load_safetensors
from rqat_deploy.train.precision import autocast
from rqat_deploy.train.schedule import lr_at

STATE_VERSION = 1
STAGE_DIR = "stage1"
AUTOCAST = ("auto", "none", "bfloat16", "float16")
INITS = ("rtn", "gptq")
LOSS_SPACES = ("block", "next_norm")


@dataclass(frozen=True)
class Stage1Config:
    """Hyperparameters of the block-wise stage (defaults: the paper / EfficientQAT Block-AP).

    Attributes:
        epochs: passes over the training sequences per block (2).
        batch_size: sequences per optimizer step (2, as EfficientQAT).
        quant_lr: AdamW learning rate of the quantization parameters (1e-4).
        weight_lr: learning rate of the latent weights (and norms); ``None``: 2e-5 at 2 bits,
            1e-5 otherwise.
        min_lr_factor: the cosine schedule ends at ``lr / min_lr_factor`` (20).
        weight_decay: AdamW weight decay (0).
        clip_grad: maximum global gradient norm over all trained parameters; ``None`` or 0: off.
        val_samples: the last ``val_samples`` calibration sequences are held out for validation (64).
        shuffle: shuffle the training sequences every epoch (seeded by ``seed`` and the block).
        seed: seed of the shuffling.
        store: activation store ``"memory"`` | ``"disk"`` | ``"auto"``.
        store_dtype: ``"float32"`` | ``"bfloat16"`` | ``"float16"``; ``None``: the model's dtype.
        train_norms: the block's norm weights train with the weights (authors' code: yes).
        train_bias: Linear biases train with the weights.
        kquant_relative_lr: on the kquant grid, scale the learning rate of the super-block scales
            ``d`` / ``dmin`` so their relative steps match the uniform grid's (see
            :func:`_scale_lrs`); ``False`` uses ``quant_lr`` for them as is.
        autocast: ``"auto"`` (= ``"bfloat16"``) | ``"bfloat16"`` | ``"float16"`` | ``"none"``; autocast
            applies on CUDA only (:func:`rqat_deploy.train.precision.autocast`), CPU runs stay in float32.
        forward_batch_size: sequences per forward when computing targets, propagating the student
            stream and validating.
        log_every: write a step record to ``metrics.jsonl`` every this many steps.
        init: how each block's quantization starts: ``"rtn"`` (round to nearest / the grid's search,
            the paper) or ``"gptq"`` (GPTQ on the block's student inputs, then trained).
        loss_space: where the block output is compared with the full-precision target:
            ``"block"`` (the raw residual stream, the paper) or ``"next_norm"`` (after the next
            block's input RMSNorm, the final norm for the last block: what the next layer reads). A
            raw MSE is dominated by the few massive residual dimensions real LLMs carry from the
            middle layers on (DESIGN.md 5); after the norm they weigh what the next layer gives them.
        keep_better: after training a block, keep its initial parameters where training raised the
            held-out block loss (so no block ends worse than its initialisation on held-out data).
    """

    epochs: int = 2
    batch_size: int = 2
    quant_lr: float = 1e-4
    weight_lr: float | None = None
    min_lr_factor: float = 20.0
    weight_decay: float = 0.0
    clip_grad: float | None = 0.3
    val_samples: int = 64
    shuffle: bool = True
    seed: int = 0
    store: str = "auto"
    store_dtype: str | None = None
    train_norms: bool = True
    train_bias: bool = False
    kquant_relative_lr: bool = True
    autocast: str = "auto"
    forward_batch_size: int = 8
    log_every: int = 10
    init: str = "rtn"
    loss_space: str = "block"
    keep_better: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "val_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"stage-1 {name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("batch_size", "forward_batch_size", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"stage-1 {name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("quant_lr", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"stage-1 {name} must be >= 0, got {getattr(self, name)!r}")
        if self.weight_lr is not None and not self.weight_lr >= 0:
            raise ConfigError(f"stage-1 weight_lr must be >= 0 or None, got {self.weight_lr!r}")
        if not self.min_lr_factor >= 1:
            raise ConfigError(f"stage-1 min_lr_factor must be >= 1, got {self.min_lr_factor!r}")
        if self.clip_grad is not None and not self.clip_grad >= 0:
            raise ConfigError(f"stage-1 clip_grad must be > 0 (or None/0 for no clipping), got {self.clip_grad!r}")
        choose_store_mode(self.store, 0)  # validates the name
        if self.store_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(
                f"stage-1 store_dtype must be float32, bfloat16, float16 or None, got {self.store_dtype!r}"
            )
        if self.autocast not in AUTOCAST:
            raise ConfigError(f"stage-1 autocast must be one of {AUTOCAST}, got {self.autocast!r}")
        if self.init not in INITS:
            raise ConfigError(f"stage-1 init must be one of {INITS}, got {self.init!r}")
        if self.loss_space not in LOSS_SPACES:
            raise ConfigError(f"stage-1 loss_space must be one of {LOSS_SPACES}, got {self.loss_space!r}")

    def resolved_weight_lr(self, bits: int) -> float:
        """The weight learning rate for ``bits`` (2e-5 at 2 bits, 1e-5 otherwise, unless set)."""
        if self.weight_lr is not None:
            return float(self.weight_lr)
        return 2e-5 if bits == 2 else 1e-5

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return dataclasses.asdict(self)

    def result_fields(self) -> dict[str, Any]:
        """The fields that change the trained weights (not where activations live or logging)."""
        d = self.to_dict()
        for k in ("store", "log_every"):
            d.pop(k)
        return d


@dataclass
class BlockReport:
    """What stage 1 did to one decoder block.

    Attributes:
        index, name: block index and module name.
        modules: quantized Linears of the block (relative names).
        val_loss_init: validation loss at the block's initialisation (RTN / search, or GPTQ).
        val_loss: validation loss after training (the initialisation's where ``kept_init``).
        kept_init: ``keep_better`` restored the initial parameters (training raised the loss).
        val_loss_epochs: validation MSE after each epoch.
        train_loss_epochs: mean training MSE of each epoch.
        train_loss_first, train_loss_last: MSE of the first and last step.
        steps: optimizer steps.
        grad_norm_mean, grad_norm_max: global gradient norm before clipping.
        clipped_steps: steps whose gradient was scaled down by clipping.
        seconds: wall time of the block (targets, training, propagation).
        train_seconds: wall time of the optimizer loop alone.
        resumed: restored from the work directory instead of trained in this call.
    """

    index: int
    name: str
    modules: list[str]
    val_loss_init: float
    val_loss: float
    kept_init: bool = False
    val_loss_epochs: list[float] = field(default_factory=list)
    train_loss_epochs: list[float] = field(default_factory=list)
    train_loss_first: float = float("nan")
    train_loss_last: float = float("nan")
    steps: int = 0
    grad_norm_mean: float = 0.0
    grad_norm_max: float = 0.0
    clipped_steps: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0
    resumed: bool = False


@dataclass
class Stage1Report:
    """The result of :func:`run_stage1`.

    Attributes:
        blocks: one :class:`BlockReport` per decoder block.
        n_train, n_val, seq_len: calibration sequences used for training / validation, and length.
        store_mode: ``memory`` or ``disk``; store_bytes: bytes of both activation stores.
        store_dtype: dtype of the stored activations.
        device: where blocks trained.
        seconds: wall time of the call; train_seconds: time inside optimizer loops.
        train_tokens: sequence tokens through forward + backward in this call (epochs x n_train x L
            per trained block).
        tokens_per_second: ``train_tokens / seconds`` (end to end); train_tokens_per_second:
            ``train_tokens / train_seconds``.
        peak_memory_bytes: peak CUDA memory allocated (CUDA) or peak resident set size of the
            process (CPU).
        resumed_blocks: blocks restored from the work directory.
        rtn_modules: selected Linears outside the decoder blocks (e.g. ``lm_head``), RTN-initialised.
        layer_inputs: shapes of the captured layer inputs.
        config: the resolved :class:`Stage1Config` (weight_lr filled in) and the spec.
    """

    blocks: list[BlockReport]
    n_train: int
    n_val: int
    seq_len: int
    store_mode: str
    store_bytes: int
    store_dtype: str
    device: str
    seconds: float
    train_seconds: float
    train_tokens: int
    tokens_per_second: float
    train_tokens_per_second: float
    peak_memory_bytes: int
    resumed_blocks: int
    rtn_modules: list[str]
    layer_inputs: dict[str, Any]
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for ``rqat_quant.json`` and logs)."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# work directory: progress state, block states, metrics
# ---------------------------------------------------------------------------------------------


class _WorkDir:
    """``<work_dir>/stage1``: ``state.json``, ``block_NNNN.safetensors``, activations, ``metrics.jsonl``."""

    def __init__(self, root: Path, fingerprint: str, resume: bool) -> None:
        self.dir = root / STAGE_DIR
        if self.dir.exists() and not resume:
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "state.json"
        self.fingerprint = fingerprint
        self.state: dict[str, Any] = {
            "version": STATE_VERSION, "fingerprint": fingerprint, "blocks": [], "acts_block": None
        }
        if self.state_path.exists():
            old = read_json(self.state_path, error=CheckpointError)
            if old.get("fingerprint") != fingerprint or old.get("version") != STATE_VERSION:
                raise ConfigError(
                    f"{self.dir} holds a stage-1 run with different calibration data, spec, model or settings: "
                    "resume with the same ones, use another work directory, or start over (resume=False / no --resume)"
                )
            self.state = old
        self.metrics = (self.dir / "metrics.jsonl").open("a")

    @property
    def done(self) -> int:
        return len(self.state["blocks"])

    def block_path(self, k: int) -> Path:
        return self.dir / f"block_{k:04d}.safetensors"

    def save(self) -> None:
        atomic_write_json(self.state_path, self.state)

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def close(self) -> None:
        self.metrics.close()


def _fingerprint(model: nn.Module, spec: QuantSpec, calib_ids: torch.Tensor, cfg: Stage1Config) -> str:
    h = hashlib.sha256()
    h.update(calib_ids.cpu().contiguous().numpy().tobytes())
    h.update(str(tuple(calib_ids.shape)).encode())
    conf = getattr(model, "config", None)
    conf_d = conf.to_dict() if conf is not None else {}
    skip = ("transformers_version", "name_or_path")
    conf_d = {k: v for k, v in conf_d.items() if not k.startswith("_") and k not in skip}
    payload = {"spec": spec.to_dict(), "cfg": cfg.result_fields(), "model": conf_d}
    h.update(json.dumps(payload, sort_keys=True, default=str).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# block surgery
# ---------------------------------------------------------------------------------------------


def _block_names(selected: list[str], prefix: str) -> list[str]:
    """Names relative to the block of the selected Linears under ``prefix.``."""
    return [n[len(prefix) + 1 :] for n in selected if n.startswith(prefix + ".")]


def quantize_block(block: nn.Module, names: list[str], spec: QuantSpec, backend: str | None = None) -> None:
    """Swap the Linears ``names`` (relative to ``block``) for RTN / k-quant-initialised stage-1 QuantLinears."""
    for rel in names:
        lin = block.get_submodule(rel)
        if not isinstance(lin, nn.Linear):
            raise ConfigError(f"{rel} is already {type(lin).__name__}: stage 1 needs the full-precision model")
        set_submodule(block, rel, QuantLinear.from_linear(lin, spec, backend))


def _skeleton_block(block: nn.Module, names: list[str], spec: QuantSpec, backend: str | None) -> None:
    """Swap Linears for stage-1 QuantLinears of the right shapes (contents to be loaded)."""
    for rel in names:
        lin = block.get_submodule(rel)
        if isinstance(lin, QuantLinear):
            continue
        layout = spec.grid_def.layout(lin.out_features, lin.in_features)
        q = spec.grid_def.from_checkpoint({k: torch.zeros(t.shape, dtype=t.dtype) for k, t in layout.items()})
        w = torch.zeros(lin.out_features, lin.in_features, dtype=torch.float32)
        bias = lin.bias.detach().float() if lin.bias is not None else None
        ql = QuantLinear(lin.in_features, lin.out_features, bias, q, spec, weight=w, backend=backend)
        set_submodule(block, rel, ql)


def _block_device(block: nn.Module) -> torch.device:
    p = next(iter(block.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _model_dtype(model: nn.Module, block: nn.Module) -> torch.dtype:
    """The model's floating-point dtype: its input embedding's, else the block's first Linear's."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.dtype
    for m in block.modules():
        if isinstance(m, nn.Linear):
            return m.weight.dtype
    return torch.float32


def _param_groups(
    block: nn.Module, cfg: Stage1Config, quant_lr: float, weight_lr: float
) -> tuple[list[dict[str, Any]], list[nn.Parameter]]:
    """AdamW groups ``[quantization params, weights]``; freezes every other parameter.

    Quantization params: every QuantLinear's ``quantizer.*``. Weights: QuantLinear latent weights,
    plus the other ``*.weight`` (norms) with ``train_norms`` and biases with ``train_bias``.
    """
    qmods = [n for n, m in block.named_modules() if isinstance(m, QuantLinear)]
    quant: list[nn.Parameter] = []
    weights: list[nn.Parameter] = []
    for name, p in block.named_parameters():
        owner = next((q for q in qmods if name.startswith(q + ".")), None)
        leaf = name.rpartition(".")[2]
        group: list[nn.Parameter] | None = None
        if owner is not None and name.startswith(owner + ".quantizer."):
            group = quant if quant_lr > 0 else None
        elif leaf == "bias":
            group = weights if cfg.train_bias and weight_lr > 0 else None
        elif owner is not None and name == owner + ".weight":
            group = weights if weight_lr > 0 else None
        elif owner is None and leaf == "weight":
            group = weights if cfg.train_norms and weight_lr > 0 else None
        p.requires_grad_(group is not None)
        if group is not None:
            group.append(p)
    groups = []
    scaled = _scale_lrs(block, quant, quant_lr) if cfg.kquant_relative_lr else {}
    quant_plain = [p for p in quant if id(p) not in scaled]
    if quant_plain:
        groups.append({"params": quant_plain, "lr": quant_lr, "base_lr": quant_lr, "name": "quant"})
    for i, (p, lr) in enumerate(scaled.values()):
        groups.append({"params": [p], "lr": lr, "base_lr": lr, "name": f"quant_superblock_{i}"})
    if weights:
        groups.append({"params": weights, "lr": weight_lr, "base_lr": weight_lr, "name": "weight"})
    return groups, quant + weights


@torch.no_grad()
def _scale_lrs(
    block: nn.Module, quant: list[nn.Parameter], quant_lr: float
) -> dict[int, tuple[nn.Parameter, float]]:
    """Learning rates of quantization parameters that are not a per-group scale.

    ``quant_lr`` is meant for a per-group scale (the uniform grid's ``scale``); a grid whose scale
    multiplies integer sub-scales (the k-quants' ``d`` / ``dmin``) returns smaller ratios from
    :meth:`~rqat_deploy.quant.grids.GridQuantizer.scale_lr_ratios`, so that relative steps match.
    """
    wanted = {id(p) for p in quant}
    out: dict[int, tuple[nn.Parameter, float]] = {}
    for m in block.modules():
        if not isinstance(m, QuantLinear):
            continue
        for pname, ratio in m.quantizer.scale_lr_ratios().items():
            p = getattr(m.quantizer, pname)
            if id(p) in wanted:
                out[id(p)] = (p, quant_lr * ratio)
    return out


# ---------------------------------------------------------------------------------------------
# forward passes over a store
# ---------------------------------------------------------------------------------------------


def _autocast_dtype(cfg: Stage1Config) -> str | None:
    """``cfg.autocast`` as the dtype of :func:`~rqat_deploy.train.precision.autocast` (CUDA only)."""
    return None if cfg.autocast == "none" else "bfloat16" if cfg.autocast == "auto" else cfg.autocast


@torch.no_grad()
def _propagate(
    block: nn.Module, store: ActivationStore, inputs: LayerInputs, device: torch.device, batch: int, dtype: torch.dtype
) -> None:
    """Replace every sample of ``store`` in place by ``block``'s output on it, run in the model's ``dtype``."""
    for start in range(0, len(store), batch):
        sl = slice(start, min(start + batch, len(store)))
        x = store.read(sl).to(device=device, dtype=dtype)
        store.write(sl, run_layer(block, x, inputs))
    store.flush()


@torch.no_grad()
def _val_loss(
    block: nn.Module, q_store: ActivationStore, fp_store: ActivationStore, idx: torch.Tensor,
    inputs: LayerInputs, device: torch.device, cfg: Stage1Config, space: nn.Module,
) -> float:
    """Mean squared error of ``block`` on the student inputs ``idx`` against the targets, in ``space``."""
    if len(idx) == 0:
        return float("nan")
    sse, count = 0.0, 0
    for _, (x, y) in paired_batches([q_store, fp_store], idx, cfg.forward_batch_size):
        y = space(y.to(device=device, dtype=torch.float32))
        with autocast(device, _autocast_dtype(cfg)):
            out = run_layer(block, x.to(device=device, dtype=torch.float32), inputs)
        sse += float((space(out.float()) - y).square().sum(dtype=torch.float64))
        count += y.numel()
    return sse / count


def loss_space(model: nn.Module, layers: nn.ModuleList, k: int, space: str) -> nn.Module:
    """Where block ``k``'s output is compared with its target (see ``Stage1Config.loss_space``).

    Returns:
        ``nn.Identity()`` for ``"block"``; for ``"next_norm"`` a frozen float32 copy of the norm the
        next layer reads its input through: block ``k+1``'s ``input_layernorm``, or the model's
        final norm after the last block.

    Raises:
        ConfigError: ``"next_norm"`` on a model whose blocks have no ``input_layernorm`` or no final norm.
    """
    if space == "block":
        return nn.Identity()
    if k + 1 < len(layers):
        norm = getattr(layers[k + 1], "input_layernorm", None)
    else:
        base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
        norm = getattr(base, "norm", None)
    if not isinstance(norm, nn.Module):
        raise ConfigError(
            f"stage-1 loss_space 'next_norm' needs each decoder block's input_layernorm and a final norm; "
            f"{type(model).__name__} has none after block {k}: use loss_space 'block'"
        )
    return copy.deepcopy(norm).float().requires_grad_(False)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---------------------------------------------------------------------------------------------
# training one block
# ---------------------------------------------------------------------------------------------


def _check_finite(block: nn.Module, where: str) -> None:
    for name, p in block.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p).all()):
            raise NonFiniteError(f"stage 1: parameter {name} became NaN/inf in {where}; lower the learning rates")


def _train_block(
    block: nn.Module,
    k: int,
    name: str,
    q_store: ActivationStore,
    fp_store: ActivationStore,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    inputs: LayerInputs,
    cfg: Stage1Config,
    spec: QuantSpec,
    device: torch.device,
    wd: _WorkDir,
    progress: bool,
    space: nn.Module,
) -> BlockReport:
    """Train the (fp32, on ``device``) quantized ``block``; return its report (losses, norms).

    The loss is the MSE between the block's output and its target after ``space`` (identity, or the
    next layer's norm); with ``cfg.keep_better`` the initial parameters come back where training
    raised the held-out loss.
    """
    quant_lr, weight_lr = cfg.quant_lr, cfg.resolved_weight_lr(spec.bits)
    groups, params = _param_groups(block, cfg, quant_lr, weight_lr)
    inputs = inputs.to(device, torch.float32)  # the block trains in fp32: rotary tables / mask too
    space = space.to(device)
    val_init = _val_loss(block, q_store, fp_store, val_idx, inputs, device, cfg, space)
    rep = BlockReport(index=k, name=name, modules=[], val_loss_init=val_init, val_loss=val_init)
    initial = [p.detach().clone() for p in params] if cfg.keep_better else []
    n_train = len(train_idx)
    per_epoch = math.ceil(n_train / cfg.batch_size) if n_train else 0
    total = cfg.epochs * per_epoch if groups else 0
    if total == 0:
        return rep
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    max_norm = cfg.clip_grad if cfg.clip_grad else float("inf")
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
    norms: list[float] = []
    step, t0 = 0, time.perf_counter()
    bar = tqdm(total=total, desc=f"block {k}", disable=not progress, leave=False)
    try:
        for epoch in range(cfg.epochs):
            order = train_idx[torch.randperm(n_train, generator=gen)] if cfg.shuffle else train_idx
            losses = []
            for _, (x, y) in paired_batches([q_store, fp_store], order, cfg.batch_size, pin=device.type == "cuda"):
                for g in opt.param_groups:
                    base = g["base_lr"]  # cosine to base / min_lr_factor, no warm-up
                    g["lr"] = lr_at(step, peak=base, total=total, floor=base / cfg.min_lr_factor, pi_first=True)
                x = x.to(device=device, dtype=torch.float32, non_blocking=True)
                y = y.to(device=device, dtype=torch.float32, non_blocking=True)
                with autocast(device, _autocast_dtype(cfg)):
                    out = run_layer(block, x, inputs)
                loss = F.mse_loss(space(out.float()), space(y))
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise NonFiniteError(
                        f"stage 1: loss is {lv} in block {k} ({name}), epoch {epoch}, step {step}; the blocks "
                        f"before it are saved in {wd.dir} (resume continues from block {k}): lower the learning "
                        "rates or check the calibration data / model activations"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                if not math.isfinite(gn):
                    raise NonFiniteError(
                        f"stage 1: gradient norm is {gn} in block {k} ({name}), epoch {epoch}, step {step}; "
                        f"blocks before it are saved in {wd.dir}: lower the learning rates"
                    )
                opt.step()
                norms.append(gn)
                rep.clipped_steps += int(gn > max_norm)
                losses.append(lv)
                if step == 0:
                    rep.train_loss_first = lv
                rep.train_loss_last = lv
                if step % cfg.log_every == 0:
                    wd.log({"stage": 1, "event": "step", "block": k, "epoch": epoch, "step": step, "loss": lv,
                            "grad_norm": gn, "lr": {g["name"]: g["lr"] for g in opt.param_groups}})
                bar.set_postfix(loss=f"{lv:.3e}", refresh=False)
                bar.update(1)
                step += 1
            _check_finite(block, f"block {k} ({name}), epoch {epoch}")
            rep.train_loss_epochs.append(sum(losses) / len(losses))
            rep.val_loss_epochs.append(_val_loss(block, q_store, fp_store, val_idx, inputs, device, cfg, space))
    finally:
        bar.close()
    rep.train_seconds = time.perf_counter() - t0
    rep.steps = step
    rep.grad_norm_mean = sum(norms) / len(norms)
    rep.grad_norm_max = max(norms)
    rep.val_loss = rep.val_loss_epochs[-1]
    if initial and rep.val_loss > val_init:  # NaN (no held-out samples) compares False: keep the training
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0)
        rep.val_loss, rep.kept_init = val_init, True
    return rep


def _restore_dtypes(block: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Cast parameters outside QuantLinear back to their original dtype (QuantLinear stays fp32)."""
    qmods = [n for n, m in block.named_modules() if isinstance(m, QuantLinear)]
    for name, p in block.named_parameters():
        if any(name.startswith(q + ".") for q in qmods):
            continue
        if name in dtypes and p.dtype != dtypes[name]:
            p.data = p.data.to(dtypes[name])


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------


def _check_ids(calib_ids: torch.Tensor, cfg: Stage1Config) -> None:
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        got = f"{type(calib_ids).__name__} {getattr(calib_ids, 'dtype', '')} {list(getattr(calib_ids, 'shape', []))}"
        raise ShapeError(f"stage 1 needs calibration ids as a LongTensor [N, L], got {got}")
    n = calib_ids.shape[0]
    if n <= cfg.val_samples:
        raise ConfigError(
            f"stage 1 holds out val_samples={cfg.val_samples} of {n} calibration sequences, leaving none to "
            "train on: use more calibration samples or fewer validation samples"
        )
    if calib_ids.shape[1] < 1:
        raise ShapeError("calibration sequences are empty (length 0)")


def run_stage1(
    model: nn.Module,
    spec: QuantSpec,
    calib_ids: torch.Tensor,
    cfg: Stage1Config | None = None,
    *,
    work_dir: str | Path,
    device: str | torch.device = "cpu",
    progress: bool = True,
    resume: bool = True,
    backend: str | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Stage1Report:
    """Block-wise calibration of ``model`` in place (EfficientQAT Block-AP, DESIGN.md 5).

    Args:
        model: a full-precision Hugging Face causal LM (for a resume: the same full-precision
            model again; blocks already finished are restored from ``work_dir``).
        spec: what to quantize and how.
        calib_ids: ``[N, L]`` calibration token ids (unpadded); the last ``cfg.val_samples`` are
            held out for validation.
        cfg: hyperparameters (default :class:`Stage1Config`).
        work_dir: directory for the trained blocks, progress state, metrics and (disk) activations.
        device: where blocks run (the model may stay on CPU; one block at a time is moved).
        progress: show progress bars.
        resume: continue a run found in ``work_dir`` (same data and settings); ``False`` starts over.
        backend: kernel backend of the QuantLinears.
        callback: called after each finished block with ``{"event": "block_done", "block": k,
            "report": BlockReport}``; an exception it raises stops the run (the block is saved).

    Returns:
        The :class:`Stage1Report`. ``model`` now holds stage-1 QuantLinears in every block (and
        RTN ones for selected Linears outside the blocks), ready for
        :func:`rqat_deploy.quant.checkpoint.save_checkpoint` or :func:`rqat_deploy.quant.surgery.freeze_codes`.
        The decoder blocks' parameters are left with ``requires_grad=False`` (the next stage
        chooses what trains); QuantLinears stay float32, the other parameters keep the model's dtype.

    Raises:
        ConfigError: invalid settings, a work directory of another run, or a partly quantized model
            where the full-precision one is needed.
        ShapeError: ``calib_ids`` is not a LongTensor ``[N, L]``.
        NonFiniteError: NaN/inf in a loss, gradient or parameter (names the block; earlier blocks stay saved).
    """
    cfg = cfg or Stage1Config()
    _check_ids(calib_ids, cfg)
    t_start = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    layers_name, layers = find_decoder_layers(model)
    selected = select_linears(model, spec)
    block_names = [_block_names(selected, f"{layers_name}.{k}") for k in range(len(layers))]
    in_blocks = {f"{layers_name}.{k}.{r}" for k, names in enumerate(block_names) for r in names}
    outside = [n for n in selected if n not in in_blocks]
    n, seq_len = calib_ids.shape
    hidden = int(model.config.hidden_size)
    model_dtype = _model_dtype(model, layers[0])
    sdtype = getattr(torch, cfg.store_dtype) if cfg.store_dtype else model_dtype
    n_val = cfg.val_samples
    train_idx, val_idx = torch.arange(n - n_val), torch.arange(n - n_val, n)

    wd = _WorkDir(Path(work_dir), _fingerprint(model, spec, calib_ids, cfg), resume)
    done = wd.done
    if done > len(layers):
        raise CheckpointError(f"{wd.dir} records {done} finished blocks but the model has {len(layers)}")
    need_acts = done < len(layers)
    nbytes = 2 * store_nbytes(n, seq_len, hidden, sdtype)
    mode = choose_store_mode(cfg.store, nbytes)
    reuse = mode == "disk" and done > 0 and wd.state.get("acts_block") == done and need_acts
    reports = [BlockReport(**{**b, "resumed": True}) for b in wd.state["blocks"]]
    stores: list[ActivationStore] = []
    try:
        fp_store = q_store = None
        if need_acts:
            mk = dict(mode=mode, reuse=reuse)  # batches are pinned one at a time, never the whole store
            fp_store = ActivationStore(n, seq_len, hidden, sdtype, path=wd.dir / "acts_fp.bin", **mk)
            q_store = ActivationStore(n, seq_len, hidden, sdtype, path=wd.dir / "acts_q.bin", **mk)
            stores = [fp_store, q_store]
            inputs = capture_layer_inputs(
                model, calib_ids, None if reuse else fp_store, device=dev, batch_size=cfg.forward_batch_size
            )
            if not reuse:
                q_store.copy_from(fp_store, cfg.forward_batch_size)
        else:
            inputs = LayerInputs()
        layer_inputs = inputs.describe()

        # 1) restore finished blocks (recomputing both streams through them unless reusable)
        for k in tqdm(range(done), desc="stage 1: restore", disable=not progress or done == 0, leave=False):
            block = layers[k]
            home = _block_device(block)
            recompute = need_acts and not reuse
            if recompute and any(isinstance(m, QuantLinear) for m in block.modules()):
                raise ConfigError(
                    f"resuming stage 1 needs the full-precision model (block {k} is already quantized): reload it"
                )
            if recompute:
                block.to(dev)
                _propagate(block, fp_store, inputs, dev, cfg.forward_batch_size, model_dtype)
            _skeleton_block(block, block_names[k], spec, backend)
            state = load_safetensors(wd.block_path(k))
            block.load_state_dict(state, strict=True, assign=True)
            block.requires_grad_(False)
            if recompute:
                block.to(dev)
                _propagate(block, q_store, inputs, dev, cfg.forward_batch_size, model_dtype)
            block.to(home)

        # 2) train the remaining blocks
        for k in tqdm(range(done, len(layers)), desc="stage 1", disable=not progress, leave=True):
            reports.append(
                _stage1_block(layers[k], k, f"{layers_name}.{k}", block_names[k], fp_store, q_store, train_idx,
                              val_idx, inputs, cfg, spec, dev, wd, backend, progress, model_dtype,
                              loss_space(model, layers, k, cfg.loss_space))
            )
            if callback is not None:
                callback({"event": "block_done", "block": k, "report": reports[-1]})

        for name in outside:
            set_submodule(model, name, QuantLinear.from_linear(model.get_submodule(name), spec, backend))
    finally:
        wd.close()
        for s in stores:
            s.close(delete=False)
    if not need_acts or wd.done == len(layers):
        for f in ("acts_fp.bin", "acts_q.bin"):
            (wd.dir / f).unlink(missing_ok=True)
        wd.state["acts_block"] = None
        wd.save()

    trained = [r for r in reports if not r.resumed]
    train_s = sum(r.train_seconds for r in trained)
    tokens = sum(cfg.epochs * len(train_idx) for r in trained if r.steps) * seq_len
    seconds = time.perf_counter() - t_start
    conf = cfg.to_dict() | {"weight_lr": cfg.resolved_weight_lr(spec.bits), "spec": spec.to_dict()}
    return Stage1Report(
        blocks=reports,
        n_train=len(train_idx),
        n_val=n_val,
        seq_len=seq_len,
        store_mode=mode,
        store_bytes=nbytes,
        store_dtype=str(sdtype).replace("torch.", ""),
        device=str(dev),
        seconds=seconds,
        train_seconds=train_s,
        train_tokens=tokens,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        train_tokens_per_second=tokens / train_s if train_s > 0 else 0.0,
        peak_memory_bytes=_peak_memory(dev),
        resumed_blocks=done,
        rtn_modules=outside,
        layer_inputs=layer_inputs,
        config=conf,
    )


def _stage1_block(
    block: nn.Module,
    k: int,
    name: str,
    names: list[str],
    fp_store: ActivationStore,
    q_store: ActivationStore,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    inputs: LayerInputs,
    cfg: Stage1Config,
    spec: QuantSpec,
    dev: torch.device,
    wd: _WorkDir,
    backend: str | None,
    progress: bool,
    model_dtype: torch.dtype,
    space: nn.Module,
) -> BlockReport:
    """Targets, quantization, training, saving and student propagation of block ``k``."""
    t0 = time.perf_counter()
    home = _block_device(block)
    if any(isinstance(m, QuantLinear) for m in block.modules()):
        raise ConfigError(f"stage 1 needs the full-precision model, but block {k} ({name}) is already quantized")
    wd.state["acts_block"] = None  # the stores are about to change in place
    wd.save()
    block.to(dev)
    _propagate(block, fp_store, inputs, dev, cfg.forward_batch_size, model_dtype)  # FP targets = FP inputs of k+1
    dtypes = {n: p.dtype for n, p in block.named_parameters()}
    if cfg.init == "gptq":  # GPTQ on the block's student inputs (training sequences only)
        gptq_block(block, names, spec, q_store, inputs, indices=train_idx, prefix=f"{name}.", device=dev,
                   batch_size=cfg.forward_batch_size, dtype=model_dtype, backend=backend, compare_rtn=False)
    else:
        quantize_block(block, names, spec, backend)
    block.float()
    rep = _train_block(block, k, name, q_store, fp_store, train_idx, val_idx, inputs, cfg, spec, dev, wd, progress,
                       space)
    rep.modules = list(names)
    block.requires_grad_(False)
    _restore_dtypes(block, dtypes)
    state = {n: t.detach().cpu().contiguous() for n, t in block.state_dict().items()}
    with staged_file(wd.block_path(k)) as tmp:
        save_file(state, str(tmp))
    _propagate(block, q_store, inputs, dev, cfg.forward_batch_size, model_dtype)  # student inputs of k+1
    block.to(home)
    rep.seconds = time.perf_counter() - t0
    wd.state["blocks"].append(dataclasses.asdict(rep))
    wd.state["acts_block"] = k + 1
    wd.save()
    wd.log({"stage": 1, "event": "block", **dataclasses.asdict(rep)})
    return rep
