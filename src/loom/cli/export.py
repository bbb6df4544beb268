"""``loom export …``: merged bases, GGUF files, LoRA GGUFs and Ollama folders (loom.export)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from loom.cli.output import console, print_json
from loom.export import (
    ExportResult,
    OllamaDefaults,
    export_gguf,
    export_lora_gguf,
    export_merged,
    export_ollama,
)
from loom.store import Store

app = typer.Typer(help="Export models out of the store: merged bases, GGUF, Ollama.", no_args_is_help=True)

StoreOpt = typer.Option(None, "--store", envvar="LOOM_STORE", help="Store root (path or s3://…).")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of text.")
ForceOpt = typer.Option(False, "--force", help="Overwrite an existing output.")


class GgufType(str, Enum):
    f32 = "f32"
    f16 = "f16"
    q8_0 = "q8_0"
    q4_0 = "q4_0"


class LoraType(str, Enum):
    f32 = "f32"
    f16 = "f16"


def _report(result: ExportResult, as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    for f in result.files:
        console.print(f"[green]wrote[/] {f}", highlight=False)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


@app.command("merged")
def merged_cmd(
    ref: str = typer.Argument(..., help="Adapter ref (name, name@version or name@alias)."),
    name: str = typer.Option(..., "--name", help="Store name of the new merged base."),
    version: str | None = typer.Option(None, "--version", help="Version (default vYYYYMMDD-HHMM)."),
    alias: str | None = typer.Option(None, "--alias", help="Point this alias at the new version."),
    root: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Merge the adapter REF into its base and publish the result as base NAME (checked:
    its logits must equal base + adapter, or nothing is published)."""
    manifest, check = export_merged(Store(root), ref, name, version=version, alias=alias)
    if as_json:
        print_json({"manifest": manifest, "check": {**check.__dict__, "ok": check.ok}})
        return
    console.print(
        f"[green]published[/] base [bold]{manifest.name}@{manifest.version}[/] "
        f"({', '.join(manifest.tags)}); logits within {check.max_abs_error:.2g} of base + adapter",
        highlight=False,
    )


@app.command("gguf")
def gguf_cmd(
    ref: str = typer.Argument(..., help="Base or merged base ref."),
    out: Path = typer.Option(..., "-o", "--out", help="Output .gguf file."),
    qtype: GgufType = typer.Option(GgufType.f16, "--type", help="Tensor type of the file."),
    force: bool = ForceOpt,
    root: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write REF as a GGUF file for llama.cpp, Ollama and mobile runtimes."""
    _report(export_gguf(Store(root), ref, out, qtype.value, force=force), as_json)


@app.command("gguf-lora")
def gguf_lora_cmd(
    ref: str = typer.Argument(..., help="Adapter ref."),
    out: Path = typer.Option(..., "-o", "--out", help="Output .gguf file."),
    dtype: LoraType = typer.Option(LoraType.f32, "--type", help="Tensor type of the LoRA weights."),
    force: bool = ForceOpt,
    root: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write the adapter REF as a llama.cpp LoRA GGUF (llama-server --lora FILE)."""
    _report(export_lora_gguf(Store(root), ref, out, dtype=dtype.value, force=force), as_json)


@app.command("ollama")
def ollama_cmd(
    ref: str = typer.Argument(..., help="Base, merged base or adapter ref."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (created if missing)."),
    qtype: GgufType = typer.Option(GgufType.q8_0, "--type", help="Tensor type of model.gguf."),
    temperature: float = typer.Option(0.0, "--temperature", help="PARAMETER temperature."),
    num_predict: int = typer.Option(128, "--num-predict", help="PARAMETER num_predict."),
    num_ctx: int | None = typer.Option(
        None, "--num-ctx", help="PARAMETER num_ctx (default: model's, ≤ 8192)."
    ),
    system: str | None = typer.Option(None, "--system", help="SYSTEM prompt (default: the adapter's)."),
    force: bool = ForceOpt,
    root: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write REF as an Ollama folder: model.gguf, adapter.gguf for adapters, and a Modelfile
    (then: ollama create NAME -f OUT/Modelfile)."""
    defaults = OllamaDefaults(
        temperature=temperature, num_predict=num_predict, num_ctx=num_ctx, system=system
    )
    _report(export_ollama(Store(root), ref, out, qtype=qtype.value, defaults=defaults, force=force), as_json)
