"""``loom chat``: an interactive terminal chat with a Loom server, through the SDK.

    loom chat --url http://desktop.lan:8000 --url https://vps.example.org   # failover
    loom chat --local                  # an in-process server on the store's default base
    loom chat --local --stub           # the tiny random test model (no weights needed)

Answers stream as they are generated; the conversation lives on the server (its conversations
database), so ``/save`` and ``/load`` move it as a JSON document. Slash commands:
:mod:`loom.cli.chat_commands`."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import typer
from rich.markup import escape

from loom.cli.chat_commands import ChatState, note, problem, run_command
from loom.cli.output import console
from loom.client import ChatReply, Client, Stream
from loom.errors import LoomError

_O = typer.Option
PROMPT = "you> "
# C0/C1 control characters (not newline or tab): a model's raw bytes must not drive the terminal
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def chat(
    url: list[str] | None = _O(
        None, "--url", help="Server URL; repeat for failover, in priority order (default: LOOM_URL)."
    ),
    api_key: str | None = _O(None, "--api-key", envvar="LOOM_API_KEY", help="Bearer key of the server."),
    local: bool = _O(False, "--local", help="Start a server in this process on loopback and chat with it."),
    stub: bool = _O(False, "--stub", help="With --local: the tiny random test model instead of the base."),
    base: str | None = _O(None, "--base", help="With --local: the base ref (default: the store's default)."),
    agents: Path | None = _O(None, "--agents", help="With --local: an agent map (as loom serve --agents)."),
    conversations: str | None = _O(
        None,
        "--conversations",
        help="With --local: where sessions are kept, as for loom serve (default: conversations.sqlite "
        "beside the store).",
    ),
    agent: str | None = _O(None, "--agent", help="Talk to this agent (default: the base model)."),
    adapter: str | None = _O(None, "--adapter", help="Talk to this adapter, e.g. name@v2."),
    session: str | None = _O(None, "--session", help="Continue this session id (see loom conversations)."),
    max_tokens: int | None = _O(None, "--max-tokens", min=1, help="Longest answer (default: the server's)."),
) -> None:
    """Chat in the terminal with a Loom server (answers stream; /help lists the commands)."""
    if agent and adapter:
        raise LoomError("give --agent or --adapter, not both")
    local_only = {"--stub": stub, "--base": base, "--agents": agents, "--conversations": conversations}
    _check_target(url, local, local_only)
    _line_editing()
    with _client(url, api_key, local, stub, base, agents, conversations) as client:
        state = ChatState(client, agent=agent, adapter=adapter, max_tokens=max_tokens)
        _greet(state, session)
        repl(state)


def _check_target(url: list[str] | None, local: bool, local_only: Mapping[str, object]) -> None:
    if url and local:
        raise LoomError("give --url (a running server) or --local (start one here), not both")
    given = [flag for flag, value in local_only.items() if value]
    if given and not local:
        raise LoomError(f"{', '.join(given)} configure the server --local starts; add --local, or drop them")


@contextlib.contextmanager
def _client(
    url: list[str] | None,
    api_key: str | None,
    local: bool,
    stub: bool,
    base: str | None,
    agents: Path | None,
    conversations: str | None,
) -> Iterator[Client]:
    if not local:
        with Client(url or None, api_key=api_key) as client:
            yield client
        return
    with (
        local_server(api_key, stub, base, agents, conversations) as served,
        Client(served, api_key=api_key) as client,
    ):
        yield client


@contextlib.contextmanager
def local_server(
    api_key: str | None, stub: bool, base: str | None, agents: Path | None, conversations: str | None
) -> Iterator[str]:
    """An in-process server on a free loopback port, set up as ``loom serve`` sets one up by default
    (conversations and request log beside the store); yields its URL."""
    from loom.cli.conversations import default_conversations
    from loom.config import settings
    from loom.serve import ServeConfig, create_app
    from loom.serve.requestlog import default_log_path
    from loom.serve.server import serve_in_thread

    cfg = ServeConfig(
        base=base,
        agents_file=agents,
        stub=stub,
        api_key=api_key,
        # nobody needs the admin routes here: an unguessable key closes them to other local users
        admin_key=os.environ.get("LOOM_ADMIN_KEY") or secrets.token_urlsafe(32),
        conversations=conversations or str(default_conversations()),
        request_log=default_log_path(settings().store_root),
    )
    note(f"starting a local server on {'the stub model' if stub else base or 'the default base'}...")
    with serve_in_thread(create_app(cfg)) as served:
        yield served


def _line_editing() -> None:
    """Arrow keys and history for input() where the platform has readline."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401


