"""Golden sets: the rows an agent is evaluated on, frozen in the store like training snapshots.

A golden file is JSON Lines, one row an object::

    {"id": "q1", "input": {"text": "play jazz"}, "expected": {"intent": "PlayMusic"},
     "citation": null, "type": "STATIC", "category": "PlayMusic"}

``expected`` holds answer strings (``["Paris", "the city of Paris"]``) or expected JSON fields;
``citation`` the source ids a correct answer cites; ``type`` is STATIC (answerable) or DYNAMIC
(the agent must defer or refuse). ``import_golden`` validates every row, reporting each bad one
as ``file:line: field: problem; fix``, and publishes the normalised rows as a dataset artifact
tagged ``golden``; ``load_golden`` reads one back, checked against its manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from loom.data.snapshot import ROW_IDS, describe_rows
from loom.errors import IntegrityError, LoomError
from loom.store.manifest import Manifest, Source
from loom.store.store import Store

GOLDEN_FILE = "golden.jsonl"
GOLDEN_TAG = "golden"
MAX_REPORTED = 20  # problems listed in one error; the rest are counted
FIELDS = ("id", "input", "expected", "citation", "type", "category")
FIXES = {
    "id": "give a unique string (or leave it out: the row is then named file:line)",
    "input": 'give the agent\'s payload as a JSON object, e.g. {"text": "play some jazz"}',
    "expected": 'give answer strings (["Paris"]) or expected JSON fields ({"intent": "PlayMusic"})',
    "citation": 'give the source ids a correct answer cites, e.g. ["squad:Rhine#p38"], or null',
    "type": 'use "STATIC" (answerable) or "DYNAMIC" (the agent must defer or refuse)',
    "category": "give a non-empty string (used to break metrics down)",
}


class GoldenRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    input: dict[str, Any]
    expected: list[str] | dict[str, Any] | None = None
    citation: list[str] | None = None
    type: Literal["STATIC", "DYNAMIC"] = "STATIC"
    category: str = "all"

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        if isinstance(v, str) and not v.strip():
            raise ValueError("is empty")
        return v

    @field_validator("input")
    @classmethod
    def _input(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("is an empty object")
        return v

    @field_validator("expected", mode="before")
    @classmethod
    def _expected(cls, v: Any) -> Any:
        if isinstance(v, str):  # one answer: normalised to a list
            v = [v]
        if isinstance(v, list) and not (v and all(isinstance(a, str) for a in v)):
            raise ValueError("must be a non-empty list of strings")
        if isinstance(v, dict) and not v:
            raise ValueError("is an empty object")
        if v is not None and not isinstance(v, (list, dict)):
            raise ValueError(f"is a {type(v).__name__}, not a list of strings or an object")
        return v

    @field_validator("citation", mode="before")
    @classmethod
    def _citation(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if v is not None and not (isinstance(v, list) and v and all(isinstance(c, str) and c for c in v)):
            raise ValueError("must be a non-empty list of source ids (strings)")
        return v

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("category")
    @classmethod
    def _category(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty")
        return v

    @model_validator(mode="after")
    def _gradable(self) -> GoldenRow:
        if self.type == "STATIC" and self.expected is None:
            raise ValueError("expected: a STATIC row needs expected answers; add them, or mark it DYNAMIC")
        return self


@dataclass
class GoldenSet:
    ref: str  # name@version
    sha256: str  # the dataset's content_sha256
    rows: list[GoldenRow]


class GoldenFileError(LoomError):
    """A golden file with bad rows; ``problems`` holds one ``file:line: field: problem; fix`` each."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:MAX_REPORTED]
        more = len(problems) - len(shown)
        head = problems[0] if len(problems) == 1 else f"{path}: {len(problems)} bad rows:"
        body = [] if len(problems) == 1 else ["  " + p for p in shown]
        tail = [f"  ... and {more} more"] if more else []
        super().__init__("\n".join([head, *body, *tail]))


# ------------------------------------------------------------------ reading
def _row_problems(where: str, exc: ValidationError) -> list[str]:
    out: list[str] = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if not loc and ": " in msg:  # a whole-row check names its field itself
            field, _, msg = msg.partition(": ")
            loc = [field]
        field = ".".join(loc) or "row"
        if err["type"] == "extra_forbidden":
            problem, fix = "unknown field", f"remove it, or use one of {', '.join(FIELDS)}"
        elif err["type"] == "missing":
            problem, fix = "missing", FIXES.get(loc[0], "add it")
        else:
            problem, fix = msg, FIXES.get(loc[0] if loc else "", "fix the row")
        if "; " in problem:  # the problem carries its own fix
            problem, _, fix = problem.partition("; ")
        out.append(f"{where}: {field}: {problem}; {fix}")
    return out


def _parse_line(path: Path, n: int, line: str) -> tuple[GoldenRow | None, list[str]]:
    where = f"{path}:{n}"
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, [
            f"{where}: row: invalid JSON ({exc.msg} at column {exc.colno}); write one JSON object per line"
        ]
    if not isinstance(value, dict):
        return None, [
            f"{where}: row: a JSON {type(value).__name__}, not an object; write one JSON object per line"
        ]
    value.setdefault("id", f"{path.name}:{n}")
    try:
        return GoldenRow.model_validate(value), []
    except ValidationError as exc:
        return None, _row_problems(where, exc)


