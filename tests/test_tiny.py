"""Tests of the tiny local test models (rqat_deploy.builtin.tiny) and their session fixtures."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import regex
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from rqat_deploy.errors import ConfigError
from rqat_deploy.builtin.tiny import build_tiny_model, build_tokenizer, synthetic_corpus

# llama.cpp's hand-rewritten form of the Qwen2 pre-tokenizer regex (src/llama-vocab.cpp,
# LLAMA_VOCAB_PRE_TYPE_QWEN2): an independent oracle for the pre-tokenizer Hugging Face runs.
LLAMA_CPP_QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TEXTS = [
    "The answer is \\boxed{128}.",
    "Let $\\frac{3}{4} + x^{2} = 10$ and \\sqrt{2} \\cdot \\pi r^2.\n\nSo 12345 + 678 = 13023.",
    "Alice doesn't know; she'll check it's DON'T and I'VE   three   spaces\tand\ttabs\r\nend",
    "café naïve π ≤ ∞ 日本語 — emoji 🙂 and e\u0301 (combining accent)",
    "  leading spaces, trailing newline\n\n\n",
    "",
]
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny tokenizer as build_tokenizer returns it."""
    return build_tokenizer()


def test_round_trip_is_lossless_up_to_nfc(tokenizer) -> None:
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_no_bos_or_eos_is_added(tokenizer) -> None:
    ids = tokenizer.encode("hello world")
    special_ids = set(tokenizer.convert_tokens_to_ids(ADDED))
    assert ids and not special_ids & set(ids)
    assert tokenizer.bos_token is None
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"


def test_added_tokens_are_single_ids_at_the_end(tokenizer) -> None:
    ids = [tokenizer.encode(t) for t in ADDED]
    assert all(len(i) == 1 for i in ids)
    assert [i[0] for i in ids] == list(range(len(tokenizer) - 5, len(tokenizer)))
    text = "<|im_start|>user\n12<|im_end|>\n<think>\nx\n</think>\n\n"
    enc = tokenizer.encode(text)
    assert tokenizer.decode(enc) == text
    assert enc.count(tokenizer.convert_tokens_to_ids("<think>")) == 1


