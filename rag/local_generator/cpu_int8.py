"""Int8 weight-only linear layers: faster decoding on the CPU.

Decoding one token reads every weight once, so on a CPU it is bound by memory
bandwidth: bf16 weights (2 bytes each) decode at about a third of llama.cpp's
4-bit speed (bench.cpu_generation). Here each weight row is stored as int8 with
one scale (symmetric, per output channel); activations stay in the model's dtype.
Rows of a decode step go through torch's own int8 weight-only kernel
(``aten._weight_int8pack_mm``); a prefill, which is compute-bound, dequantises the
weight and uses the ordinary matmul. Adapters keep working: a LoRA layer's base
layer is replaced, its small ``lora_A`` / ``lora_B`` layers are not.
"""

from __future__ import annotations

import torch
from torch import nn

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


def quantise_linear_layers(model: nn.Module) -> int:
    """Replace the model's ``nn.Linear`` layers (not LoRA's own) by :class:`Int8Linear`; returns how many."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and "lora_" not in name
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, Int8Linear(module))
    return len(targets)
