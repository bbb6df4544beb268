"""``loom chat``'s state and slash commands. Every command talks to the server through the SDK
(:mod:`loom.client`); the terminal loop that reads lines and streams answers is in
:mod:`loom.cli.chat`."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from loom.cli.output import console, err_console
from loom.client import Client
from loom.client.calls import ChatArgs
from loom.conversations.io import (
    MAX_CONTEXT_FILES,
    ConversationDocument,
    read_document,
    write_document,
)
from loom.errors import LoomError


@dataclass
class ChatState:
    """What the next message is sent with. A session's model and context files are fixed when it
    starts (the server's rule), so changing either starts a new session."""

    client: Client
    agent: str | None = None
    adapter: str | None = None
    session_id: str | None = None
    context_files: list[dict[str, str]] = field(default_factory=list)  # sent when a session starts
    max_tokens: int | None = None
    model_version: str | None = None  # of the last answer
    endpoint: str | None = None  # the URL that gave the last answer

    @property
    def talking_to(self) -> str:
        return self.agent or self.adapter or "base"

    def describe(self) -> str:
        if self.agent:
            return f"agent {self.agent}"
        return f"adapter {self.adapter}" if self.adapter else "the base model"

    def chat_args(self) -> ChatArgs:
        args: ChatArgs = {}
        if self.max_tokens:
            args["max_tokens"] = self.max_tokens
        if self.session_id:
            args["session_id"] = self.session_id  # the session already knows its model and files
            return args
        if self.agent:
            args["agent"] = self.agent
        if self.adapter:
            args["adapter"] = self.adapter
        if self.context_files:
            args["context_files"] = list(self.context_files)
        return args

    def new_session(self, what: str) -> None:
        """Say ``what`` changed; forget the running session (it stays on the server, and the next
        message starts a new one)."""
        if self.session_id:
            what += f"; the next message starts a new session ({self.session_id} is kept on the server)"
        note(what)
        self.session_id, self.model_version = None, None

    def adopt(self, session_id: str, model: str | None) -> None:
        """Continue ``session_id`` (imported or resumed), talking to its ``model``."""
        self.session_id, self.agent, self.adapter = session_id, None, None
        if model is not None:
            agents = {a.name for a in self.client.agents.list()}
            self.agent, self.adapter = (model, None) if model in agents else (None, model)


# ------------------------------------------------------------------ output
def note(text: str) -> None:
    console.print(f"[dim]{escape(text)}[/]", highlight=False, soft_wrap=True)


def problem(error: BaseException | str) -> None:
    """One readable line: the SDK's multi-line messages (one line per endpoint) are joined."""
    text = str(error) if isinstance(error, LoomError | str) else f"{type(error).__name__}: {error}"
    line = re.sub(r"\s*\n\s*(- )?", " | ", text.strip())
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------ commands
Handler = Callable[[ChatState, str], bool]  # False: leave the chat


@dataclass(frozen=True)
class Command:
    usage: str
    help: str
    run: Handler


def _agent(state: ChatState, arg: str) -> bool:
    if not arg:
        names = [a.name for a in state.client.agents.list()]
        note(f"talking to {state.describe()}; agents on the server: {', '.join(names) or 'none'}")
        return True
    state.agent, state.adapter = arg, None
    state.new_session(f"talking to agent {arg} (a session's model is fixed when it starts)")
    return True


def _adapter(state: ChatState, arg: str) -> bool:
    if not arg:
        note(f"talking to {state.describe()}; give /adapter NAME[@VERSION] to switch")
        return True
    state.agent, state.adapter = None, arg
    state.new_session(f"talking to adapter {arg} (a session's model is fixed when it starts)")
    return True


def _base(state: ChatState, arg: str) -> bool:
    state.agent = state.adapter = None
    state.new_session("talking to the base model (a session's model is fixed when it starts)")
    return True


def _reset(state: ChatState, arg: str) -> bool:
    state.new_session(f"reset: talking to {state.describe()}")
    return True


def _save(state: ChatState, arg: str) -> bool:
    if not arg:
        raise LoomError("/save needs a file name: /save FILE (e.g. /save chat.json)")
    if not state.session_id:
        raise LoomError("/save: there is no session yet; send a message first")
    exported = state.client.export_conversation(state.session_id)
    doc = ConversationDocument.model_validate(exported.model_dump(mode="json", exclude={"endpoint"}))
    path = Path(arg).expanduser()
    try:
        write_document(doc, path)
    except OSError as exc:
        raise LoomError(f"/save {arg}: cannot write it ({exc.strerror}); give a writable path") from None
    note(f"saved session {state.session_id} ({len(doc.messages)} messages) to {path}")
    return True


def _load(state: ChatState, arg: str) -> bool:
    if not arg:
        raise LoomError("/load needs a file name: /load FILE (a file written by /save)")
    doc = read_document(Path(arg).expanduser())
    imported = state.client.import_conversation(doc.model_dump(mode="json"))
    state.adopt(imported.session_id, doc.model)
    state.model_version = None
    dropped = int((imported.model_extra or {}).get("dropped_messages") or 0)
    more = f"; the server dropped the {dropped} oldest" if dropped else ""
    note(
        f"loaded {arg}: continuing in new session {imported.session_id} with {state.describe()} "
        f"({len(imported.messages)} messages{more})"
    )
    return True


def _context(state: ChatState, arg: str) -> bool:
    if not arg:
        names = [f["name"] for f in state.context_files]
        note(f"context files: {', '.join(names) or 'none'} (/context FILE adds one, /context --clear)")
        return True
    if arg == "--clear":
        state.context_files.clear()
        state.new_session("context files cleared")
        return True
    if len(state.context_files) >= MAX_CONTEXT_FILES:
        raise LoomError(f"/context: a session takes at most {MAX_CONTEXT_FILES} files; /context --clear")
    path = Path(arg).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LoomError(f"/context {arg}: cannot read it ({exc.strerror}); give a local text file") from None
    except UnicodeDecodeError:
        raise LoomError(f"/context {arg}: not UTF-8 text; give a text file") from None
    state.context_files.append({"name": path.name, "text": text})
    state.new_session(f"{path.name} ({len(text)} characters) is sent as context when a session starts")
    return True


def _info(state: ChatState, arg: str) -> bool:
    info = state.client.info()
    extra = info.model_extra or {}
    grid = Table.grid(padding=(0, 2))
    grid.add_row("endpoint", state.endpoint or info.endpoint)
    states = state.client.endpoint_states
    for s in states if len(states) > 1 else []:
        grid.add_row("", f"{s.url}: {'up' if s.up else f'down ({s.last_error})'}")
    grid.add_row("session", state.session_id or "none yet (the next message starts one)")
    grid.add_row("talking to", state.describe())
    grid.add_row("model_version", state.model_version or "-")
    grid.add_row("context files", ", ".join(f["name"] for f in state.context_files) or "-")
    server = f"loom {info.loom_version}, {info.status}, base {(info.base or {}).get('ref', '-')}"
    grid.add_row("server", f"{server}, {extra.get('device', '?')} {extra.get('dtype', '')}".rstrip())
    console.print(grid, highlight=False)
    return True


def _help(state: ChatState, arg: str) -> bool:
    grid = Table.grid(padding=(0, 2))
    for cmd in COMMANDS.values():
        grid.add_row(cmd.usage, cmd.help)
    console.print(grid, highlight=False)
    note("Anything else is a message (start it with // to send a leading /). Ctrl-C stops an answer.")
    return True


def _quit(state: ChatState, arg: str) -> bool:
    return False


COMMANDS: dict[str, Command] = {
    "agent": Command("/agent NAME", "talk to agent NAME (starts a new session); no NAME: list", _agent),
    "adapter": Command("/adapter REF", "talk to adapter REF, e.g. name@v2 (starts a new session)", _adapter),
    "base": Command("/base", "talk to the base model (starts a new session)", _base),
    "reset": Command("/reset", "start a new session with the same model and context files", _reset),
    "save": Command("/save FILE", "export this session to a JSON file", _save),
    "load": Command("/load FILE", "import a saved session and continue it (a new session id)", _load),
    "context": Command(
        "/context FILE", "send a local file as context from the next session start (--clear)", _context
    ),
    "info": Command("/info", "endpoint, session, model, model_version, server", _info),
    "help": Command("/help", "this list", _help),
    "quit": Command("/quit", "leave (Ctrl-D too)", _quit),
}


def run_command(state: ChatState, line: str) -> bool:
    """Run one slash command; False when the chat should end. Errors are printed, never raised."""
    name, _, arg = line[1:].partition(" ")
    command = COMMANDS.get(name.lower())
    if command is None:
        listed = ", ".join(f"/{n}" for n in COMMANDS)
        problem(f"unknown command /{name}; the commands are {listed} (/help explains them)")
        return True
    try:
        return command.run(state, arg.strip())
    except Exception as exc:  # a LoomError's message says what to do; a chat never ends on a traceback
        problem(exc)
    return True
