"""Chat and search while an upload ingests: time to first token, whole answer and ``/search``
latency on a live ``rag serve``, idle against during a large ingestion job.

    python -m bench.ingest_load [--files 300] [--model bundled:smollm2-135m]

Each mode runs on a fresh server: a small knowledge base to chat over, then (but for idle)
an upload of ``--files`` distinct Chinese text files as one job; while it runs, one streamed
chat (16 tokens) and one search alternate, half a second apart. The job's own rate
(chunks/s) is reported beside them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import httpx

from bench.report import markdown_table, write_section
from bench.serve_load import percentile, start_server
from settings import Settings
from tests.live_server import free_port

CHAT_KB = "bench-chat"
LOAD_KB = "bench-load"
QUESTION = "退货的运费由谁承担？"


def files(count: int, prefix: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    out = []
    for i in range(count):
        body = "\n\n".join(
            f"{prefix}第{i}号制度第{j}条：编号 {i * 1000 + j} 的设备每 {j + 2} 个月检修一次，由第 {i % 7} 组负责，记录保存三年。" * 4
            for j in range(10)
        )
        out.append(("files", (f"{prefix}-{i:04}.txt", body.encode(), "text/plain")))
    return out


def chat(base: str, model: str) -> tuple[float, float]:
    """(time to the first content, time to the whole 16-token answer) of one streamed chat."""
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "stream": True, "max_tokens": 16, "knowledge_base": CHAT_KB}
    started, first = time.perf_counter(), None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if first is None and '"content":' in line and '"content":""' not in line.replace(" ", ""):
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the stream ended without content")
    return first, time.perf_counter() - started


def search(base: str) -> float:
    started = time.perf_counter()
    httpx.post(f"{base}/v1/knowledge_bases/{CHAT_KB}/search", json={"query": QUESTION, "top_k": 5}, timeout=120).raise_for_status()
    return time.perf_counter() - started


def run_mode(mode: str, env: dict, count: int, rounds: int) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = start_server(env, port, kb=None)
    try:
        kbs = f"{base}/v1/knowledge_bases"
        policy = [("files", ("退货政策.txt", "退货政策：商品签收后七天内可以无理由退货，运费由买家承担；质量问题由商家承担运费。".encode(), "text/plain"))]
        httpx.post(f"{kbs}/{CHAT_KB}/documents", params={"wait": "true"}, files=policy, timeout=300).raise_for_status()
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        chat(base, model)  # warm
        chats, answers, searches, job = [], [], [], None
        if mode != "idle":
            job = httpx.post(f"{kbs}/{LOAD_KB}/documents", files=files(count, mode[:2]), timeout=600).json()
            while httpx.get(f"{kbs}/{LOAD_KB}/jobs/{job['id']}").json()["state"] == "queued":
                time.sleep(0.1)
        while True:
            first, whole = chat(base, model)
            chats.append(first)
            answers.append(whole)
            time.sleep(0.5)
            searches.append(search(base))
            time.sleep(0.5)
            state = httpx.get(f"{kbs}/{LOAD_KB}/jobs/{job['id']}").json() if job else None
            if (state is None and len(chats) >= rounds) or (state is not None and state["state"] != "running"):
                break
        row = {
            "mode": mode,
            "chats": len(chats),
            "TTFT p50 s": f"{percentile(chats, 50):.2f}",
            "TTFT p95 s": f"{percentile(chats, 95):.2f}",
            "answer p50 s": f"{percentile(answers, 50):.2f}",
            "search p50 ms": f"{percentile(searches, 50) * 1000:.0f}",
            "search p95 ms": f"{percentile(searches, 95) * 1000:.0f}",
        }
        seconds = state["finished"] - state["started"] if state else None
        row["ingest chunks/s"] = f"{state['chunks_embedded'] / seconds:.0f}" if state else "—"
        row["ingest s"] = f"{seconds:.0f}" if state else "—"
        return row
    finally:
        process.terminate()
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=15, help="chat/search pairs when idle")
    parser.add_argument("--model", default="bundled:smollm2-135m")
    args = parser.parse_args()
    table = []
    defaults = Settings()
    models = defaults.models_dir or defaults.home / "models"
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("idle", "ingest"):
            env = {
                **os.environ,
                "ZHIKU_HOME": str(Path(tmp) / mode),
                "ZHIKU_GENERATOR_MODEL": args.model,
                "ZHIKU_MODELS_DIR": str(models),  # one materialised copy for every mode's server
            }
            print(f"[{mode}]", flush=True)
            table.append(run_mode(mode, env, args.files, args.rounds))
            print(table[-1], flush=True)
    idle = float(table[0]["TTFT p50 s"]), float(table[0]["search p50 ms"]), float(table[0]["answer p50 s"])
    for row in table:
        row["TTFT p50 × idle"] = f"{float(row['TTFT p50 s']) / idle[0]:.1f}"
        row["answer p50 × idle"] = f"{float(row['answer p50 s']) / idle[2]:.1f}"
        row["search p50 × idle"] = f"{float(row['search p50 ms']) / max(idle[1], 1):.1f}"
    body = (
        f"{args.files} files (~{args.files * 10} chunks) uploaded as one job; one streamed chat ({args.model}, 16 tokens, "
        "retrieval on) and one search alternate while it runs.\n\n" + markdown_table(table)
    )
    slug = args.model.rsplit(":", 1)[-1].split("/")[-1]
    command = f"python -m bench.ingest_load --files {args.files} --model {args.model}"
    write_section(f"ingest-load-{slug}", f"Chat and search during an ingest ({slug})", command, body)
    print(markdown_table(table))


if __name__ == "__main__":
    main()
