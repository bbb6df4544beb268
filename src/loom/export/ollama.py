"""``loom export ollama``: a folder Ollama imports with ``ollama create NAME -f DIR/Modelfile``.

It holds the base as GGUF (``FROM ./model.gguf``), the adapter as a LoRA GGUF when the ref
is an adapter (``ADAPTER ./adapter.gguf``), a ``TEMPLATE`` translated from the chat template
when it is ChatML (SmolLM2, Qwen2 and Loom's tiny test model use it), and ``PARAMETER``
defaults. Other chat templates are quoted in a comment instead: Ollama then falls back to
the template stored in the GGUF's ``tokenizer.chat_template``, which it matches itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loom.errors import LoomError
from loom.export.gguf_lora import write_lora_gguf
from loom.export.gguf_model import check_type, write_gguf
from loom.export.source import ExportResult, atomic_output, resolve_adapter, resolve_base
from loom.store.facts import chat_template_of
from loom.store.store import Store

MODELFILE = "Modelfile"
CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)


@dataclass
class OllamaDefaults:
    """``PARAMETER`` / ``SYSTEM`` lines (Loom's serving defaults: greedy, short answers)."""

    temperature: float = 0.0
    num_predict: int = 128
    num_ctx: int | None = None  # None: the model's context length, at most 8192
    system: str | None = None


def modelfile_template(chat_template: str | None) -> tuple[str | None, str | None]:
    """(Ollama TEMPLATE, None) for a ChatML chat template, else (None, why it was not translated)."""
    if chat_template is None:
        return None, "the model has no chat template; Ollama will send raw prompts"
    if "<|im_start|>" in chat_template and "<|im_end|>" in chat_template and "tools" not in chat_template:
        return CHATML_TEMPLATE, None
    return None, "its chat template is not ChatML and is not translated (Ollama uses the GGUF's own)"


def _stop_tokens(folder: Path) -> list[str]:
    config = folder / "tokenizer_config.json"
    eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return [eos] if isinstance(eos, str) and eos else []


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def render_modelfile(
    folder: Path, defaults: OllamaDefaults, *, adapter: bool, source_refs: list[str]
) -> tuple[str, list[str]]:
    """The Modelfile text for the base in ``folder``, and notes about what was left out."""
    config = json.loads((folder / "config.json").read_text())
    template, why_not = modelfile_template(chat_template_of(folder))
    lines = [f"# exported by 'loom export ollama' from {', '.join(source_refs)}", "FROM ./model.gguf"]
    if adapter:
        lines.append("ADAPTER ./adapter.gguf")
    if template is not None:
        lines.append(f"TEMPLATE {_quote(template)}")
    else:
        lines.append(f"# TEMPLATE not written: {why_not}")
    if defaults.system:
        lines.append(f"SYSTEM {_quote(defaults.system)}")
    num_ctx = defaults.num_ctx or min(int(config.get("max_position_embeddings") or 2048), 8192)
    lines += [
        f"PARAMETER temperature {defaults.temperature:g}",
        f"PARAMETER num_predict {defaults.num_predict}",
        f"PARAMETER num_ctx {num_ctx}",
    ]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in _stop_tokens(folder)]
    return "\n".join(lines) + "\n", [why_not] if why_not else []


def _prepare_dir(out_dir: Path, force: bool) -> Path:
    out_dir = out_dir.expanduser()
    if not out_dir.parent.is_dir():
        raise LoomError(
            f"{out_dir}: its parent folder {out_dir.parent} does not exist; create it "
            f"(mkdir -p {out_dir.parent}) or write elsewhere"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise LoomError(f"{out_dir} is a file; give a folder for the Modelfile and GGUF files")
    if (out_dir / MODELFILE).exists() and not force:
        raise LoomError(
            f"{out_dir / MODELFILE} already exists; pass --force to overwrite it, or choose another folder"
        )
    out_dir.mkdir(exist_ok=True)
    return out_dir


def export_ollama(
    store: Store,
    ref: str,
    out_dir: Path,
    *,
    qtype: str = "q8_0",
    defaults: OllamaDefaults | None = None,
    force: bool = False,
) -> ExportResult:
    """``loom export ollama``: ``ref`` (a base, merged base or adapter) as an Ollama model folder."""
    check_type(qtype)
    defaults = defaults or OllamaDefaults()
    kind = store.resolve(ref).manifest.kind
    adapter_folder: Path | None = None
    if kind == "adapter":
        adapter, adapter_folder, base, base_folder = resolve_adapter(store, ref, "ollama")
        sources = [adapter.ref, base.ref]
        summary = adapter.manifest.training_summary or {}
        trained_system = (summary.get("prompting") or {}).get("system_prompt")
        if defaults.system is None and trained_system:
            defaults.system = str(trained_system)
    else:
        base, base_folder = resolve_base(store, ref, "ollama")
        sources = [base.ref]
    out_dir = _prepare_dir(Path(out_dir), force)
    files = [out_dir / "model.gguf"]
    with atomic_output(files[0]) as tmp:
        notes = write_gguf(base_folder, tmp, qtype, name=base.artifact.name)
    if adapter_folder is not None:
        files.append(out_dir / "adapter.gguf")
        with atomic_output(files[1]) as tmp:
            write_lora_gguf(adapter_folder, base_folder, tmp, name=sources[0].split("@")[0])
    text, more = render_modelfile(
        base_folder, defaults, adapter=adapter_folder is not None, source_refs=sources
    )
    files.append(out_dir / MODELFILE)
    with atomic_output(files[-1]) as tmp:
        tmp.write_text(text)
    return ExportResult(files=[str(f) for f in files], sources=sources, notes=notes + more)
