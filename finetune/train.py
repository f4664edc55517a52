"""Training a LoRA or P-Tuning v2 adapter with the transformers Trainer.

``<out>/`` after a run::

    adapter_config.json, adapter_model.safetensors   the peft adapter (its config names the base)
    finetune_config.yaml                             the full resolved configuration
    loss.csv, loss.png                               loss (and eval loss, learning rate) per logged step
    train_report.json                                steps, tokens/s per device, peak RSS, wall time, data counts
    checkpoints/checkpoint-N/                        every save_steps; --resume continues from the last one

Several GPUs: ``accelerate launch --config_file finetune/accelerate.yaml -m cli.finetune train ... --deepspeed
finetune/deepspeed/zero2.json`` (see docs/en/finetune.md).
"""

from __future__ import annotations

import csv
import json
import os
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from finetune.data import Collator, encode_samples, load_samples
from finetune.hparams import FinetuneConfig, differences, read_config, write_config
from finetune.model import FinetuneError, load_base, load_tokenizer, resolve_base, train_dtype, trainable_model
from settings import Settings

CHECKPOINTS = "checkpoints"
REPORT_FILE = "train_report.json"
LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"


@dataclass
class TrainResult:
    out: str
    base: str
    method: str
    global_step: int
    resumed_from_step: int
    samples: int
    eval_samples: int
    bad_records_skipped: int
    truncated: int
    dropped: int
    train_tokens: int
    train_seconds: float
    tokens_per_second_per_device: float
    world_size: int
    peak_rss_mb: float
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None


def check_output_folder(config: FinetuneConfig, current: dict) -> None:
    """Refuse an output folder that holds something else, or a different run."""
    out = config.out
    if out is None:
        raise FinetuneError("--out is required")
    if not out.exists():
        if config.resume:
            raise FinetuneError(f"--resume: {out} does not exist; nothing to resume")
        return
    if not out.is_dir():
        raise FinetuneError(f"--out {out} is a file")
    if not any(out.iterdir()):
        if config.resume:
            raise FinetuneError(f"--resume: {out} is empty; nothing to resume")
        return
    previous = read_config(out)
    if previous is None:
        raise FinetuneError(f"--out {out} is not empty and holds no finetune run; choose an empty or new folder")
    changed = differences(previous, current)
    if changed:
        raise FinetuneError(
            f"--out {out} already holds a different run (changed: {', '.join(changed)}); choose another folder"
        )
    if not config.resume:
        raise FinetuneError(f"--out {out} already holds this run; add --resume to continue it, or choose another folder")
    if last_checkpoint(out) is None:
        raise FinetuneError(f"--resume: {out / CHECKPOINTS} holds no checkpoint")


def last_checkpoint(out: Path) -> Path | None:
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return None
    steps = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps)[1] if steps else None


