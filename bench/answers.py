"""Answer quality through the real server, per generator, on ../shared/eval/dev.jsonl.

    python -m bench.answers [--model bundled:qwen2.5-coder-1.5b-instruct bundled:smollm2-135m ...]
                            [--adapter NAME=FOLDER ...] [--max-tokens 256] [--limit N]

Every question goes to ``rag serve`` (a subprocess, hybrid retrieval, the default
``top_k``) over a knowledge base of ../shared/corpus (zh + pdfs), non-streaming, at
temperature 0, one at a time. The measures, kept simple so that anyone can check a
row by reading the answers (written to ``docs/bench/answers-<model>.jsonl``):

* **correct** — answerable questions whose answer holds at least half of the gold
  answer's key terms (:func:`key_terms`: numbers and Latin-script words such as
  ``device_map`` or ``2.5e-5``, and Chinese words of two or more characters by
  jieba), compared after NFKC, lower-casing and removing whitespace;
* **cited** — answerable questions whose answer cites, as ``[n]``, a passage from the
  gold document (``sources[n]`` of the response);
* **says unknown** — unanswerable questions whose answer says the documents do not
  contain it (:func:`rag.prompt.says_unknown`);
* **zh→zh** — Chinese questions answered mostly in Chinese (``rag.prompt.language_of``);
* **s / answer** — mean wall time of one request, on this machine.

Targets for the bundled Qwen (issue 15): correct ≥ 0.7, zh→zh ≥ 0.95,
says unknown ≥ 0.7, cited ≥ 0.6.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePath

import httpx

from bench.report import markdown_table, write_section
from bench.serve_load import start_server
from memory.evaluation import normalise_for_match
from rag.prompt import cited_numbers, language_of, says_unknown
from settings import BUNDLED_QWEN_MODEL, BUNDLED_SMOLLM2_MODEL, Settings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OUT = REPO / "docs" / "bench"
KB = "dev"
_LATIN = re.compile(r"[a-z0-9][a-z0-9_.\-+]*[a-z0-9]|[a-z0-9]")
_CJK_RUN = re.compile(r"[\u3400-\u9fff]+")
# Words of the gold answers that carry no content of their own.
_STOP = {"可以", "需要", "然后", "之后", "如果", "或者", "以及", "其中", "一是", "二是", "分别", "表示", "因为",
         "the", "a", "an", "of", "to", "and", "or", "is", "are", "be", "on", "in", "for", "that", "each", "it", "its",
         "by", "with", "from", "as", "at", "this", "than", "more", "must", "before", "after", "then", "which", "so"}


def key_terms(answer: str) -> list[str]:
    """The gold answer's content words: Latin-script words and numbers, and jieba words of ≥ 2 Chinese characters."""
    import jieba

    text = unicodedata.normalize("NFKC", answer).lower()  # words still apart; matched whitespace-free
    terms = [w for w in _LATIN.findall(text) if w not in _STOP]
    for run in _CJK_RUN.findall(text):
        terms += [w for w in jieba.lcut(run) if len(w) >= 2 and w not in _STOP]
    return list(dict.fromkeys(terms))


def term_recall(response: str, gold: str) -> float:
    terms = key_terms(gold)
    said = normalise_for_match(response)
    return sum(t in said for t in terms) / len(terms) if terms else 0.0


def cited_sources(response: str, sources: list[dict]) -> set[str]:
    """File names of the passages the answer cites as ``[n]``."""
    by_index = {s["index"]: PurePath(s["source"]).name for s in sources}
    return {by_index[n] for n in cited_numbers(response) if n in by_index}


@dataclass
class Answer:
    item: dict
    response: str
    sources: list[dict]
    seconds: float

    @property
    def recall(self) -> float:
        return term_recall(self.response, self.item["answer"])

    @property
    def correct(self) -> bool:
        return self.recall >= 0.5

    @property
    def cited(self) -> bool:
        return self.item["source"] in cited_sources(self.response, self.sources)


