"""llama.cpp's pre-tokenizer names and verify-on-write's tokenization check (exporters/gguf_vocab.py).

Facts used here come from llama.cpp at commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f (vendored in
llama-cpp-python 0.3.36): the probe text of ``get_vocab_base_pre`` (conversion/base.py) and its
table of hashes; the token ids below are what GPT-2's and Qwen2's vocabularies from that copy
(``models/ggml-vocab-gpt-2.gguf`` / ``ggml-vocab-qwen2.gguf``, loaded in transformers 5.25) give the
probe text, and their hashes are llama.cpp's own entries for openai-community/gpt2 and Qwen/Qwen1.5-7B.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import gguf
import pytest

from rqat_deploy.errors import ConfigError, ExportError
from rqat_deploy.exporters import gguf_vocab as gv
from rqat_deploy.exporters.gguf import export_gguf
from rqat_deploy.train.run import quantize_rtn

GPT2_PROBE_IDS = [
    198, 220, 628, 220, 628, 198, 220, 197, 220, 197, 197, 220, 197, 198, 220, 220, 198, 220, 220, 220,
    198, 220, 220, 220, 220, 198, 220, 220, 220, 220, 220, 198, 8582, 248, 222, 357, 11265, 8, 30325,
    114, 447, 235, 8582, 234, 104, 37929, 357, 48101, 795, 13210, 271, 1673, 36686, 515, 8, 14519, 227,
    12520, 99, 247, 8582, 99, 247, 513, 4747, 23460, 513, 20370, 23460, 2091, 23460, 20370, 23460,
    24840, 23460, 2091, 20370, 513, 13, 18, 513, 492, 18, 513, 986, 18, 28053, 252, 222, 157, 252, 114,
    157, 252, 241, 157, 253, 233, 157, 252, 237, 157, 253, 224, 157, 252, 244, 157, 252, 115, 157, 252,
    253, 157, 253, 223, 157, 252, 253, 157, 252, 95, 157, 252, 114, 157, 252, 227, 47249, 223, 5633,
    22755, 239, 46349, 111, 28839, 101, 18040, 32432, 98, 43291, 1485, 1415, 24309, 25465, 171, 121,
    252, 40103, 1421, 18604, 12466, 121, 16843, 141, 231, 15166, 12466, 121, 16142, 12466, 239, 141,
    232, 30143, 140, 111, 16142, 21169, 21727, 31583, 18849, 705, 39115, 6, 33153, 15506, 63, 15931,
    15931, 16317, 13896, 3228, 9805, 3548, 314, 1053, 587, 705, 44040, 339, 338, 612, 11, 705, 2200,
    345, 1654, 30, 705, 44, 407, 1654, 314, 1183, 787, 340, 11, 705, 35, 345, 588, 617, 8887, 30, 775,
    6, 26979, 257, 6, 75, 43,
]
QWEN2_PROBE_IDS = [
    198, 4710, 14731, 65497, 7847, 1572, 2303, 78672, 10947, 145836, 320, 8252, 8, 26525, 114, 378,
    235, 149921, 30543, 320, 35673, 99066, 97534, 8, 25521, 227, 11162, 99, 247, 149955, 220, 18, 220,
    18, 18, 220, 18, 18, 18, 220, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 18,
    220, 18, 18, 18, 18, 18, 18, 18, 220, 18, 18, 18, 18, 18, 18, 18, 18, 220, 18, 13, 18, 220, 18,
    496, 18, 220, 18, 1112, 18, 220, 146394, 97529, 241, 44258, 233, 146568, 44258, 224, 147603, 20879,
    115, 146280, 44258, 223, 146280, 147272, 97529, 227, 144534, 937, 104100, 18493, 22377, 99257, 16,
    18, 16, 19, 16, 20, 16, 35727, 21216, 55460, 53237, 18658, 14144, 1456, 13073, 63471, 33594, 3038,
    133178, 79012, 3355, 4605, 4605, 13874, 13874, 73594, 3014, 3014, 28149, 17085, 2928, 26610, 7646,
    358, 3003, 1012, 364, 83, 813, 566, 594, 1052, 11, 364, 787, 498, 2704, 30, 364, 44, 537, 2704,
    358, 3278, 1281, 432, 11, 364, 35, 498, 1075, 1045, 15243, 30, 1205, 6, 42612, 264, 63866, 43,
]


def _pre_of(path: Path) -> str:
    return gguf.GGUFReader(path).get_field("tokenizer.ggml.pre").contents()


def _pipeline_json(pre_tokenizer: Any) -> dict[str, Any]:
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    return json.loads(tok.to_str())


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RTN int2 checkpoint of a tiny Qwen3 whose tokenizer is a plain GPT-2-style byte-level BPE."""
    from rqat_deploy.builtin.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("gpt2_tok")
    model = build_tiny_model(root / "model", "qwen3", tokenizer_style="gpt2")
    return quantize_rtn(model, root / "ckpt", bits=2)


