"""An impatient crowd against ``rag serve``: many streaming chats with retrieval, many
of them abandoned mid-way, then every client gone at once.

    python -m bench.crowd [--clients 32] [--seconds 60] [--max-tokens 64] [--model bundled:smollm2-135m-instruct]

Each of ``--clients`` clients sends streaming chat requests (retrieval from a
knowledge base of docs/en, ``max_tokens`` 64) back to back for ``--seconds``.
Every other client is impatient: it gives up on a request after a random 2-30 s
(it closes the connection at whatever stage the request is in: queued,
retrieving, prefilling or decoding); the others wait for their answers. When
the time is up every client is dropped at once. Reported: outcomes by status,
p50/p99 total time of completed requests, how long the server takes to empty its
queue and batch after the crowd leaves (``/ready``'s generator load), how a fresh
request's time compares with the same request on the idle server before the
crowd, and the server's RSS at start, peak and end (target: end within 10% of
start). The audit this answers (docs/BENCHMARKS.md) saw the next request take
411 s instead of 4.

The baseline is the same server idle, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from bench.report import markdown_table, write_section
from bench.serve_load import QUESTIONS, percentile, prepare_home, start_server
from settings import Settings


class RssSampler:
    """Samples a process's resident memory every 0.2 s in a thread."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> float:
        return self.process.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append(self.now())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def chat_body(model: str, question: str, max_tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0, "stream": True}


async def one_request(http: httpx.AsyncClient, url: str, body: dict) -> str:
    """Stream one chat to the end; its outcome ("200", "429", ...)."""
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        async for _ in response.aiter_lines():
            pass
        return str(response.status_code)


async def timed_request(url: str, body: dict) -> float:
    async with httpx.AsyncClient(timeout=None) as http:
        started = time.perf_counter()
        outcome = await one_request(http, url, body)
        assert outcome == "200", outcome
        return time.perf_counter() - started


async def crowd(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> tuple[Counter, list[float]]:
    outcomes: Counter = Counter()
    completed: list[float] = []
    rng = random.Random(0)

    async def client(worker: int) -> None:
        async with httpx.AsyncClient(timeout=None) as http:
            for n in range(10**6):
                body = chat_body(model, QUESTIONS[(worker + n) % len(QUESTIONS)], max_tokens)
                started = time.perf_counter()
                patience = rng.uniform(2, 30) if worker % 2 else None
                try:
                    outcome = await asyncio.wait_for(one_request(http, url, body), patience)
                except asyncio.TimeoutError:
                    outcome = "abandoned"
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                outcomes[outcome] += 1
                if outcome == "200":
                    completed.append(time.perf_counter() - started)

    tasks = [asyncio.create_task(client(w)) for w in range(clients)]
    await asyncio.sleep(seconds)
    for task in tasks:  # every client leaves at once, mid-request
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    outcomes["dropped at the end"] = clients
    return outcomes, completed


def seconds_until_idle(url: str, timeout: float = 900) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        load = httpx.get(f"{url}/ready", timeout=10).json().get("generator", {})
        if load.get("queue_depth") == 0 and load.get("running") == 0:
            return time.perf_counter() - started
        time.sleep(0.05)
    return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="generator (default: the configured one)")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="zhiku-crowd-") as tmp:
        env = {**os.environ, "ZHIKU_HOME": tmp}
        env.setdefault("ZHIKU_MODELS_DIR", str(Settings().model_cache))
        if args.model:
            env["ZHIKU_GENERATOR_MODEL"] = args.model
        prepare_home(Path(tmp), Settings(home=Path(tmp), models_dir=Path(env["ZHIKU_MODELS_DIR"])))
        server = start_server(env, args.port)
        url = f"http://127.0.0.1:{args.port}"
        try:
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            probe = chat_body(model, QUESTIONS[0], args.max_tokens)
            asyncio.run(timed_request(url, probe))  # warm-up
            with RssSampler(server.pid) as rss:
                idle = asyncio.run(timed_request(url, probe))
                rss_start = rss.now()
                print(f"{model}: idle request {idle:.2f} s, RSS {rss_start:.0f} MiB; crowd of {args.clients} for {args.seconds:.0f} s", flush=True)
                outcomes, completed = asyncio.run(crowd(url, model, args.clients, args.seconds, args.max_tokens))
                drained = seconds_until_idle(url)
                fresh = asyncio.run(timed_request(url, probe))
                rss_end = rss.now()
                rss_peak = max(rss.samples + [rss_end])
        finally:
            server.terminate()
            server.wait(timeout=60)

    table = [
        {"measure": "outcomes", "value": ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))},
        {"measure": "completed requests: p50 / p99 total time", "value": f"{percentile(completed, 50):.1f} s / {percentile(completed, 99):.1f} s ({len(completed)} requests)"},
        {"measure": "queue and batch empty after the crowd left", "value": f"{drained:.2f} s"},
        {"measure": "next request (idle server before the crowd = baseline)", "value": f"{fresh:.2f} s vs {idle:.2f} s ({fresh / idle:.2f}x)"},
        {"measure": "server RSS start / peak / end", "value": f"{rss_start:.0f} / {rss_peak:.0f} / {rss_end:.0f} MiB (end {100 * (rss_end / rss_start - 1):+.1f}%)"},
    ]
    report = markdown_table(table)
    print(report)
    if args.no_write:
        return
    body = (
        f"`{model}`, {args.clients} streaming clients for {args.seconds:.0f} s, retrieval from docs/en "
        f"(default top_k), `max_tokens` {args.max_tokens}; half the clients abandon each request after a random 2-30 s, "
        "the other half wait for their answers; then every client is dropped at once. 5xx must be absent; abandoned requests must leave the server "
        "(queue and batch empty within a decode step of the last client leaving), the next request must "
        "take what it takes on an idle server, and RSS must come back within 10% of its start.\n\n" + report
    )
    command = f"python -m bench.crowd --model {args.model or 'default'} --clients {args.clients}"
    write_section(f"crowd-{model}-{args.clients}", f"Serving: an impatient crowd of {args.clients} ({model})", command, body)


if __name__ == "__main__":
    main()
