"""models.cpu_linear: linear layers on oneDNN-packed weights give nn.Linear's exact results."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.cpu_linear import PackedLinear, pack_linear_layers
from models.torch_device import cpu_has_fast_bf16

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(64, 96, bias=False), nn.GELU())
    return nn.Sequential(nn.Linear(48, 64), nn.GELU(), inner, nn.LayerNorm(96)).to(dtype).eval()


def test_packed_layers_reproduce_nn_linear_bit_for_bit():
    model = _model(torch.bfloat16)
    inputs = [torch.randn(shape).to(torch.bfloat16) for shape in ((5, 48), (3, 17, 48), (1, 1, 48))]
    with torch.inference_mode():
        expected = [model(x) for x in inputs]
    packed = pack_linear_layers(model)
    if cpu_has_fast_bf16():  # elsewhere oneDNN may emulate bf16 differently: packing is refused unless exact
        assert packed == 2
    kinds = [type(m) for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    assert kinds == ([PackedLinear, PackedLinear] if packed else [nn.Linear, nn.Linear])
    with torch.inference_mode():
        for x, want in zip(inputs, expected):
            got = model(x)
            assert got.shape == want.shape and torch.equal(got, want)


def test_float32_layers_are_left_as_they_are():
    model = _model(torch.float32)
    assert pack_linear_layers(model) == 0
    assert sum(type(m) is nn.Linear for m in model.modules()) == 2
