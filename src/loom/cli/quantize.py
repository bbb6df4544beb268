"""``loom store quantize``: make a base's int8/int4 variant once and cache it in the store."""

from __future__ import annotations

import typer

from loom.cli.output import console, human_bytes, print_json


def quantize(
    base: str = typer.Argument(..., help="Base ref (name or name@version)."),
    variant: str = typer.Option(..., "--variant", help="int8 (per-channel) or int4 (group-wise)."),
    group_size: int = typer.Option(128, "--group-size", help="int4: input columns per scale/zero group."),
    check: bool = typer.Option(
        True,
        "--check/--no-check",
        help="Measure the variant against fp32 (KL, greedy agreement) and record it; a variant "
        "made without the check is served only with --allow-lossy.",
    ),
    root: str | None = typer.Option(
        None, "--store", envvar="LOOM_STORE", help="Store root (path or s3://…)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the variant's manifest as JSON."),
) -> None:
    """Quantize BASE into a cached variant beside its version (the version itself is never
    changed); 'loom serve --dtype int8|int4' serves it, 'loom store verify' checks it."""
    from loom.errors import LoomError
    from loom.models.quality import quality_problem
    from loom.models.quantize import make_variant
    from loom.store import Store
    from loom.store.variants import CPU_VARIANTS, read_variant

    if variant not in CPU_VARIANTS:
        raise LoomError(f"--variant {variant!r}: choose one of {', '.join(CPU_VARIANTS)}")
    store = Store(root)
    resolved = store.resolve(base)
    if resolved.manifest.base is None:
        raise LoomError(f"{base} is a {resolved.manifest.kind}, not a base model; give a base ref")
    existing = read_variant(store, resolved, variant)
    manifest = existing or make_variant(store, resolved, variant, group_size, check)
    if as_json:
        print_json(manifest)
        return
    verb = "already cached" if existing else "made"
    console.print(
        f"[green]{verb}[/] {variant} variant of [bold]{resolved.ref}[/]: {manifest.scheme}, "
        f"{human_bytes(manifest.weight_bytes)} of quantized weights"
    )
    q = manifest.quality
    if q is not None:
        console.print(
            f"against fp32 over {q.tokens} tokens: mean KL {q.mean_kl:.4f} (max {q.max_kl:.4f}), "
            f"greedy agreement {q.agreement:.1%}"
        )
    problem = quality_problem(manifest)
    if problem:
        console.print(f"[yellow]{problem}: 'loom serve' refuses it without --allow-lossy[/]")
