"""GPTQ (Frantar et al., 2023) on both grids: the ``gptq`` recipe and Reasoning-QAT's initialisation.

For each decoder block in turn (inputs: the outputs of the already-quantized blocks), the inputs of
each selected Linear give the Hessian ``H = 2/n X^T X``; the columns of the weight are quantized one
at a time and each column's rounding error is spread over the columns not yet quantized through the
Cholesky factor of ``H^-1`` (lazy batches of ``block_size`` columns). Grid parameters come from the
error-updated weights when a group starts, as GPTQ does with a group size:

each grid's own initialisation (:meth:`rqat_deploy.quant.grids.Grid.init`) on the columns that
share parameters: min-max scale / zero point of each group of ``G`` columns on the uniform grid,
our k-quant search on each 256-column super-block of Q2_K / Q3_K; then codes column by column.

``act_order`` quantizes columns by decreasing ``diag(H)``; the groups must stay contiguous in the
checkpoint formats, so the grid parameters are then computed up front from the original weight
("static groups").

The result is a stage-1 :class:`~rqat_deploy.quant.qlinear.QuantLinear` whose latent weight is the
dequantized GPTQ weight, so that :meth:`QuantLinear.codes` returns exactly GPTQ's codes (checked).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rqat_deploy.quant import reference
from rqat_deploy.train.activations import (
    ActivationStore,
    LayerInputs,
    StopForward,
    capture_layer_inputs,
    each_block,
    choose_store_mode,
    find_decoder_layers,
    paired_batches,
    quantize_outside_blocks,
    run_layer,
    store_nbytes,
)
from rqat_deploy.errors import ConfigError, RqatError, ShapeError
from rqat_deploy.quant.qlinear import QuantLinear
from rqat_deploy.quant.grids import Grid, GridQuantizer
from rqat_deploy.quant.spec import QuantSpec
from rqat_deploy.quant.surgery import select_linears, set_submodule

GroupParams = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class GPTQResult:
    """GPTQ's quantization of one weight.

    Attributes:
        qcodes: uint8 codes ``[out, in]``.
        params: the grid's parameters in the checkpoint names (``scales``/``zeros`` or ``d``,
            ``dmin``, ``sub_scales``, ``sub_mins``), float32.
        weight: the dequantized weight ``[out, in]`` float32.
        output_mse: mean squared output error on the calibration inputs,
            ``tr(E H E^T) / (2 out)`` with ``E = weight - w`` and the undamped Hessian.
        rtn_output_mse: the same for the round-to-nearest (k-quant search) start, or ``None``.
        block_size: the lazy-batch size used (a multiple of the grid's block).
    """

    qcodes: torch.Tensor
    params: dict[str, torch.Tensor]
    weight: torch.Tensor
    output_mse: float
    rtn_output_mse: float | None
    block_size: int

    def quantizer(self, spec: QuantSpec) -> GridQuantizer:
        """The grid quantizer holding these parameters."""
        return spec.grid_def.from_checkpoint(self.params)


def _group_params(w: torch.Tensor, grid: Grid) -> tuple[dict[str, torch.Tensor], GroupParams]:
    """Grid parameters of one group / super-block ``w`` ``[out, group]``: checkpoint tensors (float32)
    and ``(s, z, o)``."""
    t = {k: v.float() for k, v in grid.init(w).params().items()}
    return t, _effective(grid.from_checkpoint(t))


def _effective(q: GridQuantizer) -> GroupParams:
    with torch.no_grad():
        s, z, o = q.group_params()
    return s.detach(), z.detach(), o.detach()


def _output_mse(e: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(E H E^T) / (2 out)`` in float64."""
    e64 = e.double()
    return float(((e64 @ h.double()) * e64).sum() / (2 * e.shape[0]))


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    compare_rtn: bool = True,
) -> GPTQResult:
    """Quantize one weight with GPTQ on ``spec``'s grid.

    Args:
        w: weight ``[out, in]``.
        h: Hessian ``[in, in]`` (``2/n X^T X`` of the layer's inputs), on ``w``'s device.
        spec: the grid (uniform: per-group of ``G``; kquant: per 256 super-block).
        damp: dampening, a fraction of the mean of ``diag(H)`` added to the diagonal.
        block_size: columns per lazy batch (rounded up to a multiple of the grid's block).
        act_order: quantize columns by decreasing ``diag(H)`` (grid parameters from the original weight).
        compare_rtn: also measure the RTN start's output error.

    Returns:
        :class:`GPTQResult`.

    Raises:
        ShapeError: ``h`` is not ``[in, in]`` or ``in`` does not fit the grid.
        RqatError: the dampened Hessian is not positive definite even after raising the dampening.
    """
    out, cols = w.shape
    if tuple(h.shape) != (cols, cols):
        raise ShapeError(f"Hessian {list(h.shape)} does not match weight {list(w.shape)}")
    spec.check_module("weight", cols)
    grid = spec.grid_def
    gsz = grid.group_size  # columns sharing grid parameters (G, or the 256 super-block)
    gs, qmax = grid.gs, grid.qmax  # groups of the unified form
    h0 = h.float()
    W = w.detach().float().clone()  # [out, in]
    H = h0.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static: list[GroupParams] = []
    static_t: list[dict[str, torch.Tensor]] = []
    perm = None
    order: list[int] = []
    if act_order:
        for g0 in range(0, cols, gsz):
            t, p = _group_params(W[:, g0 : g0 + gsz], grid)
            static_t.append(t)
            static.append(p)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        order = perm.tolist()
    hinv = _inverse_cholesky(H, damp)  # upper Cholesky factor of H^-1
    bs = block_size if act_order else max(gsz, math.ceil(block_size / gsz) * gsz)
    Q = torch.zeros_like(W)
    Wq = torch.zeros_like(W)
    tensors: list[dict[str, torch.Tensor]] = static_t
    cur: GroupParams | None = None
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()  # [out, bs]
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if act_order:
                oc = order[col]
                cur, j = static[oc // gsz], (oc % gsz) // gs
            else:
                if col % gsz == 0:
                    t, cur = _group_params(W1[:, i : i + gsz], grid)
                    tensors.append(t)
                j = (col % gsz) // gs
            assert cur is not None
            s, z, o = (p[:, j : j + 1] for p in cur)  # [out, 1]
            wc = W1[:, i : i + 1]  # [out, 1]
            # reference.quantize_codes / dequant, inlined (same operations, same order)
            live = s != 0
            u = (wc + o) / torch.where(live, s, torch.ones_like(s))
            q = torch.where(live, torch.clamp(torch.round(u) + z, 0, qmax), z)
            wq = s * (q - z) - o
            Q[:, col : col + 1], Wq[:, col : col + 1] = q, wq
            e = (wc - wq) / hinv1[i, i]  # [out, 1]
            W1[:, i:].addmm_(e, hinv1[i : i + 1, i:], alpha=-1.0)
            err1[:, i : i + 1] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        inv = torch.argsort(perm)
        Q, Wq = Q[:, inv], Wq[:, inv]
    params = {k: torch.cat([t[k] for t in tensors], dim=1) for k in tensors[0]}
    s, z, o = _effective(grid.from_checkpoint(params))
    weight = reference.dequant(Q, s, z, o, gs)
    codes = reference.quantize_codes(weight, s, z, o, qmax, gs)
    if not (torch.equal(weight, Wq) and torch.equal(codes, Q)):  # pragma: no cover - same operations
        raise RqatError("GPTQ: the per-column quantization differs from the reference form (internal error)")
    rtn = _output_mse(grid.round_to_nearest(w) - w.float(), h0) if compare_rtn else None
    return GPTQResult(
        qcodes=Q.to(torch.uint8),
        params=params,
        weight=weight,
        output_mse=_output_mse(weight - w.float(), h0),
        rtn_output_mse=rtn,
        block_size=bs,
    )


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp*mean(diag H)*I)^-1``, raising the dampening if needed."""
    mean = float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for factor in (1.0, 10.0, 100.0):
        L, info = torch.linalg.cholesky_ex(H + damp * factor * mean * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return U
    raise RqatError(
        f"GPTQ: the Hessian is not positive definite even with dampening {damp * 100:g}; "
        "use more calibration samples or a larger --gptq-damp"
    )


def gptq_linear(
    linear: nn.Linear, h: torch.Tensor, spec: QuantSpec, *, name: str = "", backend: str | None = None, **kw: Any
) -> tuple[QuantLinear, GPTQResult]:
    """A stage-1 QuantLinear holding GPTQ's quantization of ``linear`` (see :func:`gptq_quantize`).

    The latent weight is the dequantized weight, so ``codes()`` equals GPTQ's codes.

    Raises:
        RqatError: the QuantLinear's codes differ from GPTQ's (names the module).
    """
    res = gptq_quantize(linear.weight, h, spec, **kw)
    q = res.quantizer(spec).to(linear.weight.device)
    ql = QuantLinear(linear.in_features, linear.out_features, linear.bias, q, spec, weight=res.weight, backend=backend)
    if not torch.equal(ql.codes(), res.qcodes):
        bad = int((ql.codes() != res.qcodes).sum())
        raise RqatError(f"GPTQ: {bad} codes of {name or 'a module'} do not round-trip through the latent weight")
    return ql, res


# ---------------------------------------------------------------------------------------------
# the model pass
# ---------------------------------------------------------------------------------------------


@dataclass
class GPTQLayerReport:
    """GPTQ's result on one Linear: output errors (GPTQ and RTN) on its calibration inputs, time."""

    name: str
    output_mse: float
    rtn_output_mse: float | None
    seconds: float


