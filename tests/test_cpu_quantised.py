"""Weight-only layers on the CPU: int8 close to the bf16 layer on both paths; int4 exact on a 4-bit grid and
only there; LoRA kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rag.local_generator.cpu_quantised import INT8_KERNEL_MAX_ROWS, Int4Linear, Int8Linear, four_bit_grid, quantise_linear_layers


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


def on_a_four_bit_grid(rows: int, columns: int, seed: int = 0) -> nn.Linear:
    """A layer whose weights are what a GGUF Q4_K block dequantises to: minimum + level * scale per 32."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 16, (rows, columns // 32, 32), generator=generator).float()
    scales = torch.rand(rows, columns // 32, 1, generator=generator) * 0.01 + 0.001
    minimums = -8 * scales + torch.randn(rows, columns // 32, 1, generator=generator) * 0.001
    linear = nn.Linear(columns, rows, bias=False)
    linear.weight.data = (levels * scales + minimums).reshape(rows, columns).to(torch.bfloat16)
    return linear.to(torch.bfloat16)


def test_four_bit_grid_recovers_the_levels_of_a_4bit_layer_and_rejects_a_plain_one():
    grid_layer = on_a_four_bit_grid(64, 128)
    levels, scales, minimums, error = four_bit_grid(grid_layer.weight.detach())
    assert levels.dtype == torch.uint8 and int(levels.max()) <= 15 and scales.shape == (64, 4)
    assert error < 0.006  # bf16 rounding only
    torch.manual_seed(0)
    assert four_bit_grid(torch.randn(64, 128).to(torch.bfloat16))[3] > 0.05  # a plain layer is no 4-bit grid


def test_int4_linear_matches_the_layer_it_replaces_for_decode_and_prefill_rows():
    linear = on_a_four_bit_grid(96, 256)
    quantised = Int4Linear(linear, *four_bit_grid(linear.weight.detach())[:3])
    for rows in (1, 7, 300):
        x = torch.randn(2, rows, 256, dtype=torch.bfloat16)
        expected, got = linear(x).float(), quantised(x).float()
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert (got - expected).norm() / expected.norm() < 0.01, rows


def test_4bit_makes_int4_only_the_layers_on_a_grid():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.on_grid, self.plain, self.odd = on_a_four_bit_grid(64, 128), nn.Linear(64, 64), nn.Linear(128, 40)

    model = Mixed().to(torch.bfloat16)
    model.odd.weight.data = on_a_four_bit_grid(40, 128).weight.data  # on a grid, but 40 rows: the kernel wants 16s
    assert quantise_linear_layers(model, bits=4) == {"int4": 1, "int8": 2}
    assert isinstance(model.on_grid, Int4Linear) and isinstance(model.plain, Int8Linear) and isinstance(model.odd, Int8Linear)


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
    assert quantise_linear_layers(model) == {"int4": 0, "int8": 2}  # q_proj's base layer and out; not lora_A / lora_B
    assert isinstance(model.base_model.model.q_proj.lora_A["default"], nn.Linear)
    assert isinstance(model.base_model.model.q_proj.base_layer, Int8Linear)
    after = model(x)
    assert (after - before).norm() / before.norm() < 0.02
    with model.disable_adapter():
        assert (model(x) - after).abs().max() > 1e-3  # the adapter still acts on the int8 base


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_local_generator_quantised_on_the_cpu_serves_quantised_layers(generator_model_path, quantization):
    import asyncio

    from rag.chat import collect
    from rag.chat_template import encode_chat
    from rag.generation import SamplingParams
    from rag.local_generator import LocalGenerator

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = LocalGenerator(generator_model_path, dtype="bfloat16")
    gen = LocalGenerator(generator_model_path, dtype="bfloat16", quantization=quantization)
    try:
        kinds = {n: type(m) for n, m in gen.models.base.named_modules() if isinstance(m, (nn.Linear, Int8Linear, Int4Linear))}
        int8 = {n for n, kind in kinds.items() if kind is Int8Linear}
        # the bundled SmolLM2 comes from a Q4_1 GGUF: its blocks' weights lie on a 4-bit grid, so 4bit makes them
        # int4; its output layer (tied to the embedding, stored in 8 bits there) stays int8
        assert set(kinds.values()) <= {Int8Linear, Int4Linear}
        assert int8 == (set(kinds) if quantization == "8bit" else {"lm_head"})
        ids = torch.tensor([encode_chat(gen.tokenizer, messages)])
        with torch.inference_mode():
            expected, got = plain.models.base(ids).logits[0, -1].float(), gen.models.base(ids).logits[0, -1].float()
        assert int(got.argmax()) == int(expected.argmax())
        variation = float((got.softmax(-1) - expected.softmax(-1)).abs().sum() / 2)  # total variation of the next token
        assert variation < 0.1
        text, finished = asyncio.run(collect(gen.stream(messages, SamplingParams(max_tokens=12, temperature=0))))
        assert text.strip() and finished.completion_tokens > 0
    finally:
        asyncio.run(gen.aclose())
        asyncio.run(plain.aclose())


def test_quantising_a_float32_model_warns_that_the_kernels_are_slow_there(caplog):
    model = nn.Sequential(nn.Linear(64, 32))  # float32: what dtype 'auto' gives on a CPU without native bf16
    with caplog.at_level("WARNING", logger="rag.local_generator.cpu_quantised"):
        quantise_linear_layers(model, bits=8)
    assert "without native bf16" in caplog.text and "generator_quantization='none'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rag.local_generator.cpu_quantised"):
        quantise_linear_layers(nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16), bits=8)
    assert "without native bf16" not in caplog.text
