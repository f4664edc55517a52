#!/usr/bin/env bash
# The main job on a fresh machine: set up, ingest the project's own documentation
# (docs/, Chinese and English) into the knowledge base "zhiku-docs", and answer
# sample questions by retrieval. Pass your own questions as arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BIN="${ZHIKU_VENV:-.venv}/bin"
"$BIN/ingest" add docs --kb zhiku-docs
"$BIN/ingest" list --kb zhiku-docs
if [ "$#" -eq 0 ]; then
    set -- "怎么给知识库换向量模型？" "What happens if ingest is killed halfway?" "扫描版 PDF 为什么入库失败？"
fi
for question in "$@"; do
    echo
    echo "=== $question"
    "$BIN/ingest" search "$question" --kb zhiku-docs --top-k 3
done
