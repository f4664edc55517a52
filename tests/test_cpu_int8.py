"""Int8 weight-only layers on the CPU: close to the bf16 layer on both paths, LoRA kept."""

from __future__ import annotations

import torch
from torch import nn

from rag.local_generator.cpu_int8 import INT8_KERNEL_MAX_ROWS, Int8Linear, quantise_linear_layers


def test_int8_linear_is_close_to_the_layer_for_decode_and_prefill_rows():
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True).to(torch.bfloat16)
    quantised = Int8Linear(linear)
    assert quantised.weight_int8.dtype == torch.int8 and quantised.weight_int8.shape == (96, 256)
    for rows in (1, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1, 300):  # the int8 kernel, then dequantised matmul
        x = torch.randn(2, rows, 256, dtype=torch.bfloat16)
        expected, got = linear(x).float(), quantised(x).float()
        assert got.shape == expected.shape
        assert (got - expected).norm() / expected.norm() < 0.02, rows


def test_quantise_replaces_base_layers_and_keeps_lora_layers():
    from peft import LoraConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.out = nn.Linear(32, 32), nn.Linear(32, 8)

        def forward(self, x):
            return self.out(torch.relu(self.q_proj(x)))

    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    x = torch.randn(3, 32)
    before = model(x)
    assert quantise_linear_layers(model) == 2  # q_proj's base layer and out; not lora_A / lora_B
    assert isinstance(model.base_model.model.q_proj.lora_A["default"], nn.Linear)
    assert isinstance(model.base_model.model.q_proj.base_layer, Int8Linear)
    after = model(x)
    assert (after - before).norm() / before.norm() < 0.02
    with model.disable_adapter():
        assert (model(x) - after).abs().max() > 1e-3  # the adapter still acts on the int8 base


def test_local_generator_8bit_on_the_cpu_serves_int8_layers(generator_model_path):
    import asyncio

    from rag.chat import collect
    from rag.generation import SamplingParams
    from rag.local_generator import LocalGenerator

    gen = LocalGenerator(generator_model_path, dtype="bfloat16", quantization="8bit")
    try:
        layers = [m for m in gen.models.base.modules() if isinstance(m, (nn.Linear, Int8Linear))]
        assert layers and all(isinstance(m, Int8Linear) for m in layers)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        text, finished = asyncio.run(collect(gen.stream(messages, SamplingParams(max_tokens=12, temperature=0))))
        assert text.strip() and finished.completion_tokens > 0
    finally:
        asyncio.run(gen.aclose())
