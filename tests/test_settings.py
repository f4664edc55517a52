"""One typed settings object: CLI values > ZHIKU_* environment > TOML file > defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from settings import BUNDLED_QWEN_MODEL, Settings, default_home


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in list(__import__("os").environ):
        if name.startswith("ZHIKU_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    return monkeypatch


def test_defaults_and_home(clean_env, tmp_path):
    settings = Settings()
    assert settings.home == default_home() == tmp_path / "xdg" / "zhiku"
    assert settings.kb_root == settings.home / "kb" and settings.model_cache == settings.home / "models"
    assert (settings.chunk_size, settings.chunk_overlap) == (600, 120)
    assert settings.generator_model == BUNDLED_QWEN_MODEL  # Chinese-first: serve and finetune read Chinese


def test_precedence_flag_over_env_over_file(clean_env, tmp_path):
    config = tmp_path / "zhiku.toml"
    config.write_text('chunk_size = 500\ntop_k = 7\nembedding_model = "/models/m3e-base"\n', encoding="utf-8")
    clean_env.setenv("ZHIKU_CONFIG", str(config))
    assert (Settings().chunk_size, Settings().top_k) == (500, 7)
    clean_env.setenv("ZHIKU_CHUNK_SIZE", "450")
    assert Settings().chunk_size == 450 and Settings().embedding_model == "/models/m3e-base"
    assert Settings(chunk_size=300).chunk_size == 300


def test_config_file_in_home_is_read(clean_env, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("top_k = 9\n", encoding="utf-8")
    clean_env.setenv("ZHIKU_HOME", str(home))
    assert Settings().top_k == 9 and Settings().home == home


def test_bad_values_name_the_field(clean_env):
    with pytest.raises(ValidationError, match="chunk_overlap"):
        Settings(chunk_size=100, chunk_overlap=100)
    with pytest.raises(ValidationError, match="top_k"):
        Settings(top_k=0)
    with pytest.raises(ValidationError, match="no_such_setting"):
        Settings(no_such_setting=1)
