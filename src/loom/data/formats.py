"""Row formats and their validation.

Supported rows (auto-detected per row, or forced with ``--format``):

- ``messages``: ``{"messages": [{"role", "content"}, ...], "system"?: str}`` (OpenAI style)
- ``prompt_response``: ``{"prompt": str, "response": str}`` (``completion`` accepted for ``response``)
- ``alpaca``: ``{"instruction": str, "input"?: str, "output": str}``
- ``text``: ``{"text": str}`` (every token is trained)
- ``fields``: any row, with ``--input-template``/``--output-template`` building the
  prompt and response from its fields (e.g. SNIPS ``{"text", "label"}``).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from loom.errors import LoomError


class RowFormat(str, Enum):
    auto = "auto"
    messages = "messages"
    prompt_response = "prompt_response"
    alpaca = "alpaca"
    text = "text"
    fields = "fields"


ROLES = {"system", "user", "assistant", "tool"}


class RowError(LoomError):
    """A bad row: names the file, the line and the field."""

    def __init__(self, where: str, field_name: str | None, problem: str) -> None:
        self.where, self.field_name, self.problem = where, field_name, problem
        fld = f" field {field_name!r}:" if field_name else ""
        super().__init__(f"{where}:{fld} {problem} (fix the row, or pass --skip-bad-rows to skip it)")


@dataclass
class Example:
    """One training example, format-independent: chat messages, or raw text."""

    id: str
    source: str
    messages: list[dict[str, str]] = field(default_factory=list)
    text: str | None = None  # set for the ``text`` format only
    label: str | None = None


@dataclass(frozen=True)
class Templates:
    """How ``fields`` rows become prompt/response text."""

    input_template: str | None = None
    output_template: str | None = None
    system_prompt: str | None = None


def detect(row: dict[str, Any]) -> RowFormat:
    if "messages" in row:
        return RowFormat.messages
    if "prompt" in row and ("response" in row or "completion" in row):
        return RowFormat.prompt_response
    if "instruction" in row and "output" in row:
        return RowFormat.alpaca
    if "text" in row:
        return RowFormat.text
    return RowFormat.auto


def _need_str(row: dict[str, Any], key: str, where: str, allow_empty: bool = False) -> str:
    if key not in row:
        raise RowError(where, key, "missing")
    value = row[key]
    if not isinstance(value, str):
        raise RowError(where, key, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(where, key, "is empty")
    return value


def _fill(template: str, row: dict[str, Any], where: str, flag: str) -> str:
    names = {f for _t, f, _s, _c in string.Formatter().parse(template) if f}
    missing = sorted(n for n in names if n not in row)
    if missing:
        raise RowError(where, missing[0], f"missing, and {flag} uses {{{missing[0]}}}")
    return template.format(**row)


def _chat(system: str | None, prompt: str, response: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def to_example(
    row: Any, fmt: RowFormat, templates: Templates, where: str, row_id: str, label_field: str = "label"
) -> Example:
    """Validate one parsed JSON row and turn it into an Example (raises RowError)."""
    if not isinstance(row, dict):
        raise RowError(where, None, f"expected a JSON object, got {type(row).__name__}")
    if templates.output_template and fmt is RowFormat.auto:
        fmt = RowFormat.fields
    if fmt is RowFormat.auto:
        fmt = detect(row)
        if fmt is RowFormat.auto:
            raise RowError(
                where,
                None,
                f"cannot tell the format from fields {sorted(row)}: expected messages, prompt+response, "
                f"instruction+output or text (or give --input-template/--output-template)",
            )
    label = row.get(label_field)
    ex = Example(
        id=str(row.get("id", row_id)),
        source=where.rsplit(":", 1)[0],
        label=str(label) if label is not None else None,
    )
    system = templates.system_prompt
    if fmt is RowFormat.text:
        ex.text = _need_str(row, "text", where)
    elif fmt is RowFormat.prompt_response:
        key = "response" if "response" in row else "completion"
        ex.messages = _chat(system, _need_str(row, "prompt", where), _need_str(row, key, where))
    elif fmt is RowFormat.alpaca:
        prompt = _need_str(row, "instruction", where)
        extra = row.get("input", "")
        if not isinstance(extra, str):
            raise RowError(where, "input", f"expected a string, got {type(extra).__name__}")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        ex.messages = _chat(system, prompt, _need_str(row, "output", where))
    elif fmt is RowFormat.fields:
        if not templates.output_template:
            raise LoomError("--format fields needs --output-template (and usually --input-template)")
        prompt = _fill(templates.input_template or "{text}", row, where, "--input-template")
        response = _fill(templates.output_template, row, where, "--output-template")
        if not response.strip():
            raise RowError(where, None, "--output-template gives an empty response")
        ex.messages = _chat(system, prompt, response)
    else:
        ex.messages = _messages(row, where, system)
    return ex


def _messages(row: dict[str, Any], where: str, default_system: str | None) -> list[dict[str, str]]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise RowError(where, "messages", "expected a non-empty list of {role, content}")
    out: list[dict[str, str]] = []
    system = row.get("system", default_system)
    if system is not None:
        if not isinstance(system, str):
            raise RowError(where, "system", f"expected a string, got {type(system).__name__}")
        if not (isinstance(msgs[0], dict) and msgs[0].get("role") == "system"):
            out.append({"role": "system", "content": system})
    for i, m in enumerate(msgs):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RowError(where, f, "expected an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise RowError(where, f"{f}.role", f"{role!r} is not one of {sorted(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise RowError(where, f"{f}.content", f"expected a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise RowError(where, f"{f}.content", "assistant message is empty (nothing to learn)")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError(where, "messages", "has no assistant message (nothing to learn)")
    return out
