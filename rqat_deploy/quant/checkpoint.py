"""The quantized checkpoint: the contract between ``train`` and ``export`` (DESIGN.md 3).

A directory with ``config.json``, tokenizer files, ``rqat_quant.json`` and ``model.safetensors``
(or shards with ``model.safetensors.index.json``) holding, for each quantized Linear ``<m>``,
``<m>.qcodes`` and its grid's scale tensors, and every other tensor under its Hugging Face name.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from rqat_deploy.errors import CheckpointError, ConfigError
from rqat_deploy.files import inside, read_json, staged_dir
from rqat_deploy.shards import DEFAULT_MAX_SHARD_BYTES, SafetensorsDir, ShardedWriter
from rqat_deploy.quant.grids import Grid
from rqat_deploy.quant.spec import QuantSpec

FORMAT_VERSION = 1
QUANT_FILE = "rqat_quant.json"
#: files copied from the base model / tokenizer into checkpoints and exports
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
#: config.json keys every supported architecture has and the exporters read
REQUIRED_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                        "vocab_size")


@dataclass(frozen=True)
class QuantMeta:
    """The parsed ``rqat_quant.json``."""

    format_version: int
    bits: int
    grid: str
    group_size: int
    modules: list[str]
    base_model: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> QuantSpec:
        """The :class:`QuantSpec` the checkpoint was made with."""
        return QuantSpec(bits=self.bits, grid=self.grid, group_size=self.group_size)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "bits": self.bits,
            "grid": self.grid,
            "group_size": self.group_size,
            "modules": list(self.modules),
            "base_model": self.base_model,
            "recipe": self.recipe,
        }


def _parse_meta(path: Path) -> QuantMeta:
    f = path / QUANT_FILE
    if not f.exists() and not f.is_symlink():
        raise CheckpointError(f"{path} is not a quantized checkpoint: {QUANT_FILE} is missing")
    raw = read_json(inside(path, QUANT_FILE, error=CheckpointError), error=CheckpointError)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{f} must hold a JSON object, got {type(raw).__name__}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{f}: format_version {version!r} is not supported (this rqat-deploy reads version "
            f"{FORMAT_VERSION}); upgrade rqat-deploy or re-create the checkpoint"
        )
    missing = [k for k in ("bits", "grid", "group_size", "modules") if k not in raw]
    if missing:
        raise CheckpointError(f"{f} lacks the fields {missing}")
    modules = raw["modules"]
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules) or len(set(modules)) != len(modules):
        raise CheckpointError(f"{f}: modules must be a list of distinct module names")
    if not all(type(raw[k]) is int for k in ("bits", "group_size")) or not isinstance(raw["grid"], str):
        raise CheckpointError(f"{f}: bits and group_size must be integers and grid a name")
    meta = QuantMeta(
        format_version=version,
        bits=raw["bits"],
        grid=raw["grid"],
        group_size=raw["group_size"],
        modules=list(modules),
        base_model=raw.get("base_model", ""),
        recipe=raw.get("recipe", {}),
    )
    try:
        grid = meta.spec.grid_def
    except ConfigError as e:
        raise CheckpointError(f"{f}: {e}") from e
    if grid.group_size != meta.group_size:
        raise CheckpointError(f"{f}: {grid.label} checkpoints have group_size {grid.group_size}, got {meta.group_size}")
    return meta


def _read_config(path: Path) -> dict[str, Any]:
    """``config.json``, checked to be a JSON object with the keys every supported architecture has."""
    f = path / "config.json"
    if not f.exists() and not f.is_symlink():
        raise CheckpointError(f"{path}: config.json is missing")
    config = read_json(inside(path, "config.json", error=CheckpointError), error=CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{f} must hold a JSON object, got {type(config).__name__}")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{f} lacks {', '.join(missing)}: copy config.json from the base model")
    bad = [k for k in REQUIRED_CONFIG_KEYS[1:] if type(config[k]) is not int or config[k] < 1]
    if bad:
        raise CheckpointError(f"{f}: {', '.join(bad)} must be positive integers: copy config.json from the base model")
    return config


def _check_model_files(path: Path) -> None:
    """Every model file (config, tokenizer...) present is a regular file inside ``path``: a checkpoint's
    files are read and copied into exports, so a symlink to elsewhere would leak that file."""
    for name in MODEL_FILES:
        f = path / name
        if f.exists() or f.is_symlink():
            if not inside(path, name, error=CheckpointError).is_file():
                raise CheckpointError(f"{f} is not a regular file")


def model_skeleton(config: dict[str, Any], where: str | os.PathLike[str]) -> nn.Module:
    """The causal LM ``config`` describes, built on the meta device (no memory for weights).

    Only architectures transformers ships are built: a model's own code (``auto_map``) never runs.

    Raises:
        CheckpointError: transformers cannot build a causal LM from ``config`` (naming ``where``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure means config.json describes no model we can build
        custom = " (it names custom code in auto_map, which rqat-deploy never runs)" if "auto_map" in config else ""
        raise CheckpointError(
            f"{where}/config.json does not describe a causal LM that transformers ships{custom}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e


def _model_shapes(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The state-dict shapes of a model and the names that alias an earlier tensor (tied weights)."""
    state = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    aliases = {n for n, t in state.items() if first.setdefault(id(t), n) != n}
    return {n: tuple(t.shape) for n, t in state.items()}, aliases


class QuantizedCheckpoint:
    """Read access to a quantized checkpoint directory, validated on open.

    Use :func:`read_checkpoint` to open one.
    """

    def __init__(
        self, path: Path, meta: QuantMeta, config: dict[str, Any], files: SafetensorsDir, spec: QuantSpec | None
    ) -> None:
        self.path, self.meta, self.config, self.files = path, meta, config, files
        self.spec = spec  # None: a float model (read_float_model)

    @property
    def grid(self) -> Grid:
        """The checkpoint's grid (:mod:`rqat_deploy.quant.grids`).

        Raises:
            CheckpointError: a float model (:func:`read_float_model`) has no grid.
        """
        if self.spec is None:
            raise CheckpointError(f"{self.path} is a full-precision model: it has no quantization grid")
        return self.spec.grid_def

    def tensor_names(self) -> list[str]:
        """Every tensor name stored in the checkpoint."""
        return self.files.names()

    def tensor(self, name: str) -> torch.Tensor:
        """One stored tensor, as stored; floating-point tensors must hold finite values.

        Raises:
            CheckpointError: no tensor of that name, or NaN / Inf values in it.
        """
        if name not in self.files.where:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in the checkpoint")
        t = self.files.get(name)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"{self.path}: {name} holds NaN or Inf values: the checkpoint is corrupt or its training diverged; "
                "re-create it"
            )
        return t

    def quant_tensors(self, module: str) -> dict[str, torch.Tensor]:
        """The quantization tensors of ``module`` (``qcodes`` and its grid's scales), range-checked.

        Raises:
            CheckpointError: ``module`` is not quantized, or an integer tensor is out of its range.
        """
        if module not in self.meta.modules:
            raise CheckpointError(f"{module!r} is not a quantized module of {self.path}")
        t = {n: self.tensor(f"{module}.{n}") for n in self.grid.tensor_names()}
        try:
            self.grid.check_tensors(module, t)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from e
        return t

    def dequantized_weight(self, module: str) -> torch.Tensor:
        """The float32 weight ``[out, in]`` of ``module``: *the* trained weight (DESIGN.md 3)."""
        return self.grid.dequantize(self.quant_tensors(module))

    def float_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor that is not part of a quantized module's codes/scales (embeddings, norms, biases...)."""
        quant = {f"{m}.{n}" for m in self.meta.modules for n in self.grid.tensor_names()} if self.spec else set()
        for name in self.files.names():
            if name not in quant:
                yield name, self.tensor(name)

    def copy_model_files(self, dst: str | os.PathLike[str]) -> list[str]:
        """Copy config, generation config, tokenizer files and chat template to ``dst``.

        Returns:
            The names of the files copied.
        """
        copied = []
        for name in MODEL_FILES:
            if (self.path / name).exists():
                shutil.copy2(self.path / name, Path(dst) / name)
                copied.append(name)
        return copied

    def shape(self, name: str) -> tuple[int, ...]:
        """A stored tensor's shape (read from the file header)."""
        return self.files.shape(name)

    def dtype(self, name: str) -> str:
        """A stored tensor's safetensors dtype name (``F16``, ``U8``...)."""
        return self.files.dtype(name)

    def validate(self) -> None:
        """Check that the checkpoint is complete: what ``config.json``'s model needs, nothing else.

        Every quantized module has exactly its grid's tensors with the right dtypes and shapes, no
        quantization tensor lies outside ``modules``, and every other tensor the model of
        ``config.json`` has is stored with its shape (tied copies may be omitted) and nothing more.
        Values (ranges, finiteness) are checked when tensors are read (:meth:`tensor`,
        :meth:`quant_tensors`).

        Raises:
            CheckpointError: naming the first inconsistency found.
        """
        if self.spec is not None:
            self._check_modules()
        self._check_stray()
        self._check_architecture()

    def _check_modules(self) -> None:
        st_dtype = {torch.uint8: "U8", torch.int8: "I8", torch.float16: "F16"}
        for m in self.meta.modules:
            if f"{m}.qcodes" not in self.files.where:
                raise CheckpointError(f"{self.path}: quantized module {m!r} has no {m}.qcodes tensor")
            shape = self.shape(f"{m}.qcodes")
            if len(shape) != 2:
                raise CheckpointError(f"{self.path}: {m}.qcodes must be 2-D [out, in], got {shape}")
            if shape[1] % self.grid.block_size:
                raise CheckpointError(f"{self.path}: {m}.qcodes has in={shape[1]}, not a multiple of {self.grid.block_size}")
            for n, (dtype, want, *_) in self.grid.layout(*shape).items():
                key = f"{m}.{n}"
                if key not in self.files.where:
                    raise CheckpointError(f"{self.path}: quantized module {m!r} lacks the tensor {key!r}")
                got_shape, got_dtype = self.shape(key), self.dtype(key)
                if got_shape != want or got_dtype != st_dtype[dtype]:
                    raise CheckpointError(
                        f"{self.path}: {key} is {got_dtype}{list(got_shape)}, expected {st_dtype[dtype]}{list(want)}"
                    )

    def _quant_names(self) -> set[str]:
        return {f"{m}.{n}" for m in self.meta.modules for n in self.grid.tensor_names()} if self.spec else set()

    def _check_stray(self) -> None:
        """No quantization tensor (``<m>.qcodes`` and the grid's) of a module missing from ``modules``."""
        suffixes = ("qcodes", *(self.grid.tensor_names() if self.spec else ()))
        listed = set(self.meta.modules)
        for name in self.files.names():
            module, _, suffix = name.rpartition(".")
            if suffix in suffixes and module not in listed:
                raise CheckpointError(
                    f"{self.path}: {name} is a quantization tensor, but {module!r} is not in the modules of "
                    f"{QUANT_FILE}: the checkpoint is inconsistent; re-create it"
                )

    def _check_architecture(self) -> None:
        """The tensors are those of the model ``config.json`` describes, with its shapes."""
        shapes, aliases = _model_shapes(model_skeleton(self.config, self.path))
        for m in self.meta.modules:
            want = shapes.pop(f"{m}.weight", None)
            if want is None:
                raise CheckpointError(f"{self.path}: quantized module {m!r} is not a Linear of the model config.json describes")
            got = self.shape(f"{m}.qcodes")
            if got != want:
                raise CheckpointError(
                    f"{self.path}: {m}.qcodes has shape {list(got)} but the model of config.json needs {list(want)}: "
                    "config.json and the tensors disagree"
                )
        stored = set(self.files.names())
        missing = sorted(n for n in shapes if n not in stored and n not in aliases)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(
                f"{self.path}: the model of config.json needs {missing[0]}{more}, which the checkpoint lacks: "
                "it is incomplete; re-create it"
            )
        extra = sorted(stored - set(shapes) - self._quant_names())
        if extra:
            raise CheckpointError(f"{self.path}: {extra[0]} is not a tensor of the model config.json describes")
        for name in sorted(stored & set(shapes)):
            if self.shape(name) != shapes[name]:
                raise CheckpointError(
                    f"{self.path}: {name} has shape {list(self.shape(name))} but the model of config.json needs "
                    f"{list(shapes[name])}: config.json and the tensors disagree"
                )


def read_checkpoint(path: str | os.PathLike[str]) -> QuantizedCheckpoint:
    """Open and validate a quantized checkpoint directory.

    Args:
        path: the checkpoint directory.

    Returns:
        A :class:`QuantizedCheckpoint`.

    Raises:
        CheckpointError: missing files, an unknown ``format_version``, a file leading outside the
            directory, or tensors that are not exactly those of the model ``config.json`` describes.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    meta = _parse_meta(p)
    ckpt = QuantizedCheckpoint(p, meta, _read_config(p), SafetensorsDir(p), meta.spec)
    _check_model_files(p)
    ckpt.validate()
    return ckpt


def read_float_model(path: str | os.PathLike[str]) -> QuantizedCheckpoint:
    """A full-precision Hugging Face model directory seen as a checkpoint with no quantized module.

    Exporters use it to write the teacher in a float format (e.g. an F16 GGUF to bench against);
    its meta says ``bits=16, grid="float"`` and every tensor is a float tensor.

    Args:
        path: a directory with ``config.json`` and ``model.safetensors`` (or a sharded index).

    Returns:
        A :class:`QuantizedCheckpoint` whose ``meta.modules`` is empty.

    Raises:
        CheckpointError: the directory or its weights are missing, or they are not the model its
            ``config.json`` describes.
    """
    p = Path(path)
    if not (p / "config.json").exists():
        raise CheckpointError(f"{p} is not a model directory: config.json is missing")
    meta = QuantMeta(format_version=FORMAT_VERSION, bits=16, grid="float", group_size=0, modules=[],
                     base_model=p.resolve().name)
    model = QuantizedCheckpoint(p, meta, _read_config(p), SafetensorsDir(p), None)
    _check_model_files(p)
    model.validate()
    return model


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def checkpoint_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a model with QuantLinear modules in the checkpoint layout.

    Returns:
        ``(tensors, quantized module names)``; tied parameters appear once.
    """
    from rqat_deploy.quant.surgery import quant_linears

    state: dict[str, torch.Tensor] = {}
    modules = []
    for name, mod in quant_linears(model):
        modules.append(name)
        state.update({f"{name}.{k}": v for k, v in mod.checkpoint_tensors().items()})
        if mod.bias is not None:
            state[f"{name}.bias"] = mod.bias.detach().cpu().contiguous()
    prefixes = tuple(f"{m}." for m in modules)
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        if name.startswith(prefixes):
            continue
        if t.data_ptr() in seen:  # tied (e.g. lm_head.weight is embed_tokens.weight)
            continue
        seen.add(t.data_ptr())
        state[name] = t.detach().cpu().contiguous()
    return state, modules


def save_checkpoint(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    base_model: str = "",
    recipe: dict[str, Any] | None = None,
    force: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a model with QuantLinear modules as a quantized checkpoint (DESIGN.md 3).

    The directory is written under a temporary name and renamed when complete.

    Args:
        model: a Hugging Face causal LM after :func:`rqat_deploy.quant.surgery.prepare_model`.
        out_dir: the checkpoint directory.
        tokenizer: saved beside the model (with its chat template) when given.
        base_model: Hub id or path of the full-precision model.
        recipe: everything needed to reproduce the run (stored in ``rqat_quant.json``).
        force: replace an existing ``out_dir``.
        max_shard_size: bytes per safetensors shard.

    Returns:
        The checkpoint path.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``force`` is false.
        CheckpointError: the model has no quantized module, or mixes specs.
    """
    from rqat_deploy.quant.surgery import quant_linears

    out = Path(out_dir)
    specs = {mod.spec for _, mod in quant_linears(model)}
    if not specs:
        raise CheckpointError(
            "the model has no quantized Linear: nothing was quantized (its layers are not nn.Linear, or --exclude "
            "matched every one)"
        )
    if len({s.grid_def for s in specs}) > 1:
        raise CheckpointError(f"all quantized modules must share one spec, found {specs}")
    spec = specs.pop()
    with staged_dir(out, force) as tmp:
        state, modules = checkpoint_state(model)
        writer = ShardedWriter(tmp, max_shard_size)
        for name, tensor in state.items():
            writer.add(name, tensor)
        writer.finish()
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = QuantMeta(
            format_version=FORMAT_VERSION,
            bits=spec.bits,
            grid=spec.grid,
            group_size=spec.grid_def.group_size,
            modules=modules,
            base_model=base_model,
            recipe=recipe or {},
        )
        (tmp / QUANT_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# loading as a model
# ---------------------------------------------------------------------------------------------


def load_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    form: str = "dequantized",
    backend: str | None = None,
) -> tuple[nn.Module, Any]:
    """Build a transformers model from a quantized checkpoint.

    Args:
        path: the checkpoint directory.
        dtype: dtype of the model's floating-point tensors.
        device: target device.
        form: ``"dequantized"`` (plain ``nn.Linear`` with the dequantized weights, for evaluation
            and foreign runtimes) or ``"stage2"`` (QuantLinear with frozen codes, scales trainable).
        backend: kernel backend for the ``stage2`` form.

    Returns:
        ``(model, tokenizer)``; the tokenizer is ``None`` when the checkpoint has no tokenizer files.

    Raises:
        CheckpointError: an invalid checkpoint or one that does not fit its config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rqat_deploy.quant.qlinear import QuantLinear
    from rqat_deploy.quant.surgery import set_submodule

    if form not in ("dequantized", "stage2"):
        raise ConfigError(f"form must be 'dequantized' or 'stage2', got {form!r}")
    ckpt = read_checkpoint(path)
    config = AutoConfig.from_pretrained(str(ckpt.path))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = dict(ckpt.float_tensors())
    for m in ckpt.meta.modules:
        try:
            linear = model.get_submodule(m)
        except AttributeError as e:
            raise CheckpointError(f"{ckpt.path}: quantized module {m!r} does not exist in the model of config.json") from e
        t = ckpt.quant_tensors(m)
        if tuple(t["qcodes"].shape) != tuple(linear.weight.shape):
            raise CheckpointError(
                f"{ckpt.path}: {m}.qcodes has shape {list(t['qcodes'].shape)} but the model expects {list(linear.weight.shape)}"
            )
        if form == "dequantized":
            state[f"{m}.weight"] = ckpt.grid.dequantize(t)
        else:
            bias = state.pop(f"{m}.bias", None)
            set_submodule(model, m, QuantLinear.from_checkpoint(t, bias, ckpt.spec, backend))
    result = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    if result.unexpected_keys:
        raise CheckpointError(f"{ckpt.path}: tensors not in the model: {result.unexpected_keys[:5]}")
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied and ".quantizer." not in k and not k.endswith(".qcodes")]
    if missing:
        raise CheckpointError(f"{ckpt.path}: tensors missing from the checkpoint: {missing[:5]}")
    if tied:
        model.tie_weights()
    if (ckpt.path / "generation_config.json").exists():  # eos ids, sampling defaults of the base model
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(ckpt.path))
    tokenizer = None
    if (ckpt.path / "tokenizer_config.json").exists() or (ckpt.path / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path))
    return model.to(device).eval(), tokenizer
