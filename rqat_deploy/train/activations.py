"""Decoder-block activations for block-wise training and GPTQ: where they live and how a block reads them.

- :class:`ActivationStore`: ``N`` hidden-state sequences ``[N, L, H]`` in host RAM (a torch tensor)
  or on disk (a numpy memmap in a work directory), in the model's dtype (bf16 is stored as its
  16-bit pattern, since numpy has no bfloat16), read and written in mini-batches. The paper's
  4,096 x 2,048 calibration activations of an 8B model are 70 GB per copy: ``mode="auto"`` keeps
  them in RAM only when they fit comfortably (:func:`choose_store_mode`).
- :func:`capture_layer_inputs`: run the model up to its first decoder layer (a forward pre-hook on
  layer 0 that stops the forward, as GPTQ's and EfficientQAT's "Catcher" do) and record the hidden
  states into a store, plus the keyword inputs a decoder layer needs (:class:`LayerInputs`: in
  transformers 5 ``position_embeddings = (cos, sin)``, ``attention_mask``, ``position_ids``).

Calibration sequences are full, unpadded sequences of equal length, so every sample shares the same
positions and causal mask; they are captured once with batch size 1 and broadcast over batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rqat_deploy.errors import ConfigError, ShapeError

STORE_MODES = ("memory", "disk", "auto")
#: numpy storage dtype of each supported torch dtype (bf16 as its raw 16 bits)
_NP_DTYPES: dict[torch.dtype, Any] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: np.int16,
}
#: share of the available host memory ``auto`` may fill with activations
AUTO_MEMORY_FRACTION = 0.5


def available_memory_bytes() -> int:
    """Host memory available to this process now, in bytes.

    Uses ``psutil.virtual_memory().available`` when psutil is installed, else ``MemAvailable`` from
    ``/proc/meminfo``; ``0`` when neither can be read (``auto`` then chooses disk).
    """
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def choose_store_mode(mode: str, nbytes: int, *, fraction: float = AUTO_MEMORY_FRACTION) -> str:
    """Resolve a store mode: ``auto`` picks ``memory`` when ``nbytes`` fit in ``fraction`` of free RAM.

    Args:
        mode: ``"memory"``, ``"disk"`` or ``"auto"``.
        nbytes: total bytes of all the stores that will be allocated.
        fraction: share of the available memory ``auto`` may use.

    Returns:
        ``"memory"`` or ``"disk"``.

    Raises:
        ConfigError: an unknown mode.
    """
    if mode not in STORE_MODES:
        raise ConfigError(f"activation store must be one of {STORE_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "memory" if nbytes <= fraction * available_memory_bytes() else "disk"


def store_nbytes(n: int, seq_len: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of one ``[n, seq_len, hidden]`` store of ``dtype``."""
    return n * seq_len * hidden * torch.empty((), dtype=dtype).element_size()


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _NP_DTYPES:
        raise ConfigError(f"activation dtype must be one of {list(_NP_DTYPES)}, got {dtype}")