@dataclass
class GPTQReport:
    """The result of :func:`run_gptq`.

    Attributes:
        layers: one :class:`GPTQLayerReport` per quantized Linear inside the decoder blocks.
        rtn_modules: selected Linears outside the blocks (e.g. ``lm_head``), RTN-initialised.
        n_samples, seq_len: calibration sequences and their length.
        store_mode: where the block inputs lived.
        seconds: wall time.
        config: damp, block_size, act_order, true_sequential and the spec.
    """

    layers: list[GPTQLayerReport]
    rtn_modules: list[str]
    n_samples: int
    seq_len: int
    store_mode: str
    seconds: float
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def _call_groups(block: nn.Module, names: list[str], x: torch.Tensor, inputs: LayerInputs) -> list[list[str]]:
    """Group ``names`` by call order: consecutive Linears fed the same tensor form a group (q/k/v, gate/up)."""
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [
        block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: calls.append((n, a[0]))) for n in names
    ]
    try:
        with torch.no_grad():
            run_layer(block, x, inputs)
    finally:
        for hk in hooks:
            hk.remove()
    groups: list[list[str]] = []
    prev = None
    seen = set()
    for n, t in calls:
        if n in seen:
            continue
        seen.add(n)
        if groups and t is prev:
            groups[-1].append(n)
        else:
            groups.append([n])
        prev = t
    rest = [n for n in names if n not in seen]
    return groups + ([rest] if rest else [])


