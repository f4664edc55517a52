"""The base model and its trainable adapter (peft LoRA or prefix tuning = P-Tuning v2).

The base is found the way ``rag serve`` finds its generator
(:func:`models.bundled_generator.resolve_generator_model`: a folder, a cached hub
id, or the bundled SmolLM2), and its tokenizer is loaded by the same loader as
the server's, so the chat template is the same one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.hparams import FinetuneConfig
from models.bundled_generator import resolve_generator_model
from settings import Settings


class FinetuneError(Exception):
    """A problem the user can fix (bad base, bad output folder, empty data, ...)."""


def resolve_base(base: str | None, settings: Settings) -> Path:
    """The base model folder; default: the generator the server would use."""
    from models.bundled_generator import GeneratorModelNotFound

    try:
        return resolve_generator_model(base or settings.generator_model, settings)
    except GeneratorModelNotFound as exc:
        raise FinetuneError(str(exc)) from None


def is_quantised(base: Path) -> bool:
    try:
        config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return "quantization_config" in config


def load_tokenizer(base: Path):
    """The server's tokenizer loader, then right padding for training."""
    from rag.generation import GenerationError
    from rag.chat_template import load_chat_tokenizer

    try:
        tokenizer = load_chat_tokenizer(base)
    except GenerationError as exc:
        raise FinetuneError(str(exc)) from None
    tokenizer.padding_side = "right"
    return tokenizer


def train_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_base(base: Path, dtype: torch.dtype = torch.float32):
    """The base causal LM, on CPU (the Trainer / accelerate places it on the device)."""
    from transformers import AutoModelForCausalLM

    if is_quantised(base):
        raise FinetuneError(f"{base} holds quantised weights; train on the full-precision base")
    return AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, local_files_only=True)


def lora_targets(base_model, config: FinetuneConfig) -> tuple[list[str] | str, list[int] | None]:
    """LoRA's target modules and the indices of the blocks it adapts (None: every block).

    With ``lora_layers`` peft needs module names, not "all-linear": the linear layers' names
    inside the blocks are read off the model."""
    if not config.lora_layers:
        return config.lora_target, None
    blocks = base_model.config.num_hidden_layers
    layers = list(range(max(0, blocks - config.lora_layers), blocks))
    if config.lora_target != "all-linear":
        return config.lora_target, layers
    names = {name.rsplit(".", 1)[-1] for name, module in base_model.named_modules() if isinstance(module, torch.nn.Linear) and ".layers." in name}
    return sorted(names), layers


def peft_config(config: FinetuneConfig, base_model):
    from peft import LoraConfig, PrefixTuningConfig, TaskType

    if config.method == "lora":
        targets, layers = lora_targets(base_model, config)
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            layers_to_transform=layers,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
        )
    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=config.prefix_projection,
    )


def trainable_model(base_model, config: FinetuneConfig):
    """The base wrapped by peft; trainable parameters kept in float32 (half-precision bases on GPU)."""
    from peft import get_peft_model

    model = get_peft_model(base_model, peft_config(config, base_model))
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def adapter_kind(adapter: Path) -> str:
    """'LORA', 'PREFIX_TUNING', ... from an adapter folder's config."""
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise FinetuneError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    return str(json.loads(path.read_text(encoding="utf-8")).get("peft_type"))
