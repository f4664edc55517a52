"""Delimited text tables (.csv, .tsv): one line per row, carrying the column headers.

    load_delimited(Path("价目表.csv")) -> [Page(None, "- 型号: A100; 单价: 120000\n- 型号: H100; …")]

The first non-empty row is the header. The encoding is detected as for text
files (Excel's Chinese CSVs are GBK); at most ``ingest.tables.MAX_SHEET_ROWS``
rows are read.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ingest.documents import IngestError, Page
from ingest.tables import sheet_section
from ingest.text import decode_text, read_bytes

DELIMITERS = {".csv": ",", ".tsv": "\t"}


def load_delimited(path: Path) -> list[Page]:
    text = decode_text(read_bytes(path), path)
    rows = csv.reader(text.splitlines(), delimiter=DELIMITERS[path.suffix.lower()])
    try:
        return [Page(None, sheet_section(None, rows))]
    except csv.Error as exc:
        raise IngestError(path, f"malformed {path.suffix.lower()} ({exc})") from None
