"""Data specs, record rendering with the chat template, mixing, prompt masking, and data errors.

Local JSONL / Parquet / text files are written in tmp dirs; reasoning text comes from the real
chain-of-thought samples in ``../shared/data/math_cot_100.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rqat_deploy.data.calib import DEFAULT_CALIB_SPEC, build_calibration
from rqat_deploy.data.records import FieldMap
from rqat_deploy.data.sft import IGNORE_INDEX, build_sft
from rqat_deploy.data.spec import allocate, parse_spec
from rqat_deploy.errors import DataError

COT = Path(__file__).resolve().parents[2] / "shared" / "data" / "math_cot_100.jsonl"


@pytest.fixture(scope="module")
def tok():
    from rqat_deploy.builtin.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    if not COT.exists():
        pytest.skip(f"{COT} is not available")
    return [json.loads(line) for line in COT.read_text().splitlines()]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _trace(r: dict) -> str:
    return r["code"][0]


def _answer(r: dict) -> str:
    return f"The answer is $\\boxed{{{r['gt']}}}$."


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, rows: list[dict]) -> dict[str, Path]:
    """The same 100 problems as ShareGPT, OpenAI messages, prompt/response JSONL and Parquet, plus text."""
    import datasets

    d = tmp_path_factory.mktemp("data")
    sharegpt = [
        {"conversations": [
            {"from": "human", "value": r["question"]},
            {"from": "gpt", "value": f"<think>\n{_trace(r)}\n</think>\n\n{_answer(r)}"},
        ]}
        for r in rows
    ]
    openai = [
        {"messages": [
            {"role": "user", "content": r["question"]},
            {"role": "assistant", "content": _answer(r), "reasoning_content": _trace(r)},
        ]}
        for r in rows
    ]
    pr = [{"q": r["question"], "a": _answer(r), "thinking": _trace(r), "level": r["level"]} for r in rows]
    out = {
        "sharegpt": _write_jsonl(d / "sharegpt.jsonl", sharegpt),
        "openai": _write_jsonl(d / "openai.jsonl", openai),
        "pr": _write_jsonl(d / "pr.jsonl", pr),
        "cjk": d / "web.txt",
        "parquet": d / "sharegpt.parquet",
    }
    datasets.Dataset.from_list(sharegpt).to_parquet(str(out["parquet"]))
    # plain "pre-training" paragraphs in characters the reasoning data never uses
    out["cjk"].write_text("\n\n".join(" ".join(["日本 数学"] * (30 + i % 7)) for i in range(60)) + "\n")
    return out


# --- specs ----------------------------------------------------------------------------------


def test_parse_spec_weights_hub_ids_and_local_files(files: dict[str, Path]) -> None:
    s = parse_spec(f"{files['sharegpt']}:3, {files['cjk']},org/name#cfg@validation:0.5")
    assert [x.kind for x in s] == ["json", "text", "hub"]
    assert [x.weight for x in s] == [3.0, 1.0, 0.5]
    assert (s[2].location, s[2].config, s[2].split) == ("org/name", "cfg", "validation")
    d = parse_spec(DEFAULT_CALIB_SPEC)
    assert [(x.location, x.weight, x.kind) for x in d] == [
        ("open-thoughts/OpenThoughts3-1.2M", 0.8, "hub"),
        ("HuggingFaceFW/fineweb-edu", 0.2, "hub"),
    ]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "empty"),
        ("a/b,,c/d", "empty entry"),
        ("a/b:0", "positive"),
        ("a/b:-1", "positive"),
        ("/nonexistent/file.jsonl", "does not exist"),
        ("sub/missing.jsonl", "does not exist"),  # a data-file suffix is local, never a Hub id
        ("justaname", "neither"),
        ("builtin", "resolve_spec"),  # the command expands the word before parsing
    ],
)
def test_parse_spec_errors(spec: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        parse_spec(spec)


def test_directory_with_mixed_formats_is_rejected(files: dict[str, Path]) -> None:
    with pytest.raises(DataError, match="mixes file formats"):
        parse_spec(str(files["sharegpt"].parent))


def _spec_files(root: Path) -> None:
    """a.jsonl, b.parquet, c.txt and a dataset directory set/ with train and test splits, under ``root``."""
    _write_jsonl(root / "a.jsonl", [{"text": "alpha"}])
    (root / "b.parquet").write_bytes(b"")
    (root / "c.txt").write_text("gamma\n")
    (root / "set").mkdir()
    _write_jsonl(root / "set" / "train.jsonl", [{"text": f"train {i}"} for i in range(3)])
    _write_jsonl(root / "set" / "test.jsonl", [{"text": "test 0"}])


def test_train_and_bench_resolve_the_same_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One grammar: a SPEC names the same sources for training (--calib / --train-data) and bench (--dataset)."""
    from rqat_deploy.builtin import synth
    from rqat_deploy.data.evalset import eval_sources
    from rqat_deploy.data.mixing import train_sources
    from rqat_deploy.data.spec import EVAL_SPLIT, TRAIN_SPLIT
    from rqat_deploy.train.run import TrainConfig

    train = train_sources  # what build_calibration / build_sft read
    monkeypatch.chdir(tmp_path)
    _spec_files(tmp_path)
    explicit = [
        "a.jsonl:3,./b.parquet:0.5,c.txt",
        f"{tmp_path / 'a.jsonl'}:2,{tmp_path / 'set'}@test",
        "openai/gsm8k#main@test:2,org/name@validation,set#default@train",
        "gsm8k@train,math500@test:0.5,AIME24@train",
    ]
    for spec in explicit:
        assert train(spec) == eval_sources(spec), spec
    # Without '@split' the parsed form says which default split each command reads; nothing else differs.
    for spec in ["org/name#cfg", "gsm8k:2", "set", "aime24,a.jsonl"]:
        t, b = train(spec), eval_sources(spec)
        assert [replace(s, split=None) for s in t] == [replace(s, split=None) for s in b], spec
        datasets_ = [(x.split, y.split) for x, y in zip(t, b) if x.kind == "hub" or x.directory]
        assert datasets_ and set(datasets_) == {(TRAIN_SPLIT, EVAL_SPLIT)}, spec
    # aliases expand to the parsed form of their Hub id
    strip = lambda sources: [replace(s, name="") for s in sources]  # noqa: E731
    assert strip(train("gsm8k,math500@test")) == strip(train("openai/gsm8k#main,HuggingFaceH4/MATH-500@test"))
    gsm = train("gsm8k:2")[0]
    assert (gsm.location, gsm.config, gsm.weight) == ("openai/gsm8k", "main", 2.0)
    # 'builtin': each command expands the word to its built-in files, which then parse alike
    monkeypatch.setenv("RQAT_DEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(synth.DEFAULT_DATA_SIZES, "reasoning", 30)
    monkeypatch.setitem(synth.DEFAULT_DATA_SIZES, "eval_per_level", 3)
    for kind in ("calib", "train", "eval"):
        spec = synth.resolve_spec("builtin", kind)
        assert train(spec) == eval_sources(spec) and {s.kind for s in train(spec)} == {"json"}, kind
    cfg = TrainConfig(out="o", model="m", calib="builtin", train_data="builtin")
    assert [s.weight for s in train(cfg.calib_spec())] == [0.8, 0.2]
    assert train(cfg.train_spec()) == eval_sources(synth.resolve_spec("builtin", "train"))


def test_dataset_directory_reads_the_commands_split(tmp_path: Path) -> None:
    """A dataset directory is read like a Hub dataset: training takes `train`, bench `test`, '@' picks one."""
    from rqat_deploy.data.evalset import load_rows
    from rqat_deploy.data.sources import iter_records

    _spec_files(tmp_path)
    folder = str(tmp_path / "set")
    assert sorted(r["text"] for r in iter_records(parse_spec(folder)[0], seed=0)) == ["train 0", "train 1", "train 2"]
    assert [r["text"] for r in iter_records(parse_spec(f"{folder}@test")[0], seed=0)] == ["test 0"]
    assert [r["text"] for r in load_rows(folder)] == ["test 0"]
    with pytest.raises(DataError, match=r"splits \['train', 'test'\]|splits \['test', 'train'\]"):
        list(iter_records(parse_spec(f"{folder}@validation")[0], seed=0))
    with pytest.raises(DataError, match="no configurations or splits"):
        parse_spec(f"{tmp_path / 'a.jsonl'}@train")


def test_allocate_is_proportional_and_exact() -> None:
    assert allocate([0.8, 0.2], 4096) == [3277, 819]
    assert allocate([1, 1, 1], 10) == [4, 3, 3]
    assert sum(allocate([0.3, 0.5, 0.2], 7)) == 7


def test_hub_source_that_cannot_load_is_a_clear_error(tok) -> None:
    # the test session is offline (HF_DATASETS_OFFLINE=1): the real Hub path must fail cleanly
    with pytest.raises(DataError, match="Hugging Face Hub"):
        build_calibration(tok, DEFAULT_CALIB_SPEC, 4, 64, 0)


# --- calibration ------------------------------------------------------------------------------


def test_calibration_mix_ratio_lengths_and_report(tok, files: dict[str, Path]) -> None:
    spec = f"{files['sharegpt']}:0.75,{files['cjk']}:0.25"
    cal = build_calibration(tok, spec, 16, 64, seed=0)
    assert cal.input_ids.shape == (16, 64) and cal.input_ids.dtype == torch.long
    texts = [tok.decode(r) for r in cal.input_ids]
    from_text = sum("日本" in t for t in texts)
    assert from_text == 4  # 25 % of 16, counted from the content itself
    for t in texts:  # no row mixes the domains: text rows hold nothing but the text source's words
        if "日本" in t:
            assert not t.replace("日本", "").replace("数学", "").replace("<|im_end|>", "").strip()
    rep = cal.report
    assert rep["total_tokens"] == 16 * 64
    assert [s["samples"] for s in rep["sources"]] == [12, 4]
    assert [s["realised_fraction"] for s in rep["sources"]] == [0.75, 0.25]
    assert [s["tokens"] for s in rep["sources"]] == [12 * 64, 4 * 64]
    assert rep["sources"][0]["record_kinds"] == {"conversations": rep["sources"][0]["records_read"]}
    # conversations are rendered with the chat template: role markers appear in the rows
    assert any("<|im_start|>user\n" in t for t in texts) and any("<|im_start|>assistant\n" in t for t in texts)
    # pre-training paragraphs are separated by the EOS token
    assert any("<|im_end|>" in t for t in texts if "日本" in t)


def test_calibration_is_deterministic_by_seed(tok, files: dict[str, Path]) -> None:
    spec = f"{files['sharegpt']}:0.5,{files['cjk']}:0.5"
    a = build_calibration(tok, spec, 6, 48, seed=1)
    b = build_calibration(tok, spec, 6, 48, seed=1)
    c = build_calibration(tok, spec, 6, 48, seed=2)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


# --- stage-2 samples ------------------------------------------------------------------------


def _split(tok, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[str, str]:
    n = int(mask.sum())
    start = int((labels[:n] != IGNORE_INDEX).nonzero()[0])
    return tok.decode(ids[:start]), tok.decode(ids[start:n])


def test_sft_masks_the_prompt_and_trains_the_think_trace(tok, files: dict[str, Path], rows: list[dict]) -> None:
    sft = build_sft(tok, str(files["sharegpt"]), 8, 2048, seed=0)
    assert sft.input_ids.shape == sft.labels.shape == sft.attention_mask.shape
    by_question = {r["question"]: r for r in rows}
    for i in range(len(sft)):
        ids, labels, mask = sft.input_ids[i], sft.labels[i], sft.attention_mask[i]
        n = int(mask.sum())
        assert torch.equal(mask[:n], torch.ones(n, dtype=torch.long)) and int(mask[n:].sum()) == 0
        assert bool((labels[n:] == IGNORE_INDEX).all())  # padding never trained
        trained = labels[:n] != IGNORE_INDEX
        assert torch.equal(labels[:n][trained], ids[:n][trained])
        prompt, completion = _split(tok, ids, labels, mask)
        assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        question = prompt[len("<|im_start|>user\n") : -len("<|im_end|>\n<|im_start|>assistant\n")]
        r = by_question[question]
        assert completion == f"<think>\n{_trace(r)}\n</think>\n\n{_answer(r)}<|im_end|>\n"
    rep = sft.report
    assert rep["completion_tokens"] == int((sft.labels[:, 1:] != IGNORE_INDEX).sum())
    assert rep["total_tokens"] == int(sft.attention_mask.sum())
    assert rep["sources"][0]["samples"] == 8


def test_sft_record_formats_render_identically(tok, files: dict[str, Path]) -> None:
    fm = FieldMap.parse("prompt=q,response=a,reasoning=thinking")
    sets = [
        build_sft(tok, str(files["sharegpt"]), 6, 512, seed=3),
        build_sft(tok, str(files["openai"]), 6, 512, seed=3),
        build_sft(tok, str(files["pr"]), 6, 512, seed=3, fields=fm),
        build_sft(tok, str(files["parquet"]), 6, 512, seed=3),
    ]
    for s in sets[1:]:
        assert torch.equal(s.input_ids, sets[0].input_ids)
        assert torch.equal(s.labels, sets[0].labels)
    assert sets[0].report["sources"][0]["truncated"] > 0  # 512 tokens cut some long traces


def test_sft_truncation_and_mix(tok, files: dict[str, Path]) -> None:
    sft = build_sft(tok, f"{files['sharegpt']}:2,{files['cjk']}:1", 9, 128, seed=0)
    assert sft.input_ids.shape[1] <= 128
    rep = {s["kind"]: s for s in sft.report["sources"]}
    assert rep["json"]["samples"] == 6 and rep["text"]["samples"] == 3
    text_rows = [i for i in range(9) if "日本" in tok.decode(sft.input_ids[i])]
    assert len(text_rows) == 3
    for i in text_rows:  # plain text has no prompt: every token but the first is trained
        n = int(sft.attention_mask[i].sum())
        assert bool((sft.labels[i, :n] == sft.input_ids[i, :n]).all())


def test_multi_turn_trains_only_the_last_assistant_turn(tok, tmp_path: Path) -> None:
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4+4?"},
        {"role": "assistant", "content": "<think>\n4+4=8\n</think>\n\n8"},
        {"role": "user", "content": "dangling question without an answer"},
    ]}
    f = _write_jsonl(tmp_path / "mt.jsonl", [conv])
    sft = build_sft(tok, str(f), 1, 256, seed=0)
    prompt, completion = _split(tok, sft.input_ids[0], sft.labels[0], sft.attention_mask[0])
    assert "What is 2+3?" in prompt and "<|im_start|>assistant\n5<|im_end|>" in prompt
    assert completion == "<think>\n4+4=8\n</think>\n\n8<|im_end|>\n"
    assert "dangling" not in tok.decode(sft.input_ids[0])


