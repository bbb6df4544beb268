"""``verify``: prove stored bytes still match their manifests.

Checks per version: the manifest validates and names its folder; every
listed file exists with the listed size and sha256; nothing unlisted is in the
folder but eval results (``evals/<id>.json``, written after publishing, each
sealed with its own sha256: ``loom.store.sealed``) and quantized variants
(``variants/<variant>/``, each checked against its own manifest: ``loom.store.variants``);
adapters name a base that exists, with the same fingerprint, are
plain LoRA as Loom serves it (``AdapterSpec``), and every LoRA matrix fits
that base's module shapes. ``dry_run`` skips hashing
(paths, sizes, manifests and shapes only, no weights read).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from loom.errors import LoomError
from loom.store.adapter_spec import CONFIG_FILE, WEIGHTS_FILE, AdapterSpec
from loom.store.backends import CLAIM
from loom.store.facts import TensorInfo, read_safetensors_header
from loom.store.hashing import Progress, sha256_stream
from loom.store.layout import ArtifactPath
from loom.store.manifest import MANIFEST_NAME, Manifest
from loom.store.sealed import unseal
from loom.store.store import Store
from loom.store.variants import VARIANTS_DIR, verify_variant

# Eval results live beside a version in this folder; they are not in its manifest.
EVALS_DIR = "evals"


@dataclass
class VersionReport:
    ref: str
    kind: str
    problems: list[str] = field(default_factory=list)
    checked_files: int = 0
    checked_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def tensors_of(store: Store, rel: str, manifest: Manifest) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for f in manifest.files:
        if f.path.endswith(".safetensors"):
            with store.backend.open_read(f"{rel}/{f.path}") as fh:
                tensors.update(read_safetensors_header(fh, f"{rel}/{f.path}"))
    return tensors


def verify_version(
    store: Store,
    artifact: ArtifactPath,
    version: str,
    *,
    dry_run: bool = False,
    progress: Callable[[int], Progress | None] | None = None,
    variants: bool = False,
) -> VersionReport:
    """``variants``: check the version's cached quantized variants too (``loom store verify``
    does; loading a base does not, so a damaged variant never blocks serving the base)."""
    ref = f"{artifact.name}@{version}"
    report = VersionReport(ref=ref, kind=artifact.kind)
    rel = artifact.version_rel(version)
    try:
        manifest = store.manifest(artifact, version)
    except LoomError as exc:
        report.problems.append(str(exc))
        return report
    expect = (artifact.kind, artifact.name, version, artifact.agent)
    got = (manifest.kind, manifest.name, manifest.version, manifest.agent)
    if expect != got:
        report.problems.append(f"{ref}: manifest says {got} but the folder is {expect}")
    present = set(store.backend.list_files(rel)) - {MANIFEST_NAME, CLAIM}
    listed = {f.path for f in manifest.files}
    evals = {p for p in present - listed if _is_eval_file(p)}
    # an eval write cut off before its rename leaves evals/.<id>.json.<hex>.tmp: not the version's
    leftovers = {p for p in present - listed if p.startswith(f"{EVALS_DIR}/.") and p.endswith(".tmp")}
    # quantized variants (loom.store.variants) carry their own manifests: checked below
    variant_files = {p for p in present - listed if p.startswith(f"{VARIANTS_DIR}/")}
    for extra in sorted(present - listed - evals - leftovers - variant_files):
        report.problems.append(f"{ref}: unexpected file {extra} (not in the manifest)")
    tick = progress(manifest.total_bytes) if progress and not dry_run else None
    for f in manifest.files:
        path = f"{rel}/{f.path}"
        if f.path not in present:
            report.problems.append(f"{ref}: file {f.path} is missing")
            continue
        size = store.backend.size(path)
        if size != f.size:
            report.problems.append(f"{ref}: file {f.path} has {size} bytes, manifest says {f.size}")
            continue
        if not dry_run:
            with store.backend.open_read(path) as fh:
                digest, _ = sha256_stream(fh, tick)
            if digest != f.sha256:
                report.problems.append(
                    f"{ref}: file {f.path} is corrupted (sha256 {digest[:12]}…, manifest says "
                    f"{f.sha256[:12]}…); restore it or publish a new version"
                )
        report.checked_files += 1
        report.checked_bytes += f.size
    if manifest.kind == "adapter" and not report.problems:
        report.problems += _adapter_fit(store, rel, manifest)
    for path in sorted(evals):
        report.problems += _eval_problems(store, ref, f"{rel}/{path}", path)
    for variant in sorted({p.split("/")[1] for p in variant_files} if variants else ()):
        report.problems += verify_variant(store, rel, ref, variant, dry_run)
    return report


def _is_eval_file(path: str) -> bool:
    folder, _, name = path.partition("/")
    return folder == EVALS_DIR and "/" not in name and name.endswith(".json") and not name.startswith(".")


def _eval_problems(store: Store, ref: str, rel: str, path: str) -> list[str]:
    """An eval file's own seal (small files: checked in a dry run too)."""
    fix = f"delete it and run 'loom eval' again (eval files are not part of {ref})"
    try:
        unseal(store.backend.read_bytes(rel), f"{ref}: eval file {path}", fix)
    except LoomError as exc:
        return [str(exc)]
    return []


