"""Runtime check: exported GGUF files run in llama.cpp and match the PyTorch model of the checkpoint.

llama.cpp's CPU matmuls round activations before the integer dot product: Q8_K (one float scale
per 256 values, ``q = nearest(-127/max * x)``) for k-quant weights, Q8_0 (one fp16 scale per 32) for
Q4_0 / Q8_0 weights, fp16 for F16 weights. The PyTorch side emulates exactly that rounding, and
the KV cache is F32 (``type_k = type_v = GGML_TYPE_F32``), so both compute the same function up to
float summation order.

Why the tight comparison uses many short sequences (DESIGN.md 6): the activation rounding is
discontinuous. PyTorch and ggml differ by float32 ulps in RMSNorm / rope / softmax / SiLU / summation
order; now and then an activation lies within an ulp of a rounding boundary and its 8-bit code
differs by one. That one-step change (~1/254 of the block's max) moves many later roundings of the
token (about 10 % of the codes of the next quantized matmul flip), and later tokens see it through
attention: from that position on, logits drift to ~1e-2. Two PyTorch runs that differ only by a
1e-7 relative perturbation of the activations drift in exactly the same way (same positions, same
magnitudes, on the tiny models), so the drift comes from emulating a discontinuous function, not
from a different kernel path in llama.cpp (disabling llama.cpp's weight repacking changes nothing).
On these models such a flip happens in roughly a quarter of two-token sequences. So the test scores
64 independent two-token sequences: most must agree to 1e-5 relative at both positions (without the
emulation none does), and a long chat prompt must agree in argmax at >= 95 % of positions and give
the same 16-token greedy continuation.
"""

from __future__ import annotations

import os

# llama.cpp's OpenMP threads spin-wait by default; beside PyTorch's own OpenMP pool in one process
# that stalls llama.cpp for seconds per call on a busy machine. Must be set before llama_cpp loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install 'rqat-deploy[llamacpp]')"
)

from rqat_deploy.quant.checkpoint import load_model  # noqa: E402
from rqat_deploy.exporters.gguf import ExportReport, export_gguf  # noqa: E402
from rqat_deploy.train.run import quantize_rtn  # noqa: E402

pytestmark = pytest.mark.llamacpp

GGML_TYPE_F32 = 0
N_TRIALS = 64  # independent two-token sequences compared tightly
TIGHT = 1e-5  # relative logit error of a trial without a rounding flip
PROMPT = [
    {"role": "user", "content": "Alice has 12 apples and buys 30 more. How many apples does she have?"},
    {"role": "assistant", "content": "<think>\n12 + 30 = 42. Let me check: 42 - 30 = 12.\n</think>\n\nThe answer is \\boxed{42}."},
    {"role": "user", "content": "And if she sells 7?"},
]


# ------------------------------------------------------------------------------------------------
# llama.cpp's activation rounding, in PyTorch
# ------------------------------------------------------------------------------------------------


def q8_k(x: torch.Tensor) -> torch.Tensor:
    """ggml ``quantize_row_q8_K_ref`` then dequantize: per 256 values, float scale ``max/-127``."""
    xb = x.reshape(-1, 256)  # [rows*blocks, 256]
    idx = xb.abs().argmax(dim=-1, keepdim=True)  # first max |x|, as ggml's strict '>' scan
    mx = torch.gather(xb, 1, idx)  # signed value of largest magnitude
    iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
    q = torch.clamp(torch.round(iscale * xb), max=127)  # nearest_int: round half to even
    d = torch.where(mx != 0, 1.0 / iscale, torch.zeros_like(mx))
    return (d * q).reshape(x.shape)


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """ggml x86 ``quantize_row_q8_0`` then dequantize: per 32 values, fp16 scale ``amax/127``."""
    xb = x.reshape(-1, 32)  # [rows*blocks, 32]
    amax = xb.abs().amax(dim=-1, keepdim=True)
    iscale = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * iscale)
    return ((amax / 127.0).half().float() * q).reshape(x.shape)


def f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


ACT_ROUNDING: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q2_K": q8_k, "Q3_K": q8_k, "Q4_K": q8_k, "Q4_0": q8_0, "Q8_0": q8_0, "Q2_0": q8_0, "F16": f16, "F32": lambda x: x,
}


