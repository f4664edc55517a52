"""Generator precision on this CPU: float32 (the baseline) against bfloat16, speed and quality.

    python -m bench.generator_precision [--questions 120] [--greedy 12]

Same bundled generator, same prompts, both precisions in one run, through
``LocalGenerator`` (the server's decode loop):

* speed: prefill tokens/s of a ~400- and a ~1,500-token RAG prompt (best of 3),
  decode ms per token alone and with 8 requests in one batch;
* quality: the mean negative log-likelihood per answer token of InsuranceQA-en
  gold answers, teacher-forced after the server's RAG prompt (system message with
  the gold passage, the question) — lower is better, and the float32 value is the
  reference; and how many of ``--greedy`` greedy answers (48 tokens) are identical
  to float32's.

The result decides ``generator_dtype='auto'`` on CPUs (settings).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from types import SimpleNamespace

import torch

from bench.insuranceqa import load
from bench.report import markdown_table, write_section
from models.torch_device import cpu_has_fast_bf16
from rag.generation import Finished, SamplingParams
from rag.chat_template import encode_chat
from rag.local_generator import LocalGenerator
from rag.prompt import render_system_message
from settings import Settings

DTYPES = ("float32", "bfloat16")


def rag_samples(count: int) -> list[tuple[list[dict], str]]:
    """(messages, gold answer) pairs: the server's system message holding the gold passage, then the question."""
    answers, questions = load("answers"), load("valid")
    samples = []
    for question in list(questions.values())[:count]:
        gold = answers[str(question["answers"][0])]["en"]
        samples.append((rag_messages([gold], question["en"]), " ".join(gold.split()[:60])))
    return samples


def rag_messages(passages: list[str], question: str) -> list[dict]:
    chosen = [SimpleNamespace(text=text, source="insuranceqa-answers", pages=()) for text in passages]
    return [{"role": "system", "content": render_system_message(chosen, "en")}, {"role": "user", "content": question}]


@torch.inference_mode()
def answer_nll(generator: LocalGenerator, samples, with_passage: bool = True) -> float:
    """Mean negative log-likelihood per gold-answer token after each prompt (or after the question alone)."""
    model, tokenizer = generator.models.base, generator.tokenizer
    total, count = 0.0, 0
    for messages, answer in samples:
        messages = messages if with_passage else messages[1:]
        prompt = encode_chat(tokenizer, messages)
        target = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + target], device=generator.device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt) :], reduction="sum"))
        count += len(target)
    return total / count


async def timed_completion(generator: LocalGenerator, messages, max_tokens: int) -> tuple[str, float, float, int]:
    """(text, seconds to the first token, seconds after it, completion tokens)."""
    started, first, parts, tokens = time.perf_counter(), None, [], 0
    async for event in generator.stream(messages, SamplingParams(max_tokens=max_tokens, temperature=0)):
        if isinstance(event, Finished):
            tokens = event.completion_tokens
        else:
            first = first or time.perf_counter()
            parts.append(event.text)
    return "".join(parts), (first or started) - started, time.perf_counter() - (first or started), tokens


def prompt_of_length(generator: LocalGenerator, samples, tokens: int) -> list[dict]:
    """A RAG prompt of about ``tokens`` tokens: passages stacked until the count is reached."""
    passages = []
    while True:
        passages.append(samples[len(passages) % len(samples)][1])
        messages = rag_messages(passages, "What does the policy cover?")
        if generator.count_prompt_tokens(messages) >= tokens:
            return messages


async def speed(generator: LocalGenerator, samples) -> dict:
    result = {}
    for length in (400, 1500):
        messages = prompt_of_length(generator, samples, length)
        prefill = min([(await timed_completion(generator, messages, 1))[1] for _ in range(3)])
        result[f"prefill_{length}_tok_s"] = generator.count_prompt_tokens(messages) / prefill
    messages = prompt_of_length(generator, samples, 400)
    _, _, after, tokens = await timed_completion(generator, messages, 64)
    result["decode_1_ms"] = after / max(1, tokens - 1) * 1000
    batch = await asyncio.gather(*(timed_completion(generator, messages, 64) for _ in range(8)))
    result["decode_8_ms_per_step"] = max(after / max(1, tokens - 1) for _, _, after, tokens in batch) * 1000
    return result


async def greedy_answers(generator: LocalGenerator, samples, count: int) -> list[str]:
    return [(await timed_completion(generator, messages, 48))[0] for messages, _ in samples[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=120, help="InsuranceQA-en validation questions for the NLL")
    parser.add_argument("--greedy", type=int, default=12, help="prompts whose greedy answers are compared")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()

    settings = Settings()
    samples = rag_samples(args.questions)
    measured, answers = {}, {}
    for dtype in DTYPES:
        generator = LocalGenerator.from_settings(settings.model_copy(update={"generator_device": "cpu", "generator_dtype": dtype}))
        try:
            measured[dtype] = {
                "answer_nll": answer_nll(generator, samples),
                "bare_nll": answer_nll(generator, samples, with_passage=False),
                **asyncio.run(speed(generator, samples)),
            }
            answers[dtype] = asyncio.run(greedy_answers(generator, samples, args.greedy))
        finally:
            asyncio.run(generator.aclose())
        print(dtype, measured[dtype], flush=True)

    base = measured["float32"]
    rows = []
    for dtype in DTYPES:
        m = measured[dtype]
        same = sum(a == b for a, b in zip(answers[dtype], answers["float32"]))
        rows.append(
            {
                "precision": dtype,
                "prefill ~400 tok/s": f"{m['prefill_400_tok_s']:.0f}",
                "prefill ~1500 tok/s": f"{m['prefill_1500_tok_s']:.0f}",
                "vs fp32 (1500)": f"{m['prefill_1500_tok_s'] / base['prefill_1500_tok_s']:.2f}×",
                "decode ms/token (1)": f"{m['decode_1_ms']:.1f}",
                "ms/token, 8 at once": f"{m['decode_8_ms_per_step']:.1f}",
                "answer NLL (RAG)": f"{m['answer_nll']:.4f} ({(m['answer_nll'] / base['answer_nll'] - 1) * 100:+.1f}%)",
                "answer NLL (no passage)": f"{m['bare_nll']:.4f} ({(m['bare_nll'] / base['bare_nll'] - 1) * 100:+.1f}%)",
                "greedy answers = fp32": f"{same}/{len(answers[dtype])}",
            }
        )
    table = markdown_table(rows)
    print(table)
    if args.no_write:
        return
    body = (
        f"Generator {settings.generator_model} on the CPU (native bf16 matmuls on this CPU: "
        f"{'yes' if cpu_has_fast_bf16() else 'no'}); through LocalGenerator. NLL: mean negative log-likelihood per "
        f"token of the first 60 words of the gold answer of {len(samples)} InsuranceQA-en validation questions, "
        "teacher-forced after the server's system message with that answer as passage [1] (RAG), or after the "
        "question alone (no passage); lower is better. \"8 at once\": the slowest of 8 requests sent together "
        "(prefills of the others included). "
        f"Greedy: {args.greedy} of those prompts, 48 tokens.\n\n{table}\n\n"
        "`generator_dtype='auto'` picks bfloat16 on CPUs with native bf16 matmuls (AMX, AVX512-BF16), float32 elsewhere."
    )
    write_section("generator_precision", "Generator precision on the CPU: float32 vs bfloat16", "python -m bench.generator_precision", body)


if __name__ == "__main__":
    main()
