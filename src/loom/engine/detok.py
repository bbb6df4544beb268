"""Incremental detokenisation that never emits half a character.

Byte-level BPE splits one UTF-8 character over several tokens; decoding the
tokens so far can end in U+FFFD until the rest arrives. With a fast tokenizer
we use the ``tokenizers`` library's own ``DecodeStream`` (one Rust call per
token, buffering incomplete characters). Otherwise, like TGI and vLLM, we
decode a window from ``prefix`` and only emit text once it no longer ends in a
replacement character.
"""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens whose text has been emitted
        self.text = ""
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream: Any = None
        if self.backend is not None:
            from tokenizers.decoders import DecodeStream

            self.stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (may be empty)."""
        self.ids.append(token_id)
        if self.stream is not None:
            new = self.stream.step(self.backend, token_id) or ""
            if new:
                self.read = len(self.ids)
                self.text += new
            return new
        before = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        new = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += new
        return new

    def flush(self) -> str:
        """Whatever remains at the end (a trailing replacement character is real then)."""
        if self.read == len(self.ids):
            return ""
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        new = full[len(self.text) :] if full.startswith(self.text) else ""
        self.prefix = self.read = len(self.ids)
        self.text += new
        return new