def score(model: str, answers: list[Answer]) -> dict:
    answerable = [a for a in answers if a.item["kind"] != "unanswerable"]
    unanswerable = [a for a in answers if a.item["kind"] == "unanswerable"]
    chinese = [a for a in answers if a.item["lang"] == "zh"]

    def share(flags) -> str:
        flags = list(flags)
        return f"{sum(flags) / len(flags):.2f}" if flags else "–"

    return {
        "generator": model,
        "questions": len(answers),
        "correct": share(a.correct for a in answerable),
        "key-term recall": share_mean([a.recall for a in answerable]),
        "cited": share(a.cited for a in answerable),
        "cites any [n]": share(bool(cited_numbers(a.response)) for a in answerable),
        "says unknown": share(says_unknown(a.response) for a in unanswerable),
        "zh→zh": share(language_of(a.response) == "zh" for a in chinese),
        "s / answer": f"{sum(a.seconds for a in answers) / len(answers):.1f}",
    }


def share_mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.2f}" if values else "–"


def ask_all(url: str, model: str, items: list[dict], max_tokens: int) -> list[Answer]:
    answers = []
    with httpx.Client(timeout=1800) as http:
        for number, item in enumerate(items, 1):
            started = time.perf_counter()
            response = http.post(f"{url}/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": item["question"]}],
                "temperature": 0, "max_tokens": max_tokens})
            response.raise_for_status()
            body = response.json()
            answer = Answer(item, body["choices"][0]["message"]["content"], body.get("sources", []),
                            time.perf_counter() - started)
            answers.append(answer)
            print(f"  [{number}/{len(items)}] {item['id']} {answer.seconds:5.1f} s  recall {answer.recall:.2f}"
                  f"  cited {answer.cited}  {answer.response[:80]!r}", flush=True)
    return answers


def build_home(home: Path, settings: Settings) -> None:
    """The dev knowledge base over ../shared/corpus, ingested once and reused by later runs."""
    from memory.embedding import load_embedder
    from memory.ingestion import add_paths
    from memory.knowledge_base import KnowledgeBases

    kbs = KnowledgeBases.from_settings(settings)
    if KB in kbs.names():
        return
    add_paths(kbs, KB, [SHARED / "corpus" / "zh", SHARED / "corpus" / "pdfs"], load_embedder(settings),
              chunk_size=settings.chunk_size, chunk_overlap=settings.chunk_overlap)


def served_id(url: str) -> str:
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return next(m["id"] for m in models if "@" not in m["id"] and m.get("parent") is None)


def answers_file(label: str) -> Path:
    return OUT / f"answers-{re.sub(r'[^A-Za-z0-9.@_-]+', '-', label)}.jsonl"


def load_answers(label: str, items: list[dict]) -> list[Answer]:
    """A run's answers as written by :func:`run_generator`, for scoring again without asking again."""
    by_id = {item["id"]: item for item in items}
    rows = [json.loads(line) for line in answers_file(label).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Answer(by_id[r["id"]], r["answer"], [{"index": i, "source": s} for i, s in enumerate(r["sources"], 1)], r["seconds"])
            for r in rows if r["id"] in by_id]


