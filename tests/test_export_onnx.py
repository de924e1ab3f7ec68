"""ONNX export (issue 8): exact weights, ORT logits and greedy tokens against PyTorch, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'rqat-deploy[onnx]')")
pytest.importorskip("onnx", reason="onnx is not installed (pip install 'rqat-deploy[onnx]')")
pytest.importorskip("onnx_ir", reason="onnx-ir is not installed (pip install 'rqat-deploy[onnx]')")
pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'rqat-deploy[onnx]')")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from rqat_deploy.quant.checkpoint import load_model, read_checkpoint  # noqa: E402
from rqat_deploy.errors import ConfigError, ExportError, OutputExistsError  # noqa: E402
from rqat_deploy.exporters import onnx as onnx_export  # noqa: E402
from rqat_deploy.exporters.onnx import decode_matmulnbits, export_onnx  # noqa: E402
from rqat_deploy.serve.runtime_onnx import OnnxCausalLM  # noqa: E402
from rqat_deploy.train.run import quantize_rtn  # noqa: E402

PROMPT = "Alice buys 12 red apples. How many apples does she have left?"


@pytest.fixture(scope="module")
def ckpts(tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("onnx_ckpts")
    return {b: quantize_rtn(tiny_qwen3_dir, root / f"q{b}", bits=b, grid="uniform") for b in (2, 3, 4)}


@pytest.fixture(scope="module")
def exports(ckpts: dict[int, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("onnx_out")
    # 2-bit at ORT's default level 4 (int8 activations), 3/4-bit at level 0 (fp32 activations)
    levels = {2: None, 3: 0, 4: 0}
    return {b: (root / f"e{b}", export_onnx(ckpts[b], root / f"e{b}", accuracy_level=levels[b])) for b in ckpts}


def _ort_decode(b: np.ndarray, s: np.ndarray, z: np.ndarray | None, attrs: dict) -> np.ndarray:
    """W [N, K] as ORT's own MatMulNBits kernel sees it: identity activations at accuracy level 0."""
    k, n = attrs["K"], attrs["N"]
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s.astype(np.float32), "S")]
    inputs = ["A", "B", "S"]
    if z is not None:
        inits.append(numpy_helper.from_array(z, "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=attrs["bits"],
                            block_size=attrs["block_size"], accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": np.eye(k, dtype=np.float32)})[0].T  # [N, K]


@pytest.mark.parametrize("bits,block", [(2, 16), (2, 128), (4, 32), (8, 64)])
def test_decoder_matches_ort_kernel(bits: int, block: int) -> None:
    rng = np.random.default_rng(bits * 100 + block)
    n, k = 24, 4 * block
    nb, per = k // block, 8 // bits
    codes = rng.integers(0, 2**bits, (n, nb, block)).astype(np.uint8)
    zeros = rng.integers(0, 2**bits, (n, nb)).astype(np.uint8)
    # pack LSB-first by arithmetic, independently of the module's unpacking
    weights = (2 ** (np.arange(per) * bits)).astype(np.uint16)
    b = (codes.reshape(n, nb, block // per, per).astype(np.uint16) * weights).sum(-1).astype(np.uint8)
    zrow = -(-nb * bits // 8)
    zpad = np.zeros((n, zrow * per), np.uint8)
    zpad[:, :nb] = zeros
    z = (zpad.reshape(n, zrow, per).astype(np.uint16) * weights).sum(-1).astype(np.uint8)
    s = rng.random((n, nb)).astype(np.float32) + 0.1
    w, got_codes, got_zeros = decode_matmulnbits(b, s, z, n=n, k=k, bits=bits, block_size=block)
    assert np.array_equal(got_codes, codes.reshape(n, k))
    assert np.array_equal(got_zeros, zeros.astype(np.float32))
    expect = (s[..., None] * (codes.astype(np.float32) - zeros[..., None])).reshape(n, k)
    assert np.array_equal(w, expect)
    ref = _ort_decode(b, s, z, {"K": k, "N": n, "bits": bits, "block_size": block})
    np.testing.assert_allclose(w, ref, rtol=1e-6, atol=1e-6 * float(np.abs(ref).max()))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_export_report_and_files(exports: dict, ckpts: dict, bits: int) -> None:
    out, report = exports[bits]
    assert report.verified and report.max_abs_weight_error == 0.0
    assert report.logits_rel_error[0] < 1e-2
    assert report.argmax_agreement[0] == 1.0
    assert report.container_bits == (4 if bits == 3 else bits)
    assert report.matmulnbits_nodes == 2 * 5  # per layer: fused qkv, o, gate, up, down
    if bits == 3:
        assert report.container_overhead_bytes == report.quant_weight_bytes // 4 > 0
        assert any("4-bit" in n for n in report.notes)
    else:
        assert report.container_overhead_bytes == 0
    for f in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "config.json", "rqat_export.json"):
        assert (out / f).exists(), f
    saved = json.loads((out / "rqat_export.json").read_text())
    assert saved["bits"] == bits and saved["verified"] is True
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary directories left behind"


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_onnx_weights_are_the_checkpoint(exports: dict, ckpts: dict, bits: int) -> None:
    """Decode the written initializers (and let ORT's kernel decode them): the checkpoint's integers and weights."""
    out, report = exports[bits]
    ckpt = read_checkpoint(ckpts[bits])
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    qkv = next(n for n in nodes if n.name == "/model/layers.1/attn/qkv_proj/MatMulNBits")
    down = next(n for n in nodes if n.name == "/model/layers.0/mlp/down_proj/MatMulNBits")
    for node, mods in ((qkv, ["q_proj", "k_proj", "v_proj"]), (down, ["down_proj"])):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        b, s, z = (inits[i] for i in node.input[1:4])
        w, codes, zeros = decode_matmulnbits(b, s, z, n=attrs["N"], k=attrs["K"], bits=attrs["bits"],
                                             block_size=attrs["block_size"])
        prefix = "model.layers.1.self_attn" if node is qkv else "model.layers.0.mlp"
        t = [ckpt.quant_tensors(f"{prefix}.{m}") for m in mods]
        assert np.array_equal(codes, torch.cat([x["qcodes"] for x in t]).numpy())
        assert np.array_equal(zeros, torch.cat([x["zeros"] for x in t]).float().numpy())
        ref = torch.cat([ckpt.dequantized_weight(f"{prefix}.{m}") for m in mods]).numpy()
        assert np.array_equal(w, ref)
        kernel = _ort_decode(b, s, z, attrs)
        np.testing.assert_allclose(kernel, ref, rtol=0, atol=1e-6 * float(np.abs(ref).max()))
    lm_head = [n for n in model.graph.node if n.name == "/lm_head/MatMul"]
    assert lm_head and lm_head[0].op_type == "MatMul"


def test_zero_points_at_both_ends_survive(ckpts: dict, tmp_path: Path) -> None:
    """z = 0 and z = 2^b - 1 (the legacy-v1 wrap-around cases) come out exact."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "ckpt"
    shutil.copytree(ckpts[2], src)
    state = load_file(str(src / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.zeros"
    z = state[name]
    state[name] = (torch.arange(z.numel()) % 4).to(torch.uint8).reshape(z.shape)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    report = export_onnx(src, tmp_path / "out", accuracy_level=0)
    assert report.max_abs_weight_error == 0.0 and report.logits_rel_error[0] < 1e-2


def test_logits_and_greedy_tokens_match_transformers(exports: dict, ckpts: dict) -> None:
    out, _ = exports[3]
    model, tok = load_model(ckpts[3])
    ids = tok(PROMPT)["input_ids"]
    with torch.inference_mode():
        ref_logits = model(torch.tensor([ids])).logits[0].numpy()
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    with OnnxCausalLM(out, engine="onnxruntime", threads=1) as runner:
        got = runner.logits(ids)
        assert np.abs(got - ref_logits).max() / np.abs(ref_logits).max() < 1e-2
        gen = runner.generate(ids, 20)
        assert gen.token_ids == ref and gen.finish_reason == "length" and gen.n_prompt_tokens == len(ids)
        stopped = runner.generate(ids, 20, stop_ids=[ref[5]])
        assert stopped.token_ids == ref[: ref.index(ref[5])] and stopped.finish_reason == "stop"
        a = runner.generate(ids, 12, temperature=0.8, top_k=20, seed=3).token_ids
        assert a == runner.generate(ids, 12, temperature=0.8, top_k=20, seed=3).token_ids and len(a) == 12
        with pytest.raises(ConfigError, match="context"):
            runner.generate([1] * runner.context_length, 2)
    with OnnxCausalLM(out, engine="genai", threads=1) as runner:
        assert runner.generate(ids, 20).token_ids == ref
        speed = runner.speed(ids, 8, repeats=1, warmup=0)
        assert speed["decode_tokens_per_s"] > 0 and speed["engine"] == "genai"


def test_accuracy_level_4_is_measured(exports: dict) -> None:
    _, report = exports[2]
    assert report.accuracy_level == 4 and set(report.logits_rel_error) == {0, 4}
    # int8 activations move the logits, but not beyond recognition
    assert 0 < report.logits_rel_error[4] < 0.2 and report.argmax_agreement[4] >= 0.8


def _as_kquant(src: Path, dst: Path) -> Path:
    """A valid Q2_K-grid checkpoint made from a uniform one (codes kept, k-quant scales made up)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    meta = json.loads((dst / "rqat_quant.json").read_text())
    state = load_file(str(dst / "model.safetensors"))
    for m in meta["modules"]:
        out_f, in_f = state.pop(f"{m}.scales").shape[0], state[f"{m}.qcodes"].shape[1]
        state.pop(f"{m}.zeros")
        state[f"{m}.d"] = torch.full((out_f, in_f // 256), 0.01, dtype=torch.float16)
        state[f"{m}.dmin"] = torch.full((out_f, in_f // 256), 0.02, dtype=torch.float16)
        state[f"{m}.sub_scales"] = torch.full((out_f, in_f // 16), 3, dtype=torch.uint8)
        state[f"{m}.sub_mins"] = torch.full((out_f, in_f // 16), 1, dtype=torch.uint8)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    meta.update(grid="kquant", group_size=256)
    (dst / "rqat_quant.json").write_text(json.dumps(meta))
    return dst


def test_kquant_is_refused(ckpts: dict, tmp_path: Path) -> None:
    ck = _as_kquant(ckpts[2], tmp_path / "k2")
    assert read_checkpoint(ck).meta.grid == "kquant"
    with pytest.raises(ExportError, match="gguf"):
        export_onnx(ck, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(exports: dict, ckpts: dict, tmp_path: Path) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        export_onnx(ckpts[4], out, verify=False)
    assert (out / "keep.txt").exists()
    report = export_onnx(ckpts[4], out, verify=False, force=True)
    assert not report.verified and not (out / "keep.txt").exists() and (out / "model.onnx").exists()


def test_wrong_weights_fail_verification(ckpts: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = onnx_export._gptq_tensors

    def corrupt(t: dict, container_bits: int, group_size: int) -> dict:
        out = real(t, container_bits, group_size)
        out["scales"] = out["scales"].clone()
        out["scales"][0, 0] *= 2
        return out

    monkeypatch.setattr(onnx_export, "_gptq_tensors", corrupt)
    with pytest.raises(ExportError, match="differ from the checkpoint"):
        export_onnx(ckpts[2], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
