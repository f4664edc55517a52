"""The InsuranceQA data shipped in the ``insuranceqa-data==1.0`` package, read once per call.

``load("answers")`` maps answer id -> {"zh", "en"}; ``load("train" | "valid" | "test")``
maps question id -> {"zh", "en", "domain", "answers": [ids], "negatives": [ids]}.
"""

from __future__ import annotations

import gzip
import json
from importlib.metadata import distribution
from pathlib import Path


def load(name: str) -> dict:
    path = Path(distribution("insuranceqa-data").locate_file(f"insuranceqa_data/{name}.json.gz"))
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)
