"""Fine-tuning configuration: one pydantic model, from a YAML file and/or CLI flags.

Precedence: CLI flags override the YAML file (``--config``), which overrides the
defaults below (LLaMA-Factory style: one flat YAML of ``key: value``). Every run
writes its full resolved configuration to ``<out>/finetune_config.yaml``; a
later run into the same folder must match it (``--resume`` continues it).

Example YAML::

    method: lora
    data: [train.jsonl]
    out: adapters/insurance-lora
    epochs: 2
    lr: 2.0e-4
    lora_r: 16
    max_length: 1024
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CONFIG_FILE = "finetune_config.yaml"
# Fields that may change between a run and its --resume without it being a different run.
# ``out`` too: a run folder that was moved is still the same run.
RESUMABLE_FIELDS = {"out", "resume", "epochs", "max_steps", "save_steps", "logging_steps", "eval_steps", "loss_log", "save_total_limit"}
DEFAULT_LR = {"lora": 2e-4, "ptuning": 2e-2}


class FinetuneConfig(BaseModel):
    """Everything one training run is told, with its default."""

    model_config = ConfigDict(extra="forbid")

    # what
    method: Literal["lora", "ptuning"] = "lora"
    base: str | None = Field(None, description="Base model: folder, cached hub id, or the server's generator (default).")
    data: list[Path] = Field(default_factory=list, description="JSON / JSONL training files.")
    out: Path | None = None

    # data
    on_bad_record: Literal["stop", "skip"] = "stop"
    max_length: int = Field(1024, ge=8, description="Tokens per sample (prompt + answer).")
    overflow: Literal["truncate", "drop"] = "truncate"
    eval_split: float = Field(0.0, ge=0, description="Held-out share (< 1) or count (>= 1) of samples for evaluation.")

    # LoRA
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target: list[str] | str = Field("all-linear", description="'all-linear' or module names, e.g. [q_proj, v_proj].")
    lora_layers: int | None = Field(
        None, ge=1, description="LoRA on the top N transformer blocks only: the blocks below need no backward pass (much faster on a CPU)."
    )
    use_rslora: bool = False
    use_dora: bool = False

    # P-Tuning v2 (prefix tuning)
    num_virtual_tokens: int = Field(128, ge=1, description="Prefix length (ChatGLM's pre_seq_len).")
    prefix_projection: bool = Field(False, description="Reparameterise the prefix through an MLP.")

    # training
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="Optimizer steps; overrides epochs when > 0.")
    lr: float | None = Field(None, gt=0, description="Learning rate; default 2e-4 (LoRA) or 2e-2 (P-Tuning).")
    batch_size: int = Field(4, ge=1, description="Samples per device per step.")
    grad_accum: int = Field(1, ge=1)
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup: float = Field(0.03, ge=0, description="Warm-up: share of the steps (< 1) or a step count.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16/fp16 on CUDA, fp32 on CPU.")
    gradient_checkpointing: bool = False
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(3, ge=1)
    logging_steps: int = Field(5, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: save_steps).")
    loss_log: Literal["csv", "tensorboard"] = "csv"
    seed: int = 42
    resume: bool = False
    deepspeed: Path | None = Field(None, description="DeepSpeed config (with accelerate launch), e.g. finetune/deepspeed/zero2.json.")

    @field_validator("lora_target")
    @classmethod
    def _target(cls, value):
        if isinstance(value, str) and value != "all-linear":
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _checks(self) -> "FinetuneConfig":
        if self.use_dora and self.method != "lora":
            raise ValueError("use_dora applies to LoRA only")
        if self.lora_layers and self.method != "lora":
            raise ValueError("lora_layers applies to LoRA only")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def resolved(self) -> dict:
        """The configuration as plain YAML-able data, the learning rate filled in."""
        data = self.model_dump(mode="json")
        data["lr"] = self.learning_rate
        data["data"] = [str(Path(p).resolve()) for p in self.data]
        for key in ("out", "deepspeed"):
            if data[key]:
                data[key] = str(Path(data[key]).resolve())
        return data


def load_config(config_file: Path | None, overrides: dict) -> FinetuneConfig:
    """YAML file values, then CLI ``overrides`` (None values are "not given")."""
    values: dict = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ValueError(f"--config: {config_file} does not exist") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"--config: {config_file} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config: {config_file} must be a mapping of option: value")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
        # relative data/out paths in a config file are relative to the file
        root = Path(config_file).resolve().parent
        if "data" in values:
            values["data"] = [str(root / p) for p in ([values["data"]] if isinstance(values["data"], str) else values["data"])]
        for key in ("out", "deepspeed"):
            if values.get(key):
                values[key] = str(root / values[key])
    values.update({k: v for k, v in overrides.items() if v is not None and v != []})
    return FinetuneConfig(**values)


def write_config(config: FinetuneConfig, out: Path, base_path: Path) -> None:
    data = config.resolved()
    data["base_path"] = str(base_path)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


def read_config(out: Path) -> dict | None:
    path = out / CONFIG_FILE
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def differences(previous: dict, current: dict) -> list[str]:
    """Fields that make ``current`` a different run from ``previous`` (ignores resumable ones)."""
    keys = (set(previous) | set(current)) - RESUMABLE_FIELDS
    return sorted(k for k in keys if previous.get(k) != current.get(k))
