"""Chat rendering, one home for prompts (bench) and training conversations.

- :func:`render_prompt` renders one user turn and the generation prompt from a raw Jinja chat
  template (a GGUF file's ``tokenizer.chat_template``, an ONNX export's, a tokenizer's) through
  transformers' ``render_jinja_template`` (the renderer ``apply_chat_template`` itself uses), or
  an equally configured sandboxed Jinja environment when transformers lacks it.
- :func:`split_conversation` splits a whole training conversation into prompt (with the generation
  prompt) and completion with the tokenizer's own ``apply_chat_template``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from rqat_deploy.errors import ConfigError, DataError

__all__ = ["Rendered", "ends_in_thinking", "render_prompt", "split_conversation"]


@dataclass(frozen=True)
class Rendered:
    """A record as text: ``prompt + completion`` is the full rendering (``prompt`` is ``""`` for text)."""

    prompt: str
    completion: str
    kind: str  # "chat" | "text"

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def _render_with_jinja(template: str, messages: list[dict[str, str]], **kwargs: Any) -> str:
    """Fallback renderer (transformers without ``render_jinja_template``): same Jinja settings."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ConfigError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **kwargs)


def render_prompt(
    template: str | None,
    user_message: str,
    *,
    special_tokens: dict[str, str | None] | None = None,
    enable_thinking: bool = True,
) -> str:
    """Render one user turn and the assistant generation prompt with a chat template.

    Args:
        template: the Jinja chat template; None or empty returns ``user_message`` unchanged (a base
            model without a template).
        user_message: the user's message.
        special_tokens: ``bos_token``, ``eos_token``... strings the template may use.
        enable_thinking: passed to the template (Qwen3 reads it).

    Returns:
        The prompt text.

    Raises:
        ConfigError: when the template fails to render.
    """
    if not template:
        return user_message
    messages = [{"role": "user", "content": user_message}]
    kwargs = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    kwargs["enable_thinking"] = enable_thinking
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        render_jinja_template = None
    try:
        if render_jinja_template is not None:
            rendered, _ = render_jinja_template(
                conversations=[messages], chat_template=template, add_generation_prompt=True, **kwargs
            )
            return rendered[0]
        return _render_with_jinja(template, messages, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"the model's chat template failed to render ({type(exc).__name__}: {exc})") from exc


def ends_in_thinking(prompt: str) -> bool:
    """Whether a rendered prompt leaves the model inside ``<think>`` (the template opened it)."""
    tail = prompt.rstrip()
    return tail.endswith("<think>")


def _probe(content: str) -> str:
    """A snippet of the assistant content that must survive rendering (end of the trace or answer)."""
    if "</think>" in content:
        trace = content.split("</think>", 1)[0].split("<think>")[-1].strip()
        if trace:
            return trace[-32:]
    return content.strip()[-32:]


def split_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> Rendered:
    """Split a conversation into prompt (with generation prompt) and completion text.

    The completion is the fully rendered conversation minus the prompt prefix. When the template
    does not render the conversation as prompt + completion, or drops the reasoning trace of the
    last assistant turn (e.g. templates that strip ``<think>`` from history), the completion is
    built as the assistant content followed by the EOS token instead.

    Raises:
        DataError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template, so conversation records cannot be rendered: use a chat "
            "model's tokenizer, or plain-text records"
        )
    prefix = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    content = messages[-1]["content"]
    if full.startswith(prefix) and _probe(content) in full[len(prefix):]:
        return Rendered(prefix, full[len(prefix):], "chat")
    completion = content
    for opener in ("<think>\n", "<think>"):
        if prefix.endswith(opener) and completion.startswith(opener):
            completion = completion[len(opener):]
            break
    return Rendered(prefix, completion + (tokenizer.eos_token or ""), "chat")
