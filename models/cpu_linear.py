"""Linear layers whose weights are packed once for oneDNN: faster bf16 inference on the CPU.

``nn.Linear`` hands oneDNN a row-major weight, which oneDNN re-blocks for its
bf16 kernels on every call. Packing each weight once, as torch.compile's
freezing pass does, skips that work, with bit-identical outputs
(docs/BENCHMARKS.md, "Embedding: batch order and packed weights"). The ops are
torch's own (``torch.ops.mkldnn``, the ones inductor emits); where they are
missing or disagree with ``nn.Linear``, nothing is changed::

    >>> pack_linear_layers(model)        # doctest: +SKIP
    84
"""

from __future__ import annotations

import torch
from torch import nn

# oneDNN picks the packed layout for this many rows (tokens in a batch); any row count works.
_ROWS_HINT = 4096


class PackedLinear(nn.Module):
    """``nn.Linear`` for inference, its weight in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _ROWS_HINT))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linear_layers(model: nn.Module) -> int:
    """Replace the bf16 ``nn.Linear`` layers of a CPU model in inference by :class:`PackedLinear`.

    Returns how many were replaced: 0 when this torch lacks the ops or a packed
    layer does not reproduce ``nn.Linear`` exactly on a probe input.
    """
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu"
    ]
    if not targets or not _packing_reproduces(targets[0][2]):
        return 0
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)


def _packing_reproduces(linear: nn.Linear) -> bool:
    try:
        probe = torch.randn(37, linear.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        with torch.inference_mode():
            return torch.equal(PackedLinear(linear)(probe), linear(probe))
    except (AttributeError, RuntimeError, NotImplementedError):  # op missing, or oneDNN without bf16
        return False
