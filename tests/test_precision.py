"""The one autocast rule of both training stages (rqat_deploy.train.precision.autocast)."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import pytest
import torch

from rqat_deploy.errors import ConfigError
from rqat_deploy.train.precision import autocast


@pytest.mark.parametrize("dtype", [None, "bfloat16", "float16"])
def test_autocast_is_a_noop_off_cuda(dtype: str | None) -> None:
    x = torch.ones(4, 4)
    with autocast(torch.device("cpu"), dtype):
        assert not torch.is_autocast_enabled("cpu")
        assert (x @ x).dtype == torch.float32


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_on_cuda_is_torch_autocast_in_that_dtype(dtype: str) -> None:
    assert isinstance(autocast(torch.device("cuda"), None), nullcontext)
    with warnings.catch_warnings():  # a CPU-only torch warns that it disables CUDA autocast
        warnings.simplefilter("ignore")
        ctx = autocast(torch.device("cuda", 0), dtype)
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == getattr(torch, dtype)
    if torch.cuda.is_available():
        x = torch.ones(4, 4, device="cuda")
        with ctx:
            assert (x @ x).dtype == getattr(torch, dtype)


def test_unknown_dtype_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="bfloat16"):
        autocast(torch.device("cpu"), "float8")
