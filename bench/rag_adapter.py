"""Train a Chinese RAG adapter for the bundled Qwen on InsuranceQA-zh, for ``bench.answers``.

    python -m bench.rag_adapter [--train-questions 400] [--steps 120] [--lora-layers 8] ...
    python -m bench.answers --model qwen2.5-coder-1.5b-instruct --adapter rag=bench/out/rag-adapter/lora

1. a knowledge base of InsuranceQA-zh answer passages (the gold answers of the chosen
   train questions plus ``--pool`` others, ``--answers-per-document`` to a file), built
   with ``ingest add``;
2. ``finetune build-rag-data``: the server's retrieval and system message; the target is
   the gold answer's first sentences with the ``[n]`` of the passage holding it; a third
   of the samples get the question's own passages less the answer's (near misses) and
   the target "无法从文段中得到答案。"; questions whose gold passage was not retrieved are left
   out (``--unsupported drop``: InsuranceQA's other answers often answer them too, so they are
   neither clean answers nor clean refusals);
3. ``finetune train``: LoRA on the top ``--lora-layers`` blocks (no backward pass below
   them, which is what makes a 1.5B model trainable on two CPU cores).

dev.jsonl is never used for training: its documents and questions stay unseen. Every
step is the CLI in a subprocess; wall time and peak RSS are printed per step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

from bench import insuranceqa
from bench.finetune_insuranceqa import run_measured

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def first_sentences_zh(text: str, chars: int) -> str:
    """The first sentences of ``text`` (split after 。！？) holding at most ``chars`` characters (at least one)."""
    sentences = [s for s in re.split(r"(?<=[。！？])", "".join(text.split())) if s]
    out = ""
    for sentence in sentences:
        if out and len(out + sentence) > chars:
            break
        out += sentence
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-questions", type=int, default=400)
    parser.add_argument("--pool", type=int, default=1500, help="Extra answer passages in the knowledge base.")
    parser.add_argument("--answers-per-document", type=int, default=1,
                        help="Answers per document: several make chunks as long as the served ones, with the answer inside.")
    parser.add_argument("--answer-chars", type=int, default=80, help="Reference: the gold answer's first sentences, at most this long.")
    parser.add_argument("--top-k", type=int, default=3, help="Passages per sample (fewer than the server's 5: shorter samples train faster).")
    parser.add_argument("--no-answer-share", type=float, default=0.25)
    parser.add_argument("--unsupported", default="drop", help="build-rag-data --unsupported.")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-layers", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "rag-adapter")
    args = parser.parse_args()

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    (work / "passages").mkdir(parents=True)
    from settings import Settings

    # the user's model cache, not a second copy under the bench's home
    env = {**os.environ, "ZHIKU_HOME": str(work / "home"), "ZHIKU_MODELS_DIR": str(Settings().model_cache), "ZHIKU_TOP_K": str(args.top_k)}

    answers, train_rows = insuranceqa.load("answers"), insuranceqa.load("train")
    questions = [q for _, q in sorted(train_rows.items(), key=lambda kv: int(kv[0])) if q.get("answers")]
    chosen = random.Random(7).sample(questions, args.train_questions)
    gold = {q["answers"][0] for q in chosen}
    others = random.Random(8).sample(sorted(set(answers) - gold, key=int), args.pool)
    ids = sorted(gold | set(others), key=int)
    random.Random(9).shuffle(ids)
    for start in range(0, len(ids), args.answers_per_document):
        group = ids[start : start + args.answers_per_document]
        text = "\n\n".join("".join(answers[answer_id]["zh"].split()) for answer_id in group)
        (work / "passages" / f"保险问答-{group[0]}.txt").write_text(text + "\n", encoding="utf-8")
    with (work / "train-qa.jsonl").open("w", encoding="utf-8") as fh:
        for q in chosen:
            reference = first_sentences_zh(answers[q["answers"][0]]["zh"], args.answer_chars)
            fh.write(json.dumps({"question": "".join(q["zh"].split()), "answer": reference}, ensure_ascii=False) + "\n")

    steps = []
    _, wall, rss = run_measured([str(BIN / "ingest"), "add", str(work / "passages"), "--kb", "保险", "--json"], env)
    steps.append(("ingest", wall, rss))
    report, wall, rss = run_measured(
        [str(BIN / "finetune"), "build-rag-data", "--kb", "保险", "--qa", str(work / "train-qa.jsonl"),
         "--out", str(work / "train-rag.jsonl"), "--no-answer-share", str(args.no_answer_share),
         "--unsupported", args.unsupported, "--json"], env)  # fmt: skip
    steps.append(("build-rag-data", wall, rss))
    print(json.dumps(report), flush=True)
    trained, wall, rss = run_measured(
        [str(BIN / "finetune"), "train", "--method", "lora", "--data", str(work / "train-rag.jsonl"), "--out", str(work / "lora"),
         "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
         "--lr", str(args.lr), "--lora-r", str(args.lora_r), "--lora-alpha", str(2 * args.lora_r),
         "--lora-layers", str(args.lora_layers), "--max-length", str(args.max_length), "--save-steps", str(max(args.steps // 2, 1)),
         "--logging-steps", "5", "--warmup", "0.05", "--json"], env)  # fmt: skip
    steps.append(("train", wall, rss))
    print(json.dumps({k: trained[k] for k in ("global_step", "first_loss", "last_loss", "samples", "truncated")}))
    for name, wall, rss in steps:
        print(f"{name}: {wall:.0f} s, peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
