"""Feedback into training data: the corrected answers posted on an agent's responses
(``POST /v1/feedback``) become training rows in that agent's own input format.

A row is the logged input payload's fields, the corrected answer and ``id`` = the response id
(``loom train`` uses it as the example id). Where the answer goes depends on the output template
the answering adapter was trained with (its training summary in the store):

- **template mode**: every correction maps back into that template's output fields (the same
  template for every row). ``{"intent": "{label}"}`` and a correction ``{"intent": "PlayMusic"}``
  (or just ``PlayMusic``) give ``label: PlayMusic``; ``{answer} <<SRC:squad:{passage_id}>>`` and
  ``Paris`` (or ``Paris <<SRC:squad:p1>>``) give ``answer: Paris``. Train with the agent's usual
  config: rows carry the fields its templates use.
- **answer mode** otherwise (no template known, versions trained with different templates, or a
  correction that does not fit the template unambiguously): each row carries ``answer``, the
  whole text the model should write. Train with ``format: fields``, the agent's
  ``input_template`` and ``output_template: "{answer}"`` (:attr:`Export.config` says so).

A plain correction (not the template's full text) is taken as the value of the template's one
output field only when the template has exactly one and the correction contains none of the
template's own text (so ``Paris <<SRC:squad:p2>>`` citing another passage is not wrapped twice).
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loom.errors import LoomError
from loom.serve.requestlog import Feedback, LoggedResponse, RequestLog

Row = dict[str, Any]
ANSWER_FIELD = "answer"


@dataclass
class Correction:
    response: LoggedResponse
    feedback: Feedback
    payload: Row  # the logged agent input

    @property
    def response_id(self) -> str:
        return self.response.response_id

    @property
    def text(self) -> str:
        """The corrected answer as the model should write it (JSON answers as compact JSON)."""
        answer = self.feedback.corrected_answer
        return answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)


@dataclass(frozen=True)
class Templates:
    """What the answering adapter was trained with (None: unknown)."""

    system_prompt: str | None = None
    input_template: str | None = None
    output_template: str | None = None


@dataclass
class Export:
    agent: str
    rows: list[Row]
    mode: Literal["template", "answer"]
    config: dict[str, Any]  # the training config keys these rows need (format, templates)
    skipped: dict[str, int] = field(default_factory=dict)  # why -> how many corrections
    notes: list[str] = field(default_factory=list)
    path: Path | None = None


def corrections(log: RequestLog, agent: str) -> tuple[list[Correction], dict[str, int]]:
    """The latest correction on each of ``agent``'s responses that has one (in the order they
    were first corrected), and how many were left out, by reason."""
    latest: dict[str, Feedback] = {}
    for fb in log.feedback(agent):
        if fb.corrected_answer is not None:
            latest[fb.response_id] = fb
    found: list[Correction] = []
    skipped: dict[str, int] = {}
    for rid, fb in latest.items():
        response = log.get(rid)
        if response is None:
            why = "the response is no longer in the log"
        elif response.input is None:
            why = "no input logged (the server ran with --log-prompts off)"
        elif response.route.startswith("/v1/agents/") and isinstance(response.input, dict):
            found.append(Correction(response, fb, response.input))
            continue
        else:
            why = f"not an agent payload (the request came through {response.route})"
        skipped[why] = skipped.get(why, 0) + 1
    return found, skipped


def trained_templates(store: Any, version: str | None, cache: dict[str, Templates]) -> Templates:
    """The templates adapter ``version`` was trained with, from its training summary."""
    if store is None or version is None:
        return Templates()
    if version not in cache:
        from loom.agents.prompting import trained_input_template

        try:
            summary = store.resolve(version).manifest.training_summary or {}
        except LoomError:
            summary = {}
        prompting = summary.get("prompting") or {}
        cache[version] = Templates(
            prompting.get("system_prompt"),
            trained_input_template(prompting) if prompting else None,
            prompting.get("output_template"),
        )
    return cache[version]


def unfill(template: str, text: str, payload: Row) -> dict[str, str] | None:
    """The output fields that make ``template.format(**payload, **fields) == text``, or None
    when there are none or more than one way to split ``text``."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        return None
    found = []
    for lazy in (True, False):
        pattern, seen = "", set()
        for literal, name, spec, conv in parts:
            pattern += re.escape(literal)
            if name is None:
                continue
            if spec or conv or not name.isidentifier():
                return None  # {x!r}, {x:>4}, {x.y}: not inverted
            if name in payload:
                pattern += re.escape(str(payload[name]))
            elif name in seen:
                pattern += f"(?P={name})"
            else:
                seen.add(name)
                pattern += f"(?P<{name}>.*{'?' if lazy else ''})"
        if not seen:
            return None
        match = re.fullmatch(pattern, text, re.DOTALL)
        found.append(match.groupdict() if match else None)
    fields = found[0]
    if fields is None or fields != found[1] or template.format(**{**payload, **fields}) != text:
        return None
    return fields


