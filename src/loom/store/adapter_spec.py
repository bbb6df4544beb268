"""One reading of a PEFT LoRA adapter, shared by publish, verify, store facts and the engine.

PEFT saves ``adapter_config.json`` and ``adapter_model.safetensors``. Loom serves exactly one
thing from them: ``y += scale * B @ A @ x`` on linear modules of the base. Everything else
PEFT can put there (DoRA magnitudes, full copies of ``modules_to_save``, trainable tokens,
biases, LoRA on embeddings, variants that change the forward pass) is refused here, with the
file, the field and the fix, instead of being dropped: a dropped piece serves a different
model than the one that was trained.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loom.errors import CompatibilityError, IntegrityError, LoomError
from loom.store.facts import DTYPE_BYTES, TensorInfo, numel, read_safetensors_header
from loom.store.hashing import sha256_bytes

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# PEFT's defaults, for configs that leave a field out
DEFAULT_R, DEFAULT_ALPHA = 8, 8.0
# PEFT key: base_model.model.<module as the base names it>.lora_A.weight
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# init_lora_weights values that rewrite the base's weights: saved without PEFT's conversion
# (path_initial_model_for_weight_conversion), the adapter only fits that rewritten base.
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")

PLAIN_LORA = "Loom serves plain LoRA only"
CONVERT = "merge it into a new base with PEFT's merge_and_unload and import that as a base"


def _rewrites_base(value: Any) -> bool:
    return isinstance(value, str) and value.lower().startswith(BASE_REWRITING_INITS)


# field -> (is it unservable?, why, fix): checked in this order, the first one found is reported
REFUSED_FIELDS: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "use_dora": (
        bool,
        "DoRA rescales every weight column by a trained magnitude",
        f"retrain without use_dora or {CONVERT}",
    ),
    "modules_to_save": (
        bool,
        "those modules are trained in full and saved beside the LoRA weights",
        f"retrain without modules_to_save (a changed vocabulary needs a new base) or {CONVERT}",
    ),
    "trainable_token_indices": (
        bool,
        "the embeddings of those tokens are trained and saved beside the LoRA weights",
        f"retrain without trainable_token_indices or {CONVERT}",
    ),
    "bias": (lambda v: v not in (None, "none"), "the base's biases are trained", "retrain with bias='none'"),
    "lora_bias": (bool, "lora_B carries a trained bias", "retrain with lora_bias=False"),
    "init_lora_weights": (
        _rewrites_base,
        "this initialisation rewrites the base's weights, and the adapter only fits the rewritten base",
        "save it with save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a "
        "plain LoRA on the original base",
    ),
    "layer_replication": (
        bool,
        "it duplicates base layers",
        f"retrain without layer_replication or {CONVERT}",
    ),
    "target_parameters": (
        bool,
        "it adapts raw parameters, not linear modules",
        "target linear modules instead",
    ),
    "alora_invocation_tokens": (bool, "activated LoRA switches on mid-sequence", "retrain as a plain LoRA"),
    "use_qalora": (bool, "QA-LoRA pools its inputs", "retrain without use_qalora"),
    "use_bdlora": (bool, "block-diagonal LoRA shards its matrices", "retrain without use_bdlora"),
    "velora_config": (bool, "VeLoRA changes the forward pass", "retrain as a plain LoRA"),
    "monteclora_config": (bool, "MonteCLoRA samples its weights", "retrain as a plain LoRA"),
    "arrow_config": (bool, "Arrow routes between adapters", "publish each expert as its own adapter"),
    "kasa_config": (bool, "KaSA changes the forward pass", "retrain as a plain LoRA"),
}

# tensors PEFT saves for refused features: (key part, what it is, the field that makes it)
REFUSED_TENSORS = (
    ("lora_magnitude_vector", "a DoRA magnitude", "use_dora"),
    ("trainable_tokens_", "trained token embeddings", "trainable_token_indices"),
    ("token_adapter", "trained token embeddings", "trainable_token_indices"),
    (".lora_B.bias", "a LoRA bias", "lora_bias"),
    ("lora_embedding_", "LoRA on an embedding layer", "target_modules (drop the embedding)"),
    (".modules_to_save.", "a full copy of a module", "modules_to_save"),
)


@dataclass(frozen=True)
class ModuleLoRA:
    """One adapted module: ``y += scale * (x @ a.T) @ b.T``."""

    module: str  # as the base names it, e.g. model.layers.3.self_attn.q_proj
    rank: int
    scale: float
    in_features: int
    out_features: int
    dtype: str  # safetensors dtype name, e.g. F32
    a: torch.Tensor | None = None  # [rank, in]; None when only the header was read
    b: torch.Tensor | None = None  # [out, rank]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.a is None or self.b is None:
            raise LoomError(f"{self.module}: the adapter spec was read without its tensors")
        return self.a, self.b


@dataclass(frozen=True)
class AdapterSpec:
    """A PEFT LoRA adapter as Loom serves it; build it with ``from_folder`` / ``from_bytes``."""

    where: str
    modules: dict[str, ModuleLoRA]
    r: int  # the config's r (rank_pattern may give modules other ranks)
    alpha: float  # the config's lora_alpha
    dropout: float
    use_rslora: bool
    parameter_count: int
    nbytes: int  # as stored

    @property
    def rank(self) -> int:
        """The largest rank of any module: what a serving slot must hold."""
        return max(m.rank for m in self.modules.values())

    @property
    def targets(self) -> list[str]:
        """Short names of the adapted modules (q_proj, v_proj...), sorted."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        expected_sha256: dict[str, str] | None = None,
        *,
        where: str | None = None,
        load_tensors: bool = True,
    ) -> AdapterSpec:
        """Read ``folder`` (each file once, checked against ``expected_sha256`` file -> sha256
        from the store manifest in the same read). ``load_tensors=False`` reads only the
        safetensors header: shapes and facts, no weights."""
        where = where or str(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise LoomError(f"{where}: no {CONFIG_FILE}; is this a PEFT adapter folder?")
        if not (folder / WEIGHTS_FILE).is_file():
            raise LoomError(
                f"{where}: no {WEIGHTS_FILE}; Loom stores safetensors only "
                f"(save with PeftModel.save_pretrained(..., safe_serialization=True))"
            )
        config = read_checked(folder, CONFIG_FILE, where, expected_sha256)
        if not load_tensors:
            with open(folder / WEIGHTS_FILE, "rb") as fh:
                return cls.from_header(config, read_safetensors_header(fh, f"{where}: {WEIGHTS_FILE}"), where)
        return cls.from_bytes(config, read_checked(folder, WEIGHTS_FILE, where, expected_sha256), where)

    @classmethod
    def from_bytes(cls, config_bytes: bytes, tensor_bytes: bytes, where: str) -> AdapterSpec:
        """Parse both files' bytes, tensors included."""
        from safetensors.torch import load as load_safetensors

        header = read_safetensors_header(io.BytesIO(tensor_bytes), f"{where}: {WEIGHTS_FILE}")

        def load() -> dict[str, torch.Tensor]:
            try:
                return load_safetensors(tensor_bytes)
            except Exception as exc:  # safetensors raises its own SafetensorError
                raise LoomError(
                    f"{where}: {WEIGHTS_FILE} cannot be read ({exc}); save the adapter again with PEFT"
                ) from None

        return _build(_parse_config(config_bytes, where), header, where, load)

    @classmethod
    def from_header(cls, config_bytes: bytes, header: dict[str, TensorInfo], where: str) -> AdapterSpec:
        """Parse the config and a safetensors header (names, dtypes, shapes): no weights."""
        return _build(_parse_config(config_bytes, where), header, where, None)

    def fit_problems(self, base: dict[str, TensorInfo]) -> list[str]:
        """Why this adapter does not apply to a base with tensors ``base`` (empty when it fits)."""
        problems: list[str] = []
        for name, m in self.modules.items():
            weight = base.get(f"{name}.weight")
            if weight is None:
                problems.append(f"{self.where}: LoRA on {name}, which the base does not have")
                continue
            shape = weight[1]
            if len(shape) != 2 or (m.out_features, m.in_features) != (shape[0], shape[1]):
                problems.append(
                    f"{self.where}: {name} maps {m.in_features} inputs to {m.out_features} outputs; "
                    f"the base's {name}.weight has shape {list(shape)}"
                )
        return problems


def read_checked(folder: Path, name: str, where: str, expected: dict[str, str] | None) -> bytes:
    """A file's bytes, checked against the manifest's sha256 in the same single read (about 1 ms
    per MB here): nothing may serve weights that differ from what was published."""
    data = (folder / name).read_bytes()
    if expected is not None and name in expected and sha256_bytes(data) != expected[name]:
        raise IntegrityError(
            f"{where}: {name} does not match its manifest checksum (the stored copy is damaged); "
            f"run 'loom store verify {where}' and republish or restore it"
        )
    return data


def _parse_config(config_bytes: bytes, where: str) -> dict[str, Any]:
    try:
        config = json.loads(config_bytes)
    except ValueError as exc:
        raise LoomError(
            f"{where}: {CONFIG_FILE} is not JSON ({exc}); save the adapter again with PEFT"
        ) from None
    if not isinstance(config, dict):
        raise LoomError(f"{where}: {CONFIG_FILE} is not a JSON object; save the adapter again with PEFT")
    peft_type = str(config.get("peft_type", "LORA"))
    if peft_type.upper() != "LORA":
        raise CompatibilityError(
            f"{where}: {CONFIG_FILE}: peft_type is {peft_type}; Loom serves LoRA adapters only: "
            f"train with peft.LoraConfig"
        )
    for field, (refused, why, fix) in REFUSED_FIELDS.items():
        value = config.get(field)
        if value is not None and refused(value):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise CompatibilityError(
                f"{where}: {CONFIG_FILE}: {field} is {shown}; {PLAIN_LORA} ({why}): {fix}"
            )
    return config


def _check_tensor_names(header: dict[str, TensorInfo], where: str) -> None:
    for key in sorted(header):
        if LORA_KEY.match(key):
            continue
        for part, what, field in REFUSED_TENSORS:
            if part in key:
                raise CompatibilityError(
                    f"{where}: {WEIGHTS_FILE}: {key} is {what} ({field} in training); {PLAIN_LORA}: "
                    f"retrain without {field} or {CONVERT}"
                )
        raise CompatibilityError(
            f"{where}: {WEIGHTS_FILE}: tensor {key} is not a LoRA A or B matrix (a full module copy, "
            f"resized embeddings or another method's weights); {PLAIN_LORA}: save the adapter with "
            f"PEFT's LoraConfig without modules_to_save or embedding targets"
        )


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first
    key that, as a regex, matches the end of the module path at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _number(config: dict[str, Any], field: str, default: float, where: str) -> float:
    value = config.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise CompatibilityError(
            f"{where}: {CONFIG_FILE}: {field} is {json.dumps(value)}; it must be a positive number: "
            f"save the adapter again with PEFT"
        )
    return float(value)


def _build(
    config: dict[str, Any],
    header: dict[str, TensorInfo],
    where: str,
    load: Callable[[], dict[str, torch.Tensor]] | None,
) -> AdapterSpec:
    """Check the header, then (``load`` given) read the weights: nothing refused is loaded."""
    _check_tensor_names(header, where)
    r, alpha = (
        int(_number(config, "r", DEFAULT_R, where)),
        _number(config, "lora_alpha", DEFAULT_ALPHA, where),
    )
    rslora = bool(config.get("use_rslora", False))
    rank_pattern: dict[str, Any] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, Any] = config.get("alpha_pattern") or {}
    pairs: dict[str, dict[str, str]] = {}
    for key in header:
        match = LORA_KEY.match(key)
        assert match is not None  # _check_tensor_names let only LoRA keys through
        pairs.setdefault(match["module"], {})[match["part"]] = key
    if not pairs:
        raise CompatibilityError(
            f"{where}: {WEIGHTS_FILE} holds no LoRA weights; save the adapter with PEFT's save_pretrained"
        )
    shapes = {
        m: _pair_shapes(m, keys, header, int(pattern_value(rank_pattern, m, r)), where)
        for m, keys in pairs.items()
    }
    tensors = load() if load is not None else None
    modules: dict[str, ModuleLoRA] = {}
    for module, keys in sorted(pairs.items()):
        rank, in_features, out_features = shapes[module]
        module_alpha = float(pattern_value(alpha_pattern, module, alpha))
        modules[module] = ModuleLoRA(
            module=module,
            rank=rank,
            scale=module_alpha / (math.sqrt(rank) if rslora else rank),  # as PEFT's LoraLayer.scaling
            in_features=in_features,
            out_features=out_features,
            dtype=header[keys["A"]][0],
            a=tensors[keys["A"]] if tensors is not None else None,
            b=tensors[keys["B"]] if tensors is not None else None,
        )
    return AdapterSpec(
        where=where,
        modules=modules,
        r=r,
        alpha=alpha,
        dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=rslora,
        parameter_count=sum(numel(shape) for _d, shape in header.values()),
        nbytes=sum(numel(shape) * DTYPE_BYTES.get(d, 4) for d, shape in header.values()),
    )