# --- errors ------------------------------------------------------------------------------------


def test_missing_field_names_the_fields_found(tok, tmp_path: Path) -> None:
    f = _write_jsonl(tmp_path / "odd.jsonl", [{"foo": "x", "bar": "y"}] * 3)
    with pytest.raises(DataError, match=r"fields found: \['bar', 'foo'\]"):
        build_sft(tok, str(f), 2, 64, 0)


def test_real_file_with_list_responses_yields_no_usable_sample(tok) -> None:
    # math_cot_100 has 'question' (a prompt) but 'response' holds a *list* of samples
    if not COT.exists():
        pytest.skip("no math_cot_100")
    with pytest.raises(DataError, match="yields no usable sample.*non_string_prompt_or_response"):
        build_sft(tok, str(COT), 4, 256, 0)


def test_field_map_makes_a_real_file_usable(tok) -> None:
    if not COT.exists():
        pytest.skip("no math_cot_100")
    sft = build_sft(tok, str(COT), 4, 256, 0, fields={"prompt": "question", "response": "gt_cot"})
    assert len(sft) == 4 and sft.report["completion_tokens"] > 0


def test_sequence_too_short_for_any_completion(tok, files: dict[str, Path]) -> None:
    with pytest.raises(DataError, match="too short for any completion.*raise the sequence length"):
        build_sft(tok, str(files["sharegpt"]), 2, 8, 0)


