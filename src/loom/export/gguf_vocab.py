"""The tokenizer inside a GGUF file: ``tokenizer.ggml.*`` keys as llama.cpp's converter writes them.

Two tokenizer families cover Llama, Mistral and Qwen2 checkpoints:
- byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen2): ``tokenizer.ggml.model = "gpt2"``,
  tokens as the tokenizer spells them, merges, and a ``pre`` name that tells llama.cpp which
  pre-tokenizer regex to use (identified, as llama.cpp does, by hashing the ids of a probe text);
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral 7B): ``"llama"``, via gguf's
  ``LlamaHfVocab``.
Special token ids, add-BOS/EOS flags and the chat template come from gguf's ``SpecialVocab``.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from loom.errors import LoomError

# llama.cpp's probe text (convert_hf_to_gguf.py, get_vocab_base_pre): its token ids identify
# the pre-tokenizer.
PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
    "?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "  # noqa: RUF001 (llama.cpp's exact text)
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# A few of llama.cpp's known pre-tokenizers (hash of str(ids) -> name), for the families Loom exports.
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}
DEFAULT_PRE = "default"


def tokenizer_family(folder: Path) -> str:
    """``gpt2`` or ``llama``, from tokenizer.json; anything else is refused."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise LoomError(
            f"{folder}: no tokenizer.json; the GGUF export needs a fast (tokenizers) tokenizer: load "
            f"the model's tokenizer with AutoTokenizer and save_pretrained it into the model folder"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise LoomError(
        f"{path}: a {model.get('type')} tokenizer (decoder {decoder}); Loom's GGUF export writes "
        f"byte-level BPE and SentencePiece-style BPE tokenizers only; use llama.cpp's "
        f"convert_hf_to_gguf.py for this model"
    )


def pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, or ``default`` when it is not known."""
    digest = sha256(str(tokenizer.encode(PROBE)).encode()).hexdigest()
    return KNOWN_PRE.get(digest, DEFAULT_PRE)


def gpt2_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and types for ids 0..vocab_size-1, as llama.cpp's get_vocab_base lists them: holes
    are UNUSED ``[PADi]``, added special tokens CONTROL, other added tokens USER_DEFINED."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _llama_tokens(folder: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    vocab = gguf.LlamaHfVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))
    for i in range(len(tokens), vocab_size):  # the embedding may be wider than the tokenizer
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> list[str]:
    """Write the tokenizer keys; returns notes for the user (e.g. an unknown pre-tokenizer)."""
    from transformers import AutoTokenizer

    family = tokenizer_family(folder)
    notes: list[str] = []
    if family == "gpt2":
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if max(tokenizer.get_vocab().values()) >= vocab_size:
            raise LoomError(
                f"{folder}: the tokenizer has ids up to {max(tokenizer.get_vocab().values())} but the "
                f"model's vocab_size is {vocab_size}; the tokenizer does not belong to this model"
            )
        tokens, types = gpt2_tokens(tokenizer, vocab_size)
        pre = pre_tokenizer(tokenizer)
        if pre == DEFAULT_PRE:
            notes.append(
                "the tokenizer's pre-tokenizer is not one llama.cpp knows by hash; wrote "
                "tokenizer.ggml.pre = 'default' (llama.cpp's GPT-2 style split)"
            )
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:
        btokens, scores, ltypes = _llama_tokens(folder, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(DEFAULT_PRE)
        writer.add_token_list(btokens)
        writer.add_token_scores(scores)
        writer.add_token_types(ltypes)
    special = gguf.SpecialVocab(folder, load_merges=family == "gpt2", n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None:
        notes.append("the model has no chat template; none was written")
    return notes