def run_generator(label: str, env: dict, port: int, items: list[dict], max_tokens: int, model: str | None = None) -> dict:
    started = time.perf_counter()
    server = start_server(env, port, kb=KB)
    print(f"{label}: ready in {time.perf_counter() - started:.0f} s", flush=True)
    url = f"http://127.0.0.1:{port}"
    try:
        answers = ask_all(url, model or served_id(url), items, max_tokens)
    finally:
        server.terminate()
        server.wait(timeout=60)
    OUT.mkdir(parents=True, exist_ok=True)
    with answers_file(label).open("w", encoding="utf-8") as out:
        for a in answers:
            out.write(json.dumps({"id": a.item["id"], "question": a.item["question"], "gold": a.item["answer"],
                                  "gold_source": a.item["source"], "answer": a.response, "recall": round(a.recall, 2),
                                  "correct": a.correct, "cited": a.cited, "says_unknown": says_unknown(a.response),
                                  "sources": [s["source"] for s in a.sources], "seconds": round(a.seconds, 1)},
                                 ensure_ascii=False) + "\n")
    row = score(label, answers)
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=[BUNDLED_QWEN_MODEL, BUNDLED_SMOLLM2_MODEL])
    parser.add_argument("--adapter", action="append", default=[], help="NAME=FOLDER on the first --model, asked as NAME.")
    parser.add_argument("--adapters-only", action="store_true",
                        help="Ask only the adapters; then --rescore puts them beside the base's earlier answers.")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="Only N questions, spread evenly over the file (a quick look).")
    parser.add_argument("--only", nargs="+", default=None, metavar="ID", help="Only these question ids (a quick look).")
    parser.add_argument("--tag", default="", help="Added to each generator's label and answers file (a variant's run).")
    parser.add_argument("--port", type=int, default=8391)
    parser.add_argument("--home", type=Path, default=Path(tempfile.gettempdir()) / "zhiku-bench-answers",
                        help="Where the dev knowledge base is built once and kept.")
    parser.add_argument("--no-write", action="store_true", help="Print, do not write docs/BENCHMARKS.md.")
    parser.add_argument("--rescore", action="store_true", help="Score the answers written by an earlier run; ask nothing.")
    args = parser.parse_args()
    if not (SHARED / "eval" / "dev.jsonl").is_file():
        raise SystemExit("bench.answers needs ../shared/eval/dev.jsonl beside the checkout")
    items = [json.loads(line) for line in (SHARED / "eval" / "dev.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    items = items[:: -(-len(items) // args.limit)] if args.limit else items
    items = [item for item in items if item["id"] in args.only] if args.only else items

    models = str(Settings().model_cache)
    settings = Settings(home=args.home, models_dir=models)  # ZHIKU_* settings apply, to the server too
    build_home(args.home, settings)
    base_env = {**os.environ, "ZHIKU_HOME": str(args.home), "ZHIKU_MODELS_DIR": models}

    rows = []
    models_asked = [] if args.rescore else args.model[:1] if args.adapters_only else args.model
    for index, model in enumerate(models_asked):
        env = {**base_env, "ZHIKU_GENERATOR_MODEL": model}
        if not args.adapters_only:
            rows.append(run_generator(model.removeprefix("bundled:") + args.tag, env, args.port, items, args.max_tokens))
        if index == 0 and args.adapter:
            adapters = dict(a.split("=", 1) for a in args.adapter)
            env["ZHIKU_GENERATOR_ADAPTERS"] = json.dumps(adapters)
            for name in adapters:
                rows.append(run_generator(f"{model.removeprefix('bundled:')}+{name}", env, args.port, items, args.max_tokens, model=name))
    if args.rescore:
        labels = [m.removeprefix("bundled:") + args.tag for m in args.model]
        labels += [f"{labels[0]}+{a.split('=', 1)[0]}" for a in args.adapter]
        rows = [score(label, load_answers(label, items)) for label in labels]
    table = markdown_table(rows)
    print(table)
    if not args.no_write:
        body = (
            f"{len(items)} questions of ../shared/eval/dev.jsonl asked through `rag serve` (hybrid retrieval, top_k "
            f"{settings.top_k}, step {settings.step}, passage_tokens {settings.passage_tokens}, temperature 0, max_tokens "
            f"{args.max_tokens}, one at a time, generator dtype {settings.generator_dtype}). Measures as defined in `bench/answers.py`; "
            "every answer is in `docs/bench/answers-<generator>.jsonl`. Targets for the bundled Qwen: correct ≥ 0.7, "
            "zh→zh ≥ 0.95, says unknown ≥ 0.7, cited ≥ 0.6.\n\n" + table
        )
        write_section("answers", "Answer quality on dev.jsonl (bench.answers)", "python -m bench.answers", body)


if __name__ == "__main__":
    main()
