"""Loading Hugging Face causal LMs and tokenizers from a Hub id or a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rqat_deploy.errors import ConfigError, ModelLoadError
from rqat_deploy.files import is_local_path

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16`` (and float32 / float16).

    Raises:
        ModelLoadError: an unknown dtype name.
    """
    import torch

    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {DTYPES}")
    return getattr(torch, name)


def check_device(device: str | None) -> None:
    """Refuse a CUDA device this machine does not have, before any work.

    Raises:
        ConfigError: ``cuda`` / ``cuda:N`` without CUDA, or N beyond the devices present.
    """
    if not device or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(f"--device {device}: no CUDA device is available (torch {torch.__version__}, {build}); "
                          "use --device cpu or install a CUDA build of torch")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def load_hf_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: a local model directory or a Hugging Face Hub id (``Qwen/Qwen3-1.7B``).
        dtype: ``float32`` | ``bfloat16`` | ``float16``.
        device: where to put the model (``cpu``, ``cuda``...).
        trust_remote_code: allow the repository's own modelling code (off unless asked).
        revision: a Hub revision (branch, tag, commit).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Weights are read from safetensors files only (never unpickled).

    Raises:
        ModelLoadError: a missing directory, weights only in pickle files, an unreachable Hub, or an
            unloadable model, with the fix.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path).expanduser()
    if is_local_path(name_or_path):
        if not path.is_dir():
            raise ModelLoadError(f"model directory {name_or_path!r} does not exist: pass an existing directory or a Hub id")
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{name_or_path!r} has no config.json: it is not a Hugging Face model directory")
        if not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
            raise ModelLoadError(
                f"{name_or_path!r} holds its weights only as pickle files (*.bin), which rqat-deploy never loads "
                "(unpickling runs code): convert them to model.safetensors with a tool you trust"
            )
        source = str(path)
    else:
        source = name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except (OSError, ValueError) as e:
        hint = (
            "check the Hub id and your network (or set HF_HUB_OFFLINE=1 with a cached copy), "
            "or pass a local model directory"
            if source == name_or_path and not path.exists()
            else "check that the directory holds a complete Hugging Face model"
        )
        raise ModelLoadError(f"could not load model {name_or_path!r}: {e}\n{hint}") from e
    return model.to(device).eval(), tok
