"""Web pages: how much of the article zhiku keeps, and how much of the site around it.

    git clone https://github.com/adbar/trafilatura /tmp/trafilatura   # its evaluation set
    python -m bench.webpages --trafilatura /tmp/trafilatura [--no-write]

The pages are trafilatura's evaluation set: about 1,000 real saved web pages (news,
blogs, government and company sites; German, English, French, Polish, Chinese, …), each
annotated with a few strings that belong to the main text (``with``: the start, the end,
quotes, list items) and a few that do not (``without``: navigation, footers, teasers,
comments). As in trafilatura's own evaluation, a page's ``with`` string present in the
output is a true positive and one missing a false negative; a ``without`` string present
is a false positive. Texts are compared with whitespace collapsed and Markdown emphasis
removed. Reported for every page and for the Chinese ones apart (at least half of their
main-text strings Han, none Japanese), against the named baseline: all the visible text of the page (what
a loader that strips tags gives). Three systems:

- **zhiku** — ``ingest.webpages.load_html``, what ``ingest add`` stores;
- **visible text** — every visible text node (scripts and styles dropped), the baseline;
- **visible text without furniture** — zhiku's fallback alone (``nav``, ``header``,
  ``footer``, ``aside``, ``form``, ``menu`` dropped as well).

Caveat, said with the figures: trafilatura is tuned on this very set, so zhiku's recall
here is an upper bound for other sites; the set is still the largest annotated collection
of real saved pages we could use offline.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from bench.report import markdown_table, write_section

_HAN = re.compile(r"[\u4e00-\u9fff]")
_KANA = re.compile(r"[\u3040-\u30ff]")
_EMPHASIS = re.compile(r"\*+")


def normalised(text: str) -> str:
    return " ".join(_EMPHASIS.sub("", text).split())


def visible_text(path: Path, drop: tuple[str, ...] = ()) -> str:
    from ingest.text import read_bytes
    from ingest.webpages import decode_html, element_text, parse_html

    return element_text(parse_html(decode_html(read_bytes(path), path), path), drop=drop)


def visible_text_without_furniture(path: Path) -> str:
    from ingest.webpages import SITE_FURNITURE

    return visible_text(path, drop=SITE_FURNITURE)


def zhiku(path: Path) -> str:
    from ingest.webpages import load_html

    return "\n\n".join(page.text for page in load_html(path))


SYSTEMS: dict[str, Callable[[Path], str]] = {
    "zhiku (load_html)": zhiku,
    "visible text (baseline)": visible_text,
    "visible text without furniture": visible_text_without_furniture,
}


def annotated_pages(root: Path) -> list[dict]:
    """Every annotated page whose file is in the checkout, with its path."""
    gold = json.loads((root / "tests" / "evaldata.json").read_text(encoding="utf-8"))
    pages = []
    for url, entry in gold.items():
        for folder in ("eval", "cache"):
            path = root / "tests" / folder / entry["file"]
            if path.is_file():
                pages.append({"url": url, "path": path, "with": entry.get("with", []), "without": entry.get("without", [])})
                break
    return pages


def is_chinese(page: dict) -> bool:
    """At least half of its main-text strings are Han, and none is Japanese (kana)."""
    strings = page["with"]
    return not any(_KANA.search(s) for s in strings) and 2 * sum(bool(_HAN.search(s)) for s in strings) >= len(strings) > 0


def score(pages: list[dict], outputs: dict[str, str]) -> dict:
    tp = fn = fp = tn = 0
    for page in pages:
        text = outputs[page["url"]]
        for wanted in page["with"]:
            found = normalised(wanted) in text
            tp, fn = tp + found, fn + (not found)
        for unwanted in page["without"]:
            found = normalised(unwanted) in text
            fp, tn = fp + found, tn + (not found)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "main text kept (recall)": f"{recall:.3f}",
        "junk kept (of junk strings)": f"{fp / (fp + tn):.3f}" if fp + tn else "",
        "precision": f"{precision:.3f}",
        "F1": f"{f1:.3f}",
    }


def run(pages: list[dict]) -> tuple[list[dict], dict[str, dict[str, str]]]:
    rows, outputs_by_system = [], {}
    chinese = [p for p in pages if is_chinese(p)]
    for name, extract in SYSTEMS.items():
        outputs, failed, started = {}, 0, time.perf_counter()
        for page in pages:
            try:
                outputs[page["url"]] = normalised(extract(page["path"]))
            except Exception:  # noqa: BLE001 - a page a system cannot read scores as empty
                outputs[page["url"]], failed = "", failed + 1
        seconds = time.perf_counter() - started
        outputs_by_system[name] = outputs
        for subset, label in ((pages, f"all ({len(pages)} pages)"), (chinese, f"Chinese ({len(chinese)} pages)")):
            row = {"system": name, "pages": label} | score(subset, outputs)
            row["pages/s"] = f"{len(pages) / seconds:.1f}" if subset is pages else ""
            row["unreadable"] = str(failed) if subset is pages else ""
            rows.append(row)
            print(row, flush=True)
    return rows, outputs_by_system


def chinese_detail(pages: list[dict], outputs: dict[str, str]) -> list[dict]:
    rows = []
    for page in (p for p in pages if is_chinese(p)):
        text = outputs[page["url"]]
        kept = sum(normalised(s) in text for s in page["with"])
        junk = [s for s in page["without"] if normalised(s) in text]
        rows.append({
            "page": page["path"].name,
            "main-text strings kept": f"{kept} / {len(page['with'])}",
            "junk strings kept": f"{len(junk)} / {len(page['without'])}" + (f" ({', '.join(junk)})" if junk else ""),
            "characters": f"{len(text):,}",
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trafilatura", type=Path, required=True, help="a checkout of github.com/adbar/trafilatura")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    if not (args.trafilatura / "tests" / "evaldata.json").is_file():
        parser.error(f"--trafilatura: {args.trafilatura} has no tests/evaldata.json (clone github.com/adbar/trafilatura)")
    import trafilatura

    pages = annotated_pages(args.trafilatura)
    rows, outputs = run(pages)
    detail = chinese_detail(pages, outputs["zhiku (load_html)"])
    body = (
        f"trafilatura's evaluation set ({len(pages)} annotated real saved pages with their files present; trafilatura "
        f"{trafilatura.__version__} inside zhiku's loader). A page's main-text strings found in the output count as kept, "
        "its junk strings found as junk kept; precision = kept main-text strings / all strings found. Baseline: all the "
        "visible text. Caveat: trafilatura is tuned on this set, so zhiku's figures are an upper bound for other sites.\n\n"
        + markdown_table(rows)
        + "\n\nThe Chinese pages, zhiku's output:\n\n"
        + markdown_table(detail)
    )
    print(body)
    if not args.no_write:
        write_section("webpages", "Web pages: main text kept vs site furniture (trafilatura's evaluation set)",
                      "python -m bench.webpages --trafilatura PATH", body)  # fmt: skip


if __name__ == "__main__":
    main()
