"""Cold-start GRPO for quantized models: the third step of Reasoning-QAT (GPTQ -> KD -> GRPO).

A focused implementation rather than TRL's ``GRPOTrainer``: TRL builds on the transformers
``Trainer`` and accelerate (two more dependencies), checkpoints every ``save_steps`` but not on
Ctrl-C, resumes through its own checkpoint folders, generates through ``model.generate`` on the
*training* module (here that would dequantize every weight again for every new token) and has no
place for this project's guards (non-finite values, scales pinned at the fp16 limit) or the
checkpoint contract. What it computes is the same algorithm; this module is ~one screen of it
written against the project's own pieces: :func:`~rqat_deploy.train.schedule.lr_at`, the grader,
the chat rendering, the thinking-token counter, staged writes, stage 2's logger and guards.

One **step**:

1. ``global_batch / group_size`` prompts (a seeded order over the prompt set, epoch by epoch);
2. ``group_size`` rollouts each from the quantized model itself, run through
   :func:`~rqat_deploy.quant.surgery.dequantized_view` (plain Linears holding exactly the
   dequantized weights: the function the checkpoint, and llama.cpp after an exact export, runs),
   sampled with PyTorch generation (KV cache) at ``temperature`` / ``top_p`` / ``top_k`` up to
   ``max_new_tokens`` (recorded in the report); the step's randomness is seeded by
   ``(seed, step)`` alone, so a resumed run draws the same rollouts;
3. rewards (:mod:`rqat_deploy.train.rewards`: the project's grader, an optional format reward,
   the optional length-aware penalty), group-normalised advantages
   ``A = (r - mean_group) / (std_group + 1e-4)`` (``scale_rewards="none"``: no division);
4. ``updates_per_batch`` optimizer updates over the rollouts, each accumulating ``grad_accum``
   micro-batches of the clipped objective, per completion token::

       loss = -min(rho * A, clip(rho, 1 - clip_eps, 1 + clip_eps_high) * A) + kl_beta * KL_k3
       rho  = exp(logp - logp_old),  KL_k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1

   summed over the completion tokens (EOS included) and divided by the step's completion-token
   count (DAPO's token-level normalisation, TRL's default). With one update per batch (the paper's
   setting) ``logp_old`` is ``logp`` detached and the ratio is exactly 1: the clip matters from the
   second update on.

**What trains** follows the checkpoint's training form (``trains``): ``weights``, the latent
weights through the straight-through estimator on QuantLinear's stage-1 form (the codes are
re-derived from the trained weights when the checkpoint is written), or ``scales``, the stage-2
scales with the codes frozen. ``auto`` takes the student's own form when it holds latent weights,
else the ``trains`` its init checkpoint's recipe records, else ``scales``.

**Choices the paper leaves open** (recorded in the report): clip range 0.2 (PPO's and TRL's
default) with the same upper bound; no KL term (``kl_beta = 0``, TRL's default and DAPO's: no
reference model is held); with ``kl_beta > 0`` the reference is the starting quantized model
(``kl_reference="init"``) or the full-precision teacher (``"teacher"``); rollouts at temperature
1.0 without top-p / top-k (TRL's defaults: the paper gives only its evaluation sampling); one
update per rollout batch; Adam (0.9, 0.95) with the gradient norm clipped at 1.

**Resumable** like stage 2: ``state_dir`` receives ``grpo_state.pt`` every ``save_every`` steps,
at the end and on Ctrl-C / SIGTERM (trainable tensors, optimizer, schedule, the teacher's
reference lengths measured so far, the metric history); ``resume=True`` continues to the same
result as an uninterrupted run. Metrics go to ``grpo_metrics.jsonl`` (and TensorBoard when
installed); the progress bar shows reward, response length and entropy. A non-finite loss,
gradient or parameter, or scales pinned at the fp16 limit, stop the run naming the last good state.
One process: GRPO is not data-parallel (yet); under torchrun it refuses.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm

from rqat_deploy.data.prompts import PromptSet, RLPrompt
from rqat_deploy.data.thinking import thinking_span_ids
from rqat_deploy.errors import CheckpointError, ConfigError, NonFiniteError
from rqat_deploy.quant.surgery import convert_model, dequantized_view, quant_linears, select_trainable
from rqat_deploy.train import distributed as dist_utils
from rqat_deploy.train.rewards import RewardConfig, Scored, score_response
from rqat_deploy.train.schedule import SHAPES, lr_at
from rqat_deploy.train.stage2 import (
    MetricsLogger, check_finite, check_pinned, epoch_order, save_state, signals_deferred,
)
from rqat_deploy.train.teacher import decoder_and_head

__all__ = [
    "GRPOConfig", "GRPOReport", "GRPOTrainer", "Rollouts", "TRAINS", "clipped_token_loss", "generate_rollouts",
    "group_advantages", "recorded_form", "resolve_trains", "run_grpo", "sequence_logprobs",
]

STATE_FILE = "grpo_state.pt"
METRICS_FILE = "grpo_metrics.jsonl"
#: What GRPO trains: ``auto`` (the checkpoint's form), ``weights`` (latent, STE) or ``scales``.
TRAINS = ("auto", "weights", "scales")
KL_REFERENCES = ("init", "teacher")
#: config fields that may change between an interrupted run and its resumption
_RESUME_FREE = ("save_every", "log_every", "tensorboard")
#: the per-step metrics kept in the report's history (and plotted by the bench report)
HISTORY_KEYS = ("reward", "accuracy", "response_length", "thinking_tokens", "entropy")
_ADV_EPS = 1e-4


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO hyperparameters; defaults are the second paper's Table 7 where it gives them (module docstring).

    Attributes:
        steps: GRPO steps (rollout batches; paper 250).
        lr: peak learning rate (paper 5e-7, Adam).
        betas, eps, weight_decay: the optimizer (AdamW; ``weight_decay=0`` is Adam).
        warmup_steps: linear warm-up, in optimizer updates (paper 8).
        schedule: ``cosine`` (paper) | ``linear`` | ``constant`` after the warm-up.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        group_size: rollouts per prompt (paper 8).
        global_batch: rollouts per step (paper 64: 8 prompts x 8).
        grad_accum: micro-batches per optimizer update (paper 4).
        updates_per_batch: optimizer updates per rollout batch (1: on-policy, the paper's).
        clip_eps, clip_eps_high: the ratio's clip range ``[1 - clip_eps, 1 + clip_eps_high]``
            (``clip_eps_high`` ``None``: ``clip_eps``).
        kl_beta: weight of the k3 KL to the reference (0: none, no reference held).
        kl_reference: ``init`` (the starting quantized model) | ``teacher`` (full precision).
        scale_rewards: ``group`` (divide by the group's std) | ``none``.
        temperature, top_p, top_k: rollout sampling (``top_k`` 0: off).
        max_new_tokens: the rollout budget (paper 32,768).
        rollout_batch: sequences per generation call (``None``: the whole step at once).
        loss_chunk: completion tokens per logits chunk (memory).
        max_grad_norm: gradient-norm clipping (``None``: off).
        reward: the reward (:class:`~rqat_deploy.train.rewards.RewardConfig`).
        trains: ``auto`` | ``weights`` | ``scales`` (module docstring).
        seed: prompt order and sampling seed.
        save_every: steps between saved states (0: only at the end / Ctrl-C).
        log_every: steps between metric lines.
        tensorboard: also log to TensorBoard when installed.
    """

    steps: int = 250
    lr: float = 5e-7
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 8
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    group_size: int = 8
    global_batch: int = 64
    grad_accum: int = 4
    updates_per_batch: int = 1
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    kl_beta: float = 0.0
    kl_reference: str = "init"
    scale_rewards: str = "group"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32768
    rollout_batch: int | None = None
    loss_chunk: int = 1024
    max_grad_norm: float | None = 1.0
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    trains: str = "auto"
    seed: int = 0
    save_every: int = 10
    log_every: int = 1
    tensorboard: bool = True

    def __post_init__(self) -> None:
        """Check every value before any work.

        Raises:
            ConfigError: naming the field and the fix.
        """
        if isinstance(self.reward, Mapping):  # from a --config file or a recorded recipe
            object.__setattr__(self, "reward", RewardConfig(**self.reward))
        for name in ("steps", "group_size", "global_batch", "grad_accum", "updates_per_batch", "max_new_tokens",
                     "loss_chunk", "log_every"):
            if not getattr(self, name) >= 1:
                raise ConfigError(f"GRPO {name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ConfigError(f"GRPO group_size must be >= 2 (advantages compare rollouts of one prompt), got {self.group_size}")
        if self.global_batch % self.group_size:
            raise ConfigError(f"GRPO global_batch ({self.global_batch}) must be a multiple of group_size ({self.group_size})")
        if self.grad_accum > self.global_batch:
            raise ConfigError(f"GRPO grad_accum ({self.grad_accum}) cannot exceed global_batch ({self.global_batch})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"GRPO lr must be a positive number, got {self.lr}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise ConfigError("GRPO sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")
        if not (0 < self.clip_eps < 1 and (self.clip_eps_high is None or self.clip_eps_high > 0)):
            raise ConfigError(f"GRPO clip_eps must lie in (0, 1) and clip_eps_high be > 0, got {self.clip_eps}, {self.clip_eps_high}")
        if not self.kl_beta >= 0 or self.kl_reference not in KL_REFERENCES:
            raise ConfigError(f"GRPO kl_beta must be >= 0 and kl_reference one of {KL_REFERENCES}")
        if self.scale_rewards not in ("group", "none"):
            raise ConfigError(f"GRPO scale_rewards must be 'group' or 'none', got {self.scale_rewards!r}")
        if self.schedule not in SHAPES or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ConfigError(f"GRPO schedule must be one of {SHAPES}, min_lr_ratio in [0, 1], warmup_steps >= 0")
        if self.trains not in TRAINS:
            raise ConfigError(f"GRPO trains must be one of {TRAINS}, got {self.trains!r}")
        if self.rollout_batch is not None and self.rollout_batch < 1 or self.save_every < 0:
            raise ConfigError("GRPO rollout_batch must be >= 1 (or None) and save_every >= 0")

    @property
    def prompts_per_step(self) -> int:
        """Prompts per step: ``global_batch / group_size``."""
        return self.global_batch // self.group_size

    @property
    def updates(self) -> int:
        """Optimizer updates of the whole run."""
        return self.steps * self.updates_per_batch

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (what the state file and the report record)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class GRPOReport:
    """What a GRPO run did.

    Attributes:
        steps, start_step: steps of the whole run; where this call began (resume).
        trains: ``weights`` or ``scales``; ``trainable``: tensors and elements that trained.
        seconds, seconds_per_step: wall time of this call's steps (rollouts, rewards and updates).
        sampling: the rollout sampling settings.
        final: the last step's metrics.
        history: per step, :data:`HISTORY_KEYS`.
        config: the :class:`GRPOConfig` as a dict.
        log_path, state_path: files written (or ``None``).
    """

    steps: int
    start_step: int
    trains: str
    trainable: dict[str, int]
    seconds: float
    seconds_per_step: float
    sampling: dict[str, Any]
    final: dict[str, Any]
    history: dict[str, list[float]]
    config: dict[str, Any]
    log_path: str | None = None
    state_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# what trains
# ---------------------------------------------------------------------------------------------


def recorded_form(recipe: Mapping[str, Any] | None) -> str | None:
    """The training form a checkpoint's recorded recipe names (its ``trains``: ``weights`` / ``scales``), or None."""
    form = (recipe or {}).get("trains")
    return form if form in ("weights", "scales") else None


def resolve_trains(option: str, student: nn.Module, init_recipe: Mapping[str, Any] | None = None) -> str:
    """``weights`` or ``scales``: ``option`` unless ``auto`` (module docstring).

    Raises:
        ConfigError: an unknown option, or a student without quantized modules.
    """
    if option not in TRAINS:
        raise ConfigError(f"trains must be one of {TRAINS}, got {option!r}")
    mods = [m for _, m in quant_linears(student)]
    if not mods:
        raise ConfigError("GRPO needs a quantized student (QuantLinear modules): pass a quantized checkpoint (--init-from)")
    if option != "auto":
        return option
    if all(m.form == "stage1" for m in mods):
        return "weights"
    return recorded_form(init_recipe) or "scales"


# ---------------------------------------------------------------------------------------------
# rollouts
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """Generated responses, ``group`` per prompt, prompt-major.

    Attributes:
        prompts: the prompt of each rollout.
        completions: generated ids, cut after the first end-of-generation token (kept: it is trained).
        texts: the decoded responses (special tokens kept, end token dropped).
        thinking: thinking tokens of each response.
        truncated: the response hit ``max_new_tokens`` without an end token.
    """

    prompts: list[RLPrompt]
    completions: list[list[int]]
    texts: list[str]
    thinking: list[int]
    truncated: list[bool]


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(found) if isinstance(found, (list, tuple)) else ([found] if found is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ConfigError("the model has no end-of-generation token (generation_config.eos_token_id or the tokenizer's eos)")
    return sorted(set(ids))


def _cut(row: list[int], eos: set[int]) -> tuple[list[int], bool]:
    """The completion up to and including its first end token; whether it never ended."""
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1], False
    return row, True


@torch.no_grad()
def generate_rollouts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[RLPrompt],
    group: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    greedy: bool = False,
    batch_size: int | None = None,
) -> Rollouts:
    """``group`` responses to each prompt from ``model`` (PyTorch generation with a KV cache).

    A quantized model generates through :func:`~rqat_deploy.quant.surgery.dequantized_view`: the
    same weights as its training forward, dequantized once per call instead of once per token.
    Sampling draws from torch's global generator: seed it for reproducible rollouts.

    Args:
        model: a causal LM (quantized or not).
        tokenizer: its tokenizer (``pad_token_id`` or ``eos_token_id`` pads the prompts on the left).
        prompts: the prompts.
        group: responses per prompt.
        temperature, top_p, top_k: sampling (``top_k`` 0: off); ignored when ``greedy``.
        max_new_tokens: the budget of each response.
        greedy: decode greedily (``group`` identical responses).
        batch_size: sequences per ``generate`` call (``None``: all at once).

    Returns:
        :class:`Rollouts`, prompt-major.
    """
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    think = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    unk = getattr(tokenizer, "unk_token_id", None)
    think_ids = tuple(think) if None not in think and unk not in think else None
    expanded = [p for p in prompts for _ in range(group)]
    device = next(model.parameters()).device
    sampling: dict[str, Any] = {"do_sample": False} if greedy else {
        "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k,  # 0 is off (None: the model's default)
    }
    out = Rollouts([], [], [], [], [])
    was_training = model.training
    model.eval()
    step = batch_size or len(expanded)
    with dequantized_view(model):
        for a in range(0, len(expanded), step):
            chunk = expanded[a : a + step]
            width = max(len(p.ids) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p.ids):] = torch.tensor(p.ids)
                mask[i, width - len(p.ids):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=pad, **sampling)
            for p, row in zip(chunk, gen[:, width:].tolist()):
                comp, truncated = _cut(row, set(eos))
                body = comp[:-1] if not truncated else comp
                n_think = thinking_span_ids(body, *think_ids, starts_in_thinking=p.starts_in_thinking)[0] if think_ids else 0
                out.prompts.append(p)
                out.completions.append(comp)
                out.texts.append(tokenizer.decode(body, skip_special_tokens=False))
                out.thinking.append(n_think)
                out.truncated.append(truncated)
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# the objective
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """Group-normalised advantages of ``rewards`` ``[prompts, group]``: ``(r - mean) / (std + 1e-4)``.

    ``scale="none"`` leaves out the division (Dr. GRPO). A group whose rewards are all equal gets 0.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + _ADV_EPS)


def clipped_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped policy loss (+ ``kl_beta`` x k3 KL to the reference), module docstring.

    Args:
        logp: the policy's log-probabilities of the sampled tokens ``[N]`` (with gradient).
        old_logp: those of the policy that sampled them ``[N]``.
        advantages: each token's advantage ``[N]``.
        clip_eps, clip_eps_high: the clip range of the ratio.
        ref_logp: the reference's log-probabilities ``[N]`` (needed when ``kl_beta > 0``).
        kl_beta: weight of the KL term.

    Returns:
        ``(loss [N], clipped [N] bool, kl [N])``: the loss per token; where the clip took the
        gradient away; the k3 KL per token (zeros without a reference).
    """
    ratio = torch.exp(logp - old_logp)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if kl_beta and ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
        loss = loss + kl_beta * kl
    return loss, (clipped < unclipped).detach(), kl.detach()