@pytest.fixture(scope="module")
def qwen_ckpt(tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_rtn(tiny_qwen3_dir, tmp_path_factory.mktemp("qwen_tok") / "ckpt", bits=2)


# ------------------------------------------------------------------------------------- the facts


def test_probe_text_and_hash_function_are_llamacpps() -> None:
    # sha256 of the probe text as llama.cpp's source has it: the copy is byte for byte.
    assert hashlib.sha256(gv.PROBE_TEXT.encode()).hexdigest() == (
        "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"
    )
    assert gv.probe_hash([1, 2, 3]) == hashlib.sha256(b"[1, 2, 3]").hexdigest()  # str(list), as chkhsh
    gpt2 = "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454"
    qwen2 = "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea"
    assert gv.probe_hash(GPT2_PROBE_IDS) == gpt2 and gv.PRE_BY_HASH[gpt2] == "gpt-2"
    assert gv.probe_hash(QWEN2_PROBE_IDS) == qwen2 and gv.PRE_BY_HASH[qwen2] == "qwen2"


def test_lookup_encodes_the_probe_text() -> None:
    class Tok:
        def encode(self, text: str) -> list[int]:
            assert text == gv.PROBE_TEXT
            return list(GPT2_PROBE_IDS)

    assert gv.pre_from_hash(Tok()) == ("gpt-2", gv.probe_hash(GPT2_PROBE_IDS))


def test_every_name_is_one_llamacpp_knows() -> None:
    assert set(gv.PRE_BY_HASH.values()) <= gv.KNOWN_PRE_NAMES
    assert {"gpt-2", "llama-bpe", "qwen2", "deepseek-r1-qwen", "smollm", "qwen35"} <= set(gv.PRE_BY_HASH.values())
    assert "gpt2" not in gv.KNOWN_PRE_NAMES  # the name llama.cpp refuses ("unknown pre-tokenizer type")
    assert set(gv._PRE_BY_SPLITS.values()) <= gv.KNOWN_PRE_NAMES


def test_structure_fallback() -> None:
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    from rqat_deploy.builtin.tiny import QWEN2_PRETOKENIZE_REGEX

    def split(regex: str) -> Any:
        return pt.Split(Regex(regex), behavior="isolated", invert=False)

    plain = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    cases = {
        "gpt-2": pt.ByteLevel(add_prefix_space=False, use_regex=True),
        "qwen2": pt.Sequence([split(QWEN2_PRETOKENIZE_REGEX), plain]),
        "llama-bpe": pt.Sequence([split(gv._LLAMA3_REGEX), plain]),
        "smollm": pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
    }
    for name, pre in cases.items():
        assert gv.pre_from_structure(_pipeline_json(pre)) == name
    assert gv.pre_from_structure(_pipeline_json(pt.Sequence([split(gv._GPT2_REGEX), plain]))) == "gpt-2"
    for unknown in (
        pt.ByteLevel(add_prefix_space=True),  # llama.cpp adds no prefix space
        pt.Sequence([split(r"\s+|\S+"), plain]),
        pt.Sequence([pt.Digits(individual_digits=False), pt.ByteLevel(add_prefix_space=False)]),
        pt.Whitespace(),
    ):
        assert gv.pre_from_structure(_pipeline_json(unknown)) is None
    assert gv.pre_from_structure({"pre_tokenizer": None}) is None


# ------------------------------------------------------------------------------------- the export


@pytest.mark.llamacpp
def test_gpt2_style_tokenizer_loads_in_llamacpp_and_benches(gpt2_ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from rqat_deploy.serve.bench import BenchConfig, run_bench

    out = tmp_path / "gpt2.gguf"
    report = export_gguf(gpt2_ckpt, out, gguf_type="Q4_0")
    assert _pre_of(out) == "gpt-2" and (report.tokenizer_pre, report.tokenizer_pre_source) == ("gpt-2", "structure")
    assert "exactly as Hugging Face" in report.tokenizer_check and "gpt-2" in report.summary()
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in (3, 4)))
    bench = run_bench(BenchConfig(
        models=[str(out)], dataset=str(qa), max_tokens=8, greedy=True, out_dir=tmp_path / "bench",
        speed=False, n_threads=1, progress=False, plots=False,
    ))
    m = bench["models"]["gpt2.gguf"]
    assert m["runtime"] == "llama.cpp" and m["n"] == 2 and all(r["n_completion_tokens"] for r in m["raw"])


