"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
MLSys 2024) on the uniform-layout grids (uniform, q2_0): the ``awq`` recipe, one of the paper's baselines.

Written from the paper and the authors' reference implementation (mit-han-lab/llm-awq,
``awq/quantize/auto_scale.py``, ``auto_clip.py``, ``pre_quant.py``), read, not copied. For each
decoder block in turn, its inputs being the *full-precision* outputs of the block before (as
``run_awq`` propagates them):

1. **Scale search.** For each group of Linears that read one tensor, and the op that writes it
   (Llama / Qwen blocks: ``input_layernorm`` -> q/k/v, ``v_proj`` -> ``o_proj`` when ``v_proj``
   writes every channel ``o_proj`` reads (not under grouped-query attention), ``post_attention_layernorm`` -> gate/up, ``up_proj`` ->
   ``down_proj``): per input channel ``s = mean|x|^a``, normalised by ``sqrt(max(s) min(s))``, for
   ``a`` in ``0, 1/20, ..., 19/20``; the ``a`` whose quantized weights ``Q(W diag(s)) diag(s)^-1``
   give the lowest mean squared error of the group's module output (the attention, the MLP, or the
   Linear itself) on the calibration tokens wins. ``s`` is then folded in: the Linears' columns are
   multiplied by it, the writing op (the norm's weight, the rows of ``v_proj`` / ``up_proj``) divided.
2. **Clipping search.** For every Linear but q/k (their product makes clipping hard to judge, as
   the reference skips them): per output row and group of ``G`` inputs, the clipping range
   ``max|w| (1 - i/20)``, ``i < 10``, that gives the lowest output error on 512 sampled input tokens
   (scaled by step 1); the weights are clamped to it.
3. Every selected Linear is then quantized round-to-nearest on the grid
   (:meth:`~rqat_deploy.quant.grids.Grid.round_to_nearest`, the grid's own initialisation: min-max
   for uniform, the Q2_0 search for q2_0), which is also the quantizer of the searches.

The calibration is the paper's: 128 samples of math (NuminaMath; the built-in traces offline). The
folded norm weights are ordinary float tensors of the checkpoint, so its contract is unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from rqat_deploy.errors import ConfigError, ShapeError
from rqat_deploy.quant.grids import Grid
from rqat_deploy.quant.qlinear import QuantLinear
from rqat_deploy.quant.spec import QuantSpec
from rqat_deploy.quant.surgery import select_linears, set_submodule
from rqat_deploy.train.activations import (
    ActivationStore,
    LayerInputs,
    StopForward,
    capture_layer_inputs,
    each_block,
    find_decoder_layers,
    quantize_outside_blocks,
    run_layer,
)

N_GRID = 20  # scale exponents 0, 1/20, ..., 19/20 and clipping ratios 1 - i/20
MAX_SHRINK = 0.5  # clipping ratios down to 1 - 0.5 (exclusive)
CLIP_TOKENS = 512  # input tokens sampled for the clipping search


@dataclass(frozen=True)
class _Group:
    """Linears that read one tensor, the op that writes it, and the module whose output is compared."""

    prev: str
    linears: tuple[str, ...]
    inspect: str


#: the scale groups of a Llama / Qwen2 / Qwen3 decoder block (llm-awq's ``LlamaDecoderLayer`` case)
_LLAMA_GROUPS = (
    _Group("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    _Group("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    _Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    _Group("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
_NO_CLIP = ("q_proj", "k_proj")


@dataclass
class AWQGroupReport:
    """The scale search of one group: the chosen exponent and the output errors at it and at 0 (plain RTN)."""

    block: int
    prev: str
    ratio: float
    loss: float
    loss_rtn: float


@dataclass
class AWQReport:
    """What :func:`run_awq` did.

    Attributes:
        groups: per scale group, the searched exponent and the output errors.
        clip: per clipped Linear, the mean clipping bound as a fraction of ``max|w|``.
        skipped_groups: groups left unscaled (``v_proj -> o_proj`` under grouped-query attention, or
            a group with an unquantized Linear).
        config: the search settings, the calibration size, the spec; ``seconds``, the modules
            outside the blocks that were quantized round-to-nearest.
    """

    groups: list[AWQGroupReport] = dataclasses.field(default_factory=list)
    clip: dict[str, float] = dataclasses.field(default_factory=dict)
    skipped_groups: list[str] = dataclasses.field(default_factory=list)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


@torch.no_grad()
def _module_inputs(
    block: nn.Module, inspect: nn.Module, store: ActivationStore, inputs: LayerInputs, dev: torch.device, batch: int,
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The positional and keyword inputs of ``inspect`` (a submodule of ``block``) for every calibration batch.

    The block runs up to ``inspect`` once; the searches then run ``inspect`` alone on these inputs.
    """
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((args, kwargs))
        raise StopForward

    handle = inspect.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for a in range(0, len(store), batch):
            try:
                run_layer(block, store.read(slice(a, a + batch)).to(dev), inputs)
            except StopForward:
                pass
    finally:
        handle.remove()
    return seen


@torch.no_grad()
def _module_outputs(inspect: nn.Module, seen: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[torch.Tensor]:
    """``inspect``'s outputs (float32) on the inputs :func:`_module_inputs` recorded."""
    outs = [inspect(*args, **kwargs) for args, kwargs in seen]
    return [(o[0] if isinstance(o, tuple) else o).float() for o in outs]


@torch.no_grad()
def _input_stats(block: nn.Module, names: list[str], store: ActivationStore, inputs: LayerInputs, dev: torch.device,
                 batch: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per Linear: ``mean|x|`` per input channel ``[in]`` over all tokens, and ~512 evenly spaced input rows."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    n_tok = len(store) * store.shape[1]
    stride = max(1, n_tok // CLIP_TOKENS)
    seen = [0]

    def make(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = x.abs().sum(0) + sums.get(name, 0.0)
            first = (-seen[0]) % stride  # the global token index of every stride-th token
            rows[name].append(x[first::stride].cpu())
        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(make(n)) for n in names]
    try:
        for a in range(0, len(store), batch):
            x = store.read(slice(a, a + batch)).to(dev)
            run_layer(block, x, inputs)
            seen[0] += x.shape[0] * x.shape[1]
    finally:
        for h in handles:
            h.remove()
    return {n: s / n_tok for n, s in sums.items()}, {n: torch.cat(r) for n, r in rows.items()}


@torch.no_grad()
def _search_scale(block: nn.Module, group: _Group, x_mean: torch.Tensor, grid: Grid, store: ActivationStore,
                  inputs: LayerInputs, dev: torch.device, batch: int) -> tuple[torch.Tensor, float, float, float]:
    """The best per-channel scale of ``group`` (llm-awq's ``_search_module_scale``), its exponent and errors."""
    inspect = block.get_submodule(group.inspect)
    linears = [block.get_submodule(n) for n in group.linears]
    seen = _module_inputs(block, inspect, store, inputs, dev, batch)
    org = _module_outputs(inspect, seen)
    saved = [lin.weight.detach().clone() for lin in linears]
    best: tuple[float, float, torch.Tensor | None] = (float("inf"), -1.0, None)
    loss_rtn = float("nan")
    for i in range(N_GRID):
        ratio = i / N_GRID
        s = x_mean.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for lin, w in zip(linears, saved):
            lin.weight.copy_((grid.round_to_nearest(w.float() * s) / s).to(w.dtype))
        outs = _module_outputs(inspect, seen)
        loss = float(sum(float((o - r).pow(2).sum()) for o, r in zip(outs, org)) / sum(r.numel() for r in org))
        loss_rtn = loss if i == 0 else loss_rtn
        if loss < best[0]:
            best = (loss, ratio, s)
        for lin, w in zip(linears, saved):
            lin.weight.copy_(w)
    if best[2] is None:
        raise ConfigError(f"AWQ: every scale of {group.linears} gave a non-finite output error: check the model's weights")
    return best[2], best[1], best[0], loss_rtn


@torch.no_grad()
def _apply_scale(block: nn.Module, group: _Group, s: torch.Tensor, x_rows: dict[str, torch.Tensor]) -> None:
    """Fold ``s``: Linears' columns times ``s``, the writing op divided by it (output unchanged)."""
    prev = block.get_submodule(group.prev)
    if isinstance(prev, nn.Linear):
        prev.weight[-s.numel():].div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias[-s.numel():].div_(s.to(prev.bias.dtype))
    else:  # a norm: its weight scales the normalised input channel-wise
        prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for name in group.linears:
        lin = block.get_submodule(name)
        lin.weight.mul_(s.view(1, -1).to(lin.weight.dtype))
        x_rows[name] = x_rows[name] / s.cpu()


@torch.no_grad()
def _search_clip(w: torch.Tensor, x: torch.Tensor, grid: Grid, rows: int = 256) -> torch.Tensor:
    """Per output row and group, the clipping bound of lowest output error (llm-awq's ``auto_clip_layer``),
    ``[out, in/G, 1]``; ``rows`` output rows at a time bound the memory."""
    return torch.cat([_clip_rows(w[a : a + rows], x, grid) for a in range(0, w.shape[0], rows)])


def _clip_rows(w: torch.Tensor, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    out_f, in_f = w.shape
    g = grid.group_size
    wg = w.float().reshape(out_f, in_f // g, g)  # [out, n_groups, G]
    xg = x.float().to(w.device).reshape(-1, in_f // g, g)  # [n, n_groups, G]
    org = torch.einsum("ngk,ogk->ong", xg, wg)  # [out, n, n_groups]: each group's partial output
    amax = wg.abs().amax(-1, keepdim=True)  # [out, n_groups, 1]
    best_bound, best_err = amax.clone(), torch.full_like(amax, float("inf"))
    for i in range(int(MAX_SHRINK * N_GRID)):
        bound = amax * (1 - i / N_GRID)
        clipped = torch.maximum(torch.minimum(wg, bound), -bound)
        q = grid.round_to_nearest(clipped.reshape(out_f, in_f)).reshape(out_f, in_f // g, g)
        err = (torch.einsum("ngk,ogk->ong", xg, q) - org).pow(2).mean(1).unsqueeze(-1)  # [out, n_groups, 1]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_bound = torch.where(better, bound, best_bound)
    return best_bound


def _groups(block: nn.Module, names: list[str]) -> tuple[list[_Group], list[str]]:
    """The scale groups of ``block`` that apply (all their Linears quantized; v->o only without GQA)."""
    have = dict(block.named_modules())
    missing = [n for g in _LLAMA_GROUPS for n in (g.prev, *g.linears) if n not in have]
    if missing:
        raise ConfigError(
            f"AWQ knows Llama / Qwen2 / Qwen3 decoder blocks; {type(block).__name__} has no {missing[0]!r}: "
            "use --recipe gptq for this architecture"
        )
    use, skipped = [], []
    for g in _LLAMA_GROUPS:
        prev = have[g.prev]
        # a Linear writer must output exactly the channels the group reads (v_proj -> o_proj: not under GQA)
        mismatch = isinstance(prev, nn.Linear) and prev.out_features != have[g.linears[0]].in_features
        if mismatch or not all(n in names for n in g.linears):
            skipped.append(g.prev)
        else:
            use.append(g)
    return use, skipped


@torch.no_grad()
def _awq_block(block: nn.Module, k: int, names: list[str], grid: Grid, store: ActivationStore, inputs: LayerInputs,
               dev: torch.device, batch: int, report: AWQReport) -> None:
    """Scale and clip the Linears ``names`` of block ``k`` in place (still float Linears)."""
    groups, skipped = _groups(block, names)
    report.skipped_groups += [f"{k}.{p}" for p in skipped]
    x_mean, x_rows = _input_stats(block, names, store, inputs, dev, batch)
    for group in groups:
        s, ratio, loss, loss_rtn = _search_scale(block, group, x_mean[group.linears[0]], grid, store, inputs, dev, batch)
        _apply_scale(block, group, s, x_rows)
        report.groups.append(AWQGroupReport(k, group.prev, ratio, loss, loss_rtn))
    for name in names:
        if name.rpartition(".")[2] in _NO_CLIP:
            continue
        lin = block.get_submodule(name)
        bound = _search_clip(lin.weight, x_rows[name], grid)
        w = lin.weight.float().reshape(bound.shape[0], bound.shape[1], -1)
        lin.weight.copy_(torch.maximum(torch.minimum(w, bound), -bound).reshape(lin.weight.shape).to(lin.weight.dtype))
        report.clip[f"{k}.{name}"] = float((bound / w.abs().amax(-1, keepdim=True).clamp(min=1e-12)).mean())


@torch.no_grad()
def run_awq(
    model: nn.Module,
    spec: QuantSpec,
    calib_ids: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    backend: str | None = None,
) -> AWQReport:
    """Quantize ``model`` in place with AWQ (module docstring), block by block.

    Args:
        model: a full-precision Hugging Face causal LM (Llama / Qwen2 / Qwen3 blocks).
        spec: what to quantize; its grid must have the uniform layout (uniform, q2_0).
        calib_ids: ``[N, L]`` calibration token ids (the paper: 128 math samples).
        device: where blocks run (one at a time).
        batch_size: sequences per forward. The block inputs stay in host RAM (128 x 2,048 tokens of
            an 8B model: 2 GB in bf16).
        progress: show a progress bar.
        backend: kernel backend of the QuantLinears.

    Returns:
        :class:`AWQReport`. ``model`` holds stage-1 QuantLinears (RTN on the scaled, clipped weights)
        and the folded norm weights.

    Raises:
        ConfigError: a grid without the uniform layout, or an unsupported block layout.
        ShapeError: ``calib_ids`` is not a LongTensor ``[N, L]``.
    """
    grid = spec.grid_def
    if not grid.uniform_layout:
        raise ConfigError(
            f"AWQ is implemented for the grids with one scale and zero point per group (uniform, q2_0), not {grid.label}: "
            "use --recipe gptq or rtn for it"
        )
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise ShapeError("AWQ needs calibration ids as a LongTensor [N, L]")
    t0 = time.perf_counter()
    dev = torch.device(device)
    layers_name, layers = find_decoder_layers(model)
    selected = select_linears(model, spec)
    n, seq_len = calib_ids.shape
    dtype = model.get_input_embeddings().weight.dtype
    hidden = int(model.config.hidden_size)
    st = ActivationStore(n, seq_len, hidden, dtype, mode="memory")
    report = AWQReport(config={"n_grid": N_GRID, "max_shrink": MAX_SHRINK, "clip_tokens": CLIP_TOKENS, "n_samples": n,
                               "seq_len": seq_len, "spec": spec.to_dict()})
    try:
        inputs = capture_layer_inputs(model, calib_ids, st, device=dev, batch_size=batch_size)
        for k, block, _, names in each_block(layers_name, layers, selected, dev, desc=f"AWQ {spec.grid} int{spec.bits}",
                                             progress=progress):
            fp = copy.deepcopy(block)  # the next block reads the full-precision outputs, as llm-awq's run_awq
            _awq_block(block, k, names, grid, st, inputs, dev, batch_size, report)
            for a in range(0, n, batch_size):
                sl = slice(a, min(a + batch_size, n))
                st.write(sl, run_layer(fp, st.read(sl).to(dev), inputs))
            del fp
            for rel in names:
                set_submodule(block, rel, QuantLinear.from_linear(block.get_submodule(rel), spec, backend))
    finally:
        st.close(delete=True)
    outside = quantize_outside_blocks(model, layers_name, selected, spec, backend)
    report.config |= {"rtn_modules": outside, "seconds": round(time.perf_counter() - t0, 3)}
    return report