class ActivationStore:
    """``N`` hidden-state sequences ``[N, L, H]`` in RAM or in a disk memmap.

    Args:
        n, seq_len, hidden: the shape ``[n, seq_len, hidden]``.
        dtype: ``torch.float32`` | ``torch.bfloat16`` | ``torch.float16``.
        mode: ``"memory"`` | ``"disk"`` | ``"auto"`` (by :func:`choose_store_mode` for this store alone).
        path: the memmap file for ``disk`` (its directory is created).
        reuse: for ``disk``, open an existing file of the right size instead of creating a new one.
        pin: pin the RAM copy (faster host-to-GPU copies).

    Raises:
        ConfigError: an unsupported dtype or mode, or ``disk`` without ``path``.
        ShapeError: ``reuse`` of a file whose size does not match.
    """

    def __init__(
        self,
        n: int,
        seq_len: int,
        hidden: int,
        dtype: torch.dtype,
        *,
        mode: str = "auto",
        path: str | os.PathLike[str] | None = None,
        reuse: bool = False,
        pin: bool = False,
    ) -> None:
        _check_dtype(dtype)
        self.shape = (n, seq_len, hidden)
        self.dtype = dtype
        self.nbytes = store_nbytes(n, seq_len, hidden, dtype)
        self.mode = choose_store_mode(mode, self.nbytes)
        self.path = Path(path) if path is not None else None
        self._mem: torch.Tensor | None = None
        self._map: np.memmap | None = None
        if self.mode == "memory":
            self._mem = torch.empty(self.shape, dtype=dtype, pin_memory=pin and torch.cuda.is_available())
            return
        if self.path is None:
            raise ConfigError("a disk activation store needs a path (pass a work directory)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        exists = self.path.exists()
        if reuse and exists and self.path.stat().st_size != self.nbytes:
            raise ShapeError(
                f"activation file {self.path} has {self.path.stat().st_size} bytes, expected {self.nbytes} "
                f"for {list(self.shape)} {dtype}; delete it or start without resume"
            )
        file_mode = "r+" if (reuse and exists) else "w+"
        self._map = np.memmap(self.path, dtype=_NP_DTYPES[dtype], mode=file_mode, shape=self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.mode == "disk" else ""
        return f"ActivationStore(shape={list(self.shape)}, dtype={self.dtype}, mode={self.mode!r}{where})"

    def _to_torch(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    @staticmethod
    def _index(idx: Sequence[int] | torch.Tensor | slice) -> slice | np.ndarray:
        if isinstance(idx, slice):
            return idx
        return np.asarray(torch.as_tensor(idx, dtype=torch.long).cpu().numpy(), dtype=np.int64)

    def read(self, idx: Sequence[int] | torch.Tensor | slice) -> torch.Tensor:
        """Samples ``idx`` as a new CPU tensor ``[b, L, H]`` of the store's dtype."""
        i = self._index(idx)
        if self._mem is not None:
            if isinstance(i, slice):
                return self._mem[i].clone()
            return self._mem[torch.from_numpy(i)]
        assert self._map is not None
        return self._to_torch(np.array(self._map[i]))

    def write(self, idx: Sequence[int] | torch.Tensor | slice, x: torch.Tensor) -> None:
        """Store ``x`` ``[b, L, H]`` (cast to the store's dtype) at samples ``idx``.

        Raises:
            ShapeError: ``x`` does not have the store's ``[L, H]``.
        """
        if tuple(x.shape[1:]) != self.shape[1:]:
            raise ShapeError(f"activation batch {list(x.shape)} does not fit a store of {list(self.shape)}")
        x = x.detach().to(device="cpu", dtype=self.dtype)
        i = self._index(idx)
        if self._mem is not None:
            if isinstance(i, slice):
                self._mem[i] = x
            else:
                self._mem[torch.from_numpy(i)] = x
            return
        assert self._map is not None
        raw = x.view(torch.int16) if self.dtype == torch.bfloat16 else x
        self._map[i] = raw.contiguous().numpy()

    def batches(
        self, indices: Sequence[int] | torch.Tensor, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(idx, x)`` mini-batches over ``indices`` in the given order (``x`` ``[b, L, H]``)."""
        ids = torch.as_tensor(indices, dtype=torch.long)
        for start in range(0, len(ids), batch_size):
            b = ids[start : start + batch_size]
            yield b, self.read(b)

    def copy_from(self, other: "ActivationStore", batch_size: int = 64) -> None:
        """Copy every sample of ``other`` (same shape) into this store."""
        if other.shape != self.shape:
            raise ShapeError(f"cannot copy a store of {list(other.shape)} into one of {list(self.shape)}")
        for start in range(0, self.shape[0], batch_size):
            sl = slice(start, min(start + batch_size, self.shape[0]))
            self.write(sl, other.read(sl))

    def flush(self) -> None:
        """Write a disk store's pages to the file (a no-op in memory)."""
        if self._map is not None:
            self._map.flush()

    def close(self, delete: bool = False) -> None:
        """Release the data; ``delete`` also removes a disk store's file."""
        if self._map is not None:
            self._map.flush()
            self._map = None
            if delete and self.path is not None and self.path.exists():
                self.path.unlink()
        self._mem = None


def paired_batches(
    stores: Sequence[ActivationStore],
    indices: Sequence[int] | torch.Tensor,
    batch_size: int,
    *,
    pin: bool = False,
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Yield ``(idx, [x_0, x_1, ...])``: the same samples from several stores, read one batch ahead.

    A background thread reads (and optionally pins) the next batch while the caller works on the
    current one, so disk reads overlap with compute.
    """
    from concurrent.futures import ThreadPoolExecutor

    ids = torch.as_tensor(indices, dtype=torch.long)
    chunks = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]

    def load(b: torch.Tensor) -> list[torch.Tensor]:
        xs = [s.read(b) for s in stores]
        return [x.pin_memory() for x in xs] if pin and torch.cuda.is_available() else xs

    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(load, chunks[0])
        for i, b in enumerate(chunks):
            xs = nxt.result()
            if i + 1 < len(chunks):
                nxt = pool.submit(load, chunks[i + 1])
            yield b, xs


# ---------------------------------------------------------------------------------------------
# decoder layers and their inputs
# ---------------------------------------------------------------------------------------------


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks of a causal LM, and its module name.

    Looks for a ``ModuleList`` named ``layers`` / ``h`` / ``blocks`` whose length is
    ``config.num_hidden_layers`` (``model.model.layers`` in Qwen / Llama).

    Raises:
        ConfigError: no such list (an unsupported architecture).
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rpartition(".")[2] in ("layers", "h", "blocks"):
            if n is None or len(mod) == n:
                return name, mod
    raise ConfigError(
        f"could not find the decoder blocks of {type(model).__name__} (a ModuleList 'layers' of "
        f"config.num_hidden_layers={n} blocks); this architecture is not supported"
    )


@dataclass
class LayerInputs:
    """The keyword inputs every decoder layer receives besides ``hidden_states``.

    Attributes:
        kwargs: as captured on layer 0 (``position_embeddings``, ``attention_mask``,
            ``position_ids`` ...), batch dimension 1, broadcast over any batch; the cache
            arguments are dropped (``use_cache=False``).
    """

    kwargs: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "LayerInputs":
        """A copy with every tensor (also inside tuples) on ``device``; floating ones cast to ``dtype``."""

        def mv(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                if dtype is not None and v.is_floating_point():
                    return v.to(device=device, dtype=dtype)
                return v.to(device)
            if isinstance(v, tuple):
                return tuple(mv(t) for t in v)
            return v

        return LayerInputs({k: mv(v) for k, v in self.kwargs.items()})

    def describe(self) -> dict[str, Any]:
        """JSON-ready shapes of the captured inputs (for reports)."""

        def d(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return {"shape": list(v.shape), "dtype": str(v.dtype)}
            if isinstance(v, tuple):
                return [d(t) for t in v]
            return v if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__

        return {k: d(v) for k, v in self.kwargs.items()}


def run_layer(layer: nn.Module, x: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
    """Apply one decoder layer to ``x`` ``[b, L, H]`` with the captured inputs.

    The attention mask (batch 1) broadcasts over ``b``; a tuple output (older transformers)
    gives its first element.
    """
    out = layer(x, **inputs.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def each_block(
    layers_name: str, layers: nn.ModuleList, selected: Sequence[str], device: torch.device, *, desc: str, progress: bool,
) -> Iterator[tuple[int, nn.Module, str, list[str]]]:
    """For a block-by-block pass (GPTQ, AWQ): ``(k, block, prefix, names)`` per decoder block, the block
    moved to ``device`` while the caller works on it and back afterwards; ``names`` are the block's
    ``selected`` Linears relative to it (``prefix`` is the block's name with a trailing dot)."""
    for k in tqdm(range(len(layers)), desc=desc, disable=not progress):
        block, prefix = layers[k], f"{layers_name}.{k}."
        home = next(block.parameters()).device
        block.to(device)
        yield k, block, prefix, [s[len(prefix):] for s in selected if s.startswith(prefix)]
        block.to(home)


def quantize_outside_blocks(model: nn.Module, layers_name: str, selected: Sequence[str], spec: Any,
                            backend: str | None) -> list[str]:
    """Quantize round-to-nearest the ``selected`` Linears outside the decoder blocks (e.g. ``lm_head``); their names."""
    from rqat_deploy.quant.qlinear import QuantLinear
    from rqat_deploy.quant.surgery import set_submodule

    outside = [s for s in selected if not s.startswith(f"{layers_name}.")]
    for name in outside:
        set_submodule(model, name, QuantLinear.from_linear(model.get_submodule(name), spec, backend))
    return outside


class StopForward(Exception):
    """Raised by a hook to end a forward once it has what it needs (the layer-0 inputs, a Linear's inputs)."""


_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "output_attentions")


def _base_model(model: nn.Module, layers_name: str) -> nn.Module:
    parent = layers_name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def _move_non_layers(base: nn.Module, layers: nn.ModuleList, device: torch.device | str) -> dict[str, torch.device]:
    """Move the base model's children except the decoder blocks to ``device``; return where they were."""
    where: dict[str, torch.device] = {}
    for name, child in base.named_children():
        if child is layers:
            continue
        p = next(iter(child.parameters()), None)
        if p is None:
            p = next(iter(child.buffers()), None)
        if p is not None:
            where[name] = p.device
            child.to(device)
    return where


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    store: ActivationStore | None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
) -> LayerInputs:
    """Record the hidden states entering decoder layer 0 for every sequence, and the layer inputs.

    The model runs only up to layer 0 (embeddings, rotary embedding, mask construction); the
    embedding and other non-block modules are moved to ``device`` for it and moved back after.

    Args:
        model: a Hugging Face causal LM.
        input_ids: ``[N, L]`` token ids, unpadded, all of length ``L``.
        store: a store of shape ``[N, L, hidden]`` that receives the hidden states; ``None``:
            capture only the layer inputs (one sequence runs).
        device: where to run.
        batch_size: sequences per forward.

    Returns:
        The :class:`LayerInputs` (on ``device``) every decoder layer needs.

    Raises:
        ShapeError: ``input_ids`` not ``[N, L]`` matching ``store``.
    """
    if input_ids.dim() != 2 or (store is not None and tuple(input_ids.shape) != store.shape[:2]):
        want = list(store.shape[:2]) if store is not None else "[N, L]"
        raise ShapeError(f"calibration ids {list(input_ids.shape)} do not match the activation store ({want})")
    layers_name, layers = find_decoder_layers(model)
    base = _base_model(model, layers_name)
    where = _move_non_layers(base, layers, device)
    got: dict[str, Any] = {}

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got["x"] = args[0] if args else kwargs["hidden_states"]
        got["kwargs"] = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS and k != "hidden_states"}
        raise StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ids = input_ids.to(device)
        base(input_ids=ids[:1], use_cache=False)
    except StopForward:
        pass
    else:  # pragma: no cover - a model that never calls layer 0
        handle.remove()
        raise ConfigError(f"{type(model).__name__} did not call its first decoder layer")
    try:
        inputs = LayerInputs(dict(got["kwargs"]))
        for start in range(0, ids.shape[0] if store is not None else 0, batch_size):
            try:
                base(input_ids=ids[start : start + batch_size], use_cache=False)
            except StopForward:
                pass
            store.write(slice(start, start + got["x"].shape[0]), got["x"])
    finally:
        handle.remove()
        for name, dev in where.items():
            getattr(base, name).to(dev)
    if store is not None:
        store.flush()
    return inputs
