"""Tiny, offline, deterministic test models: a Qwen-style tokenizer and random Qwen3 / Qwen2 / Llama.

Everything here is built locally, without the Hub, so tests can exercise the real loading, training
and export code paths on models that take milliseconds to run:

- :func:`build_tokenizer` trains a byte-level BPE with the ``tokenizers`` library
  (:func:`train_bpe`) on a synthetic corpus generated in code (arithmetic with step-by-step
  reasoning, ``\\boxed{}`` answers, LaTeX, English sentences); the built-in teacher's tokenizer is
  the same builder on its own corpus. Its pipeline is the one of Qwen2 / Qwen3's ``tokenizer.json`` (NFC,
  Split(Qwen2 regex, isolated) + ByteLevel(use_regex=False), ByteLevel decoder, no BOS), so that
  llama.cpp, told ``tokenizer.ggml.pre = "qwen2"``, tokenizes exactly like Hugging Face.
  ``style="gpt2"`` trains a plain GPT-2-style byte-level BPE instead (no normalizer,
  ``ByteLevel(use_regex=True)``: GPT-2's own split; llama.cpp's ``gpt-2``), with the same added
  tokens and chat template.
- :func:`build_tiny_model` saves a randomly initialised causal LM (float32 safetensors, tokenizer,
  chat template, ``generation_config.json``) whose decoder Linear input sizes are multiples of 256,
  so llama.cpp k-quants (``QK_K = 256``) apply to every one of them.
"""

from __future__ import annotations

import functools
import json
import random
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from rqat_deploy.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

__all__ = [
    "ARCHS",
    "CHAT_TEMPLATE",
    "QWEN2_PRETOKENIZE_REGEX",
    "SPECIAL_TOKENS",
    "THINK_TOKENS",
    "TOKENIZER_STYLES",
    "build_tiny_model",
    "build_tokenizer",
    "synthetic_corpus",
    "train_bpe",
]

#: Architectures :func:`build_tiny_model` can build.
ARCHS: tuple[str, ...] = ("qwen3", "qwen2", "llama")

#: The pre-tokenizer regex of Qwen2 / Qwen3 ``tokenizer.json`` (llama.cpp's ``LLAMA_VOCAB_PRE_TYPE_QWEN2``
#: keeps it as a comment beside its case-insensitive rewrite; transformers' ``Qwen2Tokenizer`` uses it).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Control tokens, in Qwen's order (``<|endoftext|>`` = pad, ``<|im_end|>`` = eos), added with
#: ``special=True`` after the BPE vocabulary, as in Qwen's tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: Reasoning delimiters, added after :data:`SPECIAL_TOKENS`. Qwen3 (and DeepSeek-R1-Distill-Qwen)
#: register them with ``special=False``: they are single ids, yet survive
#: ``decode(skip_special_tokens=True)`` and llama.cpp's detokenizer (which drops CONTROL tokens), so
#: thinking lengths can be measured on generated text. We do the same.
THINK_TOKENS: tuple[str, ...] = ("<think>", "</think>")

#: Pre-tokenizer pipelines :func:`train_bpe` can train -> the ``tokenizer_class`` written for it
#: (transformers 5's ``Qwen2Tokenizer`` imposes Qwen's split whatever ``tokenizer.json`` says, so a
#: GPT-2-style file is read with ``GPT2Tokenizer``, which keeps GPT-2's).
TOKENIZER_STYLES: dict[str, str] = {"qwen2": "Qwen2Tokenizer", "gpt2": "GPT2Tokenizer"}

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

#: Qwen3-style chat template: ``<|im_start|>role\ncontent<|im_end|>\n`` per message; assistant
#: messages keep their ``<think>`` reasoning (inline in ``content`` or as ``reasoning_content``);
#: ``add_generation_prompt`` opens an assistant turn and ``enable_thinking=False`` pre-fills an empty
#: ``<think>\n\n</think>\n\n`` block, exactly as Qwen3's template does.
CHAT_TEMPLATE = (
    r"{%- for message in messages -%}"
    r"{%- set content = message['content'] if message['content'] is string else '' -%}"
    r"{%- if message['role'] == 'assistant' and message['reasoning_content'] is defined"
    r" and message['reasoning_content'] is string -%}"
    r"{{- '<|im_start|>assistant\n<think>\n' + message['reasoning_content'].strip('\n')"
    r" + '\n</think>\n\n' + content.lstrip('\n') + '<|im_end|>\n' -}}"
    r"{%- else -%}"
    r"{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}"
    r"{{- '<|im_start|>assistant\n' -}}"
    r"{%- if enable_thinking is defined and enable_thinking is false -%}"
    r"{{- '<think>\n\n</think>\n\n' -}}"
    r"{%- endif -%}"
    r"{%- endif -%}"
)