def output_fields(template: str, payload: Row) -> list[str]:
    names = [n for _t, n, _s, _c in string.Formatter().parse(template) if n]
    return [n for n in dict.fromkeys(names) if n not in payload]


def map_answer(template: str, correction: Correction) -> dict[str, str] | None:
    """The template's output fields for this correction (see the module's doc), or None."""
    payload = correction.payload
    fields = unfill(template, correction.text, payload)
    if fields is not None:
        return fields
    answer = correction.feedback.corrected_answer
    outputs = output_fields(template, payload)
    literals = [t.strip() for t, _n, _s, _c in string.Formatter().parse(template) if t.strip()]
    if len(outputs) == 1 and isinstance(answer, str) and not any(t in answer for t in literals):
        return {outputs[0]: answer}
    return None


def export_feedback(log: RequestLog, agent: str, *, store: Any = None, out: Path | None = None) -> Export:
    """``agent``'s corrections as training rows (written to ``out`` as JSONL when given).
    ``store`` is where the answering adapters' training summaries are read from."""
    found, skipped = corrections(log, agent)
    cache: dict[str, Templates] = {}
    templates = [trained_templates(store, c.response.model_version.get("adapter"), cache) for c in found]
    mapped = [
        map_answer(t.output_template, c) if t.output_template else None
        for t, c in zip(templates, found, strict=True)
    ]
    notes: list[str] = []
    distinct = {t.output_template for t in templates}
    if found and len(distinct) == 1 and None not in distinct and all(m is not None for m in mapped):
        rows = [{**c.payload, **(m or {}), "id": c.response_id} for c, m in zip(found, mapped, strict=True)]
        mode: Literal["template", "answer"] = "template"
        output_template = templates[0].output_template
    else:
        rows = [_answer_row(c, t, m) for c, t, m in zip(found, templates, mapped, strict=True)]
        mode, output_template = "answer", "{" + ANSWER_FIELD + "}"
        notes += _why_answer_mode(found, templates, mapped)
    first = templates[0] if templates else Templates()
    config = {
        "format": "fields",
        "system_prompt": first.system_prompt,
        "input_template": first.input_template,
        "output_template": output_template,
    }
    if found and len({(t.system_prompt, t.input_template) for t in templates}) > 1:
        notes.append(
            "the corrected responses came from versions trained with different prompts; the first's shown"
        )
    if out is not None:
        from loom.agents.examples import write_jsonl

        write_jsonl(out, rows)
    return Export(agent, rows, mode, config, skipped, notes, out)


def _answer_row(c: Correction, t: Templates, fields: dict[str, str] | None) -> Row:
    template = t.output_template
    text = c.text if template is None or fields is None else template.format(**{**c.payload, **fields})
    return {**c.payload, ANSWER_FIELD: text, "id": c.response_id}


def _why_answer_mode(found: list[Correction], templates: list[Templates], mapped: list[Any]) -> list[str]:
    if not found:
        return []
    if any(t.output_template is None for t in templates):
        return ["some answering versions record no output template (no adapter, or not `loom train`ed)"]
    if len({t.output_template for t in templates}) > 1:
        return ["the corrected responses came from versions trained with different output templates"]
    bad = [c.response_id for c, m in zip(found, mapped, strict=True) if m is None]
    return [f"corrections that do not fit the output template unambiguously: {', '.join(bad[:5])}"]


def feedback_table(log: RequestLog, agent: str | None = None) -> list[Row]:
    """Every feedback (on ``agent``'s responses), with what it was about, for ``loom feedback ls``."""
    out = []
    for fb in log.feedback(agent):
        response = log.get(fb.response_id)
        mv = response.model_version if response else {}
        out.append(
            {
                "time": fb.time,
                "feedback_id": fb.feedback_id,
                "response_id": fb.response_id,
                "agent": response.agent if response else None,
                "model_version": mv.get("adapter") or mv.get("base"),
                "rating": fb.rating,
                "corrected_answer": fb.corrected_answer,
                "comment": fb.comment,
            }
        )
    return out
