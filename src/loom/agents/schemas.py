"""Input and output JSON schemas of an agent: given in the map, or inferred.

Input: the input template's ``{fields}``, each a string or number. Output: when training wrote
JSON answers (the output template renders to a JSON object), each property filled from a row
field becomes a string, and one filled from the snapshot's label column an ``enum`` of the
labels the snapshot counted, so a classifier can only ever answer one of its labels.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from loom.agents.prompting import template_fields
from loom.errors import LoomError

SCALAR = {"type": ["string", "number", "integer", "boolean"]}


def input_schema(fields: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {f: dict(SCALAR) for f in fields},
        "required": list(fields),
    }


def output_schema(
    output_template: str | None, label_field: str | None, labels: list[str]
) -> dict[str, Any] | None:
    """The JSON schema of the answers training taught, or None when they were not JSON."""
    if not output_template:
        return None
    fields = template_fields(output_template)
    sentinel = {f: f"@@loom:{f}@@" for f in fields}
    # A field may sit inside quotes ("{label}") or stand for a JSON value ({ranking}): try both.
    for quoted in itertools.product((True, False), repeat=len(fields)):
        values = {
            f: (sentinel[f] if q else json.dumps(sentinel[f])) for f, q in zip(fields, quoted, strict=True)
        }
        try:
            doc = json.loads(output_template.format(**values))
        except (ValueError, KeyError, IndexError):
            continue
        if isinstance(doc, dict):
            raw = {f for f, q in zip(fields, quoted, strict=True) if not q}
            return _Infer(sentinel, raw, label_field, labels).object(doc)
    return None


class _Infer:
    def __init__(self, sentinel: dict[str, str], raw: set[str], label_field: str | None, labels: list[str]):
        self.sentinel, self.raw, self.label_field, self.labels = sentinel, raw, label_field, labels

    def object(self, doc: dict[str, Any]) -> dict[str, Any]:
        props = {key: self.value(value) for key, value in doc.items()}
        return {"type": "object", "properties": props, "required": list(doc), "additionalProperties": False}

    def value(self, value: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            return self.object(value)
        if isinstance(value, list):
            return {"type": "array", "items": self.value(value[0])} if len(value) == 1 else {"type": "array"}
        if not isinstance(value, str):
            return {"const": value}
        field = next((f for f, s in self.sentinel.items() if value == s), None)
        if field is not None and field in self.raw:  # {field} stood for a whole JSON value
            if field == self.label_field and self.labels:
                return {"enum": sorted((_json_or_str(x) for x in self.labels), key=json.dumps)}
            return {}
        if field is not None and field == self.label_field and self.labels:
            return {"type": "string", "enum": sorted(self.labels)}
        if any(s in value for s in self.sentinel.values()):
            return {"type": "string"}
        return {"const": value}


def _json_or_str(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def check_schema(schema: dict[str, Any], where: str) -> Draft202012Validator:
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise LoomError(
            f"{where}: not a valid JSON schema ({exc.message}); fix it in the agent map"
        ) from None
    return Draft202012Validator(schema)


def first_error(validator: Draft202012Validator, value: Any, what: str) -> str | None:
    """A message naming the field that does not fit, or None when ``value`` fits."""
    error = next(iter(sorted(validator.iter_errors(value), key=lambda e: list(e.path))), None)
    if error is None:
        return None
    path = ".".join(str(p) for p in error.absolute_path)
    return f"{what}.{path}: {error.message}" if path else f"{what}: {error.message}"