_VOCAB_SIZE_DEFAULT = 1024
_VOCAB_SIZE_MIN = 512
_VOCAB_SIZE_MAX = 1152  # the synthetic corpus yields ~1158 BPE tokens at min_frequency 2
_CORPUS_SEED = 1234
_CORPUS_DOCS = 2500

_NOUNS = (
    "apple", "banana", "student", "teacher", "number", "triangle", "circle", "square", "garden",
    "river", "train", "market", "book", "library", "problem", "answer", "equation", "function",
    "graph", "integer", "fraction", "angle", "area", "perimeter", "volume", "probability", "coin",
    "dice", "marble", "box", "bag", "ticket", "store", "farmer", "cow", "chicken", "bicycle", "car",
    "mountain", "city", "village", "computer", "program", "sequence", "series", "matrix", "vector",
    "polynomial", "root", "digit", "remainder", "divisor", "prime", "factor", "ratio", "percent",
)
_VERBS = (
    "buys", "sells", "reads", "writes", "counts", "finds", "computes", "measures", "draws", "solves",
    "checks", "divides", "multiplies", "adds", "subtracts", "walks", "runs", "builds", "carries",
    "shares", "collects", "compares", "chooses", "arranges", "paints", "plants", "visits",
)
_ADJECTIVES = (
    "small", "large", "red", "blue", "green", "old", "new", "quick", "careful", "even", "odd",
    "positive", "negative", "equal", "different", "total", "final", "first", "second", "last",
    "bright", "heavy", "light", "simple", "hard", "easy", "rational", "real", "complex",
)
_NAMES = (
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate",
    "Liam", "Maria", "Noah", "Olivia", "Peter", "Quinn", "Rosa", "Sam", "Tom", "Uma", "Victor",
)
_CONNECTIVES = (
    "Wait,", "So", "Therefore,", "Hmm,", "Let me check:", "First,", "Next,", "Then", "Finally,",
    "Alternatively,", "But", "Now", "Hence", "Thus", "Okay,", "Actually,", "In other words,",
)
_LATEX = (
    r"\frac{{{a}}}{{{b}}}", r"\sqrt{{{a}}}", r"x^{{{a}}} + y^{{{b}}}", r"{a} \cdot {b}",
    r"{a} \times {b}", r"\left( {a} + {b} \right)", r"\sum_{{k=1}}^{{{a}}} k",
    r"\binom{{{a}}}{{{b}}}",
    r"\pi r^2", r"\int_0^{{{a}}} x \, dx", r"a_{{n+1}} = a_n + {b}", r"{a} \le x \le {b}",
    r"\log_{{2}} {a}", r"\sin \theta = \frac{{{a}}}{{{b}}}", r"{a} \equiv {b} \pmod{{7}}",
)
_UNICODE_WORDS = ("café", "naïve", "π", "≤", "≥", "√2", "∞", "°C", "é", "Ω", "…", "—", "日本", "数学")


def _sentence(rng: random.Random) -> str:
    """One random English sentence."""
    name = rng.choice(_NAMES)
    verb = rng.choice(_VERBS)
    adj = rng.choice(_ADJECTIVES)
    noun = rng.choice(_NOUNS)
    count = rng.randint(2, 99)
    forms = (
        f"{name} {verb} {count} {adj} {noun}s.",
        f"The {adj} {noun} is next to the {rng.choice(_NOUNS)}.",
        f"How many {noun}s does {name} have left?",
        f"{name} doesn't know what the {adj} {noun} is, but she'll find out.",
        f"We're told that each {noun} costs ${count}.",
        f"It's {adj}, and I've seen that {noun} before!",
    )
    return rng.choice(forms)


def _arithmetic(rng: random.Random) -> str:
    """A worked arithmetic problem with reasoning and a boxed answer."""
    a, b = rng.randint(1, 999), rng.randint(1, 999)
    op, result = rng.choice(((("+", a + b)), ("-", a - b), ("*", a * b)))
    name, noun = rng.choice(_NAMES), rng.choice(_NOUNS)
    steps = [
        f"{name} has {a} {noun}s and the problem asks for {a} {op} {b}.",
        f"{rng.choice(_CONNECTIVES)} {a} {op} {b} = {result}.",
        f"{rng.choice(_CONNECTIVES)} let me verify: {result} is the result.",
        f"The answer is \\boxed{{{result}}}.",
    ]
    return "\n".join(steps)


