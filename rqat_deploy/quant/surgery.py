"""Model surgery: swap a causal LM's ``nn.Linear``s for :class:`QuantLinear` and back.

    prepare_model(model, spec)   # Linear -> QuantLinear (stage-1 form, RTN / k-quant search init)
    freeze_codes(model)          # stage-1 -> stage-2 form (codes frozen, scales train)
    select_trainable(model, form)  # what end-to-end training trains: the scales or the latent weights
    convert_model(model)         # QuantLinear -> Linear with the dequantized weight
    with dequantized_view(model): ...   # the same swap, undone on exit (fast generation)
"""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from rqat_deploy.errors import ConfigError
from rqat_deploy.quant.qlinear import QuantLinear
from rqat_deploy.quant.spec import QuantSpec


def _output_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _is_tied(model: nn.Module) -> bool:
    out, get_in = _output_embedding(model), getattr(model, "get_input_embeddings", None)
    if out is None or not callable(get_in):
        return False
    return out.weight is get_in().weight


def select_linears(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Names of the Linears ``spec`` quantizes: every ``nn.Linear`` but the output head and ``exclude``.

    Embeddings (``nn.Embedding``) and norms are never Linears, so they stay in floating point.

    Raises:
        ConfigError: ``quantize_lm_head`` with tied input/output embeddings, or nothing to quantize.
        ShapeError: a selected module whose input size the grid cannot divide (names the fix).
    """
    head = _output_embedding(model)
    if spec.quantize_lm_head and _is_tied(model):
        raise ConfigError("quantize_lm_head needs untied embeddings: this model ties lm_head to embed_tokens")
    names = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or spec.is_excluded(name):
            continue
        if mod is head and not spec.quantize_lm_head:
            continue
        spec.check_module(name, mod.in_features)
        names.append(name)
    if not names and not any(isinstance(m, QuantLinear) for m in model.modules()):  # (quantized already: the caller's case)
        linears = any(type(m) is nn.Linear and m is not head for m in model.modules())
        why = (f"--exclude {' '.join(repr(p) for p in spec.exclude)} matches every one of its nn.Linear layers" if linears
               else f"{type(model).__name__} has no nn.Linear layers besides its output head (GPT-2-style Conv1D "
                    "layers are not supported; Qwen3, Qwen2 and Llama are)")
        raise ConfigError(f"nothing to quantize: {why}")
    return names


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``model`` by ``new``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def prepare_model(
    model: nn.Module, spec: QuantSpec, *, backend: str | None = None, progress: bool = True
) -> list[str]:
    """Replace the selected Linears in place by stage-1 :class:`QuantLinear`s.

    Args:
        model: a Hugging Face causal LM (or any module tree of ``nn.Linear``).
        spec: what to quantize and how.
        backend: kernel backend for the new modules.
        progress: show a progress bar (k-quant initialisation takes a moment on large models).

    Returns:
        The names of the quantized modules, in model order.
    """
    names = select_linears(model, spec)
    for name in tqdm(names, desc=f"init {spec.grid} int{spec.bits}", disable=not progress, leave=False):
        linear = model.get_submodule(name)
        set_submodule(model, name, QuantLinear.from_linear(linear, spec, backend))
    return names


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """Yield ``(name, module)`` for every :class:`QuantLinear` in ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            yield name, mod


def freeze_codes(model: nn.Module, train_sub_scales: bool = False) -> None:
    """Switch every QuantLinear to the stage-2 form (codes frozen; only scales train).

    Everything that is not a stage-2 scale (embeddings, norms, biases) is frozen too.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for _, mod in quant_linears(model):
        mod.freeze_codes(train_sub_scales)


#: What end-to-end training trains (:func:`select_trainable`): ``scales`` = the quantization scales with
#: the integer codes frozen (the paper's stage 2); ``weights`` = the latent float weights through the
#: straight-through estimator with the grid parameters frozen (Reasoning-QAT's KD, the released code
#: of the paper); the codes are re-derived from the trained weights when the checkpoint is written.
TRAIN_FORMS = ("scales", "weights")


def select_trainable(
    model: nn.Module,
    form: str,
    *,
    train_sub_scales: bool = False,
    extra_trainable: Sequence[str] = (),
) -> list[tuple[str, nn.Parameter]]:
    """Put every QuantLinear in the training form ``form``, freeze everything else, return what trains.

    The one place that decides what an end-to-end stage trains (stage 2, and any later stage that
    follows the same training form): ``scales`` switches each QuantLinear to its stage-2 form
    (codes frozen; :meth:`QuantLinear.freeze_codes`) and trains its grid's stage-2 scales;
    ``weights`` switches it to its stage-1 form (:meth:`QuantLinear.to_latent`: the latent weight
    starts at the dequantized weight) and trains the latent weight, the grid parameters frozen.

    Args:
        model: a model holding QuantLinear modules (either form).
        form: one of :data:`TRAIN_FORMS`.
        train_sub_scales: ``scales`` form, k-quant grid: also train the integer sub-scales.
        extra_trainable: ``fnmatch`` patterns of further parameter names to train (e.g. ``"*norm*"``).

    Returns:
        ``(name, parameter)`` of every parameter that trains, in ``model.named_parameters()`` order.

    Raises:
        ConfigError: an unknown form, no QuantLinear in ``model``, or nothing to train.
    """
    if form not in TRAIN_FORMS:
        raise ConfigError(f"training form must be one of {TRAIN_FORMS}, got {form!r}")
    mods = list(quant_linears(model))
    if not mods:
        raise ConfigError("end-to-end training needs a quantized model (QuantLinear modules): quantize it or load a checkpoint")
    if form == "scales":
        freeze_codes(model, train_sub_scales)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, mod in mods:
            mod.to_latent()
            mod.weight.requires_grad_(True)
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in extra_trainable):
            p.requires_grad_(True)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing trains: check train_sub_scales / extra_trainable")
    return params


@torch.no_grad()
def _dequantized_linear(mod: QuantLinear) -> nn.Linear:
    """A plain Linear holding ``mod``'s dequantized weight (and a copy of its bias)."""
    w = mod.dequantized_weight()
    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=w.device)
    lin.weight.data = w.to(lin.weight.dtype)
    if mod.bias is not None:
        lin.bias.data = mod.bias.detach().clone()
    return lin


def convert_model(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear in place by a plain ``nn.Linear`` holding its dequantized weight.

    Returns:
        ``model``, now free of QuantLinear modules (for evaluation or foreign runtimes).
    """
    for name, mod in list(quant_linears(model)):
        set_submodule(model, name, _dequantized_linear(mod))
    return model


@contextlib.contextmanager
def dequantized_view(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every QuantLinear is swapped for a plain Linear of its dequantized weight.

    The forward is the same function (the weight each QuantLinear would compute, the one the
    checkpoint and its exact exports hold) without re-dequantizing it at every call: what
    generation, which runs the model once per new token, needs. The QuantLinear modules are put
    back on exit; nothing trains through the view.

    Yields:
        ``model``.
    """
    swapped = [(name, mod) for name, mod in quant_linears(model)]
    for name, mod in swapped:
        set_submodule(model, name, _dequantized_linear(mod))
    try:
        yield model
    finally:
        for name, mod in swapped:
            set_submodule(model, name, mod)