def test_not_enough_samples(tok, files: dict[str, Path]) -> None:
    with pytest.raises(DataError, match="yields only 100 samples"):
        build_sft(tok, str(files["sharegpt"]), 101, 4096, 0)
    with pytest.raises(DataError, match="positive integer"):
        build_sft(tok, str(files["sharegpt"]), 0, 64, 0)


def test_template_that_drops_the_trace_still_trains_it(tok, files: dict[str, Path], rows: list[dict]) -> None:
    """A DeepSeek-R1-style template strips <think> from assistant turns and opens one in the prompt."""
    import copy

    r1 = copy.deepcopy(tok)
    r1.chat_template = (
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ '<|im_start|>user\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- else -%}{%- set c = m['content'] -%}{%- if '</think>' in c -%}{%- set c = c.split('</think>')[-1].lstrip() -%}"
        "{%- endif -%}{{ '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n<think>\\n' }}{%- endif -%}"
    )
    sft = build_sft(r1, str(files["sharegpt"]), 3, 4096, seed=0)
    by_question = {r["question"]: r for r in rows}
    for i in range(3):
        prompt, completion = _split(r1, sft.input_ids[i], sft.labels[i], sft.attention_mask[i])
        assert prompt.endswith("<|im_start|>assistant\n<think>\n")
        r = by_question[prompt[len("<|im_start|>user\n") : -len("<|im_end|>\n<|im_start|>assistant\n<think>\n")]]
        assert completion == f"{_trace(r)}\n</think>\n\n{_answer(r)}<|im_end|>"


def test_tokenizer_without_chat_template(tok, files: dict[str, Path]) -> None:
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        build_sft(plain, str(files["sharegpt"]), 2, 256, 0)