@torch.no_grad()
def _hessians(
    block: nn.Module, group: list[str], store: ActivationStore, idx: torch.Tensor, inputs: LayerInputs,
    dev: torch.device, batch: int, dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """``2/n X^T X`` of the inputs of each Linear in ``group`` over the samples ``idx`` of ``store``."""
    hs = {n: None for n in group}
    rows = {n: 0 for n in group}
    last = group[-1]

    def make(n: str):
        def hook(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
            hs[n] = x.t() @ x if hs[n] is None else hs[n].addmm_(x.t(), x)
            rows[n] += x.shape[0]
            if n == last:
                raise StopForward

        return hook

    hooks = [block.get_submodule(n).register_forward_pre_hook(make(n)) for n in group]
    try:
        for _, (x,) in paired_batches([store], idx, batch):
            try:
                run_layer(block, x.to(device=dev, dtype=dtype), inputs)
            except StopForward:
                pass
    finally:
        for hk in hooks:
            hk.remove()
    out = {}
    for n in group:
        in_f = block.get_submodule(n).in_features
        h = hs[n] if hs[n] is not None else torch.zeros(in_f, in_f, device=dev)
        out[n] = h * (2.0 / max(rows[n], 1))
    return out


def gptq_block(
    block: nn.Module,
    names: list[str],
    spec: QuantSpec,
    store: ActivationStore,
    inputs: LayerInputs,
    *,
    indices: torch.Tensor | None = None,
    prefix: str = "",
    device: torch.device,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    true_sequential: bool = True,
    backend: str | None = None,
    compare_rtn: bool = True,
) -> list[GPTQLayerReport]:
    """Quantize the Linears ``names`` of one decoder ``block`` (on ``device``) in place with GPTQ.

    Args:
        block: the decoder block, full precision.
        names: its Linears to quantize, relative to the block.
        spec: the grid.
        store: the block's inputs, one sample per calibration sequence (e.g. the quantized
            prefix's outputs); read, never written.
        indices: the samples of ``store`` to calibrate on (default: all).
        inputs: the block's other inputs (rotary tables, mask).
        prefix: the block's name in the model, for the reports.
        device, batch_size, dtype: where and how the block runs its forwards.
        damp, block_size, act_order, compare_rtn, backend: as :func:`gptq_quantize` / :func:`gptq_linear`.
        true_sequential: quantize Linears in call order (q/k/v, o, gate/up, down), each group seeing
            the outputs of the groups already quantized.

    Returns:
        One :class:`GPTQLayerReport` per Linear.

    Raises:
        ConfigError: a Linear of ``names`` is already quantized.
    """
    idx = torch.arange(len(store)) if indices is None else indices
    if true_sequential:
        probe = store.read(idx[:1]).to(device=device, dtype=dtype)
        groups = _call_groups(block, names, probe, inputs)
    else:
        groups = [names]
    reports = []
    for group in groups:
        hs = _hessians(block, group, store, idx, inputs, device, batch_size, dtype)
        for rel in group:
            t1 = time.perf_counter()
            lin = block.get_submodule(rel)
            if not isinstance(lin, nn.Linear):
                raise ConfigError(f"GPTQ needs the full-precision model, but {prefix}{rel} is {type(lin).__name__}")
            ql, res = gptq_linear(
                lin, hs.pop(rel), spec, name=prefix + rel, backend=backend,
                damp=damp, block_size=block_size, act_order=act_order, compare_rtn=compare_rtn,
            )
            set_submodule(block, rel, ql)
            reports.append(GPTQLayerReport(prefix + rel, res.output_mse, res.rtn_output_mse, time.perf_counter() - t1))
    return reports


def run_gptq(
    model: nn.Module,
    spec: QuantSpec,
    calib_ids: torch.Tensor,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    true_sequential: bool = True,
    device: str | torch.device = "cpu",
    store: str = "auto",
    work_dir: str | Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
    backend: str | None = None,
    compare_rtn: bool = True,
) -> GPTQReport:
    """Quantize ``model`` in place with GPTQ, block by block (inputs from the quantized prefix).

    Args:
        model: a full-precision Hugging Face causal LM.
        spec: what to quantize and how (uniform or kquant grid).
        calib_ids: ``[N, L]`` calibration token ids (unpadded; GPTQ's paper uses 128 x 2048).
        damp: dampening as a fraction of the mean Hessian diagonal (GPTQ's ``percdamp``).
        block_size: lazy-batch columns (rounded up to a multiple of the grid's block).
        act_order: columns by decreasing ``diag(H)`` (static groups).
        true_sequential: within a block, quantize Linears in call order (q/k/v, o, gate/up, down),
            each group seeing the outputs of the groups already quantized.
        device: where blocks run (one at a time).
        store: ``memory`` | ``disk`` | ``auto`` for the block inputs.
        work_dir: directory of a disk store (a temporary one when ``None``).
        batch_size: sequences per forward.
        progress: show a progress bar.
        backend: kernel backend of the QuantLinears.
        compare_rtn: record each Linear's RTN output error beside GPTQ's.

    Returns:
        :class:`GPTQReport`. ``model`` holds stage-1 QuantLinears with GPTQ's codes and grid parameters.

    Raises:
        ShapeError: ``calib_ids`` is not a LongTensor ``[N, L]``.
        ConfigError: invalid settings or an already-quantized model.
    """
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise ShapeError("GPTQ needs calibration ids as a LongTensor [N, L]")
    if not 0 <= damp < 1 or block_size < 1 or batch_size < 1:
        raise ConfigError(
            f"GPTQ needs 0 <= damp < 1 and block_size, batch_size >= 1 (got {damp}, {block_size}, {batch_size})"
        )
    t0 = time.perf_counter()
    dev = torch.device(device)
    layers_name, layers = find_decoder_layers(model)
    selected = select_linears(model, spec)
    n, seq_len = calib_ids.shape
    hidden = int(model.config.hidden_size)
    dtype = model.get_input_embeddings().weight.dtype
    mode = choose_store_mode(store, store_nbytes(n, seq_len, hidden, dtype))
    tmp = None
    if mode == "disk" and work_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="rqat-gptq-"))
    base = Path(work_dir) if work_dir is not None else tmp
    path = base / "gptq_acts.bin" if base is not None else None
    st = ActivationStore(n, seq_len, hidden, dtype, mode=mode, path=path)
    reports: list[GPTQLayerReport] = []
    try:
        inputs = capture_layer_inputs(model, calib_ids, st, device=dev, batch_size=batch_size)
        for _, block, prefix, names in each_block(layers_name, layers, selected, dev, desc=f"GPTQ {spec.grid} int{spec.bits}",
                                                  progress=progress):
            reports += gptq_block(
                block, names, spec, st, inputs, prefix=prefix, device=dev, batch_size=batch_size, dtype=dtype,
                damp=damp, block_size=block_size, act_order=act_order, true_sequential=true_sequential,
                backend=backend, compare_rtn=compare_rtn,
            )
            with torch.no_grad():
                for start in range(0, n, batch_size):
                    sl = slice(start, min(start + batch_size, n))
                    st.write(sl, run_layer(block, st.read(sl).to(device=dev, dtype=dtype), inputs))
        outside = quantize_outside_blocks(model, layers_name, selected, spec, backend)
    finally:
        st.close(delete=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    conf = {"damp": damp, "block_size": block_size, "act_order": act_order, "true_sequential": true_sequential,
            "n_samples": n, "seq_len": seq_len, "spec": spec.to_dict()}
    return GPTQReport(reports, outside, n, seq_len, mode, time.perf_counter() - t0, conf)