def _latex(rng: random.Random) -> str:
    """A short passage mixing English and LaTeX math."""
    a, b = rng.randint(1, 64), rng.randint(1, 64)
    expr = rng.choice(_LATEX).format(a=a, b=b)
    return (
        f"{rng.choice(_CONNECTIVES)} consider ${expr}$. "
        f"{rng.choice(_CONNECTIVES)} we get $$ {expr} = {rng.randint(0, 500)} $$\n\n"
        f"So the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} is \\boxed{{{rng.randint(0, 99)}}}."
    )


def _misc(rng: random.Random) -> str:
    """Whitespace, punctuation and non-ASCII text, to exercise the pre-tokenizer's branches."""
    words = [rng.choice(_UNICODE_WORDS + _NOUNS) for _ in range(rng.randint(3, 8))]
    sep = rng.choice((" ", "  ", "\t", "\n", " \n", "\r\n", ", ", "; "))
    return sep.join(words) + rng.choice((".", "!", "?", "...", ":)", " (1)", " [2]", " {3}"))


def synthetic_corpus(n_docs: int = _CORPUS_DOCS, seed: int = _CORPUS_SEED) -> list[str]:
    """Generate the deterministic training corpus of the tiny tokenizer.

    Args:
        n_docs: number of documents (each a few lines).
        seed: seed of the ``random.Random`` that draws the documents.

    Returns:
        ``n_docs`` strings: worked arithmetic with ``\\boxed{}`` answers, LaTeX passages, English
        sentences and whitespace / punctuation / non-ASCII snippets.
    """
    rng = random.Random(seed)
    makers = (_arithmetic, _latex, _misc, lambda r: " ".join(_sentence(r) for _ in range(3)))
    return [makers[i % len(makers)](rng) for i in range(n_docs)]


def _pipeline(style: str) -> tuple[Any, Any]:
    """(normalizer, pre-tokenizer) of a :data:`TOKENIZER_STYLES` style."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if style not in TOKENIZER_STYLES:
        raise ConfigError(f"unknown tokenizer style {style!r}; choose one of {list(TOKENIZER_STYLES)}")
    if style == "gpt2":  # GPT-2's tokenizer.json: no normalizer, ByteLevel splitting with its own regex
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    split = pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return normalizers.NFC(), pre_tokenizers.Sequence([split, byte_level])


def train_bpe(texts: Iterable[str], vocab_size: int, style: str = "qwen2") -> str:
    """Train the byte-level BPE on ``texts`` and return its ``tokenizer.json`` text.

    The pipeline is Qwen2 / Qwen3's (module docstring), or GPT-2's with ``style="gpt2"``. :data:`SPECIAL_TOKENS` and
    :data:`THINK_TOKENS` are cut out of the texts before training, so they never take part in a
    merge, and are added after the BPE vocabulary (the last 5 ids), as in Qwen's tokenizer.

    Args:
        texts: the training corpus (rendered chat text may hold the added tokens).
        vocab_size: total size, the 5 added tokens included.
        style: a key of :data:`TOKENIZER_STYLES`.

    Returns:
        The serialised tokenizer, exactly as ``tokenizers`` writes it.

    Raises:
        ConfigError: an unknown style, or the corpus yields fewer BPE tokens than ``vocab_size`` needs.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    added = SPECIAL_TOKENS + THINK_TOKENS
    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    normalizer, tok.pre_tokenizer = _pipeline(style)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    # Qwen's post-processor: touches offsets only, adds no BOS/EOS.
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    splitter = re.compile("|".join(re.escape(t) for t in added))
    pieces = (piece for text in texts for piece in splitter.split(text) if piece)
    tok.train_from_iterator(pieces, trainer=trainer)
    if tok.get_vocab_size() != vocab_size - len(added):
        raise ConfigError(
            f"the corpus yields only {tok.get_vocab_size()} BPE tokens, fewer than the "
            f"{vocab_size - len(added)} asked for; choose a smaller vocab_size"
        )
    # Added after the BPE vocabulary, as in Qwen (ids vocab_size-5 .. vocab_size-1).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok.to_str()


@functools.lru_cache(maxsize=4)
def _synthetic_tokenizer_json(vocab_size: int, style: str = "qwen2") -> str:
    """:func:`train_bpe` on :func:`synthetic_corpus`, once per process, size and style."""
    return train_bpe(synthetic_corpus(), vocab_size, style)


