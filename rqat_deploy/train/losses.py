"""Stage-2 losses, computed in chunks of completion tokens so full-vocabulary logits stay small.

Notation, per completion token ``t`` (prompt and padding never count), with label ``y_t``, student
log-probabilities ``log q_t = log_softmax(student logits)`` over the full vocabulary, and the
teacher's full-vocabulary log-probabilities ``log p_t`` of which the top ``k`` (``K_t``, k = 20) and
the label's ``log p_t(y_t)`` are kept (live or from the cache of :mod:`rqat_deploy.train.teacher`)::

    CE_t = -log q_t(y_t)

The loss is a sum of *terms*, each with a name; every term is summed over the ``N`` completion
tokens of the (global) batch and divided by the same ``N``:

| term             | what                          | per-token value                                            | weight |
|------------------|-------------------------------|------------------------------------------------------------|--------|
| ``ce``           | cross-entropy                 | ``CE_t``                                                   | alpha  |
| ``rr``           | teacher-guided reward-rectified CE | ``CE_t * sg(p_t(y_t))`` (teacher's probability of the label) | alpha |
| ``dft``          | self-rectified CE (DFT)       | ``CE_t * sg(q_t(y_t))`` (student's own probability)        | alpha  |
| ``topk_kl``      | top-k part of the forward KL  | ``sum_{i in K_t} p_t(i) * (log p_t(i) - log q_t(i))``      | beta   |
| ``topk_kl_renorm`` | KL between the top-k renormalised | the same with ``p``, ``q`` renormalised over ``K_t``   | beta   |
| ``jsd``          | symmetric top-k JSD (partial) | ``1/2 sum_K p log(p/m) + 1/2 sum_K q log(q/m)``, ``m = (p+q)/2`` | beta |
| ``jsd_renorm``   | JSD of the top-k renormalised | the same with ``p``, ``q`` renormalised over ``K_t``       | beta   |
| ``kl``           | full-vocabulary forward KL    | ``sum_{i in V} p_t(i) * (log p_t(i) - log q_t(i))`` (live teacher only) | beta |

``sg`` is stop-gradient. ``topk_kl`` is a *partial sum* (the authors' released code computes it
so; the paper does not say): its gradient is a cross-entropy on the teacher's top-k soft labels, it
is minimised at the teacher's top-k renormalised (``q = p / sum_K p`` on ``K_t``, 0 elsewhere), not
at the teacher, and its minimum ``P_K log P_K`` is negative. ``topk_kl_renorm`` is a true
divergence between the two distributions restricted to the teacher's top-k (log-softmax of the
``k`` gathered values), zero exactly when they agree there.

Presets (:data:`PRESETS`): ``paper`` = ``rr+topk_kl`` (the paper's ``alpha*CE*sg(p) + beta*KL``
over the teacher's top-20), ``released`` = ``ce+jsd`` (the released code: plain CE and symmetric
top-20 JSD), ``reasoning-qat`` = ``kl`` (Reasoning-QAT's KD), ``efficientqat`` = ``ce``,
``self-dft`` = ``dft``. The paper's ablation *rows* (S, R, C, C+S, C+R) are runs, not loss terms:
they are recipes (:mod:`rqat_deploy.train.recipes`); :data:`LETTERS` maps the letters this module
used before to the names, for the error message that refuses them.

Memory: :func:`chunked_loss` computes the student logits from the final hidden states ``chunk_size``
tokens at a time through ``lm_head``, and the gradient w.r.t. the hidden states (and ``lm_head``
when it trains) of each chunk right away, inside a custom autograd function; so no more than
``chunk_size x V`` fp32 logits (plus their softmax and gradient) exist at once, in the forward and
in the backward.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from rqat_deploy.errors import ConfigError, ShapeError, did_you_mean

#: loss term name -> what it is (the module docstring has the formulas)
TERMS: dict[str, str] = {
    "ce": "cross-entropy",
    "rr": "teacher-guided reward-rectified cross-entropy",
    "dft": "self-rectified cross-entropy (DFT)",
    "topk_kl": "forward KL over the teacher's top-k, partial sum (not renormalised)",
    "topk_kl_renorm": "forward KL between teacher and student renormalised over the teacher's top-k",
    "jsd": "symmetric JSD over the teacher's top-k, partial sums (not renormalised)",
    "jsd_renorm": "symmetric JSD between teacher and student renormalised over the teacher's top-k",
    "kl": "full-vocabulary forward KL (live teacher)",
}
ALPHA_TERMS = ("ce", "rr", "dft")
BETA_TERMS = ("topk_kl", "topk_kl_renorm", "jsd", "jsd_renorm", "kl")
#: top-k terms, and whether each renormalises over the top-k
TOPK_TERMS: dict[str, bool] = {"topk_kl": False, "topk_kl_renorm": True, "jsd": False, "jsd_renorm": True}
#: named loss variants -> term sets
PRESETS: dict[str, str] = {
    "paper": "rr+topk_kl",
    "released": "ce+jsd",
    "reasoning-qat": "kl",
    "efficientqat": "ce",
    "self-dft": "dft",
}
#: the one-letter term spellings of earlier versions (refused, with these names in the message)
LETTERS: dict[str, str] = {"C": "ce", "R": "rr", "D": "dft", "S": "topk_kl", "J": "jsd", "F": "kl"}
LN2 = math.log(2.0)


def parse_terms(terms: str) -> tuple[str, ...]:
    """``"rr+topk_kl"`` (or a preset name) -> ``("rr", "topk_kl")``, validated and in canonical order.

    Raises:
        ConfigError: an unknown or repeated term, an empty set, or the old one-letter spellings
            (the message names the new names, and the recipes that run the paper's ablation rows).
    """
    spec = PRESETS.get(terms.strip(), terms)
    names = [t.strip() for t in re.split(r"[+,]", spec) if t.strip()]
    if names and all(n.upper() in LETTERS for n in names):
        new = "+".join(LETTERS[n.upper()] for n in names)
        raise ConfigError(
            f"loss terms are named now, not lettered: {terms!r} means {new!r} "
            f"({', '.join(f'{k}={v}' for k, v in LETTERS.items())}); the paper's ablation rows S, R, C, C+S, C+R are "
            "recipes (--recipe C+S), not loss terms"
        )
    bad = [n for n in names if n not in TERMS]
    if bad or not names or len(set(names)) != len(names):
        raise ConfigError(
            f"loss terms {terms!r} are not a '+'-joined set of {list(TERMS)}"
            f"{did_you_mean(bad[0], list(TERMS)) if bad else ''} or a preset {list(PRESETS)}"
        )
    return tuple(t for t in TERMS if t in names)


@dataclass(frozen=True)
class LossConfig:
    """Which loss terms, their weights, and how they are computed (module docstring).

    Attributes:
        terms: ``"+"``-joined term names or a preset name (default the paper's ``rr+topk_kl``).
        alpha: weight of the CE-type terms ``ce``, ``rr``, ``dft`` (paper 0.2).
        beta: weight of the divergence terms ``topk_kl``, ``jsd``, ``kl``... (paper 1.0).
        top_k: teacher top-k size of the top-k terms (paper 20).
        chunk_size: completion tokens per logits chunk.
    """

    terms: str = "rr+topk_kl"
    alpha: float = 0.2
    beta: float = 1.0
    top_k: int = 20
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        parse_terms(self.terms)
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def term_set(self) -> tuple[str, ...]:
        """The term names, in canonical order."""
        return parse_terms(self.terms)

    @property
    def needs_full_teacher(self) -> bool:
        """Whether a term needs the teacher's full-vocabulary distribution (``kl``: live teacher only)."""
        return "kl" in self.term_set

    @property
    def needs_topk(self) -> bool:
        """Whether a term reads the teacher's top-k."""
        return any(t in TOPK_TERMS for t in self.term_set)

    @property
    def needs_teacher(self) -> bool:
        """Whether a term needs teacher targets at all (``ce`` and ``dft`` do not)."""
        return any(t not in ("ce", "dft") for t in self.term_set)


@dataclass
class TeacherTargets:
    """The teacher's view of ``N`` completion tokens, in the order of the student's selected positions.

    Attributes:
        topk_ids: ``[N, k]`` int64 token ids of the teacher's top-k.
        topk_logprobs: ``[N, k]`` float32 full-vocabulary log-probabilities of those ids.
        label_logprobs: ``[N]`` float32 teacher log-probability of the label token.
        hidden: ``[N, H_t]`` teacher final hidden states (live teacher; needed by term F).
        head_weight: ``[V, H_t]`` teacher output matrix (with ``hidden``).
        head_bias: ``[V]`` or ``None``.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    label_logprobs: torch.Tensor
    hidden: torch.Tensor | None = None
    head_weight: torch.Tensor | None = None
    head_bias: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.label_logprobs.shape[0]

    def to(self, device: torch.device | str) -> "TeacherTargets":
        """The targets on ``device`` (the head stays where it is; its chunks move on use)."""
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return TeacherTargets(
            mv(self.topk_ids), mv(self.topk_logprobs), mv(self.label_logprobs), self.hidden, self.head_weight, self.head_bias
        )

    def slice(self, a: int, b: int) -> "TeacherTargets":
        """Tokens ``a:b``."""
        return TeacherTargets(
            self.topk_ids[a:b],
            self.topk_logprobs[a:b],
            self.label_logprobs[a:b],
            None if self.hidden is None else self.hidden[a:b],
            self.head_weight,
            self.head_bias,
        )

    @staticmethod
    def cat(parts: list["TeacherTargets"]) -> "TeacherTargets":
        """Concatenate targets along tokens (hidden states only if every part has them)."""
        hid = None if any(p.hidden is None for p in parts) else torch.cat([p.hidden for p in parts])
        return TeacherTargets(
            torch.cat([p.topk_ids for p in parts]),
            torch.cat([p.topk_logprobs for p in parts]),
            torch.cat([p.label_logprobs for p in parts]),
            hid,
            parts[0].head_weight if parts else None,
            parts[0].head_bias if parts else None,
        )


def topk_targets(logits: torch.Tensor, labels: torch.Tensor, k: int) -> TeacherTargets:
    """Teacher targets from teacher logits ``[N, V]`` and labels ``[N]`` (no hidden states).

    Log-probabilities are the float32 log-softmax over the full vocabulary.
    """
    logp = logits.float().log_softmax(-1)  # [N, V]
    if k > logp.shape[-1]:
        raise ShapeError(f"top_k={k} exceeds the vocabulary size {logp.shape[-1]}")
    vals, ids = logp.topk(k, dim=-1)  # [N, k]
    return TeacherTargets(ids, vals, logp.gather(1, labels[:, None].long())[:, 0])


def term_sums(
    logits: torch.Tensor, labels: torch.Tensor, teacher: TeacherTargets | None, cfg: LossConfig
) -> dict[str, torch.Tensor]:
    """Weighted, unnormalised sums of each configured term over a chunk of tokens.

    Args:
        logits: ``[c, V]`` float32 student logits.
        labels: ``[c]`` label ids.
        teacher: the chunk's teacher targets (``None`` only for term sets without a teacher).
        cfg: the loss configuration.

    Returns:
        ``{name: alpha_or_beta * sum_t term_t}`` (differentiable w.r.t. ``logits``).
    """
    terms = cfg.term_set
    logq = logits.log_softmax(-1)  # [c, V]
    lq_y = logq.gather(1, labels[:, None])[:, 0]  # [c]
    ce = -lq_y
    out: dict[str, torch.Tensor] = {}
    if "ce" in terms:
        out["ce"] = cfg.alpha * ce.sum()
    if "rr" in terms:
        out["rr"] = cfg.alpha * (ce * teacher.label_logprobs.float().exp()).sum()
    if "dft" in terms:
        out["dft"] = cfg.alpha * (ce * lq_y.detach().exp()).sum()
    for name in (t for t in terms if t in TOPK_TERMS):
        lp = teacher.topk_logprobs.float()  # [c, k]
        lq = logq.gather(1, teacher.topk_ids)  # [c, k]
        if TOPK_TERMS[name]:
            lp, lq = lp.log_softmax(-1), lq.log_softmax(-1)
        if name.startswith("topk_kl"):
            out[name] = cfg.beta * F.kl_div(lq, lp, reduction="sum", log_target=True)
        else:
            lm = torch.logaddexp(lp, lq) - LN2  # log of the mixture m = (p + q) / 2
            js = F.kl_div(lm, lp, reduction="sum", log_target=True) + F.kl_div(lm, lq, reduction="sum", log_target=True)
            out[name] = cfg.beta * 0.5 * js
    if "kl" in terms:
        if teacher is None or teacher.hidden is None or teacher.head_weight is None:
            raise ConfigError("the full-vocabulary KL term (kl) needs the live teacher's hidden states; a cached teacher has only its top-k")
        out["kl"] = cfg.beta * F.kl_div(logq, _teacher_logprobs(teacher, logq.device), reduction="sum", log_target=True)
    return out


def _teacher_logprobs(teacher: TeacherTargets, device: torch.device) -> torch.Tensor:
    """Full-vocabulary teacher log-probabilities ``[c, V]`` of a chunk (no grad)."""
    with torch.no_grad():
        w = teacher.head_weight
        b = teacher.head_bias
        logits = F.linear(teacher.hidden.to(w.device), w, b).float()  # [c, V]
        return logits.log_softmax(-1).to(device)


@dataclass
class LossOutput:
    """A batch loss and its parts.

    Attributes:
        loss: scalar tensor, differentiable w.r.t. the hidden states (and ``lm_head`` if it trains).
        parts: each term's contribution to ``loss`` (``{name: value}``, floats).
        n_tokens: completion tokens in this call.
    """

    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)
    n_tokens: int = 0


class _ChunkedLossFn(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradients; backward scales them."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, job: "_Job") -> torch.Tensor:  # type: ignore[override]
        need = job.need
        grads = [
            torch.zeros_like(hidden, dtype=torch.float32) if need[0] else None,
            torch.zeros_like(weight, dtype=torch.float32) if need[1] else None,
            torch.zeros_like(bias, dtype=torch.float32) if need[2] else None,
        ]
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        n, c = hidden.shape[0], job.cfg.chunk_size
        for a in range(0, n, c):
            b = min(a + c, n)
            with torch.enable_grad() if any(need) else torch.no_grad():
                h = hidden[a:b].detach().requires_grad_(need[0])
                w = weight.detach().requires_grad_(need[1])
                bb = None if bias is None else bias.detach().requires_grad_(need[2])
                logits = F.linear(h, w, bb).float()  # [c, V]
                sums = term_sums(logits, job.labels[a:b], None if job.teacher is None else job.teacher.slice(a, b), job.cfg)
                loss = torch.stack(list(sums.values())).sum() / job.n_norm
                inputs = [x for x, nd in zip((h, w, bb), need) if nd]
                chunk_grads = torch.autograd.grad(loss, inputs) if inputs else ()
            it = iter(chunk_grads)
            if need[0]:
                grads[0][a:b] = next(it).float()
            if need[1]:
                grads[1] += next(it).float()
            if need[2]:
                grads[2] += next(it).float()
            total += loss.detach().double()
            for k, v in sums.items():
                job.parts[k] = job.parts.get(k, 0.0) + float(v.detach()) / job.n_norm
        ctx.need = need
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        return total.float()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        out: list[torch.Tensor | None] = []
        for g, nd, dt in zip(saved, ctx.need, ctx.dtypes):
            out.append((g * grad_out).to(dt) if nd else None)
        return out[0], out[1], out[2], None


@dataclass
class _Job:
    labels: torch.Tensor
    teacher: TeacherTargets | None
    cfg: LossConfig
    n_norm: float
    need: tuple[bool, bool, bool] = (False, False, False)  # gradients for (hidden, weight, bias)
    parts: dict[str, float] = field(default_factory=dict)


def chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    teacher: TeacherTargets | None,
    cfg: LossConfig,
    n_norm: int | float | None = None,
) -> LossOutput:
    """The stage-2 loss over completion tokens, ``chunk_size`` tokens of logits at a time.

    Args:
        hidden: ``[N, H]`` student final hidden states at the positions that predict each label
            (position ``t-1`` for label ``t``), in any dtype.
        weight: ``[V, H]`` the student's ``lm_head`` weight (trains only if it requires grad).
        bias: ``[V]`` ``lm_head`` bias or ``None``.
        labels: ``[N]`` the completion tokens.
        teacher: teacher targets for the same ``N`` tokens (``None`` for teacher-free terms).
        cfg: which terms, weights, top-k handling, chunk size.
        n_norm: the token count every term is divided by; default ``N``. Pass the completion-token
            count of the whole global batch when the batch is split into micro-batches, so that
            the accumulated gradient is the global per-token mean.

    Returns:
        A :class:`LossOutput` (``loss`` differentiable w.r.t. ``hidden`` / ``weight`` / ``bias``).

    Raises:
        ShapeError: mismatched token counts.
        ConfigError: a teacher term without teacher targets.
    """
    n = hidden.shape[0]
    if labels.shape != (n,):
        raise ShapeError(f"labels must be [N={n}], got {list(labels.shape)}")
    if cfg.needs_teacher:
        if teacher is None:
            raise ConfigError(f"loss terms {cfg.terms!r} need teacher targets")
        if len(teacher) != n:
            raise ShapeError(f"teacher targets cover {len(teacher)} tokens, the student batch {n}")
        if cfg.needs_topk and teacher.topk_ids.shape[1] < cfg.top_k:
            raise ShapeError(f"the teacher gives its top {teacher.topk_ids.shape[1]}, the loss asks for {cfg.top_k}")
        if teacher.topk_ids.shape[1] > cfg.top_k:
            teacher = TeacherTargets(
                teacher.topk_ids[:, : cfg.top_k], teacher.topk_logprobs[:, : cfg.top_k], teacher.label_logprobs,
                teacher.hidden, teacher.head_weight, teacher.head_bias,
            )
    norm = float(n if n_norm is None else n_norm)
    if n == 0:
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        return LossOutput(zero.float(), {}, 0)
    if norm <= 0:
        raise ConfigError(f"n_norm must be positive, got {n_norm}")
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    job = _Job(labels.long(), teacher, cfg, norm, need)
    loss = _ChunkedLossFn.apply(hidden, weight, bias, job)
    return LossOutput(loss, job.parts, n)


@torch.no_grad()
def token_metrics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    teacher: TeacherTargets,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Evaluation sums over tokens: CE, top-k KL with a tail bucket, and full KL when possible.

    ``kl_topk_tail`` is the KL between teacher and student coarse-grained to the teacher's top-k
    tokens plus one bucket for the rest of the vocabulary (``1 - sum_K p`` against ``1 - sum_K q``):
    a true divergence (>= 0, <= the full KL) computable from a cached teacher.

    Returns:
        ``{"tokens": N, "ce": sum, "kl_topk_tail": sum}`` and ``"kl_full"`` when ``teacher`` has
        hidden states. Divide by ``tokens`` for per-token means.
    """
    out = {"tokens": float(hidden.shape[0]), "ce": 0.0, "kl_topk_tail": 0.0}
    if teacher.hidden is not None and teacher.head_weight is not None:
        out["kl_full"] = 0.0
    for a in range(0, hidden.shape[0], chunk_size):
        b = min(a + chunk_size, hidden.shape[0])
        t = teacher.slice(a, b)
        logq = F.linear(hidden[a:b], weight, bias).float().log_softmax(-1)  # [c, V]
        out["ce"] -= float(logq.gather(1, labels[a:b, None].long()).sum())
        lp, lq = t.topk_logprobs.float(), logq.gather(1, t.topk_ids)  # [c, k]
        kl = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)  # [c]
        lp_rest = _log1mexp(lp.logsumexp(-1))  # log(1 - sum_K p)
        lq_rest = _log1mexp(lq.logsumexp(-1))
        p_rest = lp_rest.exp()
        kl = kl + torch.where(p_rest > 0, p_rest * (lp_rest - lq_rest), torch.zeros_like(p_rest))
        out["kl_topk_tail"] += float(kl.sum())
        if "kl_full" in out:
            out["kl_full"] += float(F.kl_div(logq, _teacher_logprobs(t, logq.device), reduction="sum", log_target=True))
    return out


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable; ``-inf`` at 0 (clamped to the float32 floor)."""
    x = x.clamp(max=0.0)
    out = torch.where(x > -LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return out.clamp(min=-1e4)
