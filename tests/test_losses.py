"""Stage-2 loss terms: chunked computation against direct full-tensor formulas on small tensors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from rqat_deploy.train import losses
from rqat_deploy.errors import ConfigError
from rqat_deploy.train.losses import PRESETS, LossConfig, TeacherTargets, chunked_loss, parse_terms, token_metrics

N, H, HT, V, K = 37, 16, 12, 50, 5


@pytest.fixture(autouse=True)
def _one_thread():
    """Small ops on a shared 2-core machine run far faster without OpenMP contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _problem(seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    th = torch.randn(N, HT, generator=g)
    tw = torch.randn(V, HT, generator=g) * 0.7
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, b, y, th, tw


def _targets(th: torch.Tensor, tw: torch.Tensor, y: torch.Tensor, k: int = K) -> TeacherTargets:
    t = losses.topk_targets(th @ tw.T, y, k)
    return TeacherTargets(t.topk_ids, t.topk_logprobs, t.label_logprobs, th, tw, None)


def _direct(h, w, b, y, th, tw, terms, alpha, beta, k):
    """Full-tensor formulas written from the definitions (probabilities, not log-space tricks)."""
    logits = F.linear(h, w, b)
    q = logits.softmax(-1)
    p = (th @ tw.T).softmax(-1)
    n = len(y)
    rows = torch.arange(n)
    ce = F.cross_entropy(logits, y, reduction="none")
    top = p.topk(k, dim=-1).indices
    pk, qk = p.gather(1, top), q.gather(1, top)
    rk, sk = pk / pk.sum(-1, keepdim=True), qk / qk.sum(-1, keepdim=True)  # renormalised over the top-k

    def kl(a, b):
        return (a * (a.log() - b.log())).sum()

    def jsd(a, b):
        m = (a + b) / 2
        return 0.5 * ((a * (a / m).log()).sum() + (b * (b / m).log()).sum())

    value = {
        "ce": alpha * ce.sum(),
        "rr": alpha * (ce * p[rows, y]).sum(),
        "dft": alpha * (ce * q[rows, y].detach()).sum(),
        "topk_kl": beta * kl(pk, qk),
        "topk_kl_renorm": beta * kl(rk, sk),
        "jsd": beta * jsd(pk, qk),
        "jsd_renorm": beta * jsd(rk, sk),
        "kl": beta * kl(p, q),
    }
    return sum(value[t] for t in terms) / n


@pytest.mark.parametrize("terms", [
    "ce", "rr", "dft", "topk_kl", "topk_kl_renorm", "jsd", "jsd_renorm", "kl", "rr+topk_kl", "ce+jsd", "ce+topk_kl",
    "ce+rr", "rr+topk_kl_renorm", "ce+jsd_renorm", "ce+rr+dft+topk_kl+topk_kl_renorm+jsd+jsd_renorm+kl",
])
def test_chunked_loss_and_gradients_match_direct(terms: str) -> None:
    h, w, b, y, th, tw = _problem(1, bias=True)
    t = _targets(th, tw, y)
    ref_h, ref_w, ref_b = (x.clone().requires_grad_(True) for x in (h, w, b))
    ref = _direct(ref_h, ref_w, ref_b, y, th, tw, parse_terms(terms), 0.2, 1.0, K)
    ref.backward()
    for chunk in (1, 7, 1000):
        ch, cw, cb = (x.clone().requires_grad_(True) for x in (h, w, b))
        cfg = LossConfig(terms, alpha=0.2, beta=1.0, top_k=K, chunk_size=chunk)
        out = chunked_loss(ch, cw, cb, y, t, cfg)
        out.loss.backward()
        torch.testing.assert_close(out.loss, ref.detach(), rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(ch.grad, ref_h.grad, rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(cw.grad, ref_w.grad, rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(cb.grad, ref_b.grad, rtol=2e-4, atol=1e-6)
        assert sum(out.parts.values()) == pytest.approx(float(out.loss.detach()), rel=1e-5, abs=1e-7)
        assert set(out.parts) == set(parse_terms(terms))


def test_paper_loss_uses_alpha_beta_and_one_token_count() -> None:
    h, w, _, y, th, tw = _problem(2)
    t = _targets(th, tw, y)
    cfg = LossConfig("rr+topk_kl", alpha=0.2, beta=1.0, top_k=K)
    out = chunked_loss(h, w, None, y, t, cfg)
    logits = h @ w.T
    ce = F.cross_entropy(logits, y, reduction="none")
    p = (th @ tw.T).softmax(-1)
    q = logits.softmax(-1)
    top = p.topk(K, dim=-1).indices
    kl = (p.gather(1, top) * (p.gather(1, top).log() - q.gather(1, top).log())).sum(-1)
    want = 0.2 * (ce * p[torch.arange(N), y]).sum() / N + 1.0 * kl.sum() / N
    assert float(out.loss) == pytest.approx(float(want), rel=1e-5)
    assert out.parts["rr"] == pytest.approx(float(0.2 * (ce * p[torch.arange(N), y]).sum() / N), rel=1e-5)


def test_accumulated_microbatches_equal_the_whole_batch() -> None:
    h, w, _, y, th, tw = _problem(3)
    t = _targets(th, tw, y)
    cfg = LossConfig("rr+topk_kl", top_k=K, chunk_size=8)
    full_h = h.clone().requires_grad_(True)
    full = chunked_loss(full_h, w, None, y, t, cfg)
    full.loss.backward()
    part_h = h.clone().requires_grad_(True)
    total = 0.0
    for a, b in ((0, 10), (10, 30), (30, N)):
        out = chunked_loss(part_h[a:b], w, None, y[a:b], t.slice(a, b), cfg, n_norm=N)
        out.loss.backward()
        total += float(out.loss.detach())
    assert total == pytest.approx(float(full.loss.detach()), rel=1e-5)
    torch.testing.assert_close(part_h.grad, full_h.grad, rtol=1e-5, atol=1e-7)


def test_logits_never_exceed_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = losses.term_sums

    def spy(logits, labels, teacher, cfg):
        seen.append(logits.shape[0])
        return real(logits, labels, teacher, cfg)

    monkeypatch.setattr(losses, "term_sums", spy)
    h, w, _, y, th, tw = _problem(4)
    out = chunked_loss(h.requires_grad_(True), w, None, y, _targets(th, tw, y), LossConfig("rr+topk_kl", top_k=K, chunk_size=8))
    out.loss.backward()
    assert seen == [8, 8, 8, 8, 5]  # 37 tokens in chunks of at most 8, forward and gradient together


@pytest.mark.parametrize("terms", ["topk_kl", "topk_kl_renorm", "jsd", "jsd_renorm", "kl"])
def test_divergences_vanish_when_student_equals_teacher(terms: str) -> None:
    _, _, _, y, th, tw = _problem(5)
    out = chunked_loss(th, tw, None, y, _targets(th, tw, y), LossConfig(terms, top_k=K))
    assert abs(float(out.loss)) < 1e-6


def test_jsd_is_nonnegative_and_bounded() -> None:
    h, w, _, y, th, tw = _problem(6)
    out = chunked_loss(h, w, None, y, _targets(th, tw, y), LossConfig("jsd_renorm", beta=1.0, top_k=K))
    assert 0 < float(out.loss) <= torch.log(torch.tensor(2.0)) + 1e-6


def test_token_metrics_tail_kl_is_a_divergence_below_the_full_kl() -> None:
    h, w, _, y, th, tw = _problem(7)
    m = token_metrics(h, w, None, y, _targets(th, tw, y), chunk_size=6)
    logits = h @ w.T
    p, q = (th @ tw.T).softmax(-1), logits.softmax(-1)
    top = p.topk(K, dim=-1).indices
    pk, qk = p.gather(1, top), q.gather(1, top)
    pr, qr = 1 - pk.sum(-1), 1 - qk.sum(-1)
    tail = (pk * (pk / qk).log()).sum(-1) + pr * (pr / qr).log()
    full = (p * (p / q).log()).sum()
    assert m["tokens"] == N
    assert m["ce"] == pytest.approx(float(F.cross_entropy(logits, y, reduction="sum")), rel=1e-5)
    assert m["kl_topk_tail"] == pytest.approx(float(tail.sum()), rel=1e-4)
    assert m["kl_full"] == pytest.approx(float(full), rel=1e-5)
    assert 0 < m["kl_topk_tail"] <= m["kl_full"]


def test_presets_names_and_bad_terms() -> None:
    assert parse_terms("paper") == ("rr", "topk_kl")
    assert parse_terms("released") == ("ce", "jsd")
    assert parse_terms("reasoning-qat") == ("kl",)
    assert parse_terms("topk_kl+ce") == ("ce", "topk_kl")
    assert set(PRESETS) >= {"paper", "released", "reasoning-qat"}
    for bad in ("", "X", "rr+rr", "rr+Q", "topk"):
        with pytest.raises(ConfigError):
            parse_terms(bad)
    assert LossConfig().needs_full_teacher is False and LossConfig("kl").needs_full_teacher is True
    assert LossConfig("ce").needs_teacher is False


@pytest.mark.parametrize("old, new", [("C+S", "ce+topk_kl"), ("R+S", "rr+topk_kl"), ("s+c", "topk_kl+ce"), ("F", "kl")])
def test_old_letter_spellings_fail_naming_the_new_names(old: str, new: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"means '{new}'") + r".*C=ce.*S=topk_kl.*--recipe C\+S"):
        parse_terms(old)


def test_topk_kl_is_a_partial_sum_minimised_at_the_renormalised_top_k() -> None:
    """Issue 15: without renormalisation the top-k KL can be negative and is not minimised at the teacher."""
    _, _, _, y, th, tw = _problem(10)
    t = _targets(th, tw, y)
    at_teacher = chunked_loss(th, tw, None, y, t, LossConfig("topk_kl", top_k=K)).loss
    logp = (th @ tw.T).log_softmax(-1)
    topk = torch.full_like(logp, -1e4).scatter(1, t.topk_ids, t.topk_logprobs.log_softmax(-1))  # q = renormalised top-k
    h = torch.eye(logp.shape[1])
    at_renorm = chunked_loss(topk, h, None, y, t, LossConfig("topk_kl", top_k=K)).loss
    assert float(at_renorm) < float(at_teacher) == pytest.approx(0.0, abs=1e-6) and float(at_renorm) < 0
    renorm = chunked_loss(topk, h, None, y, t, LossConfig("topk_kl_renorm", top_k=K)).loss
    assert abs(float(renorm)) < 1e-5  # renormalised, the two agree on the top-k: zero


def test_full_kl_without_teacher_hidden_states_is_a_clear_error() -> None:
    h, w, _, y, th, tw = _problem(8)
    t = losses.topk_targets(th @ tw.T, y, K)  # a cached teacher has no hidden states
    with pytest.raises(ConfigError, match="live teacher"):
        chunked_loss(h, w, None, y, t, LossConfig("kl", top_k=K))
    with pytest.raises(ConfigError, match="need teacher"):
        chunked_loss(h, w, None, y, None, LossConfig("rr+topk_kl", top_k=K))


def test_teacher_free_loss_and_empty_batch() -> None:
    h, w, _, y, _, _ = _problem(9)
    out = chunked_loss(h, w, None, y, None, LossConfig("ce", alpha=1.0))
    assert float(out.loss) == pytest.approx(float(F.cross_entropy(h @ w.T, y)), rel=1e-5)
    empty = chunked_loss(h[:0].requires_grad_(True), w, None, y[:0], None, LossConfig("ce"))
    assert float(empty.loss.detach()) == 0.0 and empty.n_tokens == 0
