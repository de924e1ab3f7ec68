"""The recipes of ``rqat-deploy train`` (DESIGN.md 5, 9): an initialisation, then an optional stage 2.

| recipe          | initialisation                     | stage 2 (scales only)                          |
|-----------------|------------------------------------|------------------------------------------------|
| `rtn`           | round-to-nearest                   | none                                           |
| `gptq`          | GPTQ on calibration data           | none                                           |
| `stage1`        | stage 1 (block-wise, Block-AP)     | none (the paper's "C" row)                     |
| `efficientqat`  | stage 1                            | plain CE (``C``)                               |
| `rqat` (default)| stage 1 from GPTQ, norm-space loss | reward-rectified CE + top-20 KL (``R+S``), rate probed, guarded |
| `rqat-released` | stage 1                            | CE + top-20 JSD (``C+J``), linear schedule, 1,024-token sequences, norms and lm_head train |
| `reasoning-qat` | GPTQ                               | full-vocabulary KL (``F``)                     |
| `grpo`          | ``--init-from`` a quantized checkpoint | none; then cold-start GRPO (:mod:`rqat_deploy.train.grpo`) |

A recipe whose ``grpo`` is not ``None`` ends with the GRPO stage (after its stage 2, if any).

A new recipe is one :class:`Recipe` entry in :data:`RECIPE_TABLE` (and the CLI's ``--recipe``
choices); a new initialisation or stage is a function that :mod:`rqat_deploy.train.run` dispatches on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """What a recipe runs.

    Attributes:
        name: the recipe name.
        init: ``rtn`` | ``gptq`` | ``stage1`` | ``checkpoint`` (``--init-from`` is required).
        loss: stage-2 loss terms (:mod:`rqat_deploy.train.losses`), or ``None`` for no stage 2.
        stage1: :class:`~rqat_deploy.train.stage1.Stage1Config` overrides (``init``, ``loss_space``...).
        stage2: further :class:`~rqat_deploy.train.stage2.Stage2Config` overrides.
        train_seq_len: stage-2 sequence length override (the released code truncates at 1,024).
        grpo: :class:`~rqat_deploy.train.grpo.GRPOConfig` overrides of a final GRPO stage, or ``None``
            for none.
    """

    name: str
    init: str
    loss: str | None = None
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)
    train_seq_len: int | None = None
    grpo: dict[str, Any] | None = None


#: The flagship's departures from the paper's form (DESIGN.md 5), chosen by held-out KL to the teacher
#: (benchmarks/flagship_kl.py): stage 1 starts each block from GPTQ, measures the block loss where the
#: next layer reads it (after its norm) and keeps a block's start where training raised its held-out
#: loss; stage 2 scales each rate to its scale (k-quant d / dmin), probes the rate and keeps its start
#: where training raised the held-out KL. Never worse than GPTQ on held-out data by construction of
#: the guards, better wherever training helps.
FLAGSHIP_STAGE1: dict[str, Any] = {"init": "gptq", "loss_space": "next_norm", "keep_better": True}
FLAGSHIP_STAGE2: dict[str, Any] = {"relative_lr": True, "keep_better": True, "lr_search": (1.0, 1 / 3, 1 / 10, 1 / 30)}
#: The paper's form of the two stages (the defaults of Stage1Config / Stage2Config, spelled out).
PAPER_STAGE1: dict[str, Any] = {"init": "rtn", "loss_space": "block", "keep_better": False}
PAPER_STAGE2: dict[str, Any] = {"relative_lr": False, "keep_better": False, "lr_search": ()}

RECIPE_TABLE: dict[str, Recipe] = {
    "rqat": Recipe("rqat", "stage1", "R+S", stage1=FLAGSHIP_STAGE1, stage2=FLAGSHIP_STAGE2),
    "rqat-released": Recipe(
        "rqat-released", "stage1", "C+J",
        stage2={"schedule": "linear", "extra_trainable": ("*norm*", "lm_head.weight")}, train_seq_len=1024,
    ),
    "stage1": Recipe("stage1", "stage1"),
    "rtn": Recipe("rtn", "rtn"),
    "gptq": Recipe("gptq", "gptq"),
    "efficientqat": Recipe("efficientqat", "stage1", "C"),
    "reasoning-qat": Recipe("reasoning-qat", "gptq", "F"),
    "grpo": Recipe("grpo", "checkpoint", grpo={}),
}
RECIPES = tuple(RECIPE_TABLE)

#: Defaults for the built-in tiny reasoner (``--model`` not given): its sequences are ~100 tokens and
#: it has 3.7 M parameters, so the paper's 4,096 x 2,048 calibration tokens and its learning rates
#: (set for 1.5-32 B models) do not fit. Chosen on stage-2 validation loss, not on accuracy (README).
#: GRPO: 16 steps of 4 prompts x 8 rollouts of <= 160 tokens (the teacher's answers take ~60), at
#: the stage-2 rate (the same scales train); sized for a two-core CPU, not tuned on accuracy.
BUILTIN_PRESET: dict[str, Any] = {
    "calib_samples": 256,
    "calib_seq_len": 512,
    "train_samples": 2048,
    "train_seq_len": 256,
    "global_batch": 16,
    "stage2_epochs": 1,
    "stage2_lr": 1e-3,
    "grpo_steps": 16,
    "grpo_lr": 1e-3,
    "grpo_batch": 32,
    "grpo_max_tokens": 160,
}
