"""Weight-only quantized base products on CPUs: int8 (per output channel) and int4
(group-wise), run by torch's own packed-weight kernels.

* **int8**: ``w ≈ q * scale[out]``, ``q`` in -127..127; the product is
  ``torch.ops.aten._weight_int8pack_mm``.
* **int4**: per group of ``group_size`` input columns and output row,
  ``w ≈ (q - 8) * scale + zero``, ``q`` in 0..15 (the "tinygemm" convention torch's kernel
  reads); stored two values a byte, converted once at load into the kernel's layout
  (``_convert_weight_to_int4pack_for_cpu``); the product is ``_weight_int4pack_mm_for_cpu``.

Activations enter both kernels in bf16 and the result comes back as fp32 (biases and
the LoRA deltas are added in fp32 by the caller). Measured on the 2-core AMD EPYC
(avx512_bf16), 32 rows x 576 @ 576 x 49,152 (SmolLM2's vocabulary projection): the
kernels' fp32-activation path took 1,041 ms (int8) and 2,426 ms (int4) against 68 / 43 ms
with bf16 activations, so fp32 activations are not an option. Scales are stored in bf16,
the dtype the kernels take them in, so ``dequantize()`` is exactly the weight the kernel
multiplies by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP_SIZES = (128, 64, 32)  # the largest that divides a weight's input features is used
# The int4 kernel's inner K tiling (torch's tinygemm layout); 2 works for every K that is a
# multiple of 32, the smallest group size offered.
INT4_INNER_K_TILES = 2
SCALE_DTYPE = torch.bfloat16
ALIGNMENT = 64  # bytes: torch's CPU allocator's, and what its packed-int kernels may assume


@dataclass
class Int8Weight:
    qweight: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # bf16 [out]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.qweight.shape[0]), int(self.qweight.shape[1])

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 2

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]


@dataclass
class Int4Weight:
    qweight: torch.Tensor  # uint8 [out, in // 2]: two values a byte, the even column high
    scales_zeros: torch.Tensor  # bf16 [in // group_size, out, 2]: (scale, zero) per group
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.qweight.shape[0]), int(self.qweight.shape[1]) * 2

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales_zeros.numel() * 2

    def values(self) -> torch.Tensor:
        """The 4-bit values as int32 [out, in] (0..15)."""
        q = self.qweight.to(torch.int32)
        return torch.stack([q >> 4, q & 15], dim=-1).reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        out, inp = self.shape
        groups = inp // self.group_size
        sz = self.scales_zeros.float()
        scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # [out, groups, 1]
        q = self.values().reshape(out, groups, self.group_size).float()
        return ((q - 8) * scale + zero).reshape(out, inp)


QuantWeight = Int8Weight | Int4Weight


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8; the scale is rounded to bf16 first, so ``q`` is
    computed against the scale the kernel will use."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).to(SCALE_DTYPE)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scales.contiguous())


def int4_group_size(in_features: int, preferred: int = INT4_GROUP_SIZES[0]) -> int:
    """``preferred`` when it divides ``in_features``, else the largest offered size that does."""
    for size in (preferred, *INT4_GROUP_SIZES):
        if in_features % size == 0:
            return size
    raise ValueError(
        f"int4 needs input features divisible by one of {INT4_GROUP_SIZES}; this weight has "
        f"{in_features}: use the int8 variant for this base"
    )


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZES[0]) -> Int4Weight:
    """Asymmetric group-wise int4 (min/max per group), in the layout ``Int4Weight`` stores."""
    w = weight.detach().float()
    out, inp = w.shape
    group_size = int4_group_size(inp, group_size)
    groups = w.reshape(out, inp // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(SCALE_DTYPE).float()
    zero = (lo + 8 * scale).to(SCALE_DTYPE).float()
    q = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8)
    q = q.reshape(out, inp)
    packed = (q[:, 0::2] << 4) | q[:, 1::2]
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(SCALE_DTYPE)
    return Int4Weight(packed.contiguous(), scales_zeros.contiguous(), group_size)


def concat_out(weights: list[QuantWeight]) -> QuantWeight:
    """Weights that read the same input (q/k/v; gate/up) stacked along the output features."""
    first = weights[0]
    if len(weights) == 1:
        return first
    if isinstance(first, Int8Weight) and all(isinstance(w, Int8Weight) for w in weights):
        int8s = [w for w in weights if isinstance(w, Int8Weight)]
        return Int8Weight(torch.cat([w.qweight for w in int8s]), torch.cat([w.scales for w in int8s]))
    int4s = [w for w in weights if isinstance(w, Int4Weight)]
    if len(int4s) != len(weights) or len({w.group_size for w in int4s}) != 1:
        raise ValueError("projections merged into one product need one quantization scheme")
    return Int4Weight(
        torch.cat([w.qweight for w in int4s]),
        torch.cat([w.scales_zeros for w in int4s], dim=1),
        int4s[0].group_size,
    )


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when its data does not start on a 64-byte boundary. torch's int8 CPU
    kernel (``_weight_int8pack_mm``, AVX-512) dies with a general protection fault on a weight
    only 8- or 24-byte aligned (a prefill of 5 rows at any shape we tried; 32 and 64 work), as
    a tensor viewed inside a safetensors memory map is. Storage torch allocates is 64-aligned,
    so this copies nothing that Loom's loader (``loom.models.tensor_file``) reads."""
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone()


class QuantizedLinear:
    """``x @ dequantize(weight).T (+ bias)`` through torch's packed-weight CPU kernels;
    called like ``FrozenLinear`` (fp32 in, fp32 out)."""

    packed = None  # nothing oneDNN-packed here (FrozenLinear's attribute, read by the runner)

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias.detach().float() if bias is not None else None
        self.scheme = "int8" if isinstance(weight, Int8Weight) else "int4"
        self.nbytes = weight.nbytes
        if isinstance(weight, Int8Weight):
            self.qweight = aligned(weight.qweight.contiguous())
            self.scales = aligned(weight.scales.to(SCALE_DTYPE).contiguous())
            self.group_size = 0
        else:
            self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                weight.values(), INT4_INNER_K_TILES
            )
            self.scales = aligned(weight.scales_zeros.to(SCALE_DTYPE).contiguous())
            self.group_size = weight.group_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.group_size:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size, self.scales)
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales)
        out = out.float()
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], self.out_features)
