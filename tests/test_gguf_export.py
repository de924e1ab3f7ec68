"""Whole-model GGUF export (exporters/gguf.py): metadata, tensors, verify-on-write, inspect.

Every file written here is read back with gguf's own reader and decoder (independent of our
writer) and compared with the checkpoint: the tokenizer against ``tokenizer.json``, the weights
against ``QuantizedCheckpoint.dequantized_weight``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from rqat_deploy.quant.checkpoint import read_checkpoint
from rqat_deploy.errors import ConfigError, ExportError, OutputExistsError
from rqat_deploy.exporters import gguf_quants as gq
from rqat_deploy.exporters.gguf import export_gguf, format_inspect, inspect_gguf
from rqat_deploy.train.run import quantize_rtn


class _Ckpts(dict):
    """Quantized checkpoints of the tiny models, made on first use (each takes seconds)."""

    def __init__(self, models: dict[str, Path], root: Path) -> None:
        super().__init__()
        self.models, self.root = models, root

    def __missing__(self, key: str) -> Path:
        arch, bits, grid = {
            "u2": ("qwen3", 2, "uniform"), "u3": ("qwen3", 3, "uniform"),
            "k2": ("qwen3", 2, "kquant"), "k3": ("qwen3", 3, "kquant"),
            "qwen2": ("qwen2", 3, "uniform"), "llama": ("llama", 2, "uniform"),
        }[key]
        self[key] = quantize_rtn(self.models[arch], self.root / key, bits=bits, grid=grid)
        return self[key]


@pytest.fixture(scope="module")
def ckpts(
    tiny_qwen3_dir: Path, tiny_qwen2_dir: Path, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    models = {"qwen3": tiny_qwen3_dir, "qwen2": tiny_qwen2_dir, "llama": tiny_llama_dir}
    return _Ckpts(models, tmp_path_factory.mktemp("gguf_ckpts"))


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    assert f is not None, f"missing metadata key {key}"
    return f.contents()


def _decoded(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    shape = [int(x) for x in reversed(t.shape.tolist())]
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape)


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_qwen3_uniform_q2_k_file(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    report = export_gguf(ckpts["u2"], out)
    ckpt = read_checkpoint(ckpts["u2"])
    r = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    # architecture and hyperparameters
    c = ckpt.config
    assert _field(r, "general.architecture") == "qwen3"
    assert _field(r, "qwen3.block_count") == c["num_hidden_layers"]
    assert _field(r, "qwen3.embedding_length") == c["hidden_size"]
    assert _field(r, "qwen3.feed_forward_length") == c["intermediate_size"]
    assert _field(r, "qwen3.attention.head_count") == c["num_attention_heads"]
    assert _field(r, "qwen3.attention.head_count_kv") == c["num_key_value_heads"]
    assert _field(r, "qwen3.attention.key_length") == c["head_dim"]
    assert _field(r, "qwen3.context_length") == c["max_position_embeddings"]
    assert _field(r, "qwen3.rope.freq_base") == pytest.approx(c["rope_parameters"]["rope_theta"])
    assert _field(r, "qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(c["rms_norm_eps"])
    # tensor types: quantized modules Q2_K, norms F32, embedding F16, tied output omitted
    assert sum(v == "Q2_K" for v in types.values()) == len(ckpt.meta.modules)
    assert types["token_embd.weight"] == "F16" and "output.weight" not in types
    assert all(v == "F32" for k, v in types.items() if "norm" in k)
    # weights decode to the reported error, norms exactly
    for t in report.tensors:
        if t.quantized:
            ref = ckpt.dequantized_weight(t.source).numpy()
            err = np.linalg.norm(_decoded(r, t.name) - ref) / np.linalg.norm(ref)
            assert err == pytest.approx(t.rel_error, rel=1e-5) and 0 < err < 2e-2
    assert np.array_equal(_decoded(r, "output_norm.weight"), ckpt.tensor("model.norm.weight").numpy())
    # the report is stored in the file and says what was lossy
    stored = json.loads(_field(r, "rqat.export.report"))
    assert stored["total_rel_error"] == report.total_rel_error > 0 and not stored["exact"]
    assert _field(r, "rqat.export.total_rel_error") == pytest.approx(report.total_rel_error)
    assert report.verified and report.file_size == out.stat().st_size and not _leftovers(out)
    assert _field(r, "general.base_model.0.name") == ckpt.meta.base_model
    assert json.loads(_field(r, "rqat.recipe"))["name"] == "rtn"


def test_tokenizer_metadata(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    export_gguf(ckpts["k2"], out)
    r = gguf.GGUFReader(out)
    tj = json.loads((ckpts["k2"] / "tokenizer.json").read_text())
    tokens = _field(r, "tokenizer.ggml.tokens")
    types = _field(r, "tokenizer.ggml.token_type")
    vocab = tj["model"]["vocab"]
    assert len(tokens) == len(types) == read_checkpoint(ckpts["k2"]).config["vocab_size"]
    assert all(tokens[i] == tok for tok, i in vocab.items())
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "qwen2"
    merges = _field(r, "tokenizer.ggml.merges")
    assert merges == [" ".join(m) for m in tj["model"]["merges"]]
    added = {a["content"]: a["id"] for a in tj["added_tokens"]}
    assert types[added["<|im_end|>"]] == gguf.TokenType.CONTROL
    assert types[added["<think>"]] == gguf.TokenType.USER_DEFINED  # kept in detokenized text
    assert types[vocab["Ġt"]] == gguf.TokenType.NORMAL
    assert _field(r, "tokenizer.ggml.eos_token_id") == added["<|im_end|>"]
    assert _field(r, "tokenizer.ggml.add_bos_token") is False
    template = json.loads((ckpts["k2"] / "tokenizer_config.json").read_text()).get("chat_template") or (
        ckpts["k2"] / "chat_template.jinja"
    ).read_text()
    assert _field(r, "tokenizer.chat_template") == template


@pytest.mark.parametrize("key", ["k2", "k3"])
def test_kquant_is_bit_exact(ckpts: dict[str, Path], tmp_path: Path, key: str) -> None:
    out = tmp_path / "m.gguf"
    report = export_gguf(ckpts[key], out)
    ckpt = read_checkpoint(ckpts[key])
    assert report.exact and report.total_rel_error == 0.0 and report.gguf_type == f"Q{key[1]}_K"
    r = gguf.GGUFReader(out)
    for m in ckpt.meta.modules:
        t = next(t for t in report.tensors if t.source == m)
        assert t.qtype == report.gguf_type
        assert np.array_equal(_decoded(r, t.name), ckpt.dequantized_weight(m).numpy())


def test_uniform_exact_choice_q4_0(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    report = export_gguf(ckpts["u3"], out, gguf_type="q4_0", embed_type="F32")
    ckpt = read_checkpoint(ckpts["u3"])
    assert report.exact and report.total_rel_error == 0.0
    r = gguf.GGUFReader(out)
    for t in report.tensors:
        if t.quantized:
            assert t.qtype == "Q4_0"
            assert np.array_equal(_decoded(r, t.name), ckpt.dequantized_weight(t.source).numpy())
    emb = ckpt.tensor("model.embed_tokens.weight").float().numpy()
    assert np.array_equal(_decoded(r, "token_embd.weight"), emb)  # F32 embedding: exact


def test_qwen2_biases(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    report = export_gguf(ckpts["qwen2"], out, gguf_type="Q8_0")
    ckpt = read_checkpoint(ckpts["qwen2"])
    r = gguf.GGUFReader(out)
    assert _field(r, "general.architecture") == "qwen2" and report.exact
    for i in range(ckpt.config["num_hidden_layers"]):
        for p, g in (("q", "q"), ("k", "k"), ("v", "v")):
            bias = ckpt.tensor(f"model.layers.{i}.self_attn.{p}_proj.bias").numpy()
            t = next(t for t in r.tensors if t.name == f"blk.{i}.attn_{g}.bias")
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(_decoded(r, t.name), bias)


def test_llama_untied_output_and_rope_permutation(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    report = export_gguf(ckpts["llama"], out, gguf_type="Q4_0", embed_type="Q8_0")
    ckpt = read_checkpoint(ckpts["llama"])
    r = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert _field(r, "llama.rope.dimension_count") == ckpt.config["head_dim"]
    # llama.cpp's rope pairs adjacent rows: each head's halves are interleaved
    n_head = ckpt.config["num_attention_heads"]
    w = ckpt.dequantized_weight("model.layers.0.self_attn.q_proj").numpy()
    hd = w.shape[0] // n_head
    want = w.reshape(n_head, 2, hd // 2, -1).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(_decoded(r, "blk.0.attn_q.weight"), want)
    v = ckpt.dequantized_weight("model.layers.0.self_attn.v_proj").numpy()
    assert np.array_equal(_decoded(r, "blk.0.attn_v.weight"), v)  # v is not permuted
    assert report.exact


def test_existing_output_needs_force(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="--force"):
        export_gguf(ckpts["k3"], out)
    assert out.read_bytes() == b"old"
    export_gguf(ckpts["k3"], out, force=True, verify=False)
    assert out.read_bytes()[:4] == b"GGUF" and not _leftovers(out)


def test_verify_catches_corrupt_bytes_and_removes_output(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = gq.pack_q2_k

    def corrupt(*args, **kwargs):
        data = real(*args, **kwargs).copy()
        data[0, 20] ^= 0b0100  # one 2-bit code of the first super-block
        return data

    monkeypatch.setattr(gq, "pack_q2_k", corrupt)
    out = tmp_path / "m.gguf"
    with pytest.raises(ExportError, match="bit-exactly|beyond the reported"):
        export_gguf(ckpts["k2"], out)
    assert not out.exists() and not _leftovers(out)
    monkeypatch.setattr(gq, "pack_q2_k", real)
    export_gguf(ckpts["k2"], out)  # the same export passes once the packer is sound


def test_type_choices_validated(ckpts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Q3_K"):
        export_gguf(ckpts["k3"], tmp_path / "a.gguf", gguf_type="Q4_K")
    with pytest.raises(ConfigError, match="Q2_K"):
        export_gguf(ckpts["u3"], tmp_path / "b.gguf", gguf_type="Q2_K")
    with pytest.raises(ConfigError, match="embed_type"):
        export_gguf(ckpts["u3"], tmp_path / "c.gguf", embed_type="Q2_K")
    assert not list(tmp_path.iterdir())


def test_unknown_pre_tokenizer_needs_a_name(ckpts: dict[str, Path], tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(ckpts["k3"], ck)
    tj = json.loads((ck / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (ck / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((ck / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers' Qwen2Tokenizer would impose Qwen's split
    (ck / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="tokenizer_pre"):
        export_gguf(ck, tmp_path / "m.gguf")
    with pytest.raises(ConfigError, match="gpt-2"):  # "gpt2" is not llama.cpp's name: it refuses the file
        export_gguf(ck, tmp_path / "m.gguf", tokenizer_pre="gpt2")
    export_gguf(ck, tmp_path / "m.gguf", tokenizer_pre="gpt-2", verify=False)  # no llama.cpp split matches \s+|\S+
    assert _field(gguf.GGUFReader(tmp_path / "m.gguf"), "tokenizer.ggml.pre") == "gpt-2"


def test_fallbacks_listed(tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    ck = quantize_rtn(tiny_qwen3_dir, tmp_path / "g16", bits=4, grid="uniform", group_size=16)
    report = export_gguf(ck, tmp_path / "m.gguf")  # default Q4_K: 32-weight sub-blocks split a group of 16
    assert report.gguf_type == "Q4_K" and report.exact
    assert len(report.fallbacks) == len(read_checkpoint(ck).meta.modules)
    assert all("group 16" in why for why in report.fallbacks.values())
    info = inspect_gguf(tmp_path / "m.gguf")
    assert info["export_report"]["fallbacks"] == report.fallbacks
    assert "fallback" in format_inspect(info)


def test_inspect(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    report = export_gguf(ckpts["k3"], out)
    info = inspect_gguf(out)
    assert info["architecture"] == "qwen3" and info["file_size"] == out.stat().st_size
    assert info["tensor_types"]["Q3_K"] == len(read_checkpoint(ckpts["k3"]).meta.modules)
    assert info["quantized_bits_per_weight"] == pytest.approx(110 * 8 / 256)  # Q3_K: 3.4375 bpw
    assert info["export_report"]["exact"] and info["export_report"]["gguf_type"] == "Q3_K"
    assert info["bits_per_weight"] == pytest.approx(report.bits_per_weight)
    assert info["hyperparameters"]["block_count"] == 2 and info["tokenizer"]["pre"] == "qwen2"
    text = format_inspect(info)
    assert "qwen3" in text and "Q3_K" in text and "bit-exact" in text
    with pytest.raises(ExportError, match="not a readable GGUF"):
        (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
        inspect_gguf(tmp_path / "bad.gguf")
