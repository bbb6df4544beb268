"""The model runner: a Llama/Mistral-family forward pass over our own KV cache.

It reuses the Hugging Face model's modules (embeddings, RMSNorm, rotary
embedding, MLP, weights of the projections, merged and given LoRA slots by ``loom.engine.lora``) and
owns only the attention over the slot cache, so numerics match transformers while requests
of different lengths and adapters share one decode step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from loom.engine.kv_cache import KVCache
from loom.engine.linear import FrozenLinear, packs, release_weights
from loom.engine.lora import BatchLoRAContext, LoRASlots, Projection
from loom.engine.quantized import QuantizedLinear
from loom.engine.step import DecodePass, ModelPass
from loom.errors import LoomError

SUPPORTED = {"llama", "mistral", "qwen2"}
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


class ModelRunner:
    def __init__(
        self,
        model: Any,
        num_slots: int,
        max_rank: int,
        targets: tuple[str, ...] = ATTN_TARGETS,
        pack_weights: bool = True,
    ) -> None:
        """``pack_weights``: hold CPU weights oneDNN-packed where ``loom.engine.linear`` can
        (fp32; bf16 on CPUs with native bf16) and measured it faster (``packs``); the model's
        own weights of the packed parts (and an untied lm_head's) are then dropped."""
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
        self.ctx = BatchLoRAContext(zero_slot=num_slots, max_rank=max_rank)
        self.lora_modules: dict[str, LoRASlots] = {}
        unknown = set(targets) - set(ATTN_TARGETS) - set(MLP_TARGETS)
        if unknown:
            raise LoomError(f"lora_targets {sorted(unknown)} unknown; use {ATTN_TARGETS + MLP_TARGETS}")
        self.pack = pack_weights
        self.qkv: list[Projection] = []
        self.o_proj: list[Projection] = []
        self.gate_up: list[Projection] = []
        self.down: list[Projection] = []
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if getattr(mlp, "act_fn", None) is None:
                raise LoomError(f"layer {i} MLP has no act_fn; the engine runs gated (SwiGLU) MLPs")
            self.qkv.append(self._projection(i, "qkv", attn, ("q_proj", "k_proj", "v_proj"), targets))
            self.o_proj.append(self._projection(i, "o", attn, ("o_proj",), targets))
            self.gate_up.append(self._projection(i, "gate_up", mlp, ("gate_proj", "up_proj"), targets))
            self.down.append(self._projection(i, "down", mlp, ("down_proj",), targets))
        # each layer's norms and activation, looked up once rather than through nn.Module
        # attribute access and call machinery 120 times a step (after the loop has checked act_fn)
        self.blocks = [
            (norm_fn(layer.input_layernorm), norm_fn(layer.post_attention_layernorm), layer.mlp.act_fn)
            for layer in self.layers
        ]
        self.final_norm = norm_fn(self.inner.norm)
        head = model.lm_head
        quant_head = getattr(head, "loom_quant", None)  # a quantized variant (loom.models.quantize)
        self.head: FrozenLinear | QuantizedLinear = (
            QuantizedLinear(quant_head, None)
            if quant_head is not None
            else FrozenLinear(head.weight, None, pack_weights and packs("vocab", self.dtype), vocab=True)
        )
        head.loom_quant = None
        self.head_bias = head.bias
        self.tied_head_copy = 0  # bytes of a packed lm_head whose dense weight the embeddings share
        if self.head.packed is not None:
            if head.weight.data_ptr() == self.inner.embed_tokens.weight.data_ptr():
                self.tied_head_copy = head.weight.numel() * head.weight.element_size()
            else:
                release_weights([head])

    def _projection(
        self,
        layer: int,
        part: str,
        parent: nn.Module,
        names: tuple[str, ...],
        targets: tuple[str, ...],
    ) -> Projection:
        """``part``: ``qkv``, ``o``, ``gate_up`` or ``down`` (``loom.engine.linear.KEEP_DENSE``)."""
        linears, loras = [], []
        module = "self_attn" if part in ("qkv", "o") else "mlp"
        for name in names:
            linear = getattr(parent, name)
            if not isinstance(linear, nn.Linear):
                raise LoomError(f"layer {layer} {name} is {type(linear).__name__}, not nn.Linear")
            linears.append(linear)
            lora = None
            if name in targets:
                # Only targeted modules get slot storage: memory is slots x rank x (in + out) per module.
                lora = LoRASlots(linear.in_features, linear.out_features, self.ctx, linear.weight)
                self.lora_modules[f"model.layers.{layer}.{module}.{name}"] = lora
            loras.append(lora)
        return Projection(linears, loras, self.ctx, pack=self.pack and packs(part, self.dtype))

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

    def execute(self, cache: KVCache, step: ModelPass) -> torch.Tensor:
        """Run one pass the scheduler planned; return its rows' next-token logits [rows, vocab]."""
        if isinstance(step, DecodePass):
            return self.decode(cache, step.token_ids, step.positions, step.adapter_slots)
        return self.prefill(cache, step.first_row, step.prompts, step.adapter_slots, step.starts or None)

    @torch.inference_mode()
    def prefill(
        self,
        cache: KVCache,
        first_slot: int,
        prompts: list[list[int]],
        adapter_slots: list[int],
        starts: list[int] | None = None,
    ) -> torch.Tensor:
        """Run several prompts at once into cache slots ``first_slot..``; return each
        prompt's last-token logits [B, vocab]. Row i computes ``prompts[i][starts[i]:]``
        at positions ``starts[i]..``, attending to the cached positions before it (a reused
        prefix).

        Padding-free (varlen, as vLLM prefills): the rows' tokens are laid end to end and
        every projection runs over exactly the real tokens, where right-padding to the
        longest row wasted 20-40% of the matmuls on a typical mix of chat prompts. Only
        attention needs the rows apart: one attention call per row over its own slot."""
        starts = starts or [0] * len(prompts)
        todo = [p[s:] for p, s in zip(prompts, starts, strict=True)]
        lengths = [len(t) for t in todo]
        ends = list(itertools.accumulate(lengths))
        flat = [tok for t in todo for tok in t]
        ids = torch.tensor(flat, device=self.device).unsqueeze(1)  # every token a row of one
        pos_list = [s + j for s, n in zip(starts, lengths, strict=True) for j in range(n)]
        positions = torch.tensor(pos_list, device=self.device)
        slot_of_token = torch.tensor(
            [first_slot + i for i, n in enumerate(lengths) for _ in range(n)], device=self.device
        )
        token_slots = [a for a, n in zip(adapter_slots, lengths, strict=True) for _ in range(n)]
        self.ctx.set_rows(token_slots, self.device, self.dtype, prefill=True)
        masks = [self._prefill_mask(s, n) for s, n in zip(starts, lengths, strict=True)]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # q: [tokens, heads, 1, d]; k, v: [tokens, kv_heads, 1, d]
            cache.k[layer, slot_of_token, :, positions] = k[:, :, 0]
            cache.v[layer, slot_of_token, :, positions] = v[:, :, 0]
            outs = []
            for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
                slot, q_i = first_slot + i, q[ends[i] - n : ends[i], :, 0].transpose(0, 1)[None]
                out = F.scaled_dot_product_attention(
                    q_i,
                    cache.k[layer, slot : slot + 1, :, : s + n],
                    cache.v[layer, slot : slot + 1, :, : s + n],
                    attn_mask=masks[i],
                    is_causal=masks[i] is None,
                    scale=self.scaling,
                    enable_gqa=self.kv_heads != self.num_heads,
                )
                outs.append(out[0].transpose(0, 1))  # [n, heads, d]
            return torch.cat(outs).unsqueeze(2)

        hidden = self._forward(ids, positions.unsqueeze(1), attend)
        last = hidden[torch.tensor(ends, device=self.device) - 1, -1]
        return self._logits(last)

    @torch.inference_mode()
    def decode(
        self, cache: KVCache, tokens: list[int], positions: list[int], adapter_slots: list[int]
    ) -> torch.Tensor:
        """One token for each of rows ``0..B-1`` (slot i = row i); return logits [B, vocab]."""
        b = len(tokens)
        ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
        pos = torch.tensor(positions, device=self.device)
        self.ctx.set_rows(adapter_slots, self.device, self.dtype, prefill=False)
        length = int(max(positions)) + 1
        rows = torch.arange(b, device=self.device)
        keys = torch.arange(length, device=self.device)
        mask = additive(self._allowed(pos[:, None], keys[None, :])[:, None, None, :], self.dtype)  # [B,1,1,L]

        group = self.num_heads // self.kv_heads

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[layer, rows, :, pos] = k[:, :, 0]
            cache.v[layer, rows, :, pos] = v[:, :, 0]
            # One query token per row: each K/V head's group of query heads is folded into
            # the query axis, the same math as enable_gqa without repeating K/V, and a form
            # CUDA's memory-efficient kernel accepts with a mask (GQA + mask fell back to math).
            out = F.scaled_dot_product_attention(
                q.reshape(b, self.kv_heads, group, self.head_dim),
                cache.k[layer, :b, :, :length],
                cache.v[layer, :b, :, :length],
                attn_mask=mask,
                scale=self.scaling,
            )
            return out.reshape(b, self.num_heads, 1, self.head_dim)

        hidden = self._forward(ids, pos.unsqueeze(1), attend)
        return self._logits(hidden[:, -1])

    def _prefill_mask(self, start: int, n: int) -> torch.Tensor | None:
        """Row attention mask for ``n`` new tokens after ``start`` cached ones; None when it
        is plain causal (nothing cached, no sliding window cut): SDPA's ``is_causal`` then
        skips the masked blocks instead of reading a mask (2.6x faster attention at 1,000
        tokens in fp32; BENCHMARKS.md, issue 18)."""
        if start == 0 and not (self.sliding_window and n > self.sliding_window):
            return None
        q_pos = torch.arange(start, start + n, device=self.device)[:, None]
        keys = torch.arange(start + n, device=self.device)[None, :]
        return additive(self._allowed(q_pos, keys), self.dtype)

    def _allowed(self, q_pos: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Which key positions each query position attends to: causal, within the sliding
        window where the base has one (``q_pos`` and ``keys`` broadcast against each other)."""
        mask = keys <= q_pos
        if self.sliding_window:
            mask &= keys > q_pos - self.sliding_window
        return mask

    @property
    def scaling(self) -> float:
        return float(self.head_dim**-0.5)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, attend: Any) -> torch.Tensor:
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, positions)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [b, t, 1, d]: the same for every head
        bsz, t = ids.shape
        nh, kvh, d = self.num_heads, self.kv_heads, self.head_dim
        for i, (input_norm, post_norm, act) in enumerate(self.blocks):
            qkv = self.qkv[i].merged(input_norm(h)).reshape(bsz, t, nh + 2 * kvh, d)
            # q and k heads rotated together: one rotation per layer instead of two
            qk = rope(qkv[:, :, : nh + kvh], cos, sin)
            q, k = qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2)
            v = qkv[:, :, nh + kvh :].transpose(1, 2)
            out = attend(i, q, k, v).transpose(1, 2).reshape(bsz, t, nh * d)
            h = h + self.o_proj[i].merged(out)
            gate, up = self.gate_up[i](post_norm(h))
            h = h + self.down[i].merged(act(gate).mul_(up))
        return self.final_norm(h)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.head_bias is not None:
            logits = logits + self.head_bias
        return logits.float()


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one SDPA adds to the scores (0 or -inf).
    CPU SDPA reads an additive mask faster than a boolean one, which it converts per call:
    1.6x at 300 keys for a decode batch of 32 (BENCHMARKS.md, issue 18)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, float("-inf")
    )


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers' ``apply_rotary_pos_emb`` computes it for Llama,
    Mistral and Qwen2 (``x * cos + rotate_half(x) * sin``, the same ops in the same order,
    so the same bits); ``x`` is [b, t, heads, d] and ``cos``/``sin`` [b, t, 1, d]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def norm_fn(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s RMSNorm as one fused ``F.rms_norm`` (five elementwise ops in transformers'
    Llama/Mistral/Qwen2 ``RMSNorm``). fp32 gave the same bits on our CPUs with torch 2.13
    (``tests/test_runner_ops.py`` checks it wherever the tests run); in lower precision the
    normalisation runs in fp32 and the weight multiplies after the cast, as transformers
    does. Any other norm module is called as it is."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not type(module).__name__.endswith("RMSNorm") or weight is None or eps is None:
        return cast(Callable[[torch.Tensor], torch.Tensor], module)
    shape = (int(weight.shape[0]),)

    def norm(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, shape, weight, eps)
        return weight * F.rms_norm(x.float(), shape, None, eps).to(x.dtype)

    return norm
