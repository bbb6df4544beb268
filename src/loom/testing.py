"""A tiny, deterministic, randomly initialised Mistral and tokenizer built in memory.

Used by the test-suite and by the documented stub modes (``loom serve --stub``,
``loom bench serve --stub``): real Mistral code and the real engine path, but no
weights to download, so the tools around the model are testable anywhere.
"""

from __future__ import annotations

from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "play some music by the beatles",
    "what is the weather like in paris tomorrow",
    "book a table for two at an italian restaurant",
    '{"intent": "GetWeather"} {"intent": "PlayMusic"}',
] * 20


def make_tokenizer(vocab_size: int = 400) -> Any:  # PreTrainedTokenizerFast
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
    bpe.train_from_iterator(CORPUS, vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_model(seed: int = 0, hidden: int = 64, layers: int = 2) -> Any:  # MistralForCausalLM
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return MistralForCausalLM(config).eval()
