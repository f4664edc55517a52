"""Load test of the chat server, in the spirit of ModelArts' ``benchmark_parallel.py``.

    python -m bench.serve_load [--concurrency 1 4 8 16] [--rounds 2] [--pairs 1:256 3:128]

A pair is ``TOP_K:MAX_TOKENS``: how many passages go into the prompt (its
length) and how many tokens are generated. The defaults are an answer-heavy
pair (one passage, ~400 prompt tokens, 256 generated: a typical RAG answer)
and a prompt-heavy one (three passages, ~1,500 prompt tokens, 128 generated),
where a CPU's compute-bound prefill dominates. For each pair and concurrency level,
every one of the ``c`` clients sends ``rounds`` streaming requests back to back
(more at low concurrency, so every level has at least 8 samples).

Two systems run the same prompts in the same run:

* **server** — ``rag serve`` in a subprocess, over HTTP with the ``openai``
  client semantics (SSE), retrieval from a knowledge base of docs/;
* **in-process** — the same generator called directly with the exact messages
  the server assembles (computed here by the same ChatService), no HTTP, no retrieval.

Reported: TTFT p50/p99, time per output token, aggregate output tokens/s, error
rate; CSV and a PNG plot under docs/bench/, a summary in docs/BENCHMARKS.md.
Targets: server throughput at concurrency 8 is ≥ 2.5× concurrency 1; no errors.
The TTFT target (retrieval + HTTP add ≤ 50 ms) is measured by ``bench.serve_overhead``
with paired requests: between two runs a CPU prefill drifts by more than that.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.report import markdown_table, write_section
from rag.local_generator import generator_dtype
from settings import Settings

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "bench"
MIN_SAMPLES = 8
QUESTIONS = [
    "Explain in detail how to ingest a folder of documents into zhiku.",
    "Describe step by step how to serve a knowledge base with rag serve.",
    "Explain how zhiku chooses chunk size and overlap, and why.",
    "Describe how to configure zhiku with environment variables.",
    "Explain what happens when an ingest is interrupted by a crash.",
    "Describe how to use a different embedding model with zhiku.",
]


@dataclass
class Sample:
    system: str
    concurrency: int
    pair: str
    ttft: float
    latency: float
    tokens: int
    prompt_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / (self.tokens - 1) if self.tokens > 1 else 0.0


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


# ---- the two systems -------------------------------------------------------------
async def via_server(http: httpx.AsyncClient, url: str, model: str, question: str, top_k: int, max_tokens: int) -> tuple[float, float, int, int]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "top_k": top_k,
    }
    started = time.perf_counter()
    ttft, tokens, prompt_tokens = None, 0, 0
    # one long-lived client, as SDK users have (creating an httpx client costs ~20 ms of TLS set-up)
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens, prompt_tokens = chunk["usage"]["completion_tokens"], chunk["usage"]["prompt_tokens"]
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - started
    return ttft or 0.0, time.perf_counter() - started, tokens, prompt_tokens


async def in_process(generator, messages: list[dict], max_tokens: int) -> tuple[float, float, int, int]:
    from rag.generation import Finished, SamplingParams

    started = time.perf_counter()
    ttft, tokens, prompt_tokens = None, 0, 0
    async for event in generator.stream(messages, SamplingParams(max_tokens=max_tokens, temperature=0)):
        if isinstance(event, Finished):
            tokens, prompt_tokens = event.completion_tokens, event.prompt_tokens
        elif ttft is None and event.text:
            ttft = time.perf_counter() - started
    return ttft or 0.0, time.perf_counter() - started, tokens, prompt_tokens


async def run_level(system: str, call, concurrency: int, rounds: int, pair: str) -> tuple[list[Sample], float]:
    """``concurrency`` clients each sending ``rounds`` requests; returns samples and wall time."""

    requests_each = max(rounds, -(-MIN_SAMPLES // concurrency))  # enough samples for a p50 at low concurrency

    async def client(worker: int) -> list[Sample]:
        samples = []
        for r in range(requests_each):
            question = QUESTIONS[(worker + r * concurrency) % len(QUESTIONS)]
            try:
                ttft, latency, tokens, prompt_tokens = await call(question)
                samples.append(Sample(system, concurrency, pair, ttft, latency, tokens, prompt_tokens))
            except Exception as exc:  # an error is a result here, counted in the error rate
                samples.append(Sample(system, concurrency, pair, 0.0, 0.0, 0, error=f"{type(exc).__name__}: {exc}"))
        return samples

    started = time.perf_counter()
    results = await asyncio.gather(*(client(w) for w in range(concurrency)))
    return [s for group in results for s in group], time.perf_counter() - started


# ---- set-up ------------------------------------------------------------------------
def prepare_home(home: Path, settings: Settings) -> None:
    from memory.embedding import load_embedder
    from memory.ingestion import add_paths
    from memory.knowledge_base import KnowledgeBases

    kbs = KnowledgeBases.from_settings(settings)
    add_paths(kbs, "bench-docs", [REPO / "docs" / "en"], load_embedder(settings), chunk_size=settings.chunk_size, chunk_overlap=settings.chunk_overlap)


def start_server(env: dict, port: int, kb: str | None = "bench-docs", extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """``rag serve`` in a subprocess, returned once ``/ready`` says so."""
    command = [sys.executable, "-m", "cli.serve", "serve", "--port", str(port), "--log-level", "warning", *extra]
    process = subprocess.Popen(command + (["--kb", kb] if kb else []), env=env, cwd=REPO)
    wait_ready(f"http://127.0.0.1:{port}", process)
    return process


def wait_ready(url: str, process: subprocess.Popen, path: str = "/ready", timeout: float = 600) -> float:
    """Seconds until ``url + path`` answers 200; the process is killed if it never does."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, process.args[:4]))} exited during start-up")
        time.sleep(0.25)
    process.kill()
    raise RuntimeError(f"{url} was not ready after {timeout:.0f} s")


