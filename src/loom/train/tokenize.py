"""Examples → token ids + labels, with the response-only mask and its check.

Loss is on the response only: prompt tokens get label -100, the assistant's
tokens (including its end-of-turn token, so the model learns to stop) keep
their ids. We build the mask ourselves from the base's chat template rather
than rely on string matching of a response marker, and check it before any
training: an example without supervised tokens fails loudly, showing the
decoded example with its mask (the silent masking failure is the most common
complaint in TRL's and Axolotl's trackers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loom.data.formats import Example
from loom.errors import LoomError

IGNORE = -100
DEFAULT_PROMPT_TEMPLATE = "### Prompt:\n{prompt}\n### Response:\n"


@dataclass
class Tokenized:
    id: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    def supervised_content(self, special_ids: set[int], tokenizer: Any) -> int:
        """Trained tokens that carry content: an empty response still trains the
        end-of-turn token, which must not count as having something to learn."""
        kept = [x for x in self.labels if x != IGNORE and x not in special_ids]
        return len(tokenizer.decode(kept).strip()) if kept else 0


class MaskingError(LoomError):
    pass


class Renderer:
    """Turns Examples into (text, trained?) segments with the chosen prompt format."""

    def __init__(self, tokenizer: Any, prompt_template: str | None = None) -> None:
        self.tok = tokenizer
        self.use_chat = prompt_template is None and bool(getattr(tokenizer, "chat_template", None))
        self.prompt_template = prompt_template or DEFAULT_PROMPT_TEMPLATE
        if tokenizer.eos_token is None:
            raise LoomError("the base's tokenizer has no eos_token; the adapter could never learn to stop")

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The text before the first response: what training masked as the prompt, and so what
        an agent must send to get the behaviour its adapter learned (``loom.agents``)."""
        if self.use_chat:
            text: str = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return text
        turns = [m for m in messages if m["role"] != "system"]
        if len(turns) != 1:
            raise LoomError("--prompt-template formats one prompt; the base has no chat template")
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        return self.prompt_template.format(prompt=turns[0]["content"], system=system)

    def segments(self, ex: Example) -> list[tuple[str, bool]]:
        if ex.text is not None:
            return [(ex.text + self.tok.eos_token, True)]
        if self.use_chat:
            return self._chat_segments(ex)
        msgs = ex.messages
        turns = [m for m in msgs if m["role"] != "system"]
        if len(turns) != 2:
            raise LoomError(
                f"{ex.id}: multi-turn messages need a chat template; the base has none and "
                f"--prompt-template formats one prompt and one response"
            )
        prompt = self.prompt([m for m in msgs if m is not turns[1]])
        return [(prompt, False), (turns[1]["content"] + self.tok.eos_token, True)]

    def _chat_segments(self, ex: Example) -> list[tuple[str, bool]]:
        render = self.tok.apply_chat_template
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(ex.messages):
            if m["role"] != "assistant":
                continue
            prefix = self.prompt(ex.messages[:i]) if i else ""
            upto = render(ex.messages[: i + 1], tokenize=False)
            if not (prefix.startswith(done) and upto.startswith(prefix)):
                raise LoomError(
                    f"{ex.id}: the chat template does not render turns as prefixes of each other, so "
                    f"the response mask cannot be built; pass --prompt-template instead"
                )
            out += [(prefix[len(done) :], False), (upto[len(prefix) :], True)]
            done = upto
        return [(text, trained) for text, trained in out if text]


def tokenize_examples(
    examples: list[Example], tokenizer: Any, max_len: int, prompt_template: str | None = None
) -> list[Tokenized]:
    renderer = Renderer(tokenizer, prompt_template)
    eos_id = tokenizer.eos_token_id
    out = []
    for ex in examples:
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in renderer.segments(ex):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        if ex.text is None and eos_id not in [x for x in labels if x != IGNORE]:
            # the template's end-of-turn is not the eos token: train eos explicitly
            ids.append(eos_id)
            labels.append(eos_id)
        truncated = len(ids) > max_len
        out.append(Tokenized(ex.id, ids[:max_len], labels[:max_len], truncated))
    return out


def show_mask(item: Tokenized, tokenizer: Any) -> str:
    """The decoded example with the supervised spans wrapped in «…»."""
    parts: list[str] = []
    run: list[int] = []
    trained_run = False
    for tok_id, label in [*zip(item.input_ids, item.labels, strict=True), (None, None)]:
        trained = label is not None and label != IGNORE
        if tok_id is None or (run and trained != trained_run):
            text = tokenizer.decode(run)
            parts.append(f"«{text}»" if trained_run else text)
            run = []
        if tok_id is not None:
            run.append(tok_id)
            trained_run = trained
    return "".join(parts)


def check_masks(items: list[Tokenized], tokenizer: Any) -> None:
    """Fail loudly when any example has no supervised tokens."""
    special = set(tokenizer.all_special_ids)
    empty = [t for t in items if t.supervised_content(special, tokenizer) == 0]
    if empty:
        first = empty[0]
        why = (
            "it was truncated before the response: raise --max-seq-length"
            if first.truncated
            else "its response is empty"
        )
        raise MaskingError(
            f"{len(empty)} of {len(items)} examples have no supervised tokens (e.g. {first.id}: {why}).\n"
            f"Decoded with the trained tokens in «»:\n{show_mask(first, tokenizer)}"
        )
