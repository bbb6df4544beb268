"""The model runner: a Llama/Mistral-family forward pass over our own KV cache.

It reuses the Hugging Face model's modules (embeddings, RMSNorm, rotary
embedding, MLP, projections wrapped by BatchedLoRALinear) and owns only the
attention over the slot cache, so numerics match transformers while requests
of different lengths and adapters share one decode step.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loom.engine.kv_cache import KVCache
from loom.engine.lora import BatchedLoRALinear, BatchLoRAContext, FastLinear, fast_linear
from loom.errors import LoomError

SUPPORTED = {"llama", "mistral", "qwen2"}
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


class ModelRunner:
    def __init__(
        self, model: Any, num_slots: int, max_rank: int, targets: tuple[str, ...] = ATTN_TARGETS
    ) -> None:
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise LoomError(
                f"the engine runs {sorted(SUPPORTED)} architectures; this base is {cfg.model_type!r}"
            )
        self.model = model.eval()
        self.config = cfg
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.sliding_window = getattr(cfg, "sliding_window", None)
        self.vocab_size = int(model.lm_head.out_features)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        rope_module = importlib.import_module(type(model).__module__)
        self._apply_rope = rope_module.apply_rotary_pos_emb
        self.ctx = BatchLoRAContext(zero_slot=num_slots)
        self.lora_modules: dict[str, BatchedLoRALinear] = {}
        unknown = set(targets) - set(ATTN_TARGETS) - set(MLP_TARGETS)
        if unknown:
            raise LoomError(f"lora_targets {sorted(unknown)} unknown; use {ATTN_TARGETS + MLP_TARGETS}")
        # Only targeted modules get slot storage: memory is slots x rank x (in + out) per module.
        for i, layer in enumerate(self.layers):
            for part, parent, names in (
                ("self_attn", layer.self_attn, ATTN_TARGETS),
                ("mlp", layer.mlp, MLP_TARGETS),
            ):
                for name in names:
                    linear = getattr(parent, name)
                    if not isinstance(linear, nn.Linear):
                        raise LoomError(f"layer {i} {name} is {type(linear).__name__}, not nn.Linear")
                    if name not in targets:
                        setattr(parent, name, FastLinear(linear))
                        continue
                    wrapped = BatchedLoRALinear(linear, num_slots, max_rank, self.ctx)
                    setattr(parent, name, wrapped)
                    self.lora_modules[f"model.layers.{i}.{part}.{name}"] = wrapped

    def new_cache(self, budget_bytes: int, max_len: int, max_seqs: int | None = None) -> KVCache:
        if self.sliding_window and max_len > self.sliding_window:
            raise LoomError(f"max_seq_len {max_len} exceeds the base's sliding window {self.sliding_window}")
        return KVCache.from_budget(
            budget_bytes,
            max_len,
            len(self.layers),
            self.kv_heads,
            self.head_dim,
            self.device,
            self.dtype,
            max_seqs,
        )

    @torch.inference_mode()
    def prefill(
        self, cache: KVCache, first_slot: int, prompts: list[list[int]], adapter_slots: list[int]
    ) -> torch.Tensor:
        """Run several whole prompts at once into cache slots ``first_slot..``; return each
        prompt's last-token logits [B, vocab]. Prompts are right-padded to the longest;
        padding is masked out and its cache entries are overwritten before any use."""
        b, t = len(prompts), max(len(p) for p in prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        ids = torch.zeros(b, t, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, device=self.device)
        positions = torch.arange(t, device=self.device).expand(b, t)
        self.ctx.set_rows(adapter_slots, self.device)
        q_idx = torch.arange(t, device=self.device)
        mask = (q_idx[None, :] <= q_idx[:, None])[None] & (q_idx[None, None, :] < lengths[:, None, None])
        if self.sliding_window:
            mask &= (q_idx[None, :] > q_idx[:, None] - self.sliding_window)[None]
        mask = mask[:, None]  # [B, 1, T, T]
        rows = slice(first_slot, first_slot + b)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[layer, rows, :, :t] = k
            cache.v[layer, rows, :, :t] = v
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=self.kv_heads != self.num_heads
            )

        hidden = self._forward(ids, positions, attend)
        last = hidden[torch.arange(b, device=self.device), lengths - 1]
        return self._logits(last)

    @torch.inference_mode()
    def decode(
        self, cache: KVCache, tokens: list[int], positions: list[int], adapter_slots: list[int]
    ) -> torch.Tensor:
        """One token for each of rows ``0..B-1`` (slot i = row i); return logits [B, vocab]."""
        b = len(tokens)
        ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
        pos = torch.tensor(positions, device=self.device)
        self.ctx.set_rows(adapter_slots, self.device)
        length = int(max(positions)) + 1
        rows = torch.arange(b, device=self.device)
        keys = torch.arange(length, device=self.device)
        mask = keys.unsqueeze(0) <= pos.unsqueeze(1)  # [B, L]
        if self.sliding_window:
            mask &= keys.unsqueeze(0) > pos.unsqueeze(1) - self.sliding_window
        mask = mask[:, None, None, :]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[layer, rows, :, pos] = k[:, :, 0]
            cache.v[layer, rows, :, pos] = v[:, :, 0]
            return F.scaled_dot_product_attention(
                q,
                cache.k[layer, :b, :, :length],
                cache.v[layer, :b, :, :length],
                attn_mask=mask,
                scale=self.scaling,
                enable_gqa=self.kv_heads != self.num_heads,
            )

        hidden = self._forward(ids, pos.unsqueeze(1), attend)
        return self._logits(hidden[:, -1])

    @property
    def scaling(self) -> float:
        return float(self.head_dim**-0.5)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Any) -> torch.Tensor:
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, positions)
        bsz, t = ids.shape
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).reshape(bsz, t, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).reshape(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).reshape(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._apply_rope(q, k, cos, sin)
            out = attend(i, q, k, v).transpose(1, 2).reshape(bsz, t, self.num_heads * self.head_dim)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.inner.norm(h)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.lm_head
        return fast_linear(hidden, head.weight, head.bias).float()
