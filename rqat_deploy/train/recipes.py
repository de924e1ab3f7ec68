"""The recipes of ``rqat-deploy train`` (DESIGN.md 5, 9): an initialisation, then an optional stage 2.

| recipe          | initialisation                     | stage 2                                         |
|-----------------|------------------------------------|-------------------------------------------------|
| `rqat` (default)| stage 1 from GPTQ, norm-space loss | scales: ``rr+topk_kl``, rate probed, guarded    |
| `rqat-released` | stage 1                            | latent weights + norms + lm_head: ``ce+jsd``, linear schedule, 1,024 tokens |
| `S`, `R`        | round-to-nearest (the paper's rows) | scales: ``ce`` (S) / ``rr+topk_kl`` (R), the paper's form |
| `C`             | stage 1, the paper's form          | none                                            |
| `C+S`, `C+R`    | stage 1, the paper's form          | scales: ``ce`` / ``rr+topk_kl``, the paper's form |
| `stage1`        | stage 1 (= `C`)                    | none                                            |
| `rtn`           | round-to-nearest                   | none                                            |
| `gptq`          | GPTQ, 128 math samples by default  | none                                            |
| `awq`           | AWQ, 128 math samples by default   | none                                            |
| `efficientqat`  | stage 1                            | scales: plain CE (``ce``)                       |
| `reasoning-qat` | GPTQ on math (NuminaMath-1.5)      | latent weights (STE): ``kl`` on OpenR1-Math, Adam (0.9, 0.95), lr 1e-6, batch 32, 6,000 steps; then cold-start GRPO |
| `reasoning-qat-kd` | as `reasoning-qat`              | its KD stage alone (no GRPO)                    |
| `reasoning-qat-scales` | as `reasoning-qat`          | the KD on the scales only, no GRPO (the earlier form) |
| `grpo`          | ``--init-from`` a quantized checkpoint | none; then cold-start GRPO (:mod:`rqat_deploy.train.grpo`) |

A recipe whose ``grpo`` is not ``None`` ends with the GRPO stage (after its stage 2, if any).

The paper's ablation rows (``S``, ``R``, ``C``, ``C+S``, ``C+R``; :data:`PAPER_ROWS`) are recipes,
not loss terms: "'S' denotes the conventional supervised fine-tuning with cross entropy loss
function, 'R' denotes the teacher-guided reward rectification loss ... and 'C' means the existence
of a calibration stage" (Okoshi et al., ICLR 2026). They run the paper's form of each stage
(:data:`PAPER_STAGE1`, :data:`PAPER_STAGE2`) and refuse ``--loss``.

A recipe also sets defaults (:attr:`Recipe.defaults`, :attr:`Recipe.builtin`) for the
:class:`~rqat_deploy.train.run.TrainConfig` options a user leaves unset; :func:`option_defaults`
resolves them. A new recipe is one :class:`Recipe` entry in :data:`RECIPE_TABLE` (the CLI's
``--recipe`` choices are the table); a new initialisation or stage is a function that
:mod:`rqat_deploy.train.run` dispatches on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INITS = ("rtn", "gptq", "awq", "stage1")
CALIB_DOMAINS = ("mix", "math")
TRAIN_DOMAINS = ("reasoning", "math")


@dataclass(frozen=True)
class Recipe:
    """What a recipe runs.

    Attributes:
        name: the recipe name.
        init: ``rtn`` | ``gptq`` | ``awq`` | ``stage1`` | ``checkpoint`` (``--init-from`` is required).
        loss: stage-2 loss terms (:mod:`rqat_deploy.train.losses`), or ``None`` for no stage 2.
        stage1: :class:`~rqat_deploy.train.stage1.Stage1Config` overrides (``init``, ``loss_space``...).
        stage2: further :class:`~rqat_deploy.train.stage2.Stage2Config` overrides (``train_form``,
            ``betas``, ``schedule``...).
        train_seq_len: a cap on stage-2 sample length (the released code truncates at 1,024);
            ``None``: whole samples up to the model's context length.
        calib_domain: the default calibration data: ``mix`` (the paper's 80 % reasoning traces +
            20 % pre-training text) or ``math`` (math problems with solutions: NuminaMath-1.5 on the
            Hub, the built-in traces for the built-in model).
        train_domain: the default stage-2 data: ``reasoning`` (OpenThoughts3) or ``math``
            (OpenR1-Math); the built-in traces for the built-in model.
        defaults: :class:`~rqat_deploy.train.run.TrainConfig` values for options left unset.
        builtin: the same for the built-in model, over :data:`BUILTIN_PRESET`.
        paper_row: one of the paper's ablation rows, run as the paper ran it (``--loss`` refused,
            ``--init-from`` only from a checkpoint of the same initialisation).
        gptq_guard: after a stage-1 initialisation, also run plain GPTQ and keep whichever model is
            closer to the teacher (mean next-token KL) on the held-out calibration sequences.
        grpo: :class:`~rqat_deploy.train.grpo.GRPOConfig` overrides of a final GRPO stage, or ``None``
            for none.
    """

    name: str
    init: str
    loss: str | None = None
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)
    train_seq_len: int | None = None
    calib_domain: str = "mix"
    train_domain: str = "reasoning"
    defaults: dict[str, Any] = field(default_factory=dict)
    builtin: dict[str, Any] = field(default_factory=dict)
    paper_row: bool = False
    gptq_guard: bool = False
    grpo: dict[str, Any] | None = None


#: The flagship's departures from the paper's form (DESIGN.md 5), chosen by held-out KL to the teacher
#: (benchmarks/flagship_kl.py): stage 1 starts each block from GPTQ, measures the block loss where the
#: next layer reads it (after its norm) and keeps a block's start where training raised its held-out
#: loss, and the recipe keeps plain GPTQ instead where stage 1 ended farther from the teacher end to
#: end (``gptq_guard``); stage 2 scales each rate to its scale (k-quant d / dmin), probes the rate and
#: keeps its start where training raised the held-out KL. Never worse than GPTQ on held-out data by
#: construction of the guards, better wherever training helps.
FLAGSHIP_STAGE1: dict[str, Any] = {"init": "gptq", "loss_space": "next_norm", "keep_better": True}
FLAGSHIP_STAGE2: dict[str, Any] = {"relative_lr": True, "keep_better": True, "lr_search": (1.0, 1 / 3, 1 / 10, 1 / 30)}
#: The paper's form of the two stages (the defaults of Stage1Config / Stage2Config, spelled out):
#: stage 1 from RTN with the raw block MSE, stage 2 training the scales at one learning rate, no guards.
PAPER_STAGE1: dict[str, Any] = {"init": "rtn", "loss_space": "block", "keep_better": False}
PAPER_STAGE2: dict[str, Any] = {"train_form": "scales", "relative_lr": False, "keep_better": False, "lr_search": ()}
#: The paper's loss ("R"): 0.2 x teacher-rectified CE + 1.0 x KL over the teacher's top-20.
PAPER_LOSS = "rr+topk_kl"
#: GPTQ and AWQ as the papers' baselines ran them: 128 calibration samples of math (NuminaMath).
_PTQ_DEFAULTS: dict[str, Any] = {"calib_samples": 128}
#: On the built-in model a math sample (one checked and rechecked trace) is 95-320 tokens (95 % under 300):
#: 128 windows of 320 tokens.
_PTQ_BUILTIN: dict[str, Any] = {"calib_samples": 128, "calib_seq_len": 320}
#: Reasoning-QAT's KD stage as published (DESIGN.md 5): KL to the teacher on the latent weights
#: (straight-through), Adam (0.9, 0.95), cosine, 180 warm-up steps of 6,000 (= warmup_ratio 0.03),
#: global batch 32, peak lr 1e-6 from the GPTQ start. 6,000 steps x 32 = 3 passes over 64,000 samples
#: (+64 held out): the paper gives the steps and the batch, not the sample count.
REASONING_QAT_STAGE2: dict[str, Any] = {
    "train_form": "weights", "betas": (0.9, 0.95), "schedule": "cosine", "warmup_ratio": 180 / 6000,
    "weight_decay": 0.0, "relative_lr": False, "keep_better": False, "lr_search": (),
}
_REASONING_QAT_DEFAULTS: dict[str, Any] = {
    "calib_samples": 128, "global_batch": 32, "stage2_lr": 1e-6, "train_samples": 64064, "stage2_epochs": 3,
    "max_steps": 6000,
}
#: Reasoning-QAT on the built-in model: the preset's sizes; 128 math (built-in) calibration samples
#: of 128 tokens; the latent-weight rate 1e-3, the lowest held-out KL to the teacher among 3e-4 / 1e-3 /
#: 3e-3 / 1e-2 (README), not chosen on accuracy. Latent weights start at their grid points, half a grid
#: step from a rounding boundary, and Adam moves each by about the rate per step: in 124 steps 3e-4 (and
#: 1e-4) changed no code at all, 1e-3 changed 2,882 of 3,145,728, 1e-2 diverged. Its GRPO step runs
#: at the preset's GRPO rate (1e-3).
_REASONING_QAT_BUILTIN: dict[str, Any] = _PTQ_BUILTIN | {"stage2_lr": 1e-3}


def _paper_row(name: str, init: str, loss: str | None) -> Recipe:
    return Recipe(name, init, loss, stage1=PAPER_STAGE1 if init == "stage1" else {},
                  stage2=PAPER_STAGE2 if loss else {}, paper_row=True)


#: The paper's ablation rows: S and R train stage 2 from an RTN start (no calibration), C is stage 1
#: alone, C+S and C+R are stage 1 followed by CE or by the proposed loss.
PAPER_ROWS: dict[str, Recipe] = {
    "S": _paper_row("S", "rtn", "ce"),
    "R": _paper_row("R", "rtn", PAPER_LOSS),
    "C": _paper_row("C", "stage1", None),
    "C+S": _paper_row("C+S", "stage1", "ce"),
    "C+R": _paper_row("C+R", "stage1", PAPER_LOSS),
}

RECIPE_TABLE: dict[str, Recipe] = {
    "rqat": Recipe("rqat", "stage1", PAPER_LOSS, stage1=FLAGSHIP_STAGE1, stage2=FLAGSHIP_STAGE2,
                   gptq_guard=True),
    "rqat-released": Recipe(
        "rqat-released", "stage1", "ce+jsd",
        stage2={"schedule": "linear", "train_form": "weights", "extra_trainable": ("*norm*", "lm_head.weight")},
        train_seq_len=1024,
    ),
    **PAPER_ROWS,
    "stage1": Recipe("stage1", "stage1"),
    "rtn": Recipe("rtn", "rtn"),
    "gptq": Recipe("gptq", "gptq", calib_domain="math", defaults=_PTQ_DEFAULTS, builtin=_PTQ_BUILTIN),
    "awq": Recipe("awq", "awq", calib_domain="math", defaults=_PTQ_DEFAULTS, builtin=_PTQ_BUILTIN),
    "efficientqat": Recipe("efficientqat", "stage1", "ce"),
    "reasoning-qat": Recipe(
        "reasoning-qat", "gptq", "kl", stage2=REASONING_QAT_STAGE2, calib_domain="math", train_domain="math",
        defaults=_REASONING_QAT_DEFAULTS, builtin=_REASONING_QAT_BUILTIN, grpo={},
    ),
    "reasoning-qat-kd": Recipe(
        "reasoning-qat-kd", "gptq", "kl", stage2=REASONING_QAT_STAGE2, calib_domain="math", train_domain="math",
        defaults=_REASONING_QAT_DEFAULTS, builtin=_REASONING_QAT_BUILTIN,
    ),
    "reasoning-qat-scales": Recipe(
        "reasoning-qat-scales", "gptq", "kl", stage2=REASONING_QAT_STAGE2 | {"train_form": "scales"},
        calib_domain="math", train_domain="math", defaults=_REASONING_QAT_DEFAULTS, builtin=_PTQ_BUILTIN,
    ),
    "grpo": Recipe("grpo", "checkpoint", grpo={}),
}
RECIPES = tuple(RECIPE_TABLE)

#: Defaults of the options a recipe may set, for a Hub / local model (the paper's sizes).
GLOBAL_DEFAULTS: dict[str, Any] = {
    "calib_samples": 4096,
    "calib_seq_len": 2048,
    "train_samples": 32768,
    "global_batch": 64,
    "stage2_epochs": None,  # the paper's per bit width (Stage2Config)
    "stage2_lr": None,  # the paper's per bit width (Stage2Config)
    "max_steps": None,
    "grpo_steps": 250,  # Reasoning-QAT's GRPO (its Table 7)
    "grpo_lr": 5e-7,
    "grpo_batch": 64,
    "grpo_max_tokens": 32768,
}
#: Defaults for the built-in tiny reasoner (``--model`` not given): its sequences are ~100 tokens and
#: it has 3.7 M parameters, so the paper's 4,096 x 2,048 calibration tokens and its learning rates
#: (set for 1.5-32 B models) do not fit. Chosen on stage-2 validation loss, not on accuracy (README).
#: GRPO: 16 steps of 4 prompts x 8 rollouts of <= 384 tokens (the teacher's answers take 60-280), at
#: the stage-2 rate (the same scales train); sized for a two-core CPU, not tuned on accuracy.
BUILTIN_PRESET: dict[str, Any] = {
    "calib_samples": 256,
    "calib_seq_len": 512,
    "train_samples": 2048,
    "global_batch": 16,
    "stage2_epochs": 1,
    "stage2_lr": 1e-3,
    "max_steps": None,
    "grpo_steps": 16,
    "grpo_lr": 1e-3,
    "grpo_batch": 32,
    "grpo_max_tokens": 384,
}


def option_defaults(recipe: str, builtin: bool) -> dict[str, Any]:
    """The values of the options in :data:`GLOBAL_DEFAULTS` that ``recipe`` runs with when left unset.

    Later wins: :data:`GLOBAL_DEFAULTS`, the recipe's :attr:`Recipe.defaults`, then for the built-in
    model :data:`BUILTIN_PRESET` and the recipe's :attr:`Recipe.builtin`.
    """
    r = RECIPE_TABLE[recipe]
    out = GLOBAL_DEFAULTS | r.defaults
    return out | BUILTIN_PRESET | r.builtin if builtin else out
