"""Chat templates and context windows: what serving and ``finetune/`` both need.

One rendering for both sides, so a model is trained on exactly the token ids
the server will send it. Cheap to import: neither torch nor the batcher
(transformers is imported only by :func:`load_chat_tokenizer`).

::

    >>> tokenizer = load_chat_tokenizer("models/smollm2-135m-instruct")      # doctest: +SKIP
    >>> encode_chat(tokenizer, [{"role": "user", "content": "Hi"}])[:2]       # doctest: +SKIP
    [1, 9690]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from rag.generation import GenerationError, Message

__all__ = ["context_window", "encode_chat", "encode_text", "load_chat_tokenizer", "render_chat"]

_UNSET_MAX_LENGTH = 10**7  # tokenizers without a limit report ~1e30
_FALLBACK_WINDOW = 2048


def load_chat_tokenizer(path: str | Path):
    """The tokenizer of the model folder ``path``, ready to serve: chat template, pad token, left padding.

    ``load_chat_tokenizer("models/smollm2-135m-instruct").padding_side == "left"``;
    a folder whose tokenizer has no chat template raises :class:`GenerationError`.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not tokenizer.chat_template:
        raise GenerationError(f"{path}: the tokenizer has no chat template; serve an instruction-tuned (chat) model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out anyway
    tokenizer.padding_side = "left"
    return tokenizer


def render_chat(tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """The chat-template rendering of ``messages``.

    SmolLM2: ``[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]`` →
    ``"<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"``;
    ``add_generation_prompt=False`` leaves off the final ``<|im_start|>assistant\\n``.
    """
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of already rendered ``text``, no special tokens added: ``"<|im_start|>user"`` → ``[1, 4093]``.

    The template already writes the special tokens (BOS, role markers).
    """
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer, messages: list[Message]) -> list[int]:
    """The prompt ids the model sees for ``messages``: ``encode_text(tokenizer, render_chat(tokenizer, messages))``."""
    return encode_text(tokenizer, render_chat(tokenizer, messages))


def context_window(config: Any, tokenizer) -> int:
    """The model's context window in tokens, from its config (an object or the ``config.json`` dict).

    ``{"max_position_embeddings": 8192}`` → 8192; ``{"seq_length": 4096}`` → 4096; neither:
    ``tokenizer.model_max_length`` when it is a real limit (< 10**7), else 2048.
    """
    if isinstance(config, Mapping):
        window = config.get("max_position_embeddings") or config.get("seq_length")
    else:
        window = getattr(config, "max_position_embeddings", None) or getattr(config, "seq_length", None)
    if not window:
        length = tokenizer.model_max_length
        window = length if length < _UNSET_MAX_LENGTH else _FALLBACK_WINDOW
    return int(window)
