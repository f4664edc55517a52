"""Weight-only quantised linear layers on the CPU (int8, int4): faster decoding.

Decoding one token reads every weight once, so on a CPU it is bound by memory
bandwidth: bf16 weights (2 bytes each) decode at about a third of llama.cpp's
4-bit speed (bench.cpu_generation). Activations stay in the model's dtype.

* **int8** (``generator_quantization=8bit``): each weight row as int8 with one scale
  (symmetric, per output channel). Decode steps use torch's int8 weight-only kernel
  (``aten._weight_int8pack_mm``); a prefill, which is compute-bound, dequantises the
  weight and uses the ordinary matmul.
* **int4** (``generator_quantization=4bit``): groups of 32 weights on a 16-level grid
  (a scale and a minimum per group), through torch's int4 kernel
  (``aten._weight_int4pack_mm_for_cpu``). Only layers whose weights already lie on such
  a grid become int4 — a model converted from a 4-bit GGUF, like the bundled Qwen, whose
  Q4_K blocks are exactly this — so int4 adds no error of its own; every other layer
  (the GGUF's 6-bit tensors, an ordinary bf16 model) is int8.

Adapters keep working: a LoRA layer's base layer is replaced, its small ``lora_A`` /
``lora_B`` layers are not.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# Up to this many rows (tokens in a step) the int8 kernel is faster than dequantising (measured).
INT8_KERNEL_MAX_ROWS = 16


class Int8Linear(nn.Module):
    """``nn.Linear`` for inference with int8 weights and per-row scales."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight_int8", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scales.dtype)
        if rows.shape[0] <= INT8_KERNEL_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scales)
            out = out if self.bias is None else out + self.bias
        else:
            weight = self.weight_int8.to(self.scales.dtype) * self.scales[:, None]
            out = nn.functional.linear(rows, weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


INT4_GROUP = 32
"""Weights per int4 group (one scale and minimum each): the size of a GGUF Q4_K / Q4_1 block."""
INT4_MAX_ERROR = 0.01
"""A layer becomes int4 when its weights' 4-bit grid reproduces them this closely (relative
norm of the error; bf16 rounding alone gives ~0.3%); otherwise int8 (6-bit weights: ~8%)."""
_OFF_GRID = 0.15  # a weight further than this many steps from its group's grid is not on it (bf16 rounding: < 0.05)
_GROUPS_PER_PASS = 1 << 16  # grid search in slices: cache-sized passes, bounded memory on a 150k-row embedding


def four_bit_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The 16-level grid each group of 32 weights lies on: ``(levels, scales, minimums, error)``.

    A group spans ``n`` steps of its grid between its smallest and largest weight, n ≤ 15;
    ``n`` is found by trying 15, then fewer for the groups that do not fit (most groups use
    both end levels), so ``weight ≈ minimum + level * scale`` with levels 0..15. ``error``:
    relative norm of what that reconstruction misses (large for a layer on no 4-bit grid,
    which is given up on as soon as most of a slice's groups fit no grid).
    """
    rows, columns = weight.shape
    groups = weight.reshape(-1, INT4_GROUP)
    levels = torch.empty(groups.shape, dtype=torch.uint8)
    scales, minimums = torch.empty(groups.shape[0], 1), torch.empty(groups.shape[0], 1)
    missed = total = 0.0
    for first in range(0, groups.shape[0], _GROUPS_PER_PASS):
        part = groups[first : first + _GROUPS_PER_PASS].float()
        low = part.amin(dim=-1, keepdim=True)
        offset = part - low
        span = offset.amax(dim=-1, keepdim=True).clamp(min=1e-12)
        steps = torch.full_like(span, 15.0)
        undecided = torch.nonzero(_off_grid(offset, span, 15.0)).squeeze(1)
        if len(undecided) * 2 > len(part):
            return levels, scales, minimums, float("inf")  # most groups fit no 16-level grid: not a 4-bit layer
        for n in range(14, 0, -1):
            if not len(undecided):
                break
            off = _off_grid(offset[undecided], span[undecided], float(n))
            steps[undecided[~off]] = n
            undecided = undecided[off]
        scale = span / steps
        level = torch.round(offset / scale).clamp(0, 15)
        missed += float(((level * scale - offset) ** 2).sum())
        total += float((part**2).sum())
        end = first + len(part)
        levels[first:end], scales[first:end], minimums[first:end] = level.to(torch.uint8), scale, low
    error = (missed / total) ** 0.5 if total else 0.0
    groups_per_row = columns // INT4_GROUP
    return levels.reshape(rows, columns), scales.reshape(rows, groups_per_row), minimums.reshape(rows, groups_per_row), error


def _off_grid(offset: torch.Tensor, span: torch.Tensor, steps: float) -> torch.Tensor:
    """Which groups have a weight off the grid of ``steps`` equal steps between their ends."""
    position = offset * (steps / span)
    return (position - torch.round(position)).abs().amax(dim=-1) > _OFF_GRID


def int4_fits(linear: nn.Linear) -> bool:
    """Shapes torch's CPU int4 kernel takes: output rows in 16s, inputs in whole groups."""
    return linear.out_features % 16 == 0 and linear.in_features % INT4_GROUP == 0


class Int4Linear(nn.Module):
    """``nn.Linear`` for inference with int4 weights (groups of 32: a scale and a minimum each)."""

    def __init__(self, linear: nn.Linear, levels: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        dtype = linear.weight.dtype
        self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32), 2))
        # the kernel's form: weight = (level - 8) * scale + zero, so zero = minimum + 8 * scale; [groups, out, 2]
        zeros = minimums + 8 * scales
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight_int4, INT4_GROUP, self.scales_and_zeros)
        out = out if self.bias is None else out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int4"


def quantised(linear: nn.Linear, bits: int) -> nn.Module:
    """``linear`` as int4 (``bits=4``, when its weights lie on a 4-bit grid and the shape fits) or int8."""
    if bits == 4 and int4_fits(linear):
        levels, scales, minimums, error = four_bit_grid(linear.weight.detach())
        if error <= INT4_MAX_ERROR:
            return Int4Linear(linear, levels, scales, minimums)
    return Int8Linear(linear)


def quantise_linear_layers(model: nn.Module, bits: int = 8) -> dict[str, int]:
    """Replace the model's ``nn.Linear`` layers (not LoRA's own) by quantised ones; how many of each kind.

    ``bits=8``: all int8; ``bits=4``: int4 where the weights lie on a 4-bit grid, int8 elsewhere.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and "lora_" not in name
    ]
    if targets and targets[0][1].weight.dtype == torch.float32:
        log.warning(
            "weight-only quantisation of a float32 model (dtype 'auto' is float32 on a CPU without native bf16): "
            "torch's int8 and int4 kernels are much slower than float32 matmuls there (int4: 10x per decode step, "
            "100x per prefill on a Xeon with AVX-512 only); use generator_quantization='none' on such a machine"
        )
    counts = {"int4": 0, "int8": 0}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        replacement = quantised(module, bits)
        counts["int4" if isinstance(replacement, Int4Linear) else "int8"] += 1
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    log.info("weight-only quantisation on the CPU: %(int4)d int4 layers, %(int8)d int8 layers", counts)
    return counts
