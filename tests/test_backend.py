"""Backend dispatch: Triton on CUDA, the reference elsewhere, overridable; both agree."""

from __future__ import annotations

import pytest
import torch

from rqat_deploy.quant import backend
from rqat_deploy.errors import BackendError, ConfigError
from rqat_deploy.quant.qlinear import QuantLinear
from rqat_deploy.quant.spec import QuantSpec


def test_auto_picks_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RQAT_BACKEND", raising=False)
    assert backend.resolve_backend(torch.zeros(1)) == "reference"
    monkeypatch.setenv("RQAT_BACKEND", "reference")
    assert backend.resolve_backend(torch.zeros(1)) == "reference"


def test_bad_or_impossible_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="unknown backend 'cuda'"):
        backend.resolve_backend(torch.zeros(1), "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if backend.triton_available():
        with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
            backend.resolve_backend(torch.zeros(1), "triton")


@pytest.mark.skipif(not backend.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("bits, grid", [(2, "uniform"), (3, "uniform"), (4, "uniform"), (2, "kquant"), (3, "kquant")])
def test_quant_linear_triton_equals_reference(bits: int, grid: str) -> None:
    """Under TRITON_INTERPRET=1 the whole QuantLinear (both forms, all grads) agrees bit for bit."""
    gen = torch.Generator().manual_seed(bits)
    lin = torch.nn.Linear(256, 48)
    lin.weight.data = torch.randn(48, 256, generator=gen) * 0.05
    x = torch.randn(5, 256, generator=gen)
    spec = QuantSpec(bits=bits, grid=grid)
    results = {}
    for name in ("reference", "triton"):
        torch.manual_seed(0)
        mod = QuantLinear.from_linear(lin, spec, backend=name)
        mod(x).pow(2).sum().backward()
        grads1 = [p.grad.clone() for p in mod.parameters()]
        mod.freeze_codes()
        mod.zero_grad()
        mod(x).pow(2).sum().backward()
        grads2 = [p.grad.clone() for p in mod.parameters() if p.grad is not None]
        results[name] = (mod(x).detach(), grads1, grads2, mod.codes().clone())
    (y_r, g1_r, g2_r, c_r), (y_t, g1_t, g2_t, c_t) = results["reference"], results["triton"]
    assert torch.equal(c_r, c_t) and torch.equal(y_r, y_t)
    assert len(g1_r) == len(g1_t) and all(torch.equal(a, b) for a, b in zip(g1_r, g1_t))
    assert len(g2_r) == len(g2_t) > 0 and all(torch.equal(a, b) for a, b in zip(g2_r, g2_t))
