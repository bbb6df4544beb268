"""Plain-text prompts as the base expects them: with its BOS token when its tokenizer adds one.

The engine tokenizes text as is (no special tokens), which is right for chat prompts (the chat
template writes the BOS itself) but not for ``/v1/completions`` and ``/generate``: a Llama or
Mistral base never saw text without its ``<s>`` in training. As vLLM does, text prompts start
with the BOS exactly when ``tokenizer(text)`` would put one there, and never with two."""

from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=8)  # one entry per engine tokenizer, for the life of the process
def bos_to_add(tokenizer: Any) -> int | None:
    """The BOS id ``tokenizer(text)`` prepends, or None when it prepends nothing."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return int(bos) if with_special[:1] == [bos] and plain[:1] != [bos] else None


def text_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a plain-text prompt, starting with the BOS the base expects (once: a prompt
    that already starts with the BOS token's text keeps that one)."""
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    bos = bos_to_add(tokenizer)
    if bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)
    return ids
