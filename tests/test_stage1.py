"""Stage 1 (block-wise calibration) and the activation store, on the tiny Qwen3 model on CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import AutoModelForCausalLM

from rqat_deploy.train import activations
from rqat_deploy.train.activations import ActivationStore, capture_layer_inputs, choose_store_mode, run_layer
from rqat_deploy.quant.checkpoint import load_model, save_checkpoint
from rqat_deploy.errors import ConfigError, ShapeError
from rqat_deploy.quant.qlinear import QuantLinear
from rqat_deploy.quant.spec import QuantSpec
from rqat_deploy.train.stage1 import NonFiniteError, Stage1Config, run_stage1
from rqat_deploy.quant.surgery import freeze_codes, prepare_model, quant_linears

N, L, N_VAL = 12, 32, 4
SMALL = dict(val_samples=N_VAL, batch_size=2, forward_batch_size=4, store="memory")


def _ids(n: int = N, length: int = L, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1024, (n, length), generator=torch.Generator().manual_seed(seed))


def _load(model_dir: Path, **kw) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(model_dir), **kw).eval()


@torch.no_grad()
def _block_outputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Output of every decoder block (forward hooks), for the whole model run on ``ids``."""
    outs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).float()))
        for layer in model.model.layers
    ]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# activation store and layer inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_round_trips_in_memory_and_on_disk(tmp_path: Path, dtype: torch.dtype) -> None:
    x = torch.randn(5, 3, 4).to(dtype)
    mem = ActivationStore(5, 3, 4, dtype, mode="memory")
    disk = ActivationStore(5, 3, 4, dtype, mode="disk", path=tmp_path / "a.bin")
    for s in (mem, disk):
        s.write(slice(0, 2), x[:2])
        s.write(torch.tensor([4, 2, 3]), x[[4, 2, 3]])
        assert s.read(slice(0, 5)).dtype == dtype
        assert torch.equal(s.read(slice(0, 5)), x)
        got = list(s.batches([3, 0, 1], 2))
        assert [b.tolist() for b, _ in got] == [[3, 0], [1]]
        assert torch.equal(torch.cat([t for _, t in got]), x[[3, 0, 1]])
    disk.flush()
    assert (tmp_path / "a.bin").stat().st_size == disk.nbytes == x.numel() * x.element_size()
    reopened = ActivationStore(5, 3, 4, dtype, mode="disk", path=tmp_path / "a.bin", reuse=True)
    assert torch.equal(reopened.read(slice(0, 5)), x)
    with pytest.raises(ShapeError, match="does not fit"):
        mem.write(slice(0, 1), torch.zeros(1, 3, 5))