def _chunk_stats(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(h, weight.to(h.dtype), bias).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    ent = -(logp_all.exp() * logp_all).sum(-1).detach()
    return logp_all.gather(1, y[:, None])[:, 0], ent


def sequence_logprobs(
    model: nn.Module, seqs: Sequence[tuple[Sequence[int], Sequence[int]]], *, temperature: float = 1.0, chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and entropies of the completion tokens of ``(prompt ids, completion ids)`` pairs.

    The sequences are right-padded into one batch; the logits are computed ``chunk`` completion
    tokens at a time (recomputed in the backward), divided by ``temperature`` as the sampler did.

    Returns:
        ``(logp [N], entropy [N])`` over every completion token, sequence after sequence (the
        entropy carries no gradient).
    """
    base, head = decoder_and_head(model)
    device = next(model.parameters()).device
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    pick = torch.zeros((len(seqs), width), dtype=torch.bool)  # positions whose NEXT token is a completion token
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor([*p, *c])
        mask[i, : len(p) + len(c)] = 1
        pick[i, len(p) - 1 : len(p) + len(c) - 1] = True
    ids, mask, pick = ids.to(device), mask.to(device), pick.to(device)
    hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    h = hidden[pick]  # [N, H], row-major: sequence after sequence
    y = ids[:, 1:][pick[:, :-1]]
    bias = getattr(head, "bias", None)
    parts = [
        torch.utils.checkpoint.checkpoint(_chunk_stats, h[a : a + chunk], head.weight, bias, y[a : a + chunk], temperature,
                                          use_reentrant=False)
        for a in range(0, h.shape[0], chunk)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------


RewardFn = Callable[[Rollouts, int, Mapping[int, float]], list[Scored]]


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


class GRPOTrainer:
    """One GRPO run (module docstring): set up or resume on construction, then :meth:`run`."""

    def __init__(
        self,
        student: nn.Module,
        tokenizer: Any,
        prompts: PromptSet,
        cfg: GRPOConfig,
        *,
        teacher: nn.Module | None = None,
        init_recipe: Mapping[str, Any] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
        reward_fn: RewardFn | None = None,
    ) -> None:
        """Check and prepare everything; resume from ``state_dir``. Arguments as :func:`run_grpo`."""
        if dist_utils.is_distributed() and dist_utils.world_size() > 1:
            raise ConfigError("GRPO runs in one process: launch it without torchrun (one device)")
        if len(prompts) < cfg.prompts_per_step:
            raise ConfigError(f"{len(prompts)} prompts are fewer than one GRPO step takes ({cfg.prompts_per_step}): add prompts")
        self.student, self.tok, self.prompts, self.cfg, self.teacher = student, tokenizer, prompts, cfg, teacher
        self.trains = resolve_trains(cfg.trains, student, init_recipe)
        needs_teacher = (cfg.kl_beta and cfg.kl_reference == "teacher") or (
            cfg.reward.length_weight and cfg.reward.length_reference == "teacher")
        if needs_teacher and teacher is None:
            raise ConfigError("this GRPO setting needs the full-precision teacher (kl_reference or length_reference 'teacher')")
        self.params = select_trainable(student, self.trains)
        if not self.params:
            raise ConfigError(f"nothing trains in GRPO with trains={self.trains!r}")
        self.reference = self._reference() if cfg.kl_beta else None
        self.reward_fn = reward_fn or self._score
        self.device = next(student.parameters()).device
        self.optimizer = torch.optim.AdamW([p for _, p in self.params], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(
            s, peak=1.0, total=cfg.updates, warmup=cfg.warmup_steps, floor=cfg.min_lr_ratio, shape=cfg.schedule))
        sdir = Path(state_dir) if state_dir is not None else None
        self.state_path = sdir / STATE_FILE if sdir is not None else None
        self.log_path = sdir / METRICS_FILE if sdir is not None else None
        self.fingerprint = prompts.fingerprint()
        self.start = 0
        self.last_saved: int | None = None
        self.teacher_lengths: dict[int, float] = {}
        self.history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
        if self.state_path is not None and self.state_path.exists():
            self._resume(resume)
        self.done = self.start
        self.logger = MetricsLogger(self.log_path, cfg.tensorboard, self.start if self.last_saved is not None else None, "grpo")
        self.seconds = 0.0
        self.final: dict[str, Any] = {}

    def _reference(self) -> nn.Module:
        """The frozen reference of the KL term: the teacher, or a plain copy of the starting student."""
        if self.cfg.kl_reference == "teacher":
            return self.teacher  # type: ignore[return-value]
        ref = convert_model(copy.deepcopy(self.student)).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _resume(self, resume: bool) -> None:
        assert self.state_path is not None
        if not resume:
            raise ConfigError(f"{self.state_path} holds the state of an earlier GRPO run: pass --resume to continue it, "
                              "or remove the work directory to start over")
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
            raise CheckpointError(f"{self.state_path} cannot be read ({type(e).__name__}): delete it to restart GRPO") from e
        old = {k: v for k, v in state["config"].items() if k not in _RESUME_FREE}
        new = {k: v for k, v in self.cfg.to_dict().items() if k not in _RESUME_FREE}
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff or state["data_fingerprint"] != self.fingerprint or state["trains"] != self.trains:
            raise ConfigError(f"cannot resume from {self.state_path}: other settings or prompts ({diff or 'data / trains'}); "
                              "resume with the same settings or start a new run")
        named = dict(self.params)
        with torch.no_grad():
            for name, value in state["params"].items():
                named[name].copy_(value.to(named[name].device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.teacher_lengths = {int(k): float(v) for k, v in state["teacher_lengths"].items()}
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.start = self.last_saved = int(state["step"])

    def snapshot(self) -> None:
        """Write the resumable state after ``self.done`` steps (no-op without ``state_dir``)."""
        if self.state_path is None:
            return
        save_state(self.state_path, {
            "step": self.done, "params": {n: p.detach().cpu().clone() for n, p in self.params},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "config": self.cfg.to_dict(), "data_fingerprint": self.fingerprint, "trains": self.trains,
            "teacher_lengths": {str(k): v for k, v in self.teacher_lengths.items()}, "history": self.history,
        })
        self.last_saved = self.done

    def stop_hint(self) -> str:
        """What a stopped run kept and what to change."""
        kept = (f"the last good state (step {self.last_saved}) stays in {self.state_path.parent}"
                if self.last_saved is not None and self.state_path is not None else "no state was saved")
        return f"no checkpoint is written and {kept}; lower the GRPO learning rate (--grpo-lr, now {self.cfg.lr:g})"

    # -- one step -------------------------------------------------------------------------------

    def _prompt_indices(self, step: int) -> list[int]:
        per = self.cfg.prompts_per_step
        per_epoch = len(self.prompts) // per
        epoch, pos = divmod(step, per_epoch)
        order = epoch_order(len(self.prompts), self.cfg.seed, epoch)
        return order[pos * per : (pos + 1) * per]

    def _reference_lengths(self, idx: list[int]) -> dict[int, float]:
        """The length-aware reward's reference thinking length of each prompt (teacher: measured once)."""
        r = self.cfg.reward
        if not r.length_weight:
            return {}
        if r.length_reference == "budget":
            return {i: float(r.length_budget or 0) for i in idx}
        if r.length_reference == "data":
            return {i: float(self.prompts.prompts[i].ref_thinking_tokens or 0) for i in idx}
        missing = [i for i in idx if i not in self.teacher_lengths]
        if missing:
            greedy = generate_rollouts(self.teacher, self.tok, [self.prompts.prompts[i] for i in missing], 1,  # type: ignore[arg-type]
                                       max_new_tokens=self.cfg.max_new_tokens, greedy=True,
                                       batch_size=self.cfg.rollout_batch)
            self.teacher_lengths.update({i: float(n) for i, n in zip(missing, greedy.thinking)})
        return {i: self.teacher_lengths[i] for i in idx}

    def _score(self, rollouts: Rollouts, group: int, reference: Mapping[int, float]) -> list[Scored]:
        refs = [reference.get(k // group) for k in range(len(rollouts.texts))]
        return [
            score_response(text, p.answer, n, self.cfg.reward, reference=ref, starts_in_thinking=p.starts_in_thinking)
            for text, p, n, ref in zip(rollouts.texts, rollouts.prompts, rollouts.thinking, refs)
        ]

    def step(self, step: int) -> dict[str, Any]:
        """GRPO step ``step`` (0-based): rollouts, rewards, updates; returns its metrics."""
        c = self.cfg
        t0 = time.perf_counter()
        idx = self._prompt_indices(step)
        torch.manual_seed(_step_seed(c.seed, step))  # the step's sampling depends on (seed, step) only
        roll = generate_rollouts(self.student, self.tok, [self.prompts.prompts[i] for i in idx], c.group_size,
                                 temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, max_new_tokens=c.max_new_tokens,
                                 batch_size=c.rollout_batch)
        t_roll = time.perf_counter() - t0
        refs = self._reference_lengths(idx)
        scored = self.reward_fn(roll, c.group_size, {k: refs[i] for k, i in enumerate(idx) if i in refs})
        rewards = torch.tensor([s.reward for s in scored], dtype=torch.float32).view(-1, c.group_size)
        adv = group_advantages(rewards, c.scale_rewards).flatten()
        stats = self._updates(step, roll, adv)
        n = len(scored)
        metrics = {
            "step": step + 1, "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
            "accuracy": sum(s.correct for s in scored) / n, "formatted": sum(s.formatted for s in scored) / n,
            "overlong": sum(s.overlong for s in scored) / n,
            "response_length": sum(len(x) for x in roll.completions) / n, "thinking_tokens": sum(roll.thinking) / n,
            "truncated": sum(roll.truncated) / n, **stats, "rollout_seconds": t_roll,
            "seconds": time.perf_counter() - t0,
        }
        return metrics

    def _updates(self, step: int, roll: Rollouts, adv: torch.Tensor) -> dict[str, float]:
        """``updates_per_batch`` optimizer updates over the rollouts; their mean statistics."""
        c = self.cfg
        seqs = [(p.ids, comp) for p, comp in zip(roll.prompts, roll.completions)]
        n_tok = max(1, sum(len(x) for x in roll.completions))
        bounds = [round(i * len(seqs) / c.grad_accum) for i in range(c.grad_accum + 1)]
        mbs = [list(range(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]
        old = self._no_grad_logprobs(self.student, seqs, mbs) if c.updates_per_batch > 1 else None
        ref = self._no_grad_logprobs(self.reference, seqs, mbs) if self.reference is not None else None
        sums = dict.fromkeys(("loss", "entropy", "kl", "clip_fraction", "grad_norm", "lr"), 0.0)
        self.student.train()
        for _ in range(c.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            for k, mb in enumerate(mbs):
                logp, ent = sequence_logprobs(self.student, [seqs[i] for i in mb], temperature=c.temperature, chunk=c.loss_chunk)
                tok_adv = torch.cat([adv[i].expand(len(seqs[i][1])) for i in mb]).to(logp.device)
                loss, clipped, kl = clipped_token_loss(
                    logp, old[k] if old is not None else logp.detach(), tok_adv, clip_eps=c.clip_eps,
                    clip_eps_high=c.clip_eps_high, ref_logp=ref[k] if ref is not None else None, kl_beta=c.kl_beta)
                total = loss.sum() / n_tok
                if not torch.isfinite(total):
                    raise NonFiniteError(f"non-finite GRPO loss ({float(total)}) at step {step}; {self.stop_hint()}")
                total.backward()
                sums["loss"] += float(total.detach())
                sums["entropy"] += float(ent.sum()) / n_tok
                sums["kl"] += float(kl.sum()) / n_tok
                sums["clip_fraction"] += float(clipped.sum()) / n_tok
            with signals_deferred():  # Ctrl-C waits for the update: a saved state is a whole step
                grad_norm, lr = self._apply(step)
            sums["grad_norm"] += grad_norm
            sums["lr"] += lr
        return {k: v / c.updates_per_batch for k, v in sums.items()}

    @torch.no_grad()
    def _no_grad_logprobs(self, model: nn.Module, seqs: list, mbs: list[list[int]]) -> list[torch.Tensor]:
        return [sequence_logprobs(model, [seqs[i] for i in mb], temperature=self.cfg.temperature, chunk=self.cfg.loss_chunk)[0]
                for mb in mbs]

    def _apply(self, step: int) -> tuple[float, float]:
        """Check, clip and apply the gradient; step the schedule. The gradient norm and the rate used."""
        check_finite(self.params, "gradient", step, self.stop_hint())
        plist = [p for _, p in self.params]
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(plist, limit))
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        check_finite(self.params, "value", step, self.stop_hint())
        check_pinned(self.params, step, self.stop_hint())
        return grad_norm, lr

    # -- the run --------------------------------------------------------------------------------

    def run(self, *, progress: bool = True, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> GRPOReport:
        """Train the remaining steps, saving every ``save_every`` and on Ctrl-C; the report."""
        bar = tqdm(total=self.cfg.steps, initial=self.start, desc="GRPO", disable=not progress, dynamic_ncols=True)
        try:
            for step in range(self.start, self.cfg.steps):
                metrics = self.step(step)
                self.done, self.final = step + 1, metrics
                self.seconds += metrics["seconds"]
                for k in HISTORY_KEYS:
                    self.history[k].append(metrics[k])
                if self.done % self.cfg.log_every == 0 or self.done == self.cfg.steps:
                    self.logger.log(metrics)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", len=f"{metrics['response_length']:.0f}",
                                ent=f"{metrics['entropy']:.3f}")
                bar.update(1)
                if self.cfg.save_every and self.done % self.cfg.save_every == 0:
                    self.snapshot()
                if on_step is not None:
                    on_step(self.done, metrics)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt) and self.last_saved != self.done:
                self.snapshot()
            raise
        finally:
            bar.close()
            self.logger.close()
        if self.last_saved != self.done:
            self.snapshot()
        return self._report()

    def _report(self) -> GRPOReport:
        c = self.cfg
        ran = self.done - self.start
        return GRPOReport(
            steps=c.steps, start_step=self.start, trains=self.trains,
            trainable={"tensors": len(self.params), "elements": sum(p.numel() for _, p in self.params)},
            seconds=self.seconds, seconds_per_step=self.seconds / ran if ran else 0.0,
            sampling={"temperature": c.temperature, "top_p": c.top_p, "top_k": c.top_k, "max_new_tokens": c.max_new_tokens,
                      "group_size": c.group_size, "prompts_per_step": c.prompts_per_step},
            final=self.final, history=self.history, config=c.to_dict(),
            log_path=str(self.log_path) if self.log_path else None,
            state_path=str(self.state_path) if self.state_path else None,
        )


def run_grpo(
    student: nn.Module,
    tokenizer: Any,
    prompts: PromptSet,
    cfg: GRPOConfig,
    *,
    teacher: nn.Module | None = None,
    init_recipe: Mapping[str, Any] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    reward_fn: RewardFn | None = None,
) -> GRPOReport:
    """Train a quantized student with GRPO on ``prompts`` (module docstring).

    Args:
        student: a causal LM with QuantLinear modules (either form), on its training device; modified in place.
        tokenizer: its tokenizer with the chat template the prompts were rendered with.
        prompts: prompts with gold answers (:func:`rqat_deploy.data.prompts.build_prompts`).
        cfg: hyperparameters.
        teacher: the full-precision model (needed by ``kl_reference`` / ``length_reference`` ``teacher``).
        init_recipe: the recorded recipe of the checkpoint the student came from (``trains="auto"``).
        state_dir: directory for resumable state and metrics (``None``: nothing written).
        resume: continue from ``state_dir``'s state.
        progress: show a progress bar with reward, response length and entropy.
        on_step: called after every step with ``(steps_done, metrics)``; ``KeyboardInterrupt`` saves first.
        reward_fn: replaces the reward: ``(rollouts, group_size, reference lengths by rollout) -> [Scored]``.

    Returns:
        A :class:`GRPOReport`.

    Raises:
        ConfigError: no quantized module, too few prompts, a missing teacher, a state without ``resume``
            or from other settings, or a torchrun launch.
        NonFiniteError / DivergenceError: the run diverged (the last good state stays in ``state_dir``).
    """
    trainer = GRPOTrainer(student, tokenizer, prompts, cfg, teacher=teacher, init_recipe=init_recipe,
                          state_dir=state_dir, resume=resume, reward_fn=reward_fn)
    return trainer.run(progress=progress, on_step=on_step)
