"""What zhiku's embedder does beyond sentence-transformers' defaults, each measured against the plain way.

    python -m bench.embedding_speed [--passages 600] [--rounds 3]

* Batch order: zhiku sorts texts by token count; sentence-transformers sorts
  them by characters. Measured on InsuranceQA answers, half Chinese and half
  English: English has far fewer tokens per character, so character order puts
  texts of very different token counts in one padded batch.
* Packed weights: on a CPU with fast bf16, zhiku runs the linears on
  oneDNN-packed weights (models.cpu_linear) instead of ``nn.Linear``.

Both ways run in the same process, alternating round by round so that drift in
the machine's speed hits both; each cell is the median of the rounds. Writes
the "Embedding: batch order and packed weights" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from unittest import mock

import numpy as np

from bench import insuranceqa
from bench.report import markdown_table, write_section


def mixed_passages(count: int) -> list[str]:
    """``count`` InsuranceQA answers, half in Chinese and half in English, in a fixed shuffled order."""
    answers = [a for _, a in sorted(insuranceqa.load("answers").items(), key=lambda kv: int(kv[0]))]
    random.Random(0).shuffle(answers)
    half = count // 2
    texts = [a["zh"].strip() for a in answers[:half]] + [a["en"].strip() for a in answers[half : 2 * half]]
    random.Random(1).shuffle(texts)
    return texts


def by_characters(embedder, texts: list[str]) -> np.ndarray:
    """sentence-transformers' order: longest text (in characters) first, then batches in that order."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    vectors = embedder.encoder.encode([texts[i] for i in order], embedder.passage_prompt, "document", embedder.batch_size)
    out = np.empty_like(vectors)
    out[order] = vectors
    return out


def alternate(rounds: int, plain: Callable[[], np.ndarray], zhiku: Callable[[], np.ndarray]) -> dict:
    seconds: dict[str, list[float]] = {"plain": [], "zhiku": []}
    outputs = {}
    for _ in range(rounds):
        for name, run in (("plain", plain), ("zhiku", zhiku)):
            started = time.perf_counter()
            outputs[name] = run()
            seconds[name].append(time.perf_counter() - started)
    plain_s, zhiku_s = statistics.median(seconds["plain"]), statistics.median(seconds["zhiku"])
    cosine = (outputs["plain"] * outputs["zhiku"]).sum(axis=1)
    return {
        "plain s": f"{plain_s:.1f}",
        "zhiku s": f"{zhiku_s:.1f}",
        "speed-up": f"{plain_s / zhiku_s:.2f}×",
        "rounds s (plain / zhiku)": " · ".join(f"{p:.1f}/{z:.1f}" for p, z in zip(seconds["plain"], seconds["zhiku"])),
        "min cosine": f"{cosine.min():.6f}",
        "identical": "yes" if np.array_equal(outputs["plain"], outputs["zhiku"]) else "no",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from memory.embedding import load_embedder
    from settings import Settings

    settings = Settings()
    texts = mixed_passages(args.passages)
    embedder = load_embedder(settings)
    embedder.embed_passages(texts[:32])  # warm-up
    tokens = int(embedder.encoder.token_lengths([embedder.passage_prompt + t for t in texts]).sum())
    rows = [
        {
            "change": "batch order: tokens (zhiku) vs characters",
            **alternate(args.rounds, lambda: by_characters(embedder, texts), lambda: embedder.embed_passages(texts)),
        }
    ]
    if embedder.device == "cpu" and embedder.dtype == "bfloat16":
        with mock.patch("models.cpu_linear.pack_linear_layers", return_value=0):
            unpacked = load_embedder(settings)
            unpacked.embed_passages(texts[:32])
        rows.append(
            {
                "change": "bf16 linears: oneDNN-packed (zhiku) vs nn.Linear",
                **alternate(args.rounds, lambda: unpacked.embed_passages(texts), lambda: embedder.embed_passages(texts)),
            }
        )
    body = (
        f"Model {settings.embedding_model} ({embedder.dtype}, {embedder.device}), batch {embedder.batch_size}; "
        f"{len(texts)} InsuranceQA answers, half Chinese, half English ({tokens} tokens with the prompt). "
        f"Median of {args.rounds} alternating rounds.\n\n" + markdown_table(rows) + "\n"
    )
    if len(rows) == 1:
        body += "\nPacked weights apply to bf16 on the CPU only; this machine embeds in float32.\n"
    print(body)
    write_section("embedding_speed", "Embedding: batch order and packed weights", "python -m bench.embedding_speed", body)


if __name__ == "__main__":
    main()