def _round_inputs(module: torch.nn.Linear, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(fn(x), module.weight, module.bias)

    module.forward = forward  # type: ignore[method-assign]


def emulated_model(ckpt: Path, report: ExportReport) -> tuple[torch.nn.Module, Any]:
    """The checkpoint's PyTorch model computing what llama.cpp computes on the exported file."""
    model, tok = load_model(ckpt, dtype=torch.float32)
    for t in report.tensors:
        if t.quantized:
            _round_inputs(model.get_submodule(t.source), ACT_ROUNDING[t.qtype])
    assert report.embed_type == "F16"
    with torch.no_grad():  # F16 embedding / output: stored values, and F16 activations for output
        emb = model.get_input_embeddings().weight
        emb.copy_(emb.half().float())
        head = model.get_output_embeddings()
        head.weight.copy_(head.weight.half().float())
    _round_inputs(model.get_output_embeddings(), f16)
    return model, tok


# ------------------------------------------------------------------------------------------------
# the check
# ------------------------------------------------------------------------------------------------


CASES = {  # id: (tiny model fixture, bits, grid, gguf type)
    "qwen3-Q2_K": ("tiny_qwen3_dir", 2, "kquant", None),
    "qwen3-Q3_K": ("tiny_qwen3_dir", 3, "kquant", None),
    "qwen2-Q3_K": ("tiny_qwen2_dir", 3, "kquant", None),  # q/k/v biases
    "llama-Q4_0": ("tiny_llama_dir", 3, "uniform", "Q4_0"),  # exact uniform; untied output; rope rows
    "qwen3-Q2_0": ("tiny_qwen3_dir", 2, "q2_0", None),  # llama.cpp's 2-bit type, activations to Q8_0
}


def _llama(path: Path) -> Any:
    return llama_cpp.Llama(
        str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, seed=0, verbose=False,
        type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
    )


@pytest.mark.parametrize("case", list(CASES))
def test_llamacpp_matches_pytorch(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    fixture, bits, grid, gguf_type = CASES[case]
    ckpt = quantize_rtn(request.getfixturevalue(fixture), tmp_path / "ckpt", bits=bits, grid=grid)
    report = export_gguf(ckpt, tmp_path / "m.gguf", gguf_type=gguf_type)
    assert report.exact  # bit-exact weights: any difference below is runtime arithmetic
    model, tok = emulated_model(ckpt, report)
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]

    rng = np.random.default_rng(0)
    pairs = rng.integers(0, tok.convert_tokens_to_ids("<|endoftext|>"), (N_TRIALS, 2))  # [trials, 2]
    plain, _ = load_model(ckpt, dtype=torch.float32)  # no emulation: shows the check can fail
    with torch.no_grad():
        want_pairs = model(torch.from_numpy(pairs)).logits.double().numpy()  # [trials, 2, vocab]
        plain_pairs = plain(torch.from_numpy(pairs)).logits.double().numpy()

    llm = _llama(tmp_path / "m.gguf")
    try:
        got_pairs = []
        for p in pairs:
            llm.reset()
            llm.eval(p.tolist())
            got_pairs.append(np.array(llm.scores[:2], dtype=np.float64))
        got_pairs = np.stack(got_pairs)  # [trials, 2, vocab]

        # same tokenizer: pre-tokenizer, merges and special tokens round-trip through the file
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float64)  # [T, vocab]

        llm.reset()
        gen_llama = []
        for tok_id in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            gen_llama.append(int(tok_id))
            if len(gen_llama) == 16:
                break
    finally:
        llm.close()

    def rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.abs(a - b).max(axis=-1) / np.abs(b).max(axis=-1)

    tight = (rel(got_pairs, want_pairs).max(axis=1) < TIGHT).mean()
    assert tight >= 0.5, f"only {tight:.0%} of two-token sequences agree to {TIGHT}"
    assert rel(got_pairs, want_pairs).max() < 5e-2
    assert (rel(got_pairs, plain_pairs).max(axis=1) < TIGHT).mean() < 0.1  # emulation is what matters

    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()  # [T, vocab]
    agree = (got.argmax(axis=1) == want.argmax(axis=1)).mean()
    assert agree >= 0.95, f"argmax agrees at only {agree:.0%} of positions; rel errors {rel(got, want)}"
    assert rel(got, want).max() < 5e-2
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
            eos_token_id=None, pad_token_id=tok.pad_token_id,
        )
    assert gen_llama == out[0, len(ids):].tolist()