def _pair_shapes(
    module: str, keys: dict[str, str], header: dict[str, TensorInfo], rank: int, where: str
) -> tuple[int, int, int]:
    """(rank, in, out) of ``module``'s A and B, checked against each other and the config's rank."""
    if set(keys) != {"A", "B"}:
        have, lack = ("A", "B") if "A" in keys else ("B", "A")
        raise CompatibilityError(
            f"{where}: {WEIGHTS_FILE}: {module} has lora_{have} but no lora_{lack}; the file is "
            f"incomplete: save the adapter again with PEFT"
        )
    (a_dtype, a_shape), (b_dtype, b_shape) = header[keys["A"]], header[keys["B"]]
    for dtype in (a_dtype, b_dtype):
        if dtype not in FLOAT_DTYPES:
            raise CompatibilityError(
                f"{where}: {WEIGHTS_FILE}: {module} is stored as {dtype}; Loom reads LoRA weights in "
                f"{', '.join(FLOAT_DTYPES)}: save the adapter unquantized"
            )
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != rank or b_shape[1] != rank:
        raise CompatibilityError(
            f"{where}: {WEIGHTS_FILE}: {module} has A {list(a_shape)} and B {list(b_shape)}, but "
            f"{CONFIG_FILE} gives it rank {rank} (r / rank_pattern), so A must be [{rank}, in] and B "
            f"[out, {rank}]: the two files do not belong together; save the adapter again with PEFT"
        )
    return rank, a_shape[1], b_shape[0]
