"""The reference quantizer against direct computations written from DESIGN.md 3-4."""

from __future__ import annotations

import pytest
import torch

from rqat_deploy.quant import reference as R
from rqat_deploy.quant.grids.kquant import dequantize_q2_k, dequantize_q3_k
from rqat_deploy.quant.grids.uniform import dequantize_uniform, rtn_uniform_init


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _params(kind: str, rows: int, k: int, gs: int, gen: torch.Generator):
    ng = k // gs
    s = torch.rand(rows, ng, generator=gen) * 0.1 + 0.01
    if kind == "uniform":
        z = torch.randint(0, 4, (rows, ng), generator=gen).float()
        return s, z, torch.zeros_like(s), 3
    if kind == "q2k":
        o = torch.randn(rows, ng, generator=gen) * 0.05
        return s, torch.zeros_like(s), o, 3
    s = s * torch.where(torch.rand(rows, ng, generator=gen) < 0.5, -1.0, 1.0)
    return s, torch.full_like(s, 4.0), torch.zeros_like(s), 7


@pytest.mark.parametrize("kind, gs", [("uniform", 128), ("uniform", 32), ("q2k", 16), ("q3k", 16)])
def test_fake_quant_forward_and_gradients_match_autograd_of_the_formula(kind: str, gs: int) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 256, generator=gen) * 0.1
    s, z, o, qmax = _params(kind, 6, 256, gs, gen)
    ins = [t.clone().requires_grad_() for t in (w, s, z, o)]
    y = R.FakeQuantFn.apply(*ins, qmax, gs)
    g = torch.randn(w.shape, generator=gen)
    (y * g).sum().backward()

    # direct: w' = s*(clamp(round((w+o)/s) + z, 0, qmax) - z) - o with straight-through round
    ref = [t.clone().requires_grad_() for t in (w, s, z, o)]
    we, se, ze, oe = ref[0], *(t.repeat_interleave(gs, 1) for t in ref[1:])
    y2 = se * (torch.clamp(_ste_round((we + oe) / se) + ze, 0, qmax) - ze) - oe
    (y2 * g).sum().backward()
    torch.testing.assert_close(y, y2, rtol=0, atol=1e-7)
    for a, b in zip(ins, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_dequant_fn_gradients_match_autograd() -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 8, (4, 128), generator=gen).float()
    s, z, o = torch.rand(4, 8, generator=gen), torch.randint(0, 8, (4, 8), generator=gen).float(), torch.randn(4, 8, generator=gen)
    s1, o1 = s.clone().requires_grad_(), o.clone().requires_grad_()
    g = torch.randn(4, 128, generator=gen)
    (R.DequantFn.apply(q, s1, z, o1, 16) * g).sum().backward()
    s2, o2 = s.clone().requires_grad_(), o.clone().requires_grad_()
    y2 = s2.repeat_interleave(16, 1) * (q - z.repeat_interleave(16, 1)) - o2.repeat_interleave(16, 1)
    (y2 * g).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o1.grad, o2.grad, rtol=1e-5, atol=1e-5)


def test_group_sum_is_a_sum_and_rejects_odd_groups() -> None:
    x = torch.randint(-50, 50, (3, 512)).float()
    assert torch.equal(R.group_sum(x, 64), x.view(3, 8, 64).sum(-1))
    with pytest.raises(Exception, match="power-of-two"):
        R.group_sum(x, 24)


def test_codes_round_half_to_even_and_clamp() -> None:
    s, z, o = torch.ones(1, 1), torch.full((1, 1), 1.0), torch.zeros(1, 1)
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -3.0, 9.0] + [0.0] * 10])
    q = R.quantize_codes(w, s, z, o, 3, 16)
    assert q[0, :6].tolist() == [1.0, 3.0, 3.0, 1.0, 0.0, 3.0]  # round(.5)=0, round(1.5)=2, round(2.5)=2 (+1), clamp


def test_zero_subscale_group_decodes_to_minus_offset() -> None:
    w = torch.randn(1, 32)
    s = torch.tensor([[0.0, 0.1]])
    z, o = torch.zeros(1, 2), torch.tensor([[0.3, 0.0]])
    q = R.quantize_codes(w, s, z, o, 3, 16)
    assert torch.all(q[0, :16] == 0)
    y = R.FakeQuantFn.apply(w, s, z, o, 3, 16)
    assert torch.all(y[0, :16] == -0.3)


def test_rtn_uniform_init_properties() -> None:
    w = torch.randn(8, 256) * 0.05
    w[0, :128] = 0.0  # an all-zero group
    for bits in (2, 3, 4):
        s, z = rtn_uniform_init(w, bits, 128)
        assert torch.equal(s, s.half().float()) and torch.all(s > 0)
        assert torch.all((z >= 0) & (z <= 2**bits - 1)) and torch.equal(z, z.round())
        y = R.FakeQuantFn.apply(w, s, z, torch.zeros_like(s), 2**bits - 1, 128)
        assert torch.all(y[0, :128] == 0)
        err = (y - w).abs().view(8, 2, 128).amax(-1)
        assert torch.all(err <= s * 0.5 + s * 2 ** -10 + 1e-7)  # within half a step (fp16 scale rounding)


def test_checkpoint_formulas_match_design() -> None:
    gen = torch.Generator().manual_seed(2)
    out, k = 3, 512
    q2 = torch.randint(0, 4, (out, k), generator=gen, dtype=torch.uint8)
    d, dmin = (torch.randn(out, k // 256, generator=gen) * 0.01).half(), (torch.randn(out, k // 256, generator=gen) * 0.01).half()
    sc, m = (torch.randint(0, 16, (out, k // 16), generator=gen, dtype=torch.uint8) for _ in range(2))
    idx256, idx16 = torch.arange(k) // 256, torch.arange(k) // 16
    want = d.float()[:, idx256] * sc.float()[:, idx16] * q2.float() - dmin.float()[:, idx256] * m.float()[:, idx16]
    assert torch.equal(dequantize_q2_k(q2, d, dmin, sc, m), want)

    q3 = torch.randint(0, 8, (out, k), generator=gen, dtype=torch.uint8)
    sc3 = torch.randint(-32, 32, (out, k // 16), generator=gen, dtype=torch.int8)
    want3 = d.float()[:, idx256] * sc3.float()[:, idx16] * (q3.float() - 4)
    assert torch.equal(dequantize_q3_k(q3, d, sc3), want3)

    qu = torch.randint(0, 8, (out, k), generator=gen, dtype=torch.uint8)
    scales, zeros = torch.rand(out, k // 128, generator=gen).half(), torch.randint(0, 8, (out, k // 128), generator=gen, dtype=torch.uint8)
    idx = torch.arange(k) // 128
    assert torch.equal(dequantize_uniform(qu, scales, zeros, 128), scales.float()[:, idx] * (qu.float() - zeros.float()[:, idx]))
