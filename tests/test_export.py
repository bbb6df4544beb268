"""loom export: merged bases, GGUF files (read back by transformers and gguf), LoRA GGUFs, Ollama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import import_retemplated_base, make_lora_adapter
from typer.testing import CliRunner

from loom.cli.main import app
from loom.errors import LoomError
from loom.export import export_gguf, export_lora_gguf, export_merged, export_ollama
from loom.export.gguf_arch import read_arch
from loom.models.loading import load_model
from loom.store import Store
from loom.store.adapters import publish_adapter
from loom.store.importers import import_hf_dir

IDS = torch.tensor([[1, 5, 9, 30, 100, 7, 311, 42]])


@pytest.fixture
def adapter(store: Store, tiny_base: str, tiny_adapter_dir: Path) -> str:
    m = publish_adapter(store, tiny_adapter_dir, agent="test", name="lora", base=tiny_base, version="v1")
    return f"{m.name}@{m.version}"


def _logits(store: Store, base: str, adapters: tuple[str, ...] = ()) -> torch.Tensor:
    with torch.no_grad():
        return load_model(base, list(adapters), store=store, device="cpu", dtype="float32").model(IDS).logits


def _folder(store: Store, ref: str) -> Path:
    return store.backend.local_path(store.resolve(ref).rel)


# --- merged ------------------------------------------------------------------------------------
def test_merged_is_a_new_base_equal_to_base_plus_adapter(store: Store, tiny_base: str, adapter: str) -> None:
    manifest, check = export_merged(store, adapter, "tiny-merged", version="v1")
    assert manifest.kind == "base" and manifest.base is not None
    assert manifest.tags == ["merged", f"base={tiny_base}", f"adapter={adapter}"]
    assert manifest.source.uri == f"merge:{tiny_base}+{adapter}"
    assert check.ok and check.max_abs_error < 1e-4
    merged = _logits(store, "tiny-merged@v1")
    torch.testing.assert_close(merged, _logits(store, tiny_base, (adapter,)), atol=1e-4, rtol=0)
    assert (merged - _logits(store, tiny_base)).abs().max() > 1e-2  # the adapter is really in it
    assert (_folder(store, "tiny-merged@v1") / "chat_template.jinja").is_file()


def test_merged_is_refused_when_its_logits_differ(
    store: Store, adapter: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import PeftModel

    def lossy_merge(self: PeftModel) -> object:  # a "merge" that drops the adapter
        return self.base_model.unload()

    monkeypatch.setattr(PeftModel, "merge_and_unload", lossy_merge, raising=False)
    with pytest.raises(LoomError, match=r"differ from base \+ adapter.*nothing was published"):
        export_merged(store, adapter, "tiny-merged")
    assert not [a for a in store.artifacts() if a.name == "tiny-merged"]


def test_merged_names_a_wrong_ref_kind(store: Store, tiny_base: str) -> None:
    with pytest.raises(LoomError, match=r"is a base, and 'loom export merged' takes an adapter"):
        export_merged(store, tiny_base, "tiny-merged")


# --- gguf --------------------------------------------------------------------------------------
def _load_gguf(path: Path) -> tuple[torch.Tensor, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        logits = model(IDS).logits
    return logits, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize(("qtype", "bound"), [("f32", 1e-5), ("f16", 1e-3)])
def test_gguf_reloads_with_the_store_models_logits(
    store: Store, tiny_base: str, tmp_path: Path, qtype: str, bound: float
) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / f"tiny-{qtype}.gguf"
    result = export_gguf(store, tiny_base, out, qtype)
    assert result.files == [str(out)] and result.sources == [tiny_base]
    logits, tokenizer = _load_gguf(out)
    expected = _logits(store, tiny_base)
    assert (logits - expected).abs().max().item() <= bound * max(1.0, expected.abs().max().item())
    original = AutoTokenizer.from_pretrained(_folder(store, tiny_base))
    text = "play some music by the beatles <|im_start|>"
    assert tokenizer(text).input_ids == original(text).input_ids  # type: ignore[operator]
    assert tokenizer.chat_template == original.chat_template  # type: ignore[attr-defined]


@pytest.mark.parametrize(("qtype", "rel_bound"), [("q8_0", 0.01), ("q4_0", 0.15)])
def test_quantized_gguf_weights_are_within_a_bounded_error(
    store: Store, tiny_base: str, tmp_path: Path, qtype: str, rel_bound: float
) -> None:
    from safetensors.torch import load_file

    folder = _folder(store, tiny_base)
    info = read_arch(folder)
    original = {}
    for hf_name, tensor in load_file(folder / "model.safetensors").items():
        name = info.tensor_name(hf_name)
        if name is not None:
            original[name] = info.to_llama_rows(name, tensor.numpy())
    out = tmp_path / "tiny.gguf"
    export_gguf(store, tiny_base, out, qtype)
    reader = gguf.GGUFReader(out)
    assert {t.name for t in reader.tensors} == set(original)
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    want = gguf.GGMLQuantizationType[qtype.upper()]
    assert kinds["blk.0.attn_q.weight"] == want
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    if qtype == "q4_0":  # the output projection keeps 8 bits
        assert kinds["output.weight"] == gguf.GGMLQuantizationType.Q8_0
    for t in reader.tensors:
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(original[t.name].shape)
        err = np.linalg.norm(got - original[t.name]) / np.linalg.norm(original[t.name])
        assert err <= rel_bound, f"{t.name}: relative error {err:.3g} > {rel_bound}"


def test_qwen2_gguf_keeps_hf_row_order_and_biases(tmp_path: Path) -> None:
    """Qwen2 (q/k/v biases, tied embeddings) is written without llama's Q/K reordering."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from loom.export import write_gguf
    from loom.testing import make_tokenizer

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "qwen")
    make_tokenizer().save_pretrained(tmp_path / "qwen")
    write_gguf(tmp_path / "qwen", tmp_path / "qwen.gguf", "f32", name="tiny-qwen2")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="qwen.gguf", dtype=torch.float32)
    with torch.no_grad():
        assert (back(IDS).logits - model(IDS).logits).abs().max().item() <= 1e-5


