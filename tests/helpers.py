"""Builders for tiny, random, real-architecture models used across tests (offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loom.store.manifest import ArchitectureFacts
from loom.testing import make_tiny_model, make_tokenizer

# the default base's shape (SmolLM2-135M-Instruct), for plans and probes without its weights
SMOLLM2 = ArchitectureFacts(
    architecture="LlamaForCausalLM",
    model_type="llama",
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
)

ADAPTERS = {  # the engine store's adapters, name: (seed, rank, targets)
    "qv4": (11, 4, ("q_proj", "v_proj")),
    "all8": (12, 8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "o2": (13, 2, ("o_proj",)),
}


def make_tiny_mistral(folder: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Save a randomly initialised MistralForCausalLM (real Mistral code) + tokenizer."""
    model = make_tiny_model(seed, hidden, layers)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer().save_pretrained(folder)
    return folder


def make_lora_adapter(
    base_folder: Path,
    folder: Path,
    seed: int = 1,
    r: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    b_std: float = 0.5,
    **lora: Any,
) -> Path:
    """A PEFT LoRA adapter with non-zero B so it really changes the output. ``lora``: more
    LoraConfig fields (use_dora, rank_pattern...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, b_std)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return folder


def import_retemplated_base(store, base_ref: str, tmp: Path, name: str) -> str:  # type: ignore[no-untyped-def]
    """Import a copy of ``base_ref`` whose chat template differs: same shapes, new fingerprint."""
    import json
    import shutil

    from loom.store.importers import import_hf_dir

    other = tmp / name
    shutil.copytree(store.backend.local_path(store.resolve(base_ref).rel), other)
    for p in other.iterdir():
        p.chmod(0o644)
    (other / "manifest.json").unlink()
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    m = import_hf_dir(store, other, name, version="v1")
    return f"{m.name}@{m.version}"


def train_tiny_intent(  # type: ignore[no-untyped-def]
    store, rows: list[dict[str, Any]], root: Path, *, version: str, alias: str | None = "current", **cfg: Any
) -> None:
    """``loom train`` an ``intent`` adapter on the store's ``tiny`` base (fields format, labels from
    ``rows``), published as ``intent@version``; ``cfg`` overrides settings (max_steps, prompts)."""
    import json

    from loom.data.formats import RowFormat
    from loom.train.config import TrainConfig
    from loom.train.run import train

    data = root / f"intent-{version}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings: dict[str, Any] = dict(
        train_files=[str(data)],
        format=RowFormat.fields,
        system_prompt="You label requests.",
        input_template="Intent of: {text}",
        output_template='{{"intent": "{label}"}}',
        agent="intent",
        adapter_name="intent",
        model_name_or_path="tiny",
        max_steps=2,
        train_batch_size=4,
        adapter_r=4,
        target_modules=["q_proj", "v_proj"],
        output_dir=root / f"run-{version}",
        publish=True,
        adapter_version=version,
        alias=alias,
        seed=3,
    )
    train(TrainConfig(**{**settings, **cfg}), store)


def tiny_engine(store: Any, **config: int) -> Any:  # Engine on the store's "tiny" base
    from loom.engine import Engine

    return Engine.from_store("tiny", device="cpu", store=store, **config)


# --- Numeric agreement -------------------------------------------------------------------------
# Two fp32 computations of the same logits differ because they sum in different orders: oneDNN
# picks other kernels (and blockings) per ISA, Loom holds packed weights, batches rows together.
# A fixed atol is a statement about one machine. Instead, each comparison is checked against what
# fp32 arithmetic allows:
# - one product of reduction length K (``assert_product_close``): Higham's bound for any
#   summation order, |fl(x.w) - x.w| <= gamma_K * (|x|.|w|), gamma_K = K*u / (1 - K*u), u = 2^-24;
#   two such results differ by at most twice that.
# - a whole network (``Fp32Reference``): no worst-case bound composes usefully through 30 layers,
#   so the reference is computed twice, in fp32 and in float64 (exact to fp32's eyes). The fp32
#   reference's own distance to float64 is the rounding noise of this computation on this machine
#   and ISA; a correct fp32 implementation summing in another order has noise of the same size,
#   so its distance to float64 must stay within NOISE_FACTOR times the reference's. A real bug
#   (a wrong scale, a row reading another row's K/V) is orders of magnitude above it.
FP32_U = 2.0**-24
NOISE_FACTOR = 4.0


def gamma(k: int) -> float:
    return k * FP32_U / (1 - k * FP32_U)


def assert_product_close(
    got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """``got`` must equal ``x @ weight.T + bias`` within two fp32 rounding bounds of the product."""
    exact = x.double() @ weight.double().T + (bias.double() if bias is not None else 0.0)
    magnitude = x.double().abs() @ weight.double().abs().T + (
        bias.double().abs() if bias is not None else 0.0
    )
    bound = 2 * gamma(x.shape[-1] + 1) * magnitude
    excess = ((got.double() - exact).abs() - bound).max().item()
    assert excess <= 0, f"product off by more than 2*gamma_K*|x||w| (excess {excess:.3g})"


# bf16 products (``assert_bf16_product_close``): the operands are bf16 values, whose products are
# exact in fp32 (8 x 8 significant bits); oneDNN's and ATen's bf16 GEMMs accumulate them (and the
# bias) in fp32, within the fp32 bound above, then round to bf16 (unit roundoff 2^-8) once, or
# twice where the bias is added to the rounded product in bf16. Each rounding is relative to the
# value rounded, which is within |exact| + |bias| + the fp32 error of the exact result.
BF16_U = 2.0**-8


def assert_bf16_product_close(
    got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """``got`` (bf16) must equal ``x @ weight.T + bias`` of bf16 operands within an fp32
    accumulation and two bf16 roundings."""
    assert got.dtype == torch.bfloat16 and x.dtype == weight.dtype == torch.bfloat16
    b = bias.double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    exact = x.double() @ weight.double().T + b
    accumulated = gamma(x.shape[-1] + 1) * (x.double().abs() @ weight.double().abs().T + b.abs())
    bound = accumulated + 2 * BF16_U * (1 + BF16_U) * (exact.abs() + b.abs() + accumulated)
    excess = ((got.double() - exact).abs() - bound).max().item()
    assert excess <= 0, f"bf16 product off by more than fp32 accumulation + 2 bf16 roundings ({excess:.3g})"


class Fp32Reference:
    """Reference logits computed in fp32 and in float64 from the same model and inputs."""

    def __init__(self, model: Any, **inputs: torch.Tensor) -> None:
        import copy

        with torch.no_grad():
            self.fp32 = model(**inputs).logits.float()
            self.fp64 = copy.deepcopy(model).double()(**inputs).logits
        # never below one ulp of the largest logit: a reference that happens to round exactly
        # would otherwise demand bit equality
        self.noise = max(
            (self.fp32.double() - self.fp64).abs().max().item(), FP32_U * self.fp64.abs().max().item()
        )

    def error(self, got: torch.Tensor, index: Any = ...) -> float:
        return (got.double() - self.fp64[index]).abs().max().item()

    def check(self, got: torch.Tensor, index: Any = ..., what: object = "") -> float:
        """Assert ``got`` (fp32, another summation order) is as close to float64 as fp32 allows."""
        err, bound = self.error(got, index), NOISE_FACTOR * self.noise
        assert err <= bound, (
            f"{what}: |got - fp64| = {err:.3g} > {NOISE_FACTOR:g} x fp32 noise {self.noise:.3g}"
        )
        record_numeric(str(what), err, self.noise)
        return err


NUMERIC_LOG: list[tuple[str, float, float]] = []  # (what, error, noise): printed by LOOM_NUMERIC_REPORT


def record_numeric(what: str, err: float, noise: float) -> None:
    NUMERIC_LOG.append((what, err, noise))


def fallback_answer(payload: dict[str, Any], agent: str) -> dict[str, Any]:
    """A "live tool call" fallback for the agent tests (``helpers:fallback_answer``)."""
    return {"intent": "B"} if "b" in str(payload.get("text", "")) else {"intent": "A"}


def failing_fallback(payload: dict[str, Any], agent: str) -> str:
    raise RuntimeError("legacy system down")