async def assembled_messages(chat, top_k: int, max_tokens: int) -> dict[str, list[dict]]:
    """The exact messages the server sends its generator for each question (same ChatService)."""
    from rag.chat import ChatTurn
    from rag.generation import SamplingParams

    prepared = {}
    for question in QUESTIONS:
        turn = ChatTurn(
            [{"role": "user", "content": question}],
            SamplingParams(max_tokens=max_tokens, temperature=0),
            knowledge_base="bench-docs",
            top_k=top_k,
        )
        prepared[question] = (await chat.prepare(turn)).messages
    return prepared


def parse_pairs(values: list[str]) -> list[tuple[int, int]]:
    pairs = []
    for value in values:
        top_k, _, max_tokens = value.partition(":")
        pairs.append((int(top_k), int(max_tokens)))
    return pairs


async def server_phase(url: str, model: str, pairs, levels, rounds) -> tuple[list[Sample], dict]:
    samples, walls = [], {}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as http:
        for top_k, max_tokens in pairs:
            pair = f"{top_k}:{max_tokens}"
            await via_server(http, url, model, QUESTIONS[0], top_k, 4)  # warm-up
            for c in levels:
                got, wall = await run_level("server", lambda q: via_server(http, url, model, q, top_k, max_tokens), c, rounds, pair)
                samples += got
                walls[("server", c, pair)] = wall
                print(f"  server      c={c:<3} pair={pair:<7} {summary(got, wall)}", flush=True)
    return samples, walls


async def in_process_phase(settings: Settings, pairs, levels, rounds) -> tuple[list[Sample], dict]:
    from memory.embedding import load_embedder
    from memory.knowledge_base import KnowledgeBases
    from rag.chat import ChatService
    from rag.local_generator import LocalGenerator
    from rag.retrieval import Retriever

    generator = LocalGenerator.from_settings(settings)
    retriever = Retriever.from_settings(settings, KnowledgeBases.from_settings(settings), load_embedder(settings))
    chat = ChatService(generator, retriever, settings)
    samples, walls = [], {}
    try:
        for top_k, max_tokens in pairs:
            pair = f"{top_k}:{max_tokens}"
            messages = await assembled_messages(chat, top_k, max_tokens)
            await in_process(generator, messages[QUESTIONS[0]], 4)  # warm-up
            for c in levels:
                got, wall = await run_level("in-process", lambda q: in_process(generator, messages[q], max_tokens), c, rounds, pair)
                samples += got
                walls[("in-process", c, pair)] = wall
                print(f"  in-process  c={c:<3} pair={pair:<7} {summary(got, wall)}", flush=True)
    finally:
        await generator.aclose()
    return samples, walls


def summary(samples: list[Sample], wall: float) -> str:
    ok = [s for s in samples if not s.error]
    tokens = sum(s.tokens for s in ok)
    return (
        f"TTFT p50 {percentile([s.ttft for s in ok], 50) * 1000:7.0f} ms  "
        f"TPOT p50 {percentile([s.tpot for s in ok], 50) * 1000:6.1f} ms  "
        f"{tokens / wall:6.1f} tok/s  errors {len(samples) - len(ok)}"
    )


