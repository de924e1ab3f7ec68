"""Stage 2 on the tiny Qwen3: scale-only training, teacher cache, resume, non-finite detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rqat_deploy.errors import ConfigError
from rqat_deploy.train.losses import LossConfig, chunked_loss
from rqat_deploy.train.stage2 import STATE_FILE, NonFiniteError, Stage2Config, run_stage2
from rqat_deploy.quant.surgery import quant_linears
from rqat_deploy.train.teacher import CachedTeacher, LiveTeacher, completion_positions, decoder_and_head

COT = Path(__file__).resolve().parents[2] / "shared" / "data" / "math_cot_100.jsonl"
SCALE_NAMES = {"scales", "d", "dmin"}


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's small ops run far faster without OpenMP contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env(tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from rqat_deploy.data.sft import build_sft
    from rqat_deploy.models import load_hf_model
    from rqat_deploy.train.run import quantize_rtn

    if not COT.exists():
        pytest.skip(f"{COT} is not available")
    d = tmp_path_factory.mktemp("stage2")
    conv = d / "conv.jsonl"
    with conv.open("w") as f:
        for line in COT.read_text().splitlines():
            r = json.loads(line)
            value = f"<think>\n{r['code'][0]}\n</think>\n\nThe answer is $\\boxed{{{r['gt']}}}$."
            f.write(json.dumps({"conversations": [{"from": "human", "value": r["question"]}, {"from": "gpt", "value": value}]}) + "\n")
    teacher, tok = load_hf_model(str(tiny_qwen3_dir))
    data = build_sft(tok, str(conv), 20, 96, seed=0)
    ckpt = quantize_rtn(tiny_qwen3_dir, d / "rtn2", bits=2)
    return {"teacher": teacher, "tok": tok, "data": data, "ckpt": ckpt, "dir": d, "model_dir": tiny_qwen3_dir}


def _student(path: Path) -> torch.nn.Module:
    from rqat_deploy.quant.checkpoint import load_model

    model, _ = load_model(path, form="stage2")
    return model


def _cfg(**kw) -> Stage2Config:
    base = dict(lr=3e-3, epochs=2, global_batch=4, micro_batch=2, eval_samples=4, warmup_ratio=0.0, save_every=0)
    return Stage2Config(**(base | kw))


def _quant_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, m in quant_linears(model) for k, v in m.checkpoint_tensors().items()}


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_stage2_lowers_heldout_kl_and_changes_only_scales(env: dict, tmp_path: Path) -> None:
    student = _student(env["ckpt"])
    before = _quant_state(student)
    floats = {n: t.clone() for n, t in student.state_dict().items() if ".quantizer." not in n and not n.endswith("qcodes")}
    rep = run_stage2(student, env["data"], LiveTeacher(env["teacher"]), _cfg(), state_dir=tmp_path, progress=False)
    after = _quant_state(student)
    assert rep.eval_after["kl"] < rep.eval_before["kl"]
    assert rep.eval_after["kl_full"] < rep.eval_before["kl_full"]
    assert rep.steps == 8 and rep.tokens > 0 and rep.trainable["tensors"] == len(list(quant_linears(student)))
    changed = 0
    for k, v in before.items():
        if k.rsplit(".", 1)[-1] in SCALE_NAMES:
            changed += not torch.equal(v, after[k])
        else:  # qcodes and zeros: bit-identical
            assert torch.equal(v, after[k]), k
    assert changed == len(list(quant_linears(student)))
    for n, t in student.state_dict().items():  # embeddings, norms: untouched
        if n in floats:
            assert torch.equal(t, floats[n]), n
    lines = [json.loads(x) for x in (tmp_path / "stage2_metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train] == list(range(1, 9))
    assert {"loss_rr", "loss_topk_kl", "lr", "grad_norm"} <= set(train[0])
    assert [x["when"] for x in lines if x.get("event") == "eval"] == ["before", "after"]
    assert (tmp_path / STATE_FILE).exists()


def test_checkpoint_after_stage2_reloads_to_the_trained_logits(env: dict, tmp_path: Path) -> None:
    from rqat_deploy.quant.checkpoint import load_model, save_checkpoint

    student = _student(env["ckpt"])
    norms: list[tuple[float, float]] = []

    def clipped(_step: int, metrics: dict) -> None:  # gradients after clipping, before the next step
        g = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        norms.append((metrics["grad_norm"], float(g.norm())))

    run_stage2(student, env["data"], LiveTeacher(env["teacher"]), _cfg(max_steps=2, max_grad_norm=1e-3),
               progress=False, on_step=clipped)
    assert len(norms) == 2 and all(pre > 1e-3 and post == pytest.approx(1e-3, rel=1e-3) for pre, post in norms)
    ids = env["data"].input_ids[:2, :40]
    student.eval()
    with torch.no_grad():
        want = student(input_ids=ids).logits
    out = save_checkpoint(student, tmp_path / "ck", tokenizer=env["tok"])
    loaded, _ = load_model(out)
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_cached_teacher_equals_live_teacher(env: dict, tmp_path: Path) -> None:
    data, live = env["data"], LiveTeacher(env["teacher"])
    cache32 = CachedTeacher.build(env["teacher"], data, tmp_path / "c32", progress=False)
    cache16 = CachedTeacher.build(env["teacher"], data, tmp_path / "c16", dtype="float16", progress=False)
    idx = [3, 0, 7]
    sub = data.subset(idx)
    args = (idx, sub.input_ids, sub.attention_mask, sub.labels)
    t_live, t32, t16 = live.targets(*args), cache32.targets(*args), cache16.targets(*args)
    assert len(t_live) == int(data.completion_tokens()[idx].sum())
    for a, b in ((t_live.topk_ids, t32.topk_ids), (t_live.topk_logprobs, t32.topk_logprobs), (t_live.label_logprobs, t32.label_logprobs)):
        assert torch.equal(a, b)  # float32 cache: the same computation, stored losslessly
    # the loss of a student batch is the same, bit for bit, with either teacher
    student = _student(env["ckpt"])
    base, head = decoder_and_head(student)
    with torch.no_grad():
        hid = base(input_ids=sub.input_ids, attention_mask=sub.attention_mask).last_hidden_state
    pos = completion_positions(sub.attention_mask, sub.labels)
    h = torch.cat([hid[b, p] for b, p in enumerate(pos)])
    y = torch.cat([sub.labels[b, p + 1] for b, p in enumerate(pos)])
    cfg = LossConfig("rr+topk_kl")
    l_live = chunked_loss(h, head.weight, None, y, t_live, cfg).loss
    assert torch.equal(l_live, chunked_loss(h, head.weight, None, y, t32, cfg).loss)
    # float16 storage: log-probs rounded to 11 significant bits, so |dlogp| <= 2^-11 |logp|; the loss
    # moves by about that relative amount
    assert torch.equal(t16.topk_ids, t_live.topk_ids)
    assert torch.all((t16.topk_logprobs - t_live.topk_logprobs).abs() <= t_live.topk_logprobs.abs() * 2**-11 + 1e-7)
    torch.testing.assert_close(chunked_loss(h, head.weight, None, y, t16, cfg).loss, l_live, rtol=2e-3, atol=0)
    # a whole stage-2 run with the float32 cache equals the live-teacher run bit for bit
    s_live, s_cache = _student(env["ckpt"]), _student(env["ckpt"])
    cfg2 = _cfg(max_steps=3)
    run_stage2(s_live, data, live, cfg2, progress=False)
    run_stage2(s_cache, data, cache32, cfg2, progress=False)
    for (n, a), (_, b) in zip(_trainable(s_live).items(), _trainable(s_cache).items()):
        assert torch.equal(a, b), n


def test_teacher_cache_errors_and_resume(env: dict, tmp_path: Path) -> None:
    data = env["data"]
    cache = CachedTeacher.build(env["teacher"], data, tmp_path / "c", progress=False)
    other = data.subset(list(range(len(data) - 1)))
    with pytest.raises(ConfigError, match="other data"):
        cache.check(other, top_k=20, full_vocab=False)
    with pytest.raises(ConfigError, match="live teacher"):
        cache.check(data, top_k=20, full_vocab=True)
    with pytest.raises(ConfigError, match="other data or settings"):
        CachedTeacher.build(env["teacher"], other, tmp_path / "c", progress=False)
    # an interrupted build (done < n) is refused on open and finished by a rebuild
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    full = {f: (tmp_path / "c" / f).read_bytes() for f in ("topk_ids.npy", "topk_logprobs.npy", "label_logprobs.npy")}
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta | {"done": 5}))
    with pytest.raises(ConfigError, match="incomplete"):
        CachedTeacher(tmp_path / "c")
    CachedTeacher.build(env["teacher"], data, tmp_path / "c", progress=False)
    assert {f: (tmp_path / "c" / f).read_bytes() for f in full} == full


def test_resume_is_bit_identical_to_an_uninterrupted_run(env: dict, tmp_path: Path) -> None:
    cfg = _cfg(save_every=2)
    teacher = LiveTeacher(env["teacher"])
    a = _student(env["ckpt"])
    rep_a = run_stage2(a, env["data"], teacher, cfg, state_dir=tmp_path / "a", progress=False)

    def interrupt(step: int, _metrics: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    b = _student(env["ckpt"])
    with pytest.raises(KeyboardInterrupt):
        run_stage2(b, env["data"], teacher, cfg, state_dir=tmp_path / "b", progress=False, on_step=interrupt)
    assert torch.load(tmp_path / "b" / STATE_FILE, weights_only=False)["step"] == 3  # saved on "Ctrl-C"
    with pytest.raises(ConfigError, match="resume"):
        run_stage2(_student(env["ckpt"]), env["data"], teacher, cfg, state_dir=tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="differ in \\['lr'\\]"):
        run_stage2(_student(env["ckpt"]), env["data"], teacher, _cfg(save_every=2, lr=1e-3),
                   state_dir=tmp_path / "b", resume=True, progress=False)
    b2 = _student(env["ckpt"])  # a fresh process: the RTN student again, state from disk
    rep_b = run_stage2(b2, env["data"], teacher, cfg, state_dir=tmp_path / "b", resume=True, progress=False)
    assert rep_b.start_step == 3 and rep_b.steps == rep_a.steps
    for (n, x), (_, y) in zip(_trainable(a).items(), _trainable(b2).items()):
        assert torch.equal(x, y), n
    assert rep_b.eval_after == rep_a.eval_after and rep_b.eval_before == rep_a.eval_before
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "stage2_metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, rep_a.steps + 1))  # no duplicated or missing step after the resume


def test_nonfinite_gradient_stops_naming_step_and_module(env: dict, tmp_path: Path) -> None:
    student = _student(env["ckpt"])
    name, mod = next(iter(quant_linears(student)))
    calls = {"n": 0}

    def poison(g: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return g * float("nan") if calls["n"] > 4 else g  # 2 micro-batches per step: step 2 goes bad

    mod.quantizer.scale.register_hook(poison)
    with pytest.raises(NonFiniteError, match=rf"non-finite gradient at step 2 .*{name}.*last good state \(step 2\)"):
        run_stage2(student, env["data"], LiveTeacher(env["teacher"]), _cfg(save_every=1), state_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert state["step"] == 2
    assert all(torch.isfinite(p).all() for p in state["params"].values())
    assert torch.isfinite(mod.quantizer.scale).all()  # the bad update was never applied


def test_nonfinite_loss_is_reported(env: dict) -> None:
    student = _student(env["ckpt"])
    name, mod = next(iter(quant_linears(student)))
    with torch.no_grad():
        mod.quantizer.scale[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite loss .* at step 0"):
        run_stage2(student, env["data"], LiveTeacher(env["teacher"]), _cfg(eval_samples=0), progress=False)


def test_kquant_student_trains_d_only(env: dict, tmp_path: Path) -> None:
    from rqat_deploy.train.run import quantize_rtn

    ck = quantize_rtn(env["model_dir"], tmp_path / "q2k", bits=2, grid="kquant")
    student = _student(ck)
    before = _quant_state(student)
    rep = run_stage2(student, env["data"], LiveTeacher(env["teacher"]), _cfg(max_steps=2, eval_samples=2), progress=False)
    after = _quant_state(student)
    assert rep.trainable["tensors"] == 2 * len(list(quant_linears(student)))  # d and dmin
    for k, v in before.items():
        same = torch.equal(v, after[k])
        assert same != (k.rsplit(".", 1)[-1] in ("d", "dmin")), k  # codes, sub-scales, sub-mins frozen


def test_gradient_checkpointing_gives_the_same_scales(env: dict) -> None:
    plain, ckpt = _student(env["ckpt"]), _student(env["ckpt"])
    teacher = LiveTeacher(env["teacher"])
    run_stage2(plain, env["data"], teacher, _cfg(max_steps=2, eval_samples=0), progress=False)
    run_stage2(ckpt, env["data"], teacher, _cfg(max_steps=2, eval_samples=0, gradient_checkpointing=True), progress=False)
    assert getattr(ckpt, "is_activation_checkpointing", None) or ckpt.is_gradient_checkpointing
    for (n, a), (_, b) in zip(_trainable(plain).items(), _trainable(ckpt).items()):
        assert torch.equal(a, b), n


def test_config_defaults_and_errors(env: dict) -> None:
    cfg = Stage2Config()
    assert (cfg.alpha, cfg.beta, cfg.top_k, cfg.global_batch, cfg.loss_terms, cfg.train_form) == (0.2, 1.0, 20, 64, "rr+topk_kl", "scales")
    student = _student(env["ckpt"])
    r = cfg.resolved(student)  # 2-bit, tiny: the paper's small-model 2-bit values
    assert (r.lr, r.epochs) == (5e-6, 3)
    for bad in (dict(schedule="exp"), dict(micro_batch=128), dict(loss_terms="Q"), dict(lr=0.0)):
        with pytest.raises(ConfigError):
            Stage2Config(**bad)
    with pytest.raises(ConfigError, match="leave none to train"):
        run_stage2(student, env["data"], LiveTeacher(env["teacher"]), _cfg(eval_samples=20), progress=False)
    cache_needed = _cfg(loss_terms="kl", max_steps=1)
    rep = run_stage2(student, env["data"], LiveTeacher(env["teacher"]), cache_needed, progress=False)
    assert rep.final_loss is not None and rep.final_loss > 0


GRID_CASES = [("uniform", 2), ("q2_0", 2), ("kquant", 2), ("kquant", 3)]


@pytest.mark.parametrize("grid, bits", GRID_CASES, ids=[f"{g}-{b}bit" for g, b in GRID_CASES])
def test_stage2_lowers_heldout_kl_on_every_grid(env: dict, tmp_path: Path, grid: str, bits: int) -> None:
    """One configuration serves every grid: rates relative to each scale, a short rate search (searched
    k-quant / q2_0 starts want ~10x smaller steps than min-max uniform ones), keep-better as a guard."""
    from rqat_deploy.train.run import quantize_rtn

    ckpt = quantize_rtn(env["model_dir"], tmp_path / "ck", bits=bits, grid=grid)
    cfg = _cfg(relative_lr=True, keep_better=True, lr_search=(1.0, 1 / 3, 1 / 10, 1 / 30))
    rep = run_stage2(_student(ckpt), env["data"], LiveTeacher(env["teacher"]), cfg, progress=False)
    assert rep.eval_after["kl_full"] < rep.eval_before["kl_full"] and not rep.kept_initial
    assert set(rep.lr_search) == {"1", "0.333333", "0.1", "0.0333333"} and rep.lr in [3e-3 * f for f in cfg.lr_search]


def test_keep_better_ends_where_it_started_when_training_hurts(env: dict) -> None:
    student = _student(env["ckpt"])
    start = _trainable(student)
    rep = run_stage2(student, env["data"], LiveTeacher(env["teacher"]), _cfg(lr=0.5, keep_better=True, max_grad_norm=None),
                     progress=False)
    assert rep.kept_initial and rep.eval_after == rep.eval_before
    assert all(torch.equal(v, start[n]) for n, v in _trainable(student).items())


def test_relative_lr_scales_only_the_kquant_super_block_scales(env: dict, tmp_path: Path) -> None:
    from rqat_deploy.train.run import quantize_rtn
    from rqat_deploy.train.stage2 import Stage2Trainer

    ckpt = quantize_rtn(env["model_dir"], tmp_path / "q2k", bits=2, grid="kquant")
    trainer = Stage2Trainer(_student(ckpt), env["data"], LiveTeacher(env["teacher"]), _cfg(relative_lr=True))
    lrs = sorted(g["lr"] for g in trainer.optimizer.param_groups)
    assert len(lrs) > 1 and max(lrs) <= 3e-3 and min(lrs) < 3e-3 / 4  # d / dmin: ~1/10 of the effective scale's
    uni = Stage2Trainer(_student(env["ckpt"]), env["data"], LiveTeacher(env["teacher"]), _cfg(relative_lr=True))
    assert [g["lr"] for g in uni.optimizer.param_groups] == [3e-3]  # the uniform grid's scale is the scale


def test_resume_after_an_lr_search_continues_with_the_chosen_rate(env: dict, tmp_path: Path) -> None:
    cfg = _cfg(save_every=2, lr_search=(1.0, 0.1))
    teacher = LiveTeacher(env["teacher"])
    a = _student(env["ckpt"])
    rep_a = run_stage2(a, env["data"], teacher, cfg, state_dir=tmp_path / "a", progress=False)

    def interrupt(step: int, _metrics: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage2(_student(env["ckpt"]), env["data"], teacher, cfg, state_dir=tmp_path / "b", progress=False,
                   on_step=interrupt)
    b = _student(env["ckpt"])
    rep_b = run_stage2(b, env["data"], teacher, cfg, state_dir=tmp_path / "b", resume=True, progress=False)
    assert rep_b.lr == rep_a.lr and rep_b.lr_search == rep_a.lr_search and len(rep_a.lr_search) == 2
    for (n, x), (_, y) in zip(_trainable(a).items(), _trainable(b).items()):
        assert torch.equal(x, y), n


def test_kd_on_latent_weights_changes_codes_and_keeps_the_checkpoint_exact(env: dict, tmp_path: Path) -> None:
    """Issue 15, Reasoning-QAT: KD (full KL) trains the latent weights through the straight-through estimator;
    the codes are re-derived from the trained weights, the grid parameters stay, and the checkpoint written
    afterwards reloads to exactly the trained model."""
    from rqat_deploy.quant.checkpoint import load_model, save_checkpoint

    student = _student(env["ckpt"])
    before = _quant_state(student)
    cfg = _cfg(train_form="weights", loss_terms="kl", lr=2e-2, epochs=1, betas=(0.9, 0.95))
    rep = run_stage2(student, env["data"], LiveTeacher(env["teacher"]), cfg, progress=False)
    assert rep.trainable["tensors"] == len(list(quant_linears(student)))  # the latent weights, nothing else
    assert all(m.form == "stage1" for _, m in quant_linears(student))
    after = _quant_state(student)
    codes = [k for k in after if k.endswith(".qcodes")]
    assert sum(not torch.equal(before[k], after[k]) for k in codes) >= len(codes) // 2  # codes moved
    assert all(torch.equal(before[k], after[k]) for k in after if not k.endswith(".qcodes"))  # scales, zeros stay
    ids = env["data"].subset([0, 1]).input_ids
    with torch.no_grad():
        trained = student(input_ids=ids).logits
    save_checkpoint(student, tmp_path / "ck", tokenizer=env["tok"])
    reloaded, _ = load_model(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained)


def test_select_trainable_follows_the_training_form(env: dict) -> None:
    from rqat_deploy.quant.surgery import select_trainable

    student = _student(env["ckpt"])
    scales = dict(select_trainable(student, "scales"))
    assert scales and all(n.endswith(".quantizer.scale") for n in scales)
    weights = dict(select_trainable(student, "weights", extra_trainable=("*norm*",)))
    assert {n for n in weights if not n.endswith(".weight") or "norm" not in n} == {
        f"{n}.weight" for n, _ in quant_linears(student)}
    assert not any(".quantizer." in n for n in weights)
    back = dict(select_trainable(student, "scales"))  # latent -> codes again: the same codes, the scales train
    assert set(back) == set(scales)
    with pytest.raises(ConfigError, match="training form must be one of"):
        select_trainable(student, "codes")


def test_micro_batches_group_samples_by_length(env: dict) -> None:
    from rqat_deploy.train.stage2 import _micro_batches

    lengths = env["data"].lengths().tolist()
    idx = list(range(len(lengths)))
    mbs = list(_micro_batches(idx, 3, lengths))
    flat = [i for mb in mbs for i in mb]
    assert sorted(flat) == idx and all(len(mb) <= 3 for mb in mbs)
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first: padding only within similar lengths
