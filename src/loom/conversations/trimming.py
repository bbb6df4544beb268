"""The prompt of a chat turn: the system text with the session's context files, then as much of
the history as fits, then the new message. History goes oldest turn first; the context files and
the new message are always kept. Fitting is measured with the real tokenizer (through the chat
template), so the limit holds exactly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loom.conversations.types import ContextFile

ChatMessage = dict[str, str]


@dataclass
class Fitted:
    ids: list[int]  # the prompt's token ids (what ``encode`` gave for the kept messages)
    messages: list[ChatMessage]
    trimmed_turns: int  # the oldest turns left out of the prompt (still stored)


def system_text(system: str | None, context_files: Sequence[ContextFile], context: str | None) -> str:
    """The system message: the agent's prompt, the session's context files, the turn's context."""
    files = "\n\n".join(f"--- {f.name} ---\n{f.text}" for f in context_files)
    parts = (system, files and f"Context files:\n\n{files}", context and f"Context:\n{context}")
    return "\n\n".join(p for p in parts if p)


def turns(history: Sequence[ChatMessage]) -> list[list[ChatMessage]]:
    """History cut into turns, each starting at a user message (with the answers after it)."""
    out: list[list[ChatMessage]] = []
    for message in history:
        if message["role"] == "user" or not out:
            out.append([])
        out[-1].append(message)
    return out


def fit(
    head: Sequence[ChatMessage],
    history: Sequence[ChatMessage],
    tail: Sequence[ChatMessage],
    encode: Callable[[list[ChatMessage]], list[int]],
    budget: int,
) -> Fitted:
    """``head + history + tail`` with the fewest oldest turns of ``history`` dropped so that
    ``encode`` gives at most ``budget`` tokens. When even no history is over budget, that prompt
    is returned all the same: its length error is the caller's to give (it names the limit).
    Tokenizes once when everything fits, else about log2(turns) + 1 times (a binary search:
    dropping turns never lengthens the prompt)."""
    chunks = turns(history)

    def attempt(dropped: int) -> Fitted:
        messages = [*head, *(m for turn in chunks[dropped:] for m in turn), *tail]
        return Fitted(encode(messages), messages, dropped)

    best = attempt(0)
    if len(best.ids) <= budget or not chunks:
        return best
    low, high = 1, len(chunks)  # the answer is in [low, high]; high (no history) is the fallback
    best = attempt(high)
    while low < high:
        mid = (low + high) // 2
        tried = attempt(mid)
        if len(tried.ids) <= budget:
            best, high = tried, mid
        else:
            low = mid + 1
    return best
