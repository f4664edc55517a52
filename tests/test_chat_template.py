"""rag.chat_template: cheap to import, the context-window fallbacks, one encoding for serving and training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rag.chat_template import context_window, encode_chat, encode_text, load_chat_tokenizer, render_chat
from rag.generation import GenerationError

REPO = Path(__file__).resolve().parents[1]


def test_importing_it_does_not_import_torch():
    check = "import rag.chat_template, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", check], cwd=REPO, check=True, timeout=60)


@pytest.mark.parametrize(
    "config, max_length, expected",
    [
        ({"max_position_embeddings": 8192, "seq_length": 4096}, 512, 8192),
        ({"seq_length": 4096}, 512, 4096),  # ChatGLM-style configs
        ({"max_position_embeddings": None, "seq_length": 4096}, 512, 4096),
        ({}, 512, 512),  # the tokenizer's limit, when it has one
        ({}, 10**30, 2048),  # "no limit" (transformers' huge sentinel): a safe default
        (SimpleNamespace(max_position_embeddings=8192), 512, 8192),  # a config object
        (SimpleNamespace(seq_length=1024), 512, 1024),
        (SimpleNamespace(), 10**30, 2048),
    ],
)
def test_context_window_fallbacks(config, max_length, expected):
    assert context_window(config, SimpleNamespace(model_max_length=max_length)) == expected


def test_encode_chat_is_the_rendering_encoded(generator_model_path):
    tokenizer = load_chat_tokenizer(generator_model_path)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, what is 2+2?"}]
    rendered = render_chat(tokenizer, messages)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert not render_chat(tokenizer, messages, add_generation_prompt=False).endswith("<|im_start|>assistant\n")
    assert encode_chat(tokenizer, messages) == encode_text(tokenizer, rendered)
    assert encode_text(tokenizer, rendered)[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS added
    config = json.loads((generator_model_path / "config.json").read_text())
    assert context_window(config, tokenizer) == 8192


def test_a_tokenizer_without_chat_template_is_refused(generator_model_path, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(generator_model_path / name, tmp_path / name)
    with pytest.raises(GenerationError, match="no chat template"):
        load_chat_tokenizer(tmp_path)