def read_golden(path: Path) -> list[GoldenRow]:
    """Every row of a golden JSONL file, or a GoldenFileError listing every bad row."""
    if not path.is_file():
        raise LoomError(f"{path}: no such golden file; check the path")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise LoomError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    rows: list[GoldenRow] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row, found = _parse_line(path, n, line)
        problems += found
        if row is None:
            continue
        if row.id in first_line:
            problems.append(
                f"{path}:{n}: id: duplicate {row.id!r} (first on line {first_line[row.id]}); "
                f"give every row its own id"
            )
            continue
        first_line[row.id] = n
        rows.append(row)
    if problems:
        raise GoldenFileError(path, problems)
    if not rows:
        raise LoomError(f"{path}: no rows; write one JSON object per line with at least an 'input'")
    return rows


def golden_facts(rows: list[GoldenRow]) -> dict[str, Any]:
    """What the manifest says about a golden set (beside the usual dataset facts)."""
    types = Counter(r.type for r in rows)
    return {
        "rows": len(rows),
        "categories": dict(sorted(Counter(r.category for r in rows).items())),
        "types": {"STATIC": types["STATIC"], "DYNAMIC": types["DYNAMIC"]},
        "with_citation": sum(r.citation is not None for r in rows),
    }


def _normalised(rows: list[GoldenRow]) -> str:
    return "".join(
        json.dumps(r.model_dump(mode="json"), ensure_ascii=False, sort_keys=True) + "\n" for r in rows
    )


# ------------------------------------------------------------------ the store
def _same_rows(store: Store, name: str, sha256: str) -> Manifest | None:
    """An existing version of golden set ``name`` with exactly these normalised rows."""
    for summary in store.summaries("dataset"):
        if summary.artifact.name != name:
            continue
        for v in summary.versions:
            m = store.manifest(summary.artifact, v)
            if GOLDEN_TAG in m.tags and (m.dataset or {}).get("content_sha256") == sha256:
                return m
    return None


def import_golden(store: Store, path: Path, name: str, *, version: str | None = None) -> Manifest:
    """Validate ``path`` and publish its rows as golden set ``name`` (alias ``current``).

    Importing the same rows again under the same name (no ``version``) returns the stored
    version instead of a duplicate, and points ``current`` back at it: the set just imported
    is the one ``loom eval`` uses."""
    rows = read_golden(path)
    with tempfile.TemporaryDirectory(prefix="loom-golden-") as tmp:
        staged = Path(tmp) / GOLDEN_FILE
        staged.write_text(_normalised(rows), encoding="utf-8")
        facts, ids = describe_rows([staged], label_field="category")
        if version is None and (existing := _same_rows(store, name, facts["content_sha256"])):
            store.set_alias(name, "current", existing.version)
            return existing
        facts["golden"] = golden_facts(rows)

        def fill(dest: Path) -> None:
            shutil.copy2(staged, dest / GOLDEN_FILE)
            (dest / ROW_IDS).write_text("\n".join(ids) + "\n")

        return store.publish(
            "dataset",
            name,
            fill=fill,
            describe=lambda _d: {"dataset": facts},
            source=Source(type="local", uri=str(path.resolve())),
            version=version,
            description=f"golden set from {path.name}: {len(rows)} rows",
            tags=[GOLDEN_TAG],
            alias="current",
        )


def is_golden(manifest: Manifest) -> bool:
    return (
        manifest.kind == "dataset"
        and GOLDEN_TAG in manifest.tags
        and bool((manifest.dataset or {}).get("golden"))
    )


def load_golden(store: Store, ref: str) -> GoldenSet:
    """The rows of golden set ``ref`` (name, name@version or name@alias), checked against the
    sha256 its manifest records."""
    resolved = store.resolve(ref)
    m = resolved.manifest
    if not is_golden(m):
        what = "a dataset snapshot" if m.kind == "dataset" else f"a {m.kind}"
        raise LoomError(
            f"{resolved.ref} is {what}, not a golden set; import golden rows with "
            f"'loom golden import FILE --name NAME' and see 'loom golden ls'"
        )
    entry = next((f for f in m.files if f.path == GOLDEN_FILE), None)
    if entry is None:
        raise IntegrityError(f"{resolved.ref}: its manifest lists no {GOLDEN_FILE}; re-import the golden set")
    data = store.backend.read_bytes(f"{resolved.rel}/{GOLDEN_FILE}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise IntegrityError(
            f"{resolved.ref}: {GOLDEN_FILE} does not match its manifest's sha256; the stored copy is "
            f"damaged: run 'loom store verify' and re-import it"
        )
    lines = data.decode("utf-8").splitlines()
    rows = [GoldenRow.model_validate_json(line) for line in lines if line.strip()]
    return GoldenSet(resolved.ref, str((m.dataset or {})["content_sha256"]), rows)


def list_golden(store: Store) -> list[Manifest]:
    """Every version of every golden set, grouped by name, oldest version first."""
    out: list[Manifest] = []
    for summary in store.summaries("dataset"):
        out += [m for v in summary.versions if is_golden(m := store.manifest(summary.artifact, v))]
    return out
