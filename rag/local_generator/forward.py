"""How the running batch calls the model: the base, LoRA inside it, or the base under a prefix-tuning prefix."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from rag.generation import GenerationError


@dataclass
class Forward:
    """How to call the model for the running batch's adapter.

    Prefix tuning (P-Tuning v2) is served by calling the *base* model with the
    adapter's prefix as the start of the KV cache: PEFT's own forward would
    replace the cache with a fresh prefix on every call. Like ``generate()``
    through PEFT, the prefix counts in the positions (``prefix_tokens`` offset).
    """

    model: Any
    prefix_tokens: int = 0
    prefix_cache: Any = None  # batch size -> a Cache holding the prefix, or None
    cache_keyword: str = field(init=False)  # looked up once per batch, not per decode step

    def __post_init__(self) -> None:
        self.cache_keyword = _cache_keyword(_base_of(self.model))

    @classmethod
    def for_model(cls, model) -> "Forward":
        config = getattr(model, "active_peft_config", None)
        if config is None or not config.is_prompt_learning:
            return cls(model)  # base model, or injected (LoRA) layers active inside it
        from peft import PeftType

        if config.peft_type != PeftType.PREFIX_TUNING:
            raise GenerationError(f"{config.peft_type} adapters are not supported; use LoRA or prefix tuning")
        return cls(model.get_base_model(), config.num_virtual_tokens, lambda n: model.get_prompt(batch_size=n, max_cache_len=-1))

    def __call__(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Float32 next-token logits (rows, vocab) of the last column."""
        # An all-ones mask is passed as None, as generate() does: same kernels, same numbers alone.
        mask = None if bool(attention_mask.all()) else attention_mask
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
            use_cache=True, logits_to_keep=1, **{self.cache_keyword: cache},
        )  # fmt: skip
        return out.logits[:, -1, :].float()


def _base_of(model):
    """The transformers model under a PEFT wrapper (which passes the cache on by keyword)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def _cache_keyword(model) -> str:
    """``cache`` on newer transformers 5.x, ``past_key_values`` before (the old name is going away)."""
    forward = getattr(type(model), "forward", None)
    takes = inspect.signature(forward).parameters if forward is not None else {}
    return "cache" if "cache" in takes else "past_key_values"
