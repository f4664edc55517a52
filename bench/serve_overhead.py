"""What retrieval + HTTP add to the time to first token: paired requests, server against in-process.

    python -m bench.serve_overhead [--pairs 1 3] [--samples 12]

``bench.serve_load`` compares p50s of two separate runs; on a shared 2-core machine
a prefill of the same prompt varies by hundreds of milliseconds from one minute to
the next, more than the overhead being measured. Here both systems are up at once
(``rag serve`` in a subprocess, the same generator in this process, each idle
while the other works) and each question is sent to one then the other, back to
back, alternating which goes first: the overhead is the median of the paired
differences. One request at a time, ``max_tokens`` 1, the server's own prompts
(retrieval, assembly) given to the in-process generator.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

import httpx

from bench.report import markdown_table, write_section
from bench.serve_load import QUESTIONS, assembled_messages, in_process, prepare_home, start_server, via_server
from settings import Settings


async def paired(url: str, settings: Settings, top_ks: list[int], samples: int) -> list[dict]:
    from memory.embedding import load_embedder
    from memory.knowledge_base import KnowledgeBases
    from rag.chat import ChatService
    from rag.local_generator import LocalGenerator
    from rag.retrieval import Retriever

    generator = LocalGenerator.from_settings(settings)
    chat = ChatService(generator, Retriever.from_settings(settings, KnowledgeBases.from_settings(settings), load_embedder(settings)), settings)
    rows = []
    try:
        async with httpx.AsyncClient(timeout=600) as http:
            model = (await http.get(f"{url}/v1/models")).json()["data"][0]["id"]
            for top_k in top_ks:
                messages = await assembled_messages(chat, top_k, 1)
                await via_server(http, url, model, QUESTIONS[0], top_k, 1)  # warm-up both
                await in_process(generator, messages[QUESTIONS[0]], 1)
                server_ms, local_ms, prompt_tokens = [], [], set()
                for i in range(samples):
                    question = QUESTIONS[i % len(QUESTIONS)]
                    calls = [("server", lambda: via_server(http, url, model, question, top_k, 1)), ("local", lambda: in_process(generator, messages[question], 1))]
                    for name, call in calls if i % 2 == 0 else calls[::-1]:
                        ttft, _, _, tokens = await call()
                        (server_ms if name == "server" else local_ms).append(ttft * 1000)
                        prompt_tokens.add((question, tokens))
                differences = [s - l for s, l in zip(server_ms, local_ms)]
                same_prompts = all(len({t for q2, t in prompt_tokens if q2 == q}) == 1 for q, _ in prompt_tokens)
                rows.append(
                    {
                        "passages (top_k)": top_k,
                        "prompt tokens (mean)": f"{statistics.mean(t for _, t in prompt_tokens):.0f}",
                        "same prompts": "yes" if same_prompts else "NO",
                        "server TTFT p50 ms": f"{statistics.median(server_ms):.0f}",
                        "in-process TTFT p50 ms": f"{statistics.median(local_ms):.0f}",
                        "added ms, median of pairs": f"{statistics.median(differences):+.0f}",
                        "added ms, pairs p25 / p75": f"{_quantile(differences, 0.25):+.0f} / {_quantile(differences, 0.75):+.0f}",
                        "target ≤ 50 ms": "✅" if statistics.median(differences) <= 50 else "❌",
                    }
                )
                print(rows[-1], flush=True)
    finally:
        await generator.aclose()
    return rows


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[1, 3], help="top_k values (passages in the prompt)")
    parser.add_argument("--samples", type=int, default=12, help="paired requests per top_k")
    parser.add_argument("--port", type=int, default=8767)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zhiku-overhead-bench-") as tmp:
        env = {**os.environ, "ZHIKU_HOME": tmp}
        env.setdefault("ZHIKU_MODELS_DIR", str(Settings().model_cache))
        settings = Settings(home=Path(tmp), models_dir=Path(env["ZHIKU_MODELS_DIR"]))
        prepare_home(Path(tmp), settings)
        server = start_server(env, args.port)
        try:
            rows = asyncio.run(paired(f"http://127.0.0.1:{args.port}", settings, args.pairs, args.samples))
        finally:
            server.terminate()
            server.wait(timeout=60)
    table = markdown_table(rows)
    print(table)
    if not args.no_write:
        body = (
            f"Bundled generator on the CPU, knowledge base of docs/en, {args.samples} paired requests per row "
            "(server then in-process, or the reverse, alternating), one at a time, max_tokens 1, streaming; "
            "the in-process generator gets the exact messages the server assembles.\n\n" + table
        )
        write_section("serve_overhead", "Time to first token: what retrieval + HTTP add (paired)", "python -m bench.serve_overhead", body)


if __name__ == "__main__":
    main()
