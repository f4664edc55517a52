#!/usr/bin/env bash
# The main job on a fresh machine: set up, ingest the project's own documentation
# (docs/en, docs/zh and docs/BENCHMARKS.md) into the knowledge base "zhiku-docs", start the
# OpenAI-compatible server on http://127.0.0.1:8000/v1, ask it sample questions,
# and keep serving until Ctrl-C.
#
#   ZHIKU_PORT        port (default 8000)
#   ZHIKU_DEMO_ONCE=1 ask the sample questions, then stop the server and exit
#   ZHIKU_DEMO_MODEL  generator (default: the bundled Chinese-capable Qwen2.5-Coder-1.5B;
#                     bundled:smollm2-135m is the small English-only one)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BIN="${ZHIKU_VENV:-.venv}/bin"
PORT="${ZHIKU_PORT:-8000}"
MODEL="${ZHIKU_DEMO_MODEL:-bundled:qwen2.5-coder-1.5b-instruct}"
"$BIN/ingest" add docs/en docs/zh docs/BENCHMARKS.md --kb zhiku-docs   # not docs/bench, docs/images: outputs, screenshots
"$BIN/ingest" list --kb zhiku-docs

"$BIN/rag" serve --kb zhiku-docs --port "$PORT" --model "$MODEL" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
"$BIN/python" - "$PORT" <<'PY'
import sys, time
import httpx, openai

base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(600):
    try:
        if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
else:
    sys.exit("the server did not become ready")
client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
model = client.models.list().data[0].id
print(f"\nserving {model} on {base}/v1 (knowledge base zhiku-docs); the web page is {base}/")
for question in ["How do I start the server and which port does it use?",
                 "What happens if ingest is killed halfway?",
                 "怎么给知识库换向量模型？"]:
    started = time.perf_counter()
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=200, extra_body={"top_k": 3})
    print(f"\n=== {question}  ({time.perf_counter() - started:.1f} s)\n{reply.choices[0].message.content.strip()}")
    for source in reply.model_dump()["sources"]:
        print(f"  [{source['index']}] {source['source']} (score {source['score']:.3f})")
PY
if [ "${ZHIKU_DEMO_ONCE:-0}" = "1" ]; then
    exit 0
fi
echo
echo "Serving on http://127.0.0.1:$PORT/v1 — try:"
echo "  curl http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\"
echo "       -d '{\"model\": \"qwen2.5-coder-1.5b-instruct@zhiku-docs\", \"messages\": [{\"role\": \"user\", \"content\": \"How do I ingest PDFs?\"}]}'"
echo "Ctrl-C stops it."
wait $SERVER
