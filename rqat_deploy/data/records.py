"""Training records: how each kind of record is recognised and rendered to text.

Records are recognised by their fields (names configurable with :class:`FieldMap`):

| record kind      | fields (defaults)                                       | rendered as                   |
|------------------|---------------------------------------------------------|-------------------------------|
| ShareGPT         | ``conversations``: ``[{from, value}]``                  | the tokenizer's chat template |
| OpenAI           | ``messages``: ``[{role, content}]``                     | the tokenizer's chat template |
| prompt/response  | ``prompt`` / ``question`` / ``problem`` / ``instruction`` + ``response`` / ``completion`` / ``output`` / ``solution`` (+ optional ``system``, ``reasoning_content`` / ``reasoning`` / ``thinking``) | chat template, one user turn + one assistant turn |
| plain text       | ``text``                                                | raw text (pre-training data)  |

A reasoning trace given separately (``reasoning_content`` of a message, or a ``reasoning`` field) is
put inline as ``<think>\\n...\\n</think>\\n\\n`` before the answer, so that every chat template keeps it.
A record that has the fields but cannot be trained on (no assistant turn, an empty completion...)
raises :class:`UnusableRecord`, which the samplers count and skip.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from rqat_deploy.data.chat import Rendered, split_conversation
from rqat_deploy.errors import DataError

__all__ = ["FieldMap", "UnusableRecord", "record_kind", "record_messages", "render_record"]

_ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class FieldMap:
    """Field names that identify each record kind; the first name present in a record is used.

    Attributes:
        conversations: ShareGPT list of ``{from, value}`` turns (``role``/``content`` accepted too).
        messages: OpenAI list of ``{role, content}`` messages (``from``/``value`` accepted too).
        prompt: the user prompt of a prompt/response record.
        response: the assistant answer of a prompt/response record.
        reasoning: an optional separate reasoning trace of a prompt/response record.
        system: an optional system prompt of a prompt/response record.
        text: plain (pre-training) text.
    """

    conversations: tuple[str, ...] = ("conversations",)
    messages: tuple[str, ...] = ("messages",)
    prompt: tuple[str, ...] = ("prompt", "question", "problem", "instruction")
    response: tuple[str, ...] = ("response", "completion", "output", "solution")
    reasoning: tuple[str, ...] = ("reasoning_content", "reasoning", "thinking")
    system: tuple[str, ...] = ("system",)
    text: tuple[str, ...] = ("text",)

    @classmethod
    def parse(cls, value: str | Mapping[str, str | Sequence[str]] | None) -> "FieldMap":
        """Build from ``"prompt=question,response=gt_cot"`` or a mapping (unnamed kinds keep their defaults).

        Raises:
            DataError: an unknown kind name.
        """
        if value is None or isinstance(value, FieldMap):
            return value or cls()
        if isinstance(value, str):
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise DataError(f"field map {value!r} must look like 'prompt=question,response=answer'")
            value = {k.strip(): v.strip() for k, v in pairs}
        kinds = [f.name for f in dataclasses.fields(cls)]
        kw: dict[str, tuple[str, ...]] = {}
        for k, v in value.items():
            if k not in kinds:
                raise DataError(f"unknown record field kind {k!r}; known: {kinds}")
            kw[k] = (v,) if isinstance(v, str) else tuple(v)
        return cls(**kw)

    def first(self, record: Mapping[str, Any], kind: str) -> str | None:
        """The first of ``kind``'s field names present (and not ``None``) in ``record``."""
        return next((n for n in getattr(self, kind) if record.get(n) is not None), None)


class UnusableRecord(Exception):
    """A record that is well-formed but unusable (counted in the data report under ``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def record_kind(record: Mapping[str, Any], fields: FieldMap) -> str:
    """``"conversations"``, ``"messages"``, ``"prompt_response"`` or ``"text"``.

    Raises:
        DataError: the record has none of the configured fields; the message lists the fields found.
    """
    if fields.first(record, "conversations"):
        return "conversations"
    if fields.first(record, "messages"):
        return "messages"
    if fields.first(record, "prompt") and fields.first(record, "response"):
        return "prompt_response"
    if fields.first(record, "text"):
        return "text"
    found = sorted(record)
    want = (
        f"conversations={list(fields.conversations)}, messages={list(fields.messages)}, "
        f"prompt={list(fields.prompt)} + response={list(fields.response)}, text={list(fields.text)}"
    )
    raise DataError(
        f"record has none of the expected fields ({want}); fields found: {found}. "
        "Name the fields with the field map, e.g. 'prompt=question,response=solution'"
    )


def _inline_reasoning(content: str, reasoning: Any) -> str:
    if not isinstance(reasoning, str) or not reasoning.strip() or "</think>" in content:
        return content
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"


def _turns(turns: Any) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise UnusableRecord("empty_conversation")
    messages = []
    for t in turns:
        if not isinstance(t, Mapping):
            raise UnusableRecord("malformed_turn")
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        if not isinstance(role, str) or not isinstance(content, str):
            raise UnusableRecord("malformed_turn")
        role = _ROLE_MAP.get(role.lower(), role.lower())
        messages.append({"role": role, "content": _inline_reasoning(content, t.get("reasoning_content"))})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()  # trailing user turns have no completion to train on
    if not messages:
        raise UnusableRecord("no_assistant_turn")
    if all(m["role"] == "assistant" for m in messages):
        raise UnusableRecord("no_prompt_turn")
    if not messages[-1]["content"].strip():
        raise UnusableRecord("empty_completion")
    return messages


def record_messages(record: Mapping[str, Any], fields: FieldMap, kind: str) -> list[dict[str, str]]:
    """The chat messages of a conversation or prompt/response record (reasoning inlined)."""
    if kind in ("conversations", "messages"):
        return _turns(record[fields.first(record, kind)])  # type: ignore[index]
    prompt, response = record[fields.first(record, "prompt")], record[fields.first(record, "response")]  # type: ignore[index]
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise UnusableRecord("non_string_prompt_or_response")
    if not response.strip():
        raise UnusableRecord("empty_completion")
    rfield, sfield = fields.first(record, "reasoning"), fields.first(record, "system")
    messages = []
    if sfield and isinstance(record[sfield], str) and record[sfield].strip():
        messages.append({"role": "system", "content": record[sfield]})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _inline_reasoning(response, record[rfield] if rfield else None)})
    return messages


def render_record(tokenizer: Any, record: Mapping[str, Any], fields: FieldMap, kind: str) -> Rendered:
    """Render one record of ``kind`` (see :func:`record_kind`) to prompt and completion text."""
    if kind == "text":
        text = record[fields.first(record, "text")]  # type: ignore[index]
        if not isinstance(text, str):
            raise UnusableRecord("non_string_text")
        if not text.strip():
            raise UnusableRecord("empty_text")
        return Rendered("", text, "text")
    return split_conversation(tokenizer, record_messages(record, fields, kind))