def test_store_mode_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(activations, "available_memory_bytes", lambda: 1000)
    assert choose_store_mode("auto", 400) == "memory"
    assert choose_store_mode("auto", 600) == "disk"
    assert choose_store_mode("disk", 1) == "disk"
    assert activations.available_memory_bytes() == 1000
    with pytest.raises(ConfigError, match="activation store"):
        choose_store_mode("ram", 1)
    with pytest.raises(ConfigError, match="needs a path"):
        ActivationStore(1, 2, 3, torch.float32, mode="disk")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_captured_inputs_replay_the_model(tiny_qwen3_dir: Path, attn: str) -> None:
    """Layer-0 inputs captured with batch 1 and replayed in batches reproduce every block output."""
    model = _load(tiny_qwen3_dir, attn_implementation=attn)
    ids = _ids(5, 16)
    store = ActivationStore(5, 16, 256, torch.float32, mode="memory")
    inputs = capture_layer_inputs(model, ids, store, batch_size=2)
    assert torch.equal(store.read(slice(0, 5)), model.model.embed_tokens(ids).detach())
    assert "position_embeddings" in inputs.kwargs and "past_key_values" not in inputs.kwargs
    want = _block_outputs(model, ids)
    x = store.read(slice(0, 5))
    with torch.no_grad():
        for k, layer in enumerate(model.model.layers):
            x = run_layer(layer, x, inputs)
            torch.testing.assert_close(x, want[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# stage 1
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid, bits", [("uniform", 2), ("uniform", 3), ("kquant", 2), ("kquant", 3)])
def test_stage1_lowers_every_block_below_rtn(tiny_qwen3_dir: Path, tmp_path: Path, grid: str, bits: int) -> None:
    """Default hyperparameters; 32 training sequences (fewer make the held-out MSE a coin toss)."""
    spec = QuantSpec(bits=bits, grid=grid)
    n, n_val = 36, 4
    ids = _ids(n, 32)
    model = _load(tiny_qwen3_dir)
    cfg = Stage1Config(val_samples=n_val, batch_size=4, forward_batch_size=8, store="memory")
    rep = run_stage1(model, spec, ids, cfg, work_dir=tmp_path, progress=False)
    assert len(rep.blocks) == 2 and rep.n_train == n - n_val and rep.n_val == n_val
    for b in rep.blocks:
        assert b.steps == 2 * (n - n_val) // 4
        assert b.val_loss < b.val_loss_init, b
        assert b.val_loss_epochs[-1] == b.val_loss and len(b.modules) == 7
    assert rep.train_tokens == 2 * 2 * (n - n_val) * 32 and rep.tokens_per_second > 0
    assert len(list(quant_linears(model))) == 14
    assert all(m.form == "stage1" for _, m in quant_linears(model))
    if grid == "kquant":  # the independent check below needs a second k-quant search: uniform only
        return
    # Independent check on the held-out sequences: the RTN model vs the stage-1 model, block by block.
    val = ids[n - n_val :]
    fp = _block_outputs(_load(tiny_qwen3_dir), val)
    rtn_model = _load(tiny_qwen3_dir)
    prepare_model(rtn_model, spec, progress=False)
    rtn = _block_outputs(rtn_model, val)
    ours = _block_outputs(model, val)
    # block 0 sees the same (embedding) inputs in all three: its errors are the report's numbers
    assert (rtn[0] - fp[0]).square().mean().item() == pytest.approx(rep.blocks[0].val_loss_init, rel=1e-4)
    assert (ours[0] - fp[0]).square().mean().item() == pytest.approx(rep.blocks[0].val_loss, rel=1e-4)
    for k in range(2):
        assert (ours[k] - fp[k]).square().mean() < (rtn[k] - fp[k]).square().mean()


def test_stage1_result_saves_loads_and_freezes(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    spec = QuantSpec(bits=4, group_size=64)
    model = _load(tiny_qwen3_dir)
    run_stage1(model, spec, _ids(), Stage1Config(**{**SMALL, "epochs": 1}), work_dir=tmp_path / "w", progress=False)
    ids = _ids(2, 16, seed=5)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ckpt = save_checkpoint(model, tmp_path / "ckpt", base_model="tiny")
    loaded, _ = load_model(ckpt)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, logits)
    freeze_codes(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)
    # the disk activations are gone once the stage is complete; the trained blocks stay
    assert not list((tmp_path / "w" / "stage1").glob("acts_*"))
    assert len(list((tmp_path / "w" / "stage1").glob("block_*.safetensors"))) == 2


def test_disk_and_memory_stores_give_identical_results(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    spec = QuantSpec(bits=2)
    ids = _ids()
    states, reports = [], []
    for store in ("memory", "disk"):
        model = _load(tiny_qwen3_dir)
        cfg = Stage1Config(**{**SMALL, "epochs": 1, "store": store})
        reports.append(run_stage1(model, spec, ids, cfg, work_dir=tmp_path / store, progress=False))
        states.append(_state(model))
    assert [r.store_mode for r in reports] == ["memory", "disk"]
    _assert_same_state(*states)
    assert [b.val_loss for b in reports[0].blocks] == [b.val_loss for b in reports[1].blocks]


def test_bf16_model_with_memory_and_disk_stores(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    """bf16 activations (a uint16 memmap on disk) give the same result as in RAM; latents stay fp32."""
    spec = QuantSpec(bits=2)
    states = []
    for store in ("memory", "disk"):
        model = _load(tiny_qwen3_dir, dtype=torch.bfloat16)
        cfg = Stage1Config(**{**SMALL, "epochs": 1, "store": store})
        rep = run_stage1(model, spec, _ids(), cfg, work_dir=tmp_path / store, progress=False)
        assert rep.store_dtype == "bfloat16" and rep.store_mode == store
        assert all(0 < b.val_loss < float("inf") for b in rep.blocks)
        states.append(_state(model))
    _assert_same_state(*states)
    layer = model.model.layers[1]
    assert layer.input_layernorm.weight.dtype == torch.bfloat16
    assert layer.mlp.down_proj.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_ids(1, 8)).logits).all()


def test_paired_batches_prefetch(tmp_path: Path) -> None:
    a = ActivationStore(7, 2, 3, torch.float32, mode="disk", path=tmp_path / "a.bin")
    b = ActivationStore(7, 2, 3, torch.float32, mode="memory")
    x = torch.randn(7, 2, 3)
    a.write(slice(0, 7), x)
    b.write(slice(0, 7), -x)
    order = [6, 1, 3, 0, 2]
    got = list(activations.paired_batches([a, b], order, 2))
    assert [i.tolist() for i, _ in got] == [[6, 1], [3, 0], [2]]
    for i, (xa, xb) in got:
        assert torch.equal(xa, x[i]) and torch.equal(xb, -x[i])


def test_resume_equals_uninterrupted(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    spec = QuantSpec(bits=3)
    ids = _ids()
    cfg = Stage1Config(**{**SMALL, "epochs": 1, "store": "disk"})
    model = _load(tiny_qwen3_dir)
    full = run_stage1(model, spec, ids, cfg, work_dir=tmp_path / "full", progress=False)
    want = _state(model)

    class Kill(Exception):
        pass

    def kill_after_block0(ev: dict) -> None:
        if ev["event"] == "block_done" and ev["block"] == 0:
            raise Kill

    with pytest.raises(Kill):
        run_stage1(_load(tiny_qwen3_dir), spec, ids, cfg, work_dir=tmp_path / "cut", progress=False,
                   callback=kill_after_block0)
    shutil.copytree(tmp_path / "cut", tmp_path / "cut_mem")
    # disk store: the activations after block 0 are reused
    model = _load(tiny_qwen3_dir)
    rep = run_stage1(model, spec, ids, cfg, work_dir=tmp_path / "cut", progress=False)
    assert rep.resumed_blocks == 1 and [b.resumed for b in rep.blocks] == [True, False]
    _assert_same_state(want, _state(model))
    assert [b.val_loss for b in rep.blocks] == [b.val_loss for b in full.blocks]
    # memory store: both activation streams are recomputed through the restored block 0
    model = _load(tiny_qwen3_dir)
    cfg_mem = Stage1Config(**{**SMALL, "epochs": 1, "store": "memory"})
    rep = run_stage1(model, spec, ids, cfg_mem, work_dir=tmp_path / "cut_mem", progress=False)
    assert rep.resumed_blocks == 1
    _assert_same_state(want, _state(model))
    # Ctrl-C in the middle of block 1 (disk stores half rewritten): resume recomputes the streams
    steps = {"n": 0}

    def interrupt(opt, args, kwargs) -> None:
        steps["n"] += 1
        if steps["n"] == 6:  # block 0 has 4 steps: this is block 1's second
            raise KeyboardInterrupt

    handle = register_optimizer_step_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_stage1(_load(tiny_qwen3_dir), spec, ids, cfg, work_dir=tmp_path / "ctrl_c", progress=False)
    finally:
        handle.remove()
    model = _load(tiny_qwen3_dir)
    rep = run_stage1(model, spec, ids, cfg, work_dir=tmp_path / "ctrl_c", progress=False)
    assert rep.resumed_blocks == 1
    _assert_same_state(want, _state(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in _load(tiny_qwen3_dir).named_parameters() if not n.startswith("model.layers.")
    }
    # a finished run restores every block without training
    model = _load(tiny_qwen3_dir)
    rep = run_stage1(model, spec, ids, cfg, work_dir=tmp_path / "full", progress=False)
    assert rep.resumed_blocks == 2 and rep.train_tokens == 0
    _assert_same_state(want, _state(model))
    # another model / data in the same work directory is refused
    with pytest.raises(ConfigError, match="different calibration data"):
        run_stage1(_load(tiny_qwen3_dir), spec, _ids(seed=1), cfg, work_dir=tmp_path / "cut", progress=False)


def test_gradient_clipping_applies(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    """Every optimizer step sees a global gradient norm <= clip_grad, though the raw norms are larger."""
    seen: list[float] = []

    def pre_step(opt: torch.optim.Optimizer, args, kwargs) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    clip = 0.02
    handle = register_optimizer_step_pre_hook(pre_step)
    try:
        cfg = Stage1Config(**{**SMALL, "epochs": 1, "clip_grad": clip})
        rep = run_stage1(_load(tiny_qwen3_dir), QuantSpec(bits=2), _ids(), cfg, work_dir=tmp_path, progress=False)
    finally:
        handle.remove()
    steps = sum(b.steps for b in rep.blocks)
    assert len(seen) == steps > 0
    assert max(seen) <= clip * (1 + 1e-4)
    assert all(b.grad_norm_max > clip and b.clipped_steps == b.steps for b in rep.blocks)


def test_autocast_is_cuda_only(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    """Stage 1 autocasts on CUDA only (rqat_deploy.train.precision.autocast, as stage 2): on CPU an
    explicit ``bfloat16`` trains exactly as ``none`` (it used to autocast the CPU forwards)."""
    states = []
    for mode in ("bfloat16", "none"):
        model = _load(tiny_qwen3_dir)
        cfg = Stage1Config(**{**SMALL, "epochs": 1, "autocast": mode})
        run_stage1(model, QuantSpec(bits=2), _ids(), cfg, work_dir=tmp_path / mode, progress=False)
        states.append(_state(model))
    _assert_same_state(*states)


def test_nan_stops_naming_the_block(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    model = _load(tiny_qwen3_dir)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"block 1 \(model\.layers\.1\)"):
        cfg = Stage1Config(**{**SMALL, "epochs": 1})
        run_stage1(model, QuantSpec(bits=2), _ids(), cfg, work_dir=tmp_path, progress=False)
    assert (tmp_path / "stage1" / "block_0000.safetensors").exists()
    assert not (tmp_path / "stage1" / "block_0001.safetensors").exists()


def test_bad_inputs_are_clear_errors(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    model = _load(tiny_qwen3_dir)
    spec = QuantSpec(bits=2)
    with pytest.raises(ConfigError, match="leaving none to train"):
        run_stage1(model, spec, _ids(4), Stage1Config(val_samples=4), work_dir=tmp_path, progress=False)
    with pytest.raises(ShapeError, match="LongTensor"):
        run_stage1(model, spec, _ids().float(), Stage1Config(**SMALL), work_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="store"):
        Stage1Config(store="ram")
    with pytest.raises(ConfigError, match="batch_size"):
        Stage1Config(batch_size=0)
    assert Stage1Config().resolved_weight_lr(2) == 2e-5 and Stage1Config().resolved_weight_lr(3) == 1e-5
    prepare_model(model, spec, progress=False)
    with pytest.raises(ConfigError, match="full-precision"):
        run_stage1(model, spec, _ids(), Stage1Config(**SMALL), work_dir=tmp_path / "q", progress=False)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_other_architectures(request: pytest.FixtureRequest, tmp_path: Path, arch: str) -> None:
    """Qwen2 (q/k/v biases, trained here) and Llama with an untied, quantized lm_head (RTN)."""
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    model = _load(model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".bias")}
    spec = QuantSpec(bits=2, quantize_lm_head=arch == "llama")
    cfg = Stage1Config(**{**SMALL, "epochs": 1, "train_bias": True})
    rep = run_stage1(model, spec, _ids(), cfg, work_dir=tmp_path, progress=False)
    blocks = [n for n, _ in quant_linears(model) if n.startswith("model.layers.")]
    assert len(blocks) == 14 and all(len(b.modules) == 7 for b in rep.blocks)
    if arch == "qwen2":
        after = dict(model.named_parameters())
        assert len(before) == 6 and all(not torch.equal(before[n], after[n]) for n in before)
        assert rep.rtn_modules == []
    else:
        assert rep.rtn_modules == ["lm_head"] and isinstance(model.lm_head, QuantLinear)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_ids(1, 8)).logits).all()


# ---------------------------------------------------------------------------------------------
# massive activations (DESIGN.md 5): the block loss where the next layer reads it
# ---------------------------------------------------------------------------------------------


def _plant_massive_activations(model: torch.nn.Module, tok) -> None:
    """A ~1,500x residual outlier in dimension 7 at the chat-start and newline tokens, from block 1 on.

    Like real LLMs' massive activations (attention-sink tokens, a few dimensions): block 1's MLP has
    one neuron that fires on those tokens (through an embedding direction) and writes a large value
    into dimension 7 of the residual stream; later norms give that dimension a tiny weight, so the
    next layers hardly read it.
    """
    d, e, j = 7, 11, 3
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        for t in (tok.convert_tokens_to_ids("<|im_start|>"), tok("\n")["input_ids"][0]):
            emb[t, e] = 4.0
        mlp = model.model.layers[1].mlp
        mlp.up_proj.weight[j, e] = mlp.gate_proj.weight[j, e] = 6.0
        mlp.down_proj.weight[d, j] = 1.0
        for layer in model.model.layers[2:]:
            layer.input_layernorm.weight[d] = layer.post_attention_layernorm.weight[d] = 1e-3
        model.model.norm.weight[d] = 1e-3


def test_next_norm_loss_is_robust_to_massive_activations(tmp_path: Path) -> None:
    """With a planted massive activation, stage 1 measured after the next layer's norm still brings the
    whole model closer to the teacher than RTN (on this tiny model the raw loss does too, by about as
    much: the failure seen on a real 135M Llama does not reproduce at this size)."""
    from rqat_deploy.builtin import synth
    from rqat_deploy.builtin.tiny import build_tiny_model
    from rqat_deploy.data.calib import build_calibration
    from rqat_deploy.data.sft import build_sft
    from rqat_deploy.models import load_hf_model
    from rqat_deploy.quant.surgery import convert_model

    mdir = build_tiny_model(tmp_path / "m", hidden_size=256, num_layers=4, num_heads=2, num_kv_heads=1,
                            head_dim=128, intermediate_size=512, seed=0)
    teacher, tok = load_hf_model(str(mdir))
    _plant_massive_activations(teacher, tok)
    with torch.no_grad():  # the plant works: one entry dominates the residual stream from block 2 on
        ids = tok("<|im_start|>user\nThe parser returns.\nIt works.", return_tensors="pt")["input_ids"]
        h = teacher(ids, output_hidden_states=True).hidden_states[2][0].abs()
    assert float(h[:, 7].max()) > 500 * float(h.median())
    calib = build_calibration(tok, synth.default_data("calib"), 24, 128, seed=0).input_ids
    heldout = build_sft(tok, str(synth.write_reasoning_jsonl(tmp_path / "h.jsonl", 24, split="heldout", seed=1)), 24, 256, 0)

    def kl_to_teacher(student: torch.nn.Module) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(len(heldout)):
                s = heldout.subset([i])
                keep = s.labels[0, 1:] != -100
                lt = torch.log_softmax(teacher(s.input_ids).logits[0, :-1][keep].double(), -1)
                ls = torch.log_softmax(student(s.input_ids).logits[0, :-1][keep].double(), -1)
                total, count = total + float((lt.exp() * (lt - ls)).sum()), count + int(keep.sum())
        return total / count

    spec = QuantSpec(bits=2)
    rtn = _load_copy(teacher)
    prepare_model(rtn, spec, progress=False)
    kl = {"rtn": kl_to_teacher(convert_model(rtn))}
    student = _load_copy(teacher)
    run_stage1(student, spec, calib, Stage1Config(loss_space="next_norm", **SMALL), work_dir=tmp_path / "s1",
               progress=False)
    kl["next_norm"] = kl_to_teacher(convert_model(student))
    assert kl["next_norm"] < kl["rtn"], kl


def _load_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def test_gptq_init_and_keep_better(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    """init='gptq' starts each block from GPTQ on its student inputs; keep_better never ends a block
    above its starting held-out loss (a learning rate that only hurts gives back the start)."""
    ids = _ids(n=40, length=64)  # GPTQ needs more tokens than the hidden size to beat RTN on held-out data
    spec = QuantSpec(bits=2)
    rtn = run_stage1(_load(tiny_qwen3_dir), spec, ids, Stage1Config(epochs=0, **SMALL), work_dir=tmp_path / "r",
                     progress=False)
    gptq = run_stage1(_load(tiny_qwen3_dir), spec, ids, Stage1Config(epochs=0, init="gptq", **SMALL),
                      work_dir=tmp_path / "g", progress=False)
    assert gptq.blocks[0].val_loss_init < rtn.blocks[0].val_loss_init  # GPTQ starts closer than RTN
    hurt = Stage1Config(init="gptq", keep_better=True, quant_lr=0.5, weight_lr=0.5, **SMALL)
    rep = run_stage1(_load(tiny_qwen3_dir), spec, ids, hurt, work_dir=tmp_path / "k", progress=False)
    assert all(b.kept_init and b.val_loss == b.val_loss_init for b in rep.blocks)
    with pytest.raises(ConfigError, match="loss_space"):
        Stage1Config(loss_space="raw")
