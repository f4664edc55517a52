"""The ``finetune`` command: train LoRA / P-Tuning v2 adapters, build RAG training data, merge, evaluate.

Exit codes: 0 success, 1 a check failed (merge logits differ), 2 usage errors
(missing base, unknown format, bad record, empty dataset, an output folder
that holds something else, bad options). Errors are one clear line, never a
traceback.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cli.errors import err, print_error, user_errors
from cli.progress import progress_bars
from finetune.data import DataError
from finetune.model import FinetuneError
from models.torch_device import run_and_exit
from settings import Settings

app = typer.Typer(
    help="Fine-tune the generator: LoRA and P-Tuning v2 adapters on your data and your knowledge base.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the "Loading weights" bars; ours are on stderr


# ValueError: e.g. a --config file that does not parse
KNOWN_ERRORS = {(FinetuneError, DataError, ValueError): 2}


@app.callback()
def main() -> None:
    """zhiku's fine-tuning commands."""
    _quiet()


@app.command()
def train(
    data: Annotated[list[Path], typer.Option("--data", help="Training file, JSON or JSONL (repeatable).")] = [],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder for the adapter.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="lora or ptuning (P-Tuning v2 = prefix tuning).")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model folder or cached id (default: the server's generator).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file of options; flags override it.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Epochs (default 3).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps; overrides --epochs.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default 2e-4 LoRA, 2e-2 P-Tuning).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Samples per device per step (default 4).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Gradient accumulation steps (default 1).")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per sample (default 1024).")] = None,
    overflow: Annotated[Optional[str], typer.Option(help="Longer samples: truncate or drop.")] = None,
    on_bad_record: Annotated[Optional[str], typer.Option(help="stop (default) or skip bad records.")] = None,
    eval_split: Annotated[Optional[float], typer.Option(help="Held-out share (<1) or count of samples.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="cosine (default), linear or constant_with_warmup.")] = None,
    warmup: Annotated[Optional[float], typer.Option(help="Warm-up share of steps (<1) or step count.")] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank (default 8).")] = None,
    lora_alpha: Annotated[Optional[int], typer.Option(help="LoRA alpha (default 16).")] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(help="LoRA dropout (default 0.05).")] = None,
    lora_target: Annotated[Optional[str], typer.Option(help="all-linear (default) or comma-separated module names.")] = None,
    lora_layers: Annotated[Optional[int], typer.Option(help="LoRA on the top N blocks only (default: all); much faster on a CPU.")] = None,
    use_rslora: Annotated[Optional[bool], typer.Option("--rslora/--no-rslora", help="Rank-stabilised LoRA.")] = None,
    use_dora: Annotated[Optional[bool], typer.Option("--dora/--no-dora", help="DoRA (weight-decomposed LoRA).")] = None,
    num_virtual_tokens: Annotated[Optional[int], typer.Option(help="P-Tuning prefix length, ChatGLM's pre_seq_len (default 128).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16/fp16 on CUDA, fp32 on CPU), fp32, bf16, fp16.")] = None,
    save_steps: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (default 500).")] = None,
    logging_steps: Annotated[Optional[int], typer.Option(help="Log the loss every N steps (default 5).")] = None,
    loss_log: Annotated[Optional[str], typer.Option(help="csv (default) or tensorboard.")] = None,
    deepspeed: Annotated[Optional[Path], typer.Option(help="DeepSpeed config, with accelerate launch.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (default 42).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Train a LoRA or P-Tuning v2 adapter; writes the adapter, its resolved config, loss.csv/png and a report."""
    from finetune.hparams import load_config
    from finetune.train import train as run_training

    overrides = dict(
        method=method, base=base, data=[str(p) for p in data], out=out, epochs=epochs, max_steps=max_steps, lr=lr,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, overflow=overflow,
        on_bad_record=on_bad_record, eval_split=eval_split, scheduler=scheduler, warmup=warmup, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_target=lora_target, lora_layers=lora_layers, use_rslora=use_rslora,
        use_dora=use_dora, num_virtual_tokens=num_virtual_tokens, precision=precision, save_steps=save_steps,
        logging_steps=logging_steps, loss_log=loss_log, deepspeed=deepspeed, seed=seed, resume=resume or None,
    )  # fmt: skip
    with user_errors(KNOWN_ERRORS, settings_field="config"):
        cfg = load_config(config, overrides)
        settings = Settings()
        with progress_bars() as progress:
            task = progress.add_task(f"training {cfg.method}", total=None)

            def on_progress(step: int, total: int, logs: dict) -> None:
                text = f"training {cfg.method}" + (f" loss {logs['loss']:.4f}" if "loss" in logs else "")
                progress.update(task, completed=step, total=total or None, **({"description": text} if "loss" in logs else {}))

            result = run_training(cfg, settings, on_progress)
    if as_json:
        print(json.dumps(asdict(result), indent=2))
        return
    err.print(
        f"[bold]{result.out}[/bold]: {result.method} adapter, {result.global_step} steps"
        + (f" (resumed at {result.resumed_from_step})" if result.resumed_from_step else "")
        + f", loss {result.first_loss:.4f} → {result.last_loss:.4f}" * (result.first_loss is not None)
        + f"\n  {result.samples} samples ({result.eval_samples} held out), {result.bad_records_skipped} bad records skipped, "
        f"{result.truncated} truncated, {result.dropped} dropped"
        f"\n  {result.tokens_per_second_per_device:.0f} tokens/s per device, {result.train_seconds:.0f} s, peak RSS {result.peak_rss_mb:.0f} MB"
        f"\n  serve it: rag serve --model {result.base} --adapter NAME={result.out}"
    )


@app.command("build-rag-data")
def build_rag_data(
    kb: Annotated[str, typer.Option("--kb", help="Knowledge base to retrieve from.")],
    qa: Annotated[list[Path], typer.Option("--qa", help="Question/answer file, any training format (repeatable).")],
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write.")],
    base: Annotated[Optional[str], typer.Option("--base", help="Model whose chat template and context window count tokens (default: the server's).")] = None,
    no_answer_share: Annotated[float, typer.Option(help="Share of samples given passages without the answer.", min=0.0, max=1.0)] = 0.2,
    negatives: Annotated[str, typer.Option(help="Passages for those samples: 'near' (the question's own, less the answer's; "
                                                 "the hard case) or 'other' (another question's).")] = "near",
    cite: Annotated[bool, typer.Option("--cite/--no-cite", help="End answerable targets with the [n] of the passages holding the answer.")] = True,
    unsupported: Annotated[str, typer.Option(help="Answerable pairs whose passages hold none of the answer: 'keep', 'drop' or "
                                                   "'no-answer' (for answers quoted from the documents).")] = "keep",
    no_answer_text_en: Annotated[str, typer.Option(help="Target answer for those samples (English questions).")] = "",
    no_answer_text_zh: Annotated[str, typer.Option(help="Target answer for those samples (Chinese questions).")] = "",
    top_k: Annotated[Optional[int], typer.Option(help="Passages per question (default: the server's top_k).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for choosing no-answer samples.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Turn question/answer pairs into samples whose system message is exactly what `rag serve` would send."""
    from finetune.evaluate import retriever_for
    from finetune.model import resolve_base
    from finetune.rag_data import NEGATIVES, UNSUPPORTED, TemplateCounter, build_rag_samples, qa_pairs, write_jsonl

    with user_errors(KNOWN_ERRORS, settings_field="config"):
        if out.exists() and not force:
            raise FinetuneError(f"--out {out} exists; add --force to overwrite it")
        for flag, value, choices in (("--negatives", negatives, NEGATIVES), ("--unsupported", unsupported, UNSUPPORTED)):
            if value not in choices:
                raise FinetuneError(f"{flag} must be one of {', '.join(choices)}, not {value!r}")
        settings = Settings()
        pairs = qa_pairs(qa)
        if not pairs:
            raise FinetuneError(f"empty dataset: no question/answer pair in {', '.join(map(str, qa))}")
        counter = TemplateCounter(resolve_base(base, settings))
        retriever = retriever_for(settings, kb)
        texts = {k: v for k, v in {"en": no_answer_text_en, "zh": no_answer_text_zh}.items() if v}
        with progress_bars() as progress:
            task = progress.add_task("retrieving", total=len(pairs))
            records, report = build_rag_samples(
                pairs, kb, counter, retriever, settings, no_answer_share=no_answer_share, negatives=negatives, no_answer_text=texts,
                cite=cite, unsupported=unsupported, top_k=top_k, seed=seed, on_progress=lambda done, total: progress.update(task, completed=done),
            )  # fmt: skip
        write_jsonl(records, out)
    if as_json:
        print(json.dumps(asdict(report), indent=2))
        return
    err.print(
        f"[bold]{out}[/bold]: {report.written} samples ({report.answerable} answerable, {report.unanswerable} with passages "
        f"lacking the answer, {report.near_negatives} of them near misses); {report.answer_in_context} answers found verbatim in their passages, "
        f"{report.unsupported} whose passages held none of the answer ({unsupported}), "
        f"{report.no_passages} questions without passages, {report.skipped} skipped (too long)"
    )


@app.command()
def merge(
    adapter: Annotated[Path, typer.Option("--adapter", help="LoRA adapter folder.")],
    out: Annotated[Path, typer.Option("--out", help="New folder for the merged model.")],
    base: Annotated[Optional[str], typer.Option("--base", help="Base model (default: the one the adapter records).")] = None,
    tolerance: Annotated[float, typer.Option(help="Largest allowed |logit difference| on the probe batch.")] = 1e-3,
    as_json: JsonOption = False,
) -> None:
    """Merge a LoRA adapter into full safetensors weights (with the tokenizer); P-Tuning adapters cannot be merged."""
    from finetune.merge import merge as run_merge
    from finetune.model import resolve_base

    with user_errors(KNOWN_ERRORS, settings_field="config"):
        base_path = resolve_base(base or _recorded_base(adapter), Settings())
        with progress_bars() as progress:
            progress.add_task("merging and checking logits", total=None)
            try:
                result = run_merge(base_path, adapter, out, tolerance)
            except FinetuneError as exc:
                if "logits differ" in str(exc):
                    print_error(str(exc))
                    raise typer.Exit(1)
                raise
    if as_json:
        print(json.dumps(asdict(result), indent=2))
        return
    err.print(
        f"[bold]{result.out}[/bold]: merged; probe logits match the adapter's (max |Δ| {result.max_abs_logit_diff:.1e} "
        f"over {result.probe_tokens} tokens)\n  serve it: rag serve --model {result.out}"
    )


def _recorded_base(adapter: Path) -> str | None:

    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise FinetuneError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    return json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")


@app.command("eval")
def eval_(
    data: Annotated[list[Path], typer.Option("--data", help="Held-out samples, any training format (repeatable).")],
    base: Annotated[Optional[str], typer.Option("--base", help="Base model (default: the server's generator).")] = None,
    adapter: Annotated[list[Path], typer.Option("--adapter", help="Adapter folder to compare with the base (repeatable).")] = [],
    kb: Annotated[Optional[str], typer.Option("--kb", help="Answer through the RAG path of this knowledge base.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate the first N samples only.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed (as a request's seed).")] = 0,
    no_base: Annotated[bool, typer.Option("--no-base", help="Skip the base model.")] = False,
    answers_out: Annotated[Optional[Path], typer.Option(help="Write every answer to this JSONL file.")] = None,
    as_json: JsonOption = False,
) -> None:
    """ROUGE-L, answer-contains and says-it-doesn't-know rates of the base and adapters, side by side."""
    from finetune.evaluate import eval_items, evaluate
    from finetune.data import load_samples
    from finetune.model import resolve_base
    from memory.knowledge_base import KnowledgeBaseError, validate_name
    from rag.generation import SamplingParams

    with user_errors(KNOWN_ERRORS, settings_field="config"):
        settings = Settings()
        if kb:
            try:
                validate_name(kb)
            except KnowledgeBaseError as exc:
                raise FinetuneError(f"--kb: {exc}") from None
        base_path = resolve_base(base, settings)
        names = {}
        for folder in adapter:
            if not (folder / "adapter_config.json").is_file():
                raise FinetuneError(f"--adapter {folder} is not a peft adapter folder (no adapter_config.json)")
            names[folder.name if folder.name not in names else str(folder)] = folder
        if no_base and not names:
            raise FinetuneError("--no-base needs at least one --adapter")
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        with progress_bars() as progress:
            tasks: dict[str, int] = {}

            def on_answer(model: str, done: int, total: int) -> None:
                if model not in tasks:
                    tasks[model] = progress.add_task(f"answering with {model}", total=total)
                progress.update(tasks[model], completed=done)

            scores = evaluate(
                base_path, data, settings, kb=kb, limit=limit, params=params, include_base=not no_base,
                adapters=names, on_answer=on_answer,
            )  # fmt: skip
        if answers_out:
            items = eval_items(load_samples(data).samples)[: limit]
            with answers_out.open("w", encoding="utf-8") as fh:
                for i, item in enumerate(items):
                    row = {"source": item.source, "reference": item.reference, "answerable": item.answerable}
                    row |= {s.model: s.answers[i] for s in scores}
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    rows = [{k: v for k, v in asdict(s).items() if k != "answers"} for s in scores]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("model", "samples", "ROUGE-L", "contains", "says unknown")
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for row in rows:
        table.add_row(row["model"], str(row["n"]), fmt(row["rouge_l"]), fmt(row["contains"]), fmt(row["says_unknown"]))
    Console().print(table)


def main() -> None:
    """The console script: the app, without interpreter teardown once torch is loaded."""
    run_and_exit(app)


if __name__ == "__main__":
    main()
