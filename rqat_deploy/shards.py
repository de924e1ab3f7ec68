"""Sharded safetensors directories, in Hugging Face's layout: one writer, one reader.

One ``model.safetensors`` when everything fits in one shard, else ``model-00001-of-0000N.safetensors``
... plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map":
{tensor: file}}``), which transformers and vLLM both read. Checkpoints (:mod:`rqat_deploy.quant.checkpoint`)
and the safetensors exporters write and read through this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rqat_deploy.errors import CheckpointError, ConfigError
from rqat_deploy.files import inside, normal_permissions, read_json

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # transformers' default "5GB"


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage size of a tensor in bytes."""
    return t.numel() * t.element_size()


class ShardedWriter:
    """Stream tensors into safetensors shards of at most ``max_shard_bytes`` each.

    Tensors are buffered until the next one would overflow the shard, then the shard is written, so
    at most one shard is held in memory. A tensor larger than the limit gets a shard of its own.
    :meth:`finish` names the shards (``model.safetensors`` when there is one) and writes the index.

    Args:
        out_dir: an existing directory to write into.
        max_shard_bytes: shard size limit in bytes.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes <= 0:
            raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (stored contiguous, as given).

        Raises:
            ConfigError: the name was added before.
        """
        if name in self._buf or any(name in names for _, names in self._shards):
            raise ConfigError(f"tensor {name!r} written twice")
        size = tensor_bytes(tensor)
        if self._buf and self._buf_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buf[name] = tensor.detach().cpu().contiguous()
        self._buf_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._buf, str(path), metadata={"format": "pt"})
        normal_permissions(path)  # safetensors creates 0600; the checkpoint's other files are 0644
        self._shards.append((path, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give the shards their final names and write the index.

        Returns:
            The file names written (shards, then the index if any).
        """
        if self._buf or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self.out_dir / WEIGHTS_FILE)
            return [WEIGHTS_FILE]
        weight_map: dict[str, str] = {}
        files = []
        for i, (path, names) in enumerate(self._shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / fname)
            files.append(fname)
            weight_map.update({name: fname for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files + [INDEX_FILE]


def open_safetensors(path: str | os.PathLike[str]) -> Any:
    """``safe_open`` of one safetensors file; a truncated, empty or corrupt file is a CheckpointError.

    Raises:
        CheckpointError: naming the file and the fix.
    """
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}): it is truncated or corrupt; restore or re-create it"
        ) from e


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (errors as :func:`open_safetensors`)."""
    with open_safetensors(path) as f:
        try:
            return {name: f.get_tensor(name) for name in f.keys()}
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read its tensors ({e}): the file is corrupt; re-create it") from e


class SafetensorsDir:
    """Lazy read access to the tensors of a (possibly sharded) safetensors directory.

    Shard names from the index must stay inside the directory (no ``..``, no absolute path, no
    symlink leading out), and every file must open as safetensors.

    Raises:
        CheckpointError: neither ``model.safetensors`` nor an index exists, the index is not valid
            JSON, a shard it names is missing or leads outside the directory, or a file is corrupt.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.exists() or index.is_symlink():
            raw = read_json(inside(self.path, INDEX_FILE, error=CheckpointError), error=CheckpointError)
            weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index} has no weight_map of tensor names to shard files: re-create the index")
            files = {f: inside(self.path, f, error=CheckpointError) for f in sorted(set(weight_map.values()))}
            for f in files.values():
                if not f.is_file():
                    raise CheckpointError(f"{self.path}: shard {f.name} named in {INDEX_FILE} is missing")
            self.where = {name: files[f] for name, f in weight_map.items()}
            self._check_shards(set(files.values()))
            return
        single = self.path / WEIGHTS_FILE
        if not single.exists() and not single.is_symlink():
            raise CheckpointError(f"{self.path}: neither {WEIGHTS_FILE} nor {INDEX_FILE} exists")
        single = inside(self.path, WEIGHTS_FILE, error=CheckpointError)
        with open_safetensors(single) as f:
            self.where = {name: single for name in f.keys()}

    def _check_shards(self, files: set[Path]) -> None:
        """Every shard opens, and holds the tensors the index places in it."""
        for f in sorted(files):
            with open_safetensors(f) as h:
                held = set(h.keys())
            listed = {n for n, where in self.where.items() if where == f}
            if not listed <= held:
                raise CheckpointError(
                    f"{f} lacks tensors that {INDEX_FILE} places in it: {sorted(listed - held)[:3]}; re-create the checkpoint"
                )

    def names(self) -> list[str]:
        """Every tensor name."""
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, as stored."""
        with open_safetensors(self.where[name]) as f:
            try:
                return f.get_tensor(name)
            except SafetensorError as e:
                raise CheckpointError(f"{self.where[name]}: cannot read {name} ({e}): the file is corrupt") from e

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, read from the header only."""
        with open_safetensors(self.where[name]) as f:
            return tuple(f.get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """A tensor's safetensors dtype name (``F16``, ``U8``...), read from the header only."""
        with open_safetensors(self.where[name]) as f:
            return f.get_slice(name).get_dtype()
