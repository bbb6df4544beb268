"""A conversation as a JSON document: export, import, and the format both share.

Format ``loom.conversation``, version 1::

    {
      "format": "loom.conversation",
      "version": 1,
      "session_id": "sess-...",        # informational: an import gets a new id
      "model": "helpdesk",             # the agent or adapter the session talks to; null: the base
      "context_files": [{"name": "briefing.md", "text": "..."}],
      "created": 1718000000.0,         # Unix seconds
      "updated": 1718000100.0,
      "messages": [
        {"role": "user", "content": "...", "time": 1718000000.0, "incomplete": false},
        {"role": "assistant", "content": "...", "time": 1718000001.0, "incomplete": false}
      ]
    }

The owner (a digest of an API key) is never exported: an import belongs to whoever imports it.
Readers refuse a version newer than theirs; fields they do not know are refused by name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loom.conversations.types import ContextFile, Message, Session, new_session_id
from loom.errors import LoomError

FORMAT: Final = "loom.conversation"
VERSION = 1
MAX_CONTEXT_FILES = 16


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContextDocument(_Doc):
    """A context file sent by value; ``name`` is a label, never opened as a path."""

    name: str = Field(min_length=1, max_length=256)
    text: str


class MessageDocument(_Doc):
    role: Literal["user", "assistant"]
    content: str
    time: float | None = None
    incomplete: bool = False


class ConversationDocument(_Doc):
    format: Literal["loom.conversation"] = FORMAT
    version: Annotated[int, Field(ge=1, le=VERSION)] = VERSION
    session_id: str | None = None
    model: str | None = Field(default=None, max_length=256)
    context_files: Annotated[list[ContextDocument], Field(max_length=MAX_CONTEXT_FILES)] = Field(
        default_factory=list
    )
    created: float | None = None
    updated: float | None = None
    messages: list[MessageDocument] = Field(default_factory=list)


def export_session(session: Session) -> ConversationDocument:
    return ConversationDocument(
        session_id=session.session_id,
        model=session.model,
        context_files=[ContextDocument(name=f.name, text=f.text) for f in session.context_files],
        created=session.created,
        updated=session.updated,
        messages=[
            MessageDocument(role=m.role, content=m.content, time=m.time, incomplete=m.incomplete)
            for m in session.messages
        ],
    )


def import_session(doc: ConversationDocument, owner: str, *, keep_id: bool = False) -> Session:
    """A new session of ``owner`` from ``doc``: with a new server-made id unless ``keep_id`` (an
    operator restoring a backup; HTTP clients never choose ids)."""
    if keep_id and not doc.session_id:
        raise LoomError("the conversation document has no session_id to keep; import it without --keep-id")
    now = time.time()
    return Session(
        session_id=doc.session_id if keep_id and doc.session_id else new_session_id(),
        owner=owner,
        model=doc.model,
        context_files=[ContextFile(f.name, f.text) for f in doc.context_files],
        created=doc.created or now,
        updated=doc.updated or now,
        messages=[Message(m.role, m.content, m.time or now, m.incomplete) for m in doc.messages],
    )


def read_document(path: Path) -> ConversationDocument:
    try:
        return ConversationDocument.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise LoomError(
            f"conversation file {path}: cannot read it ({exc.strerror}); give an existing file"
        ) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the document"
        raise LoomError(
            f"conversation file {path}: {where}: {first['msg']}; give a file written by "
            f"'loom conversations export' (format {FORMAT!r}, version <= {VERSION})"
        ) from None


def write_document(doc: ConversationDocument, path: Path) -> None:
    """Written whole or not at all: a temporary file renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