def _tokenizer_config(vocab_size: int, style: str = "qwen2") -> dict[str, Any]:
    """The ``tokenizer_config.json`` of the tiny tokenizer, shaped like Qwen3's (the class of ``style``)."""
    added = [(t, True) for t in SPECIAL_TOKENS] + [(t, False) for t in THINK_TOKENS]
    first_id = vocab_size - len(added)
    return {
        # Qwen3's class: transformers 4.x maps it to Qwen2TokenizerFast (reads tokenizer.json),
        # transformers 5.x to its tokenizers-backed Qwen2Tokenizer.
        "tokenizer_class": TOKENIZER_STYLES[style],
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(first_id + i): {
                "content": tok,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for i, (tok, special) in enumerate(added)
        },
    }


def _write_tokenizer_files(out_dir: Path, tokenizer_json: str, vocab_size: int, style: str = "qwen2") -> None:
    """Write ``tokenizer.json`` (exactly as ``tokenizers`` serialises it) and ``tokenizer_config.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    text = json.dumps(_tokenizer_config(vocab_size, style), indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(text, encoding="utf-8")


def build_tokenizer(
    out_dir: Path | None = None,
    vocab_size: int = _VOCAB_SIZE_DEFAULT,
    corpus: Sequence[str] | None = None,
    style: str = "qwen2",
) -> PreTrainedTokenizerFast:
    """Build a Qwen-style byte-level BPE tokenizer (deterministic, offline).

    The one builder of the package's tokenizers: the test models' (``corpus=None``: trained on
    :func:`synthetic_corpus`) and the built-in teacher's (:mod:`rqat_deploy.builtin.tiny_reasoner`
    passes its rendered problems and general text). The files are written first
    (``tokenizer.json`` from :func:`train_bpe`, a Qwen3-like ``tokenizer_config.json`` with the chat
    template) and the returned object is loaded from them with ``AutoTokenizer``, so it is exactly
    what every consumer of the model directory gets.

    Args:
        out_dir: directory to write the two tokenizer files into (created if missing); ``None``
            uses a temporary directory that is removed afterwards.
        vocab_size: total number of tokens, the 5 added tokens included (512 .. 1152 with the
            built-in corpus).
        corpus: the texts to train on; ``None`` = :func:`synthetic_corpus` (cached per process).
        style: the pre-tokenizer pipeline, a key of :data:`TOKENIZER_STYLES` (``"gpt2"``: a plain
            GPT-2-style byte-level BPE, read with ``GPT2Tokenizer``).

    Returns:
        A fast tokenizer (``Qwen2Tokenizer`` class, as Qwen3's): eos ``<|im_end|>``, pad
        ``<|endoftext|>``, no bos (none is prepended), the Qwen3-style :data:`CHAT_TEMPLATE`;
        ``len(tokenizer) == vocab_size``, the added tokens taking the last 5 ids.

    Raises:
        ConfigError: ``vocab_size`` outside 512 .. 1152 with the built-in corpus, or more than
            ``corpus`` yields.
    """
    if corpus is None and not _VOCAB_SIZE_MIN <= vocab_size <= _VOCAB_SIZE_MAX:
        raise ConfigError(
            f"vocab_size={vocab_size} is outside {_VOCAB_SIZE_MIN}..{_VOCAB_SIZE_MAX} (what the built-in "
            f"corpus supports); pick a size in that range"
        )
    from transformers import AutoTokenizer

    tokenizer_json = (
        _synthetic_tokenizer_json(vocab_size, style) if corpus is None else train_bpe(corpus, vocab_size, style)
    )
    if out_dir is not None:
        _write_tokenizer_files(Path(out_dir), tokenizer_json, vocab_size, style)
        return AutoTokenizer.from_pretrained(str(out_dir))
    with tempfile.TemporaryDirectory(prefix="rqat-tiny-tok-") as tmp:
        _write_tokenizer_files(Path(tmp), tokenizer_json, vocab_size, style)
        return AutoTokenizer.from_pretrained(tmp)


def _check_sizes(
    arch: str, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, intermediate_size: int
) -> None:
    """Validate the architecture and that every decoder Linear input size is a multiple of 256."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")
    if min(hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size) <= 0:
        raise ConfigError("hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size must be > 0")
    if num_heads % num_kv_heads:
        raise ConfigError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if arch == "qwen2" and num_heads * head_dim != hidden_size:
        raise ConfigError(
            f"qwen2 derives head_dim from hidden_size / num_heads; set head_dim={hidden_size // num_heads}"
            f" or num_heads*head_dim == hidden_size (got {num_heads}*{head_dim} != {hidden_size})"
        )
    # Inputs of q/k/v/gate/up (hidden), o_proj (heads*head_dim) and down_proj (intermediate).
    for name, size in (
        ("hidden_size", hidden_size),
        ("num_heads*head_dim", num_heads * head_dim),
        ("intermediate_size", intermediate_size),
    ):
        if size % 256:
            raise ConfigError(
                f"{name}={size} is not a multiple of 256, so llama.cpp k-quants (QK_K=256) cannot "
                f"quantize the Linear it feeds; use a multiple of 256"
            )