def test_skip_special_drops_control_tokens_but_keeps_think(tokenizer) -> None:
    # As Qwen3: <think> / </think> are added with special=False.
    ids = tokenizer.encode("<|im_start|>a<think>b</think>c<|im_end|><|endoftext|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a<think>b</think>c"


def test_digits_are_split_one_per_token(tokenizer) -> None:
    ids = tokenizer.encode("x=9876543210")
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces[-10:] == list("9876543210")


def test_pre_tokenizers_match_llama_cpp_qwen2_regex(tokenizer, tiny_qwen3_dir: Path) -> None:
    # Both the transformers object (whose Qwen2Tokenizer class may rebuild its own pipeline) and the
    # raw tokenizer.json (what GGUF converters read) must split like llama.cpp's "qwen2" pre-type.
    raw = Tokenizer.from_file(str(tiny_qwen3_dir / "tokenizer.json"))
    byte_map = {c: b for b, c in _bytes_to_unicode().items()}
    for pre in (tokenizer.backend_tokenizer.pre_tokenizer, raw.pre_tokenizer):
        for text in TEXTS:
            text = unicodedata.normalize("NFC", text)
            split = pre.pre_tokenize_str(text)
            pieces = [bytes(byte_map[c] for c in piece).decode("utf-8") for piece, _ in split]
            assert pieces == regex.findall(LLAMA_CPP_QWEN2_REGEX, text)


def test_raw_tokenizer_json_encodes_like_transformers(tokenizer, tiny_qwen3_dir: Path) -> None:
    raw = Tokenizer.from_file(str(tiny_qwen3_dir / "tokenizer.json"))
    texts = TEXTS + synthetic_corpus(200, seed=7)
    texts.append("<|im_start|>user\nx<|im_end|><think>a</think><|endoftext|>")
    for text in texts:
        assert raw.encode(text).ids == tokenizer.encode(text)


def test_tokenizer_json_pipeline_is_qwens(tiny_qwen3_dir: Path) -> None:
    data = json.loads((tiny_qwen3_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["normalizer"]["type"] == "NFC"
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated" and not split["invert"]
    assert byte_level["type"] == "ByteLevel"
    assert not (byte_level["add_prefix_space"] or byte_level["use_regex"] or byte_level["trim_offsets"])
    assert data["decoder"]["type"] == "ByteLevel"
    assert data["model"]["type"] == "BPE"
    added = {t["content"]: t["special"] for t in data["added_tokens"]}
    assert added == {t: t not in ("<think>", "</think>") for t in ADDED}
    config = json.loads((tiny_qwen3_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["bos_token"] is None


def test_chat_template_renders_qwen3_markers(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>\n2+3=5\n</think>\n\n\\boxed{5}"},
        {"role": "user", "content": "And 4+4?"},
        {"role": "assistant", "content": "\\boxed{8}", "reasoning_content": "\n4+4=8\n"},
    ]
    out = tokenizer.apply_chat_template(messages, tokenize=False)
    assert out == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2+3=5\n</think>\n\n\\boxed{5}<|im_end|>\n"
        "<|im_start|>user\nAnd 4+4?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n4+4=8\n</think>\n\n\\boxed{8}<|im_end|>\n"
    )
    user = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    render = dict(tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(user, enable_thinking=True, **render) == prompt
    no_think = tokenizer.apply_chat_template(user, enable_thinking=False, **render)
    assert no_think == prompt + "<think>\n\n</think>\n\n"


MODEL_FIXTURES = ["tiny_qwen3_dir", "tiny_qwen2_dir", "tiny_llama_dir"]


@pytest.mark.parametrize("fixture", MODEL_FIXTURES)
def test_model_loads_and_gives_finite_logits(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.dtype == torch.float32
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Compute 12 + 30."}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        logits = model(ids).logits  # [1, T, V]
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert model.config.vocab_size == len(tok)
    assert torch.isfinite(logits).all()
    assert logits.std(dim=-1).min() > 0.1  # not flat
    assert len(set(logits[0].argmax(-1).tolist())) > 1  # predictions depend on the input
    out = model.generate(ids, max_new_tokens=3, do_sample=False)  # [1, T+3] at most
    assert out.shape[1] <= ids.shape[1] + 3


@pytest.mark.parametrize(
    ("fixture", "arch", "tied"),
    [
        ("tiny_qwen3_dir", "qwen3", True),
        ("tiny_qwen2_dir", "qwen2", True),
        ("tiny_llama_dir", "llama", False),
    ],
)
def test_config_ids_and_tying(
    fixture: str, arch: str, tied: bool, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(fixture)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == arch and config["tie_word_embeddings"] is tied
    tensors = load_file(path / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert ("lm_head.weight" in tensors) is not tied
    tok = AutoTokenizer.from_pretrained(path)
    gen = json.loads((path / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    assert config["eos_token_id"] == tok.eos_token_id


@pytest.mark.parametrize("fixture", MODEL_FIXTURES)
def test_decoder_linear_inputs_are_multiples_of_256(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture))
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * model.config.num_hidden_layers
    assert all(m.in_features % 256 == 0 for m in linears)


def test_qwen2_has_nonzero_qkv_biases_qwen3_none(tiny_qwen2_dir: Path, tiny_qwen3_dir: Path) -> None:
    qwen2 = load_file(tiny_qwen2_dir / "model.safetensors")
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj"):
            bias = qwen2[f"model.layers.{layer}.self_attn.{proj}.bias"]
            assert bias.abs().min() > 0 and bias.std() > 0.05
        assert f"model.layers.{layer}.self_attn.o_proj.bias" not in qwen2
    assert not any(k.endswith(".bias") for k in load_file(tiny_qwen3_dir / "model.safetensors"))


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path, tiny_qwen3_dir: Path) -> None:
    again = build_tiny_model(tmp_path / "again", "qwen3", seed=0)
    other = build_tiny_model(tmp_path / "other", "qwen3", seed=1)
    ref, same, diff = (load_file(p / "model.safetensors") for p in (tiny_qwen3_dir, again, other))
    assert ref.keys() == same.keys() == diff.keys()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not any(torch.equal(ref[k], diff[k]) for k in ref)
    assert (again / "tokenizer.json").read_bytes() == (tiny_qwen3_dir / "tokenizer.json").read_bytes()


def test_unknown_arch_and_bad_sizes_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="qwen3.*qwen2.*llama"):
        build_tiny_model(tmp_path, "mistral")
    with pytest.raises(ConfigError, match="multiple of 256"):
        build_tiny_model(tmp_path, "qwen3", intermediate_size=384)
    with pytest.raises(ConfigError, match="head_dim"):
        build_tiny_model(tmp_path, "qwen2", head_dim=64)
    with pytest.raises(ConfigError, match="vocab_size"):
        build_tiny_model(tmp_path, "qwen3", vocab_size=100)
    assert not (tmp_path / "model.safetensors").exists()


def test_padded_vocab_and_other_tokenizer_size(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "m", "llama", vocab_size=1088, num_layers=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.get_input_embeddings().weight.shape == (1088, 256)
    small = build_tokenizer(tmp_path / "tok", vocab_size=512)
    assert len(small) == 512 and small.encode("<|im_end|>") == [509]
    with pytest.raises(ConfigError, match="512..1152"):
        build_tokenizer(vocab_size=4096)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table (the ByteLevel alphabet), written out here."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