def test_qwen_style_tokenizer_keeps_qwen2(qwen_ckpt: Path, tmp_path: Path) -> None:
    report = export_gguf(qwen_ckpt, tmp_path / "q.gguf", gguf_type="Q4_0")
    assert _pre_of(tmp_path / "q.gguf") == "qwen2" and report.tokenizer_pre_source == "structure"


def test_hash_table_is_consulted_first(qwen_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As if our local tokenizer were a pretrained one in llama.cpp's table: DeepSeek-R1-Distill-Qwen's
    # name (llama.cpp splits it as qwen2, so verify-on-write still passes).
    digest = gv.probe_hash(gv.load_hf_tokenizer(qwen_ckpt).encode(gv.PROBE_TEXT))
    monkeypatch.setitem(gv.PRE_BY_HASH, digest, "deepseek-r1-qwen")
    report = export_gguf(qwen_ckpt, tmp_path / "q.gguf", gguf_type="Q4_0")
    assert _pre_of(tmp_path / "q.gguf") == "deepseek-r1-qwen"
    assert (report.tokenizer_pre_source, json.loads(
        gguf.GGUFReader(tmp_path / "q.gguf").get_field("rqat.export.report").contents()
    )["tokenizer_pre_source"]) == ("hash", "hash")


def _unknown_tokenizer(ckpt: Path, dst: Path) -> Path:
    """A copy of ``ckpt`` whose tokenizer splits on a regex llama.cpp has no name for."""
    shutil.copytree(ckpt, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # Qwen2Tokenizer would impose Qwen's split
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_unknown_tokenizer_is_refused_before_writing(qwen_ckpt: Path, tmp_path: Path) -> None:
    ck = _unknown_tokenizer(qwen_ckpt, tmp_path / "ck")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ConfigError, match="--tokenizer-pre NAME"):
        export_gguf(ck, out_dir / "m.gguf")
    with pytest.raises(ConfigError, match="did you mean 'gpt-2'"):
        export_gguf(ck, out_dir / "m.gguf", tokenizer_pre="gpt2")
    assert list(out_dir.iterdir()) == []


@pytest.mark.llamacpp
def test_a_wrong_name_fails_verify_and_removes_the_file(gpt2_ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    with pytest.raises(ExportError, match="tokenizes the probe text differently"):
        export_gguf(gpt2_ckpt, tmp_path / "m.gguf", gguf_type="Q4_0", tokenizer_pre="qwen2")
    assert list(tmp_path.iterdir()) == []


def test_check_is_skipped_with_a_note_without_llama_cpp(
    qwen_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    report = export_gguf(qwen_ckpt, tmp_path / "q.gguf", gguf_type="Q4_0")
    assert report.verified and "llama-cpp-python is not installed" in report.tokenizer_check
    assert "not installed" in report.summary()