def _adapter_fit(store: Store, rel: str, manifest: Manifest) -> list[str]:
    info = manifest.adapter
    ref = f"{manifest.name}@{manifest.version}"
    if info is None:
        return [f"{ref}: adapter manifest has no 'adapter' section"]
    try:
        base = store.resolve(info.base_ref)
    except LoomError as exc:
        return [f"{ref}: its base {info.base_ref} cannot be found ({exc})"]
    if base.manifest.base is None:
        return [f"{ref}: its base {info.base_ref} is not a base model"]
    if base.manifest.base.fingerprint != info.base_fingerprint:
        return [
            f"{ref}: base fingerprint {info.base_fingerprint} does not match {base.ref} "
            f"({base.manifest.base.fingerprint}); retrain the adapter on this base"
        ]
    try:
        spec = adapter_spec_of(store, rel, ref)
    except LoomError as exc:  # refused (DoRA, modules_to_save...): published before the check
        return [str(exc)]
    except OSError as exc:
        return [f"{ref}: cannot read {CONFIG_FILE} / {WEIGHTS_FILE} ({exc}); restore or republish it"]
    return spec.fit_problems(tensors_of(store, base.rel, base.manifest))


def adapter_spec_of(store: Store, rel: str, where: str) -> AdapterSpec:
    """The adapter at ``rel`` parsed from its config and safetensors header (no weights read;
    works on any backend)."""
    with store.backend.open_read(f"{rel}/{CONFIG_FILE}") as fh:
        config = fh.read()
    with store.backend.open_read(f"{rel}/{WEIGHTS_FILE}") as fh:
        header = read_safetensors_header(fh, f"{where}: {WEIGHTS_FILE}")
    return AdapterSpec.from_header(config, header, where)


def verify_store(
    store: Store,
    ref: str | None = None,
    *,
    dry_run: bool = False,
    progress: Callable[[int], Progress | None] | None = None,
) -> list[VersionReport]:
    """Verify one ref (``name`` = every version of it; ``name@v`` = one) or everything."""
    if ref is None:
        targets = [(a, v) for a in store.artifacts() for v in store.versions(a)]
    elif "@" in ref:
        resolved = store.resolve(ref)
        targets = [(resolved.artifact, resolved.version)]
    else:
        artifact = store.find(ref)
        targets = [(artifact, v) for v in store.versions(artifact)]
    return [
        verify_version(store, a, v, dry_run=dry_run, progress=progress, variants=True) for a, v in targets
    ]