def train(config: FinetuneConfig, settings: Settings, on_progress: Callable[[int, int, dict], None] | None = None) -> TrainResult:
    """Train ``config.method`` on ``config.data`` into ``config.out``."""
    if not config.data:
        raise FinetuneError("no training data: give --data FILE (repeatable) or data: in --config")
    base_path = resolve_base(config.base, settings)
    current = config.resolved() | {"base_path": str(base_path)}
    check_output_folder(config, current)
    out = Path(config.out)

    report = load_samples(config.data, config.on_bad_record)
    if not report.samples:
        raise FinetuneError(f"empty dataset: no usable record in {', '.join(map(str, config.data))} ({report.summary()})")
    tokenizer = load_tokenizer(base_path)
    try:
        encoded, counts = encode_samples(tokenizer, report.samples, config.max_length, config.overflow)
    except ValueError as exc:
        raise FinetuneError(f"{base_path}: {exc}") from None
    if not encoded:
        raise FinetuneError(f"empty dataset: all {len(report.samples)} samples are longer than --max-length {config.max_length}")
    train_set, eval_set = _split(encoded, config.eval_split, config.seed)

    out.mkdir(parents=True, exist_ok=True)
    write_config(config, out, base_path)
    dtype = train_dtype(config.precision)
    model = trainable_model(load_base(base_path, dtype), config)
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    on_cuda = torch.cuda.is_available()
    if config.loss_log == "tensorboard":
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        use_cpu=not on_cuda,
        gradient_checkpointing=config.gradient_checkpointing,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if eval_set else "no",
        eval_steps=config.eval_steps or config.save_steps,
        report_to=["tensorboard"] if config.loss_log == "tensorboard" else [],
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        deepspeed=str(config.deepspeed) if config.deepspeed else None,
        disable_tqdm=True,
    )
    resume_from = last_checkpoint(out) if config.resume else None
    resumed_step = int(resume_from.name.split("-")[1]) if resume_from else 0
    loss_log = LossLog(out / LOSS_CSV, resumed_step)

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_progress:
                on_progress(state.global_step, state.max_steps, logs or {})

        def on_step_end(self, args, state, control, **kwargs):
            if on_progress:
                on_progress(state.global_step, state.max_steps, {})

    trainer = _CountingTrainer(
        model=model,
        args=args,
        data_collator=Collator(tokenizer.pad_token_id),
        train_dataset=train_set,
        eval_dataset=eval_set or None,
        callbacks=[loss_log, Progress()],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress goes through on_progress (the CLI's bar)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - started
    model.save_pretrained(str(out))
    _fix_base_path(out, base_path)
    plot_loss(out / LOSS_CSV, out / LOSS_PNG, title=f"{config.method} on {base_path.name}")

    history = loss_log.rows()
    losses = [r["loss"] for r in history if r.get("loss") is not None]
    eval_losses = [r["eval_loss"] for r in history if r.get("eval_loss") is not None]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    result = TrainResult(
        out=str(out),
        base=str(base_path),
        method=config.method,
        global_step=trainer.state.global_step,
        resumed_from_step=resumed_step,
        samples=len(train_set),
        eval_samples=len(eval_set),
        bad_records_skipped=len(report.skipped),
        truncated=counts.truncated,
        dropped=counts.dropped,
        train_tokens=trainer.tokens_trained,
        train_seconds=round(wall, 2),
        tokens_per_second_per_device=round(trainer.tokens_trained / wall, 1) if wall else 0.0,
        world_size=world,
        peak_rss_mb=round(peak_rss_mb(), 1),
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        eval_loss=eval_losses[-1] if eval_losses else None,
    )
    (out / REPORT_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
    return result


class _CountingTrainer(Trainer):
    tokens_trained = 0  # real (unpadded) tokens this process trained on

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.tokens_trained += int(inputs["attention_mask"].sum())
        return super().training_step(model, inputs, num_items_in_batch)


def _split(encoded: list[dict], eval_split: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not eval_split:
        return encoded, []
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    n_eval = int(eval_split) if eval_split >= 1 else max(1, round(len(encoded) * eval_split))
    if n_eval >= len(encoded):
        raise FinetuneError(f"--eval-split {eval_split} leaves no training sample out of {len(encoded)}")
    held = set(order[:n_eval])
    return [e for i, e in enumerate(encoded) if i not in held], [e for i, e in enumerate(encoded) if i in held]


def _fix_base_path(out: Path, base_path: Path) -> None:
    """Record the base as an absolute path (peft writes whatever name the model was loaded by)."""
    path = out / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(Path(base_path).resolve())
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------ loss log


class LossLog(TrainerCallback):
    """Appends every log line (step, epoch, loss, eval_loss, learning_rate) to a CSV.

    On resume, rows after the checkpoint's step (logged by the interrupted run
    after its last save) are dropped first, so the curve has no duplicates.
    """

    FIELDS = ["step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm"]

    def __init__(self, path: Path, resumed_step: int):
        self.path = path
        if resumed_step and path.exists():
            kept = [r for r in self._read() if int(r["step"]) <= resumed_step]
            self._write(kept)
        elif path.exists():
            path.unlink()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if not any(k in logs for k in ("loss", "eval_loss")):
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
        row |= {k: logs.get(k) for k in self.FIELDS[2:]}
        new = not self.path.exists()
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})

    def _read(self) -> list[dict]:
        with self.path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def _write(self, rows: list[dict]) -> None:
        with self.path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [{k: (float(v) if v not in ("", None) and k != "step" else (int(v) if k == "step" else None)) for k, v in r.items()} for r in self._read()]


def plot_loss(csv_path: Path, png_path: Path, title: str = "") -> bool:
    """Draw loss (and eval loss) against step; False when matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not csv_path.exists():
        return False
    with csv_path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r.get("loss")]
    evals = [(int(r["step"]), float(r["eval_loss"])) for r in rows if r.get("eval_loss")]
    if not train and not evals:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


def remove_checkpoints(out: Path) -> None:
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