def _greet(state: ChatState, session: str | None) -> None:
    """Check that a server answers (failing over as calls do) and resume ``session`` if given."""
    try:
        info = state.client.info()
        if session:
            conv = state.client.conversation(session)
            state.adopt(conv.session_id, (conv.model_extra or {}).get("model"))
    except LoomError as exc:
        problem(exc)
        raise SystemExit(2) from None
    base = (info.base or {}).get("ref") or "-"
    note(f"connected to {info.endpoint} (loom {info.loom_version}, base {base})")
    resumed = f", continuing session {state.session_id}" if state.session_id else ""
    note(f"talking to {state.describe()}{resumed}; /help lists the commands, /quit or Ctrl-D leaves")


def repl(state: ChatState) -> None:
    """Read lines until /quit or end of input; a slash starts a command, anything else is sent."""
    while True:
        try:
            line = input(PROMPT).strip()
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print()
            note("(/quit or Ctrl-D leaves)")
            continue
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            try:
                if not run_command(state, line):
                    return
            except KeyboardInterrupt:  # a command waiting on the server: back to the prompt
                console.print()
                note("(stopped)")
            continue
        send(state, line[1:] if line.startswith("//") else line)


def send(state: ChatState, message: str) -> None:
    """Stream one answer to the terminal; Ctrl-C stops it and the chat goes on."""
    console.print(f"[bold cyan]{escape(state.talking_to)}>[/] ", end="", highlight=False)
    stream: Stream[ChatReply] | None = None
    try:
        stream = state.client.chat_stream(message, **state.chat_args())
        for piece in stream:
            sys.stdout.write(_CONTROL.sub("", piece))
            sys.stdout.flush()
        reply = stream.result
    except KeyboardInterrupt:
        _cancelled(state, stream)
        return
    except Exception as exc:  # a LoomError's message says what to do; a chat never ends on a traceback
        console.print()
        problem(exc)
        _keep_session(state, stream)
        return
    console.print()
    state.session_id, state.model_version = reply.session_id, reply.model_version
    state.endpoint = reply.endpoint
    note(_meta(state, reply))


def _meta(state: ChatState, reply: ChatReply) -> str:
    parts = [f"model_version {reply.model_version or '?'}", f"{reply.usage.completion_tokens} tokens"]
    if reply.total_s is not None:
        parts.append(f"{reply.total_s:.1f} s")
    if len(state.client.endpoints.urls) > 1:
        parts.append(reply.endpoint)
    trimmed = int((reply.model_extra or {}).get("trimmed_turns") or 0)
    if trimmed:
        parts.append(f"{trimmed} oldest turns left out of the prompt")
    return f"[{' · '.join(parts)}]"


def _cancelled(state: ChatState, stream: Stream[ChatReply] | None) -> None:
    if stream is not None:
        stream.close()
    console.print()
    _keep_session(state, stream)
    note("(answer stopped; the server keeps what was said so far, marked incomplete)")


def _keep_session(state: ChatState, stream: Stream[ChatReply] | None) -> None:
    """A first answer cut short still started a session on the server: continue that one."""
    if stream is not None and stream.decoder.session_id and not state.session_id:
        state.session_id, state.endpoint = stream.decoder.session_id, stream.endpoint
