"""Constrained decoding: JSON schema / JSON object / regex / Lark grammars via llguidance.

llguidance (the grammar engine vLLM, SGLang and llama.cpp use) computes the
set of tokens allowed next; we mask the rest before sampling. One matcher per
request, driven by the scheduler through the LogitsProcessor protocol.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import torch

from loom.errors import LoomError


@lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer: Any, n_vocab: int) -> Any:
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab)


class GrammarProcessor:
    """Masks logits to what the grammar allows; ends the request when the grammar is complete."""

    def __init__(self, tokenizer: Any, grammar: str, vocab_size: int) -> None:
        try:
            import llguidance
            import llguidance.torch as llt
        except ImportError:
            raise LoomError("constrained decoding needs llguidance: pip install llguidance") from None
        self._llt = llt
        self.vocab_size = vocab_size
        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab_size), grammar)
        if self.matcher.is_error():
            raise LoomError(f"invalid grammar: {self.matcher.get_error()}")
        self.bitmask = llt.allocate_token_bitmask(1, vocab_size)

    @classmethod
    def json_schema(cls, tokenizer: Any, schema: dict[str, Any] | None, vocab_size: int) -> GrammarProcessor:
        import llguidance

        schema = dict(schema) if schema is not None else {"type": "object"}
        # Fixed separators instead of llguidance's default of free whitespace: a model may
        # otherwise pad with spaces or newlines until max_tokens and never close the object
        # (vLLM offers the same switch). A schema's own x-guidance settings win.
        schema["x-guidance"] = {
            "whitespace_flexible": False,
            "item_separator": ", ",
            "key_separator": ": ",
            **schema.get("x-guidance", {}),
        }
        text = json.dumps(schema)
        return cls(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(text), vocab_size)

    @classmethod
    def regex(cls, tokenizer: Any, pattern: str, vocab_size: int) -> GrammarProcessor:
        import llguidance

        return cls(tokenizer, llguidance.LLMatcher.grammar_from_regex(pattern), vocab_size)

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        self._llt.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        allowed = allowed_tokens(self.bitmask[0], self.vocab_size).to(logits.device)
        out = torch.full_like(logits, float("-inf"))
        out[: self.vocab_size] = logits[: self.vocab_size].masked_fill(~allowed, float("-inf"))
        return out

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise LoomError(f"token {token} rejected by the grammar: {self.matcher.get_error()}")

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_stopped())


_BIT = torch.arange(32, dtype=torch.int32)


def allowed_tokens(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's bitmask (int32 words, bit ``i % 32`` of word ``i // 32`` = token ``i``
    allowed) as a [vocab_size] bool tensor.

    Written out rather than llguidance.torch.apply_token_bitmask_inplace: that kernel goes
    through torch.compile, whose CPU code from torch 2.13 on an AVX-512 machine masked the
    wrong tokens and overflowed the heap (the process aborted in the next llguidance call).
    Unpacking one row is ~50k integer ops, far below one decode step."""
    return ((words.unsqueeze(1) >> _BIT) & 1).flatten()[:vocab_size].bool()