# ---- reporting ---------------------------------------------------------------------
def rows(samples: list[Sample], walls: dict) -> list[dict]:
    table = []
    for (system, c, pair), wall in walls.items():
        group = [s for s in samples if (s.system, s.concurrency, s.pair) == (system, c, pair)]
        ok = [s for s in group if not s.error]
        table.append(
            {
                "system": system,
                "pair": pair,
                "concurrency": c,
                "requests": len(group),
                "prompt_tokens_mean": sum(s.prompt_tokens for s in ok) / max(1, len(ok)),
                "ttft_p50_ms": percentile([s.ttft for s in ok], 50) * 1000,
                "ttft_p99_ms": percentile([s.ttft for s in ok], 99) * 1000,
                "tpot_p50_ms": percentile([s.tpot for s in ok], 50) * 1000,
                "output_tokens": sum(s.tokens for s in ok),
                "throughput_tok_s": sum(s.tokens for s in ok) / wall,
                "error_rate": (len(group) - len(ok)) / len(group),
            }
        )
    return table


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for (system, pair) in sorted({(r["system"], r["pair"]) for r in table}):
        series = sorted((r for r in table if (r["system"], r["pair"]) == (system, pair)), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in series]
        style = "-" if system == "server" else "--"
        for axis, key in zip(axes, ("ttft_p50_ms", "tpot_p50_ms", "throughput_tok_s")):
            axis.plot(xs, [r[key] for r in series], style, marker="o", label=f"{system} {pair}")
    for axis, label in zip(axes, ("TTFT p50 (ms)", "time per output token p50 (ms)", "output tokens/s")):
        axis.set_xlabel("concurrency")
        axis.set_ylabel(label)
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def verdicts(table: list[dict]) -> list[str]:
    def get(system, c, pair, key):
        return next(r[key] for r in table if (r["system"], r["concurrency"], r["pair"]) == (system, c, pair))

    lines = []
    levels = sorted({r["concurrency"] for r in table})
    for pair in sorted({r["pair"] for r in table}):
        for c in levels:
            added = get("server", c, pair, "ttft_p50_ms") - get("in-process", c, pair, "ttft_p50_ms")
            lines.append(f"- pair {pair}, c={c}: server − in-process TTFT p50 {added:+.0f} ms (separate runs; the paired measurement of the ≤ 50 ms target is bench.serve_overhead)")
        if 1 in levels and 8 in levels:
            ratio = get("server", 8, pair, "throughput_tok_s") / get("server", 1, pair, "throughput_tok_s")
            lines.append(f"- pair {pair}: server throughput c=8 / c=1 = {ratio:.2f}× {'✅' if ratio >= 2.5 else '❌'} (target ≥ 2.5×)")
    errors = sum(r["error_rate"] * r["requests"] for r in table)
    lines.append(f"- errors: {errors:.0f} {'✅' if errors == 0 else '❌'} (target 0)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pairs", nargs="+", default=["1:256", "3:128"], help="TOP_K:MAX_TOKENS pairs")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--report-only", action="store_true", help="re-render the report from docs/bench/serve_load.csv")
    args = parser.parse_args()
    defaults = Settings()
    model = defaults.generator_model
    precision = str(generator_dtype(defaults.generator_dtype, "cpu")).removeprefix("torch.")
    if args.report_only:
        write_report(read_csv(OUT / "serve_load.csv"), model, precision, args.rounds)
        return
    pairs = parse_pairs(args.pairs)

    with tempfile.TemporaryDirectory(prefix="zhiku-serve-bench-") as tmp:
        env = {**os.environ, "ZHIKU_HOME": tmp, "ZHIKU_GENERATOR_MAX_BATCH_SIZE": str(max(args.concurrency))}
        env.setdefault("ZHIKU_MODELS_DIR", str(Settings().model_cache))
        settings = Settings(home=Path(tmp), models_dir=Path(env["ZHIKU_MODELS_DIR"]), generator_max_batch_size=max(args.concurrency))
        prepare_home(Path(tmp), settings)
        server = start_server(env, args.port)
        try:
            url = f"http://127.0.0.1:{args.port}"
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            print(f"server ready: {model}", flush=True)
            served, server_walls = asyncio.run(server_phase(url, model, pairs, args.concurrency, args.rounds))
        finally:
            server.terminate()
            server.wait(timeout=60)
        local, local_walls = asyncio.run(in_process_phase(settings, pairs, args.concurrency, args.rounds))

    table = rows(served + local, {**server_walls, **local_walls})
    print("\n".join(verdicts(table)))
    if args.no_write:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "serve_load.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    write_report(table, model, precision, args.rounds)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return [{k: v if k in ("system", "pair") else (int(v) if k in ("concurrency", "requests", "output_tokens") else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def write_report(table: list[dict], model: str, precision: str, rounds: int) -> None:
    plot(table, OUT / "serve_load.png")
    shown = [{k: (f"{v:.1f}" if isinstance(v, float) else v) for k, v in r.items()} for r in table]
    body = (
        f"Generator: {model} on CPU ({precision}); {rounds} rounds per client; pairs are TOP_K:MAX_TOKENS "
        "(passages in the prompt : tokens generated, greedy). CSV: `docs/bench/serve_load.csv`, "
        "plot: `docs/bench/serve_load.png`.\n\n" + markdown_table(shown) + "\n\n" + "\n".join(verdicts(table))
    )
    write_section("serve_load", "Chat server under load (server vs in-process generator)", "python -m bench.serve_load", body)


if __name__ == "__main__":
    main()
