"""Write one benchmark's results into its own section of docs/BENCHMARKS.md.

Each benchmark owns the text between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``; re-running it replaces only that section, stamped with
the machine and the date.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery section is written by the command named in it; re-run that command to refresh it.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}{matrix_features()}, {os.cpu_count()} cores, {memory_gb:.0f} GiB RAM, Python {platform.python_version()}"


def matrix_features() -> str:
    """The CPU's widest matrix instructions, e.g. " (AMX)": CPUs of one model name differ in them, and
    bf16 speed-ups depend on them."""
    kind = cpu_kind()
    return f" ({kind})" if kind else ""


def cpu_kind() -> str:
    """"AMX", "AVX512-BF16", "AVX-512, no bf16", "AVX2" or "" (from /proc/cpuinfo)."""
    try:
        flags = next(
            set(line.split(":", 1)[1].split())
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return ""
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512, no bf16"), ("avx2", "AVX2")):
        if flag in flags:
            return name
    return ""


def write_section(name: str, title: str, command: str, body: str, path: Path = BENCHMARKS) -> None:
    stamp = f"_{dt.date.today().isoformat()} · {machine()} · `{command}`_"
    section = f"<!-- bench:{name} -->\n## {title}\n\n{stamp}\n\n{body.strip()}\n<!-- /bench:{name} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