def test_gguf_refuses_bad_inputs_with_the_fix(
    store: Store, tiny_base: str, adapter: str, tiny_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "x.gguf"
    with pytest.raises(LoomError, match=r"is an adapter.*loom export merged.*gguf-lora"):
        export_gguf(store, adapter, out)
    with pytest.raises(LoomError, match=r"does not exist; create it"):
        export_gguf(store, tiny_base, tmp_path / "missing" / "x.gguf")
    with pytest.raises(LoomError, match=r"must end in \.gguf"):
        export_gguf(store, tiny_base, tmp_path / "x.bin")
    with pytest.raises(LoomError, match=r"q3_k.*not supported"):
        export_gguf(store, tiny_base, out, "q3_k")
    out.write_bytes(b"keep")
    with pytest.raises(LoomError, match=r"already exists; pass --force"):
        export_gguf(store, tiny_base, out)
    assert out.read_bytes() == b"keep"
    other = tmp_path / "phi"
    shutil.copytree(tiny_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["Phi3ForCausalLM"]}))
    import_hf_dir(store, other, "phi", version="v1")
    with pytest.raises(LoomError, match=r"Phi3ForCausalLM is not supported.*convert_hf_to_gguf"):
        export_gguf(store, "phi@v1", tmp_path / "phi.gguf")
    assert not (tmp_path / "phi.gguf").exists() and not list(tmp_path.glob(".*.part"))


def test_gguf_refuses_a_dataset(store: Store, tmp_path: Path) -> None:
    from loom.data.snapshot import snapshot

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"text": "hi", "label": "a"}) + "\n")
    snapshot(store, [data], name="rows")
    with pytest.raises(LoomError, match=r"rows@.* is a dataset snapshot, not a model"):
        export_gguf(store, "rows", tmp_path / "rows.gguf")


# --- LoRA gguf ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_gguf_has_llama_cpp_names_shapes_alpha_and_the_same_delta(
    store: Store, tiny_base: str, tiny_dir: Path, tmp_path: Path, rslora: bool
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = make_lora_adapter(tiny_dir, tmp_path / "lora", r=4, use_rslora=rslora)
    publish_adapter(store, folder, agent="test", name="lora", base=tiny_base, version="v1")
    out = tmp_path / "lora.gguf"
    export_lora_gguf(store, "lora@v1", out)
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0 and fields["general.architecture"] == "llama"
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {f"blk.{i}.attn_{p}.weight.lora_{ab}" for i in (0, 1) for p in "qv" for ab in "ab"}
    assert list(tensors["blk.0.attn_q.weight.lora_a"].shape) == [64, 4]  # ggml order: [in, rank]
    assert list(tensors["blk.0.attn_v.weight.lora_b"].shape) == [4, 32]  # [rank, out]: 2 kv heads x 16
    # llama.cpp's delta (alpha / rank, rows in its RoPE order) equals PEFT's merged delta
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload().state_dict()
    info = read_arch(tiny_dir)
    for layer in (0, 1):
        for proj, short in (("q_proj", "q"), ("v_proj", "v")):
            key = f"model.layers.{layer}.self_attn.{proj}.weight"
            name = f"blk.{layer}.attn_{short}.weight"
            a = np.asarray(tensors[f"{name}.lora_a"].data).reshape(4, 64)
            b = np.asarray(tensors[f"{name}.lora_b"].data).reshape(-1, 4)
            peft_delta = info.to_llama_rows(name, (merged[key] - before[key]).numpy())
            np.testing.assert_allclose(b @ a * (8.0 / 4), peft_delta, atol=1e-5)


