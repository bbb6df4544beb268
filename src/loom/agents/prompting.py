"""Prompt parity: an agent sends exactly the prompt its adapter was trained on.

The adapter's ``training_summary`` records the system prompt, the input and output templates
and the chat template's hash; the prompt is rebuilt from them with the training renderer
(``loom.train.tokenize.Renderer``), so the tokens match training's prompt tokens one for one.
A map may override the prompt; the override is reported in every result's warnings.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any

from loom.agents.spec import AgentEntry
from loom.errors import LoomError
from loom.train.tokenize import DEFAULT_PROMPT_TEMPLATE, Renderer

DEFAULT_INPUT_TEMPLATE = "{text}"
FREE_TEXT = r"[^<\n]+"  # a free-text part of a templated answer: one line, up to a citation marker


@dataclass(frozen=True)
class AgentPrompt:
    system: str | None
    input_template: str
    output_template: str | None = None  # how training wrote answers (schema inference)
    prompt_template: str | None = None  # None: the base's chat template
    chat_template_sha256: str | None = None  # the chat template training rendered with
    source: str = "map"  # "training" (the adapter's summary) or "map"
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fields(self) -> list[str]:
        """The payload fields the input template uses, in order of first use."""
        return template_fields(self.input_template)

    def user_message(self, payload: dict[str, Any]) -> str:
        missing = [f for f in self.fields if f not in payload]
        if missing:
            raise LoomError(f"input: field {missing[0]!r} is missing; the agent's input template needs it")
        return self.input_template.format(**payload)

    def messages(self, payload: dict[str, Any]) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.user_message(payload)}]

    def answer_pattern(self, payload: dict[str, Any]) -> str | None:
        """A regex for a text answer that training wrote with an output template using input
        fields (``{answer} <<SRC:squad:{passage_id}>>``): those parts are the payload's own
        values, the rest free text. None when the template copies no input field."""
        if not self.output_template:
            return None
        parts = list(string.Formatter().parse(self.output_template))
        inputs = set(self.fields)
        if not any(f and f in inputs for _t, f, _s, _c in parts):
            return None
        pattern = ""
        for literal, name, _spec, _conv in parts:
            pattern += re.escape(literal)
            if name:
                pattern += re.escape(str(payload[name])) if name in inputs else FREE_TEXT
        return pattern

    def token_ids(self, tokenizer: Any, payload: dict[str, Any]) -> list[int]:
        text = Renderer(tokenizer, self.prompt_template).prompt(self.messages(payload))
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def template_fields(template: str) -> list[str]:
    try:
        names = [f for _t, f, _s, _c in string.Formatter().parse(template) if f]
    except ValueError as exc:
        raise LoomError(
            f"template {template!r} is not a valid format string ({exc}); double literal braces"
        ) from None
    return list(dict.fromkeys(n.split(".")[0].split("[")[0] for n in names))


def agent_prompt(
    name: str, entry: AgentEntry, summary: dict[str, Any] | None, base_template_sha: str | None
) -> AgentPrompt:
    """The prompt ``name`` runs with: its adapter's training prompt (refused when the base's chat
    template changed since training, unless the map allows it) or, without an adapter, the map's."""
    if entry.adapter is None:
        return AgentPrompt(entry.system, entry.input_template or DEFAULT_INPUT_TEMPLATE)
    prompting = (summary or {}).get("prompting") or {}
    trained_sha = ((summary or {}).get("base") or {}).get("chat_template_sha256")
    uses_chat = bool(prompting.get("uses_chat_template", True))
    override = entry.prompt
    warnings: list[str] = []
    if not prompting:
        warnings.append(
            f"adapter {entry.adapter} records no training prompt (not trained by `loom train`): "
            "the map's prompt is used, else the payload's text as is"
        )
    if uses_chat and prompting and trained_sha != base_template_sha:
        problem = (
            f"agent {name!r}: adapter {entry.adapter} was trained under chat template {_short(trained_sha)}, "
            f"but the served base has {_short(base_template_sha)}"
        )
        if override is None or not override.allow_template_mismatch:
            raise LoomError(
                f"{problem}; its answers would not match training. Retrain the adapter on this base, "
                'or set "prompt": {"allow_template_mismatch": true} for this agent in the map'
            )
        warnings.append(f"{problem} (allowed by the map)")
    system = prompting.get("system_prompt")
    template = trained_input_template(prompting)
    if override is not None and override.system is not None and override.system != system:
        warnings.append("system prompt overridden by the map (the adapter was trained with another)")
        system = override.system
    if override is not None and override.input_template is not None and override.input_template != template:
        warnings.append("input template overridden by the map (the adapter was trained with another)")
        template = override.input_template
    return AgentPrompt(
        system,
        template,
        prompting.get("output_template"),
        None if uses_chat else (prompting.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE),
        trained_sha,
        "training" if not warnings else "map",
        tuple(warnings),
    )


def trained_input_template(prompting: dict[str, Any]) -> str:
    """The user message training built from a row: ``--input-template`` applies only to fields
    rows (those with an output template); prompt/response and Alpaca rows were used as given."""
    if prompting.get("output_template") or prompting.get("format") == "fields":
        return str(prompting.get("input_template") or DEFAULT_INPUT_TEMPLATE)
    return {"prompt_response": "{prompt}", "alpaca": "{instruction}"}.get(
        str(prompting.get("format")), DEFAULT_INPUT_TEMPLATE
    )


def _short(sha: str | None) -> str:
    return f"sha256 {sha[:12]}" if sha else "none"