def _make_config(
    arch: str, common: dict[str, Any], head_dim: int, rope_theta: float
) -> PretrainedConfig:
    """The transformers config of ``arch`` (transformers 5 names: ``dtype``, ``rope_parameters``)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=head_dim, attention_bias=False, rope_parameters=rope)
    if arch == "qwen2":
        return Qwen2Config(**common, rope_parameters=rope)
    return LlamaConfig(
        **common, head_dim=head_dim, attention_bias=False, mlp_bias=False, rope_parameters=rope
    )


def _init_weights(model: torch.nn.Module, seed: int, init_std: float) -> None:
    """Overwrite every parameter from one seeded generator, in sorted-name order.

    Matrices and embeddings ~ N(0, init_std); norm weights ~ 1 + N(0, 0.1) (not all ones, so a
    converter that drops or offsets them is caught); biases ~ N(0, 0.1) (clearly non-zero).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):  # tied weights appear once
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(init_std * noise)


def build_tiny_model(
    out_dir: Path,
    arch: str = "qwen3",
    *,
    hidden_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int = 128,
    intermediate_size: int = 512,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    init_std: float = 0.04,
    max_position_embeddings: int = 4096,
    tokenizer_style: str = "qwen2",
) -> Path:
    """Build and save a tiny random causal LM with the tiny tokenizer (deterministic, offline).

    Args:
        out_dir: directory to write (created if missing; files of the same names are overwritten).
        arch: ``"qwen3"``, ``"qwen2"`` (q/k/v biases) or ``"llama"``.
        hidden_size: model width (multiple of 256).
        num_layers: number of decoder blocks.
        num_heads: attention heads.
        num_kv_heads: key/value heads (divides ``num_heads``).
        head_dim: per-head width; ``num_heads * head_dim`` must be a multiple of 256 (for qwen2 it
            must equal ``hidden_size``: Qwen2 derives it).
        intermediate_size: MLP width (multiple of 256).
        vocab_size: embedding rows; ``None`` = the tokenizer length (1024). A larger value pads the
            embedding (like Qwen's padded vocab); the tokenizer keeps 1024 tokens.
        tie_word_embeddings: share ``lm_head`` with ``embed_tokens`` (Qwen3 small models do).
        seed: seed of the weight initialisation; same seed, same weights.
        init_std: standard deviation of matrices and embeddings.
        max_position_embeddings: context length written to the config.
        tokenizer_style: the tokenizer's pre-tokenizer pipeline (:data:`TOKENIZER_STYLES`).

    Returns:
        ``out_dir``, holding ``config.json``, ``generation_config.json``, ``model.safetensors``
        (float32), ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template).

    Raises:
        ConfigError: unknown ``arch``, a size that is not a multiple of 256 where a decoder Linear
            reads it, ``num_heads`` not a multiple of ``num_kv_heads``, or ``vocab_size`` smaller
            than the tokenizer.
    """
    _check_sizes(arch, hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size)
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    n_tok = _VOCAB_SIZE_DEFAULT
    vocab_size = n_tok if vocab_size is None else vocab_size
    if vocab_size < n_tok:
        raise ConfigError(f"vocab_size={vocab_size} is smaller than the tokenizer ({n_tok}); use >= {n_tok}")
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir, n_tok, style=tokenizer_style)  # writes tokenizer.json + tokenizer_config.json
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "initializer_range": init_std,
        "tie_word_embeddings": tie_word_embeddings,
        # Like Qwen3's config.json: bos id = <|endoftext|> (never prepended), eos = <|im_end|>.
        "bos_token_id": pad_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": "float32",
    }
    config = _make_config(arch, common, head_dim, rope_theta=500000.0 if arch == "llama" else 1000000.0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, seed, init_std)
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id
    )
    model.save_pretrained(str(out_dir))
    return out_dir