def test_lora_gguf_refuses_a_base(store: Store, tiny_base: str, tmp_path: Path) -> None:
    with pytest.raises(LoomError, match=r"is a base, and 'loom export gguf-lora' takes an adapter"):
        export_lora_gguf(store, tiny_base, tmp_path / "x.gguf")


# --- ollama ------------------------------------------------------------------------------------
def test_ollama_folder_for_an_adapter(store: Store, adapter: str, tmp_path: Path) -> None:
    out = tmp_path / "ollama"
    result = export_ollama(store, adapter, out, qtype="f16")
    text = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf\nADAPTER ./adapter.gguf\n" in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0\n" in text
    assert "PARAMETER num_ctx 256" in text
    assert sorted(Path(f).name for f in result.files) == ["Modelfile", "adapter.gguf", "model.gguf"]
    assert gguf.GGUFReader(out / "adapter.gguf").fields["adapter.type"].contents() == "lora"
    with pytest.raises(LoomError, match=r"Modelfile already exists; pass --force"):
        export_ollama(store, adapter, out)


def test_ollama_notes_an_untranslated_template(store: Store, tiny_base: str, tmp_path: Path) -> None:
    other = import_retemplated_base(store, tiny_base, tmp_path, "other")
    result = export_ollama(store, other, tmp_path / "o")
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert "TEMPLATE" not in text.replace("# TEMPLATE not written", "")
    assert any("not ChatML" in n for n in result.notes)
    with pytest.raises(LoomError, match=r"parent folder .* does not exist"):
        export_ollama(store, other, tmp_path / "missing" / "o")


# --- CLI ---------------------------------------------------------------------------------------
def test_cli_export_gguf_and_errors(store: Store, tiny_base: str, adapter: str, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli.gguf"
    ok = runner.invoke(app, ["export", "gguf", tiny_base, "--type", "q8_0", "-o", str(out), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["files"] == [str(out)]
    bad = runner.invoke(app, ["export", "gguf", adapter, "-o", str(tmp_path / "y.gguf")])
    assert bad.exit_code == 2 and "loom export merged" in bad.output
    merged = runner.invoke(app, ["export", "merged", adapter, "--name", "m", "--version", "v1"])
    assert merged.exit_code == 0, merged.output
    assert "published" in merged.stdout and "m@v1" in merged.stdout


@pytest.mark.integration
def test_default_base_gguf_reloads_with_the_store_models_logits(default_store: Store, tmp_path: Path) -> None:
    """f32 reloads exactly; f16 equals the store model with its matrices rounded to float16 (what
    f16 storage means), which is ~1.6e-3 of the largest logit away from the float32 model."""
    base = default_store.resolve("smollm2-135m-instruct").ref
    loaded = load_model(base, store=default_store, device="cpu", dtype="float32").model
    with torch.no_grad():
        expected = loaded(IDS).logits
        for p in loaded.parameters():
            if p.dim() == 2:  # llama.cpp keeps 1-D tensors (norms) in F32
                p.copy_(p.half().float())
        rounded = loaded(IDS).logits
    scale = expected.abs().max().item()
    for qtype in ("f32", "f16"):
        out = tmp_path / f"smollm2-{qtype}.gguf"
        result = export_gguf(default_store, base, out, qtype)
        reader = gguf.GGUFReader(out)
        assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm", result.notes
        assert "output.weight" not in {t.name for t in reader.tensors}  # tied embeddings, as llama.cpp
        logits, _tokenizer = _load_gguf(out)
        if qtype == "f32":
            assert (logits - expected).abs().max().item() <= 1e-5 * scale
        else:
            assert (logits - rounded).abs().max().item() <= 1e-5 * scale
            assert (logits - expected).abs().max().item() <= 3e-3 * scale
        out.unlink()
