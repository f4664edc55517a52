"""Tables as text that still says what each number means.

Every table zhiku reads (spreadsheets, CSV, Word and slide tables, tables found in
PDFs) becomes one list item per row that carries its column headers::

    >>> print(table_block([["地区", "人口（万）"], ["北京", "2189"], ["上海", ""]]))
    - 地区: 北京; 人口（万）: 2189
    - 地区: 上海

A retrieved chunk holding "人口（万）: 2189" answers a question about population,
where a run of loose numbers ("北京 2189 上海 2487") does not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ingest.clean import is_cjk

CELL_SEPARATOR = "; "
# Rows are list items so that cleaning never joins two rows into one "paragraph".
ROW_MARK = "- "


def cell_text(value: object) -> str:
    """A cell as one line of text: None is empty, floats that are whole numbers lose their
    ``.0``, and lines of a wrapped cell are joined (without a space between Chinese characters).

    >>> cell_text("住宿\\n标准"), cell_text("Long\\nGun"), cell_text(3.0)
    ('住宿标准', 'Long Gun', '3')
    """
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = ""
    for part in str(value).split():
        text = text + part if text and (is_cjk(text[-1]) or is_cjk(part[0])) else f"{text} {part}" if text else part
    return text


def header_names(header: Sequence[object]) -> list[str]:
    """The header row's names; a blank header cell is named after its column ("列3")."""
    return [cell_text(name) or f"列{i}" for i, name in enumerate(header, 1)]


def row_line(names: Sequence[str], row: Sequence[object]) -> str:
    """``"header: value; header: value"`` for the non-empty cells of ``row``; cells past the
    header are named after their column."""
    parts = []
    for i, value in enumerate(row):
        text = cell_text(value)
        if text:
            name = names[i] if i < len(names) else f"列{i + 1}"
            parts.append(text if name == text else f"{name}: {text}")
    return CELL_SEPARATOR.join(parts)


def rows_as_lines(rows: Iterable[Sequence[object]], max_rows: int | None = None) -> tuple[list[str], bool]:
    """The first non-empty row is the header; every later non-empty row is one line (a header
    alone is one line of its names). Reads at most ``max_rows`` rows after the header; the
    second value says whether more were left out."""
    names: list[str] | None = None
    lines = []
    read = 0
    for row in rows:
        if not any(cell_text(v) for v in row):
            continue
        if names is None:
            names = header_names(row)
            continue
        if read == max_rows:
            return lines, True
        read += 1
        line = row_line(names, row)
        if line:
            lines.append(line)
    if names is not None and not lines:  # a header alone is still text worth keeping
        lines.append(CELL_SEPARATOR.join(names))
    return lines, False


def table_block(rows: Iterable[Sequence[object]]) -> str:
    """The rows of one table as list items, one per row (empty when the table is)."""
    lines, _ = rows_as_lines(rows)
    return "\n".join(ROW_MARK + line for line in lines)


# Rows read per sheet (spreadsheets, CSV): a sheet of a million rows would make a
# knowledge base of one file. The rest are left out and the text says so.
MAX_SHEET_ROWS = 50_000


def sheet_section(title: str | None, rows: Iterable[Sequence[object]], max_rows: int = MAX_SHEET_ROWS) -> str:
    """A sheet as a section: ``## title``, then one list item per row with its headers
    (the first non-empty row); rows past ``max_rows`` are dropped with a line saying so.
    Empty when the sheet is."""
    lines, cut = rows_as_lines(rows, max_rows)
    if not lines:
        return ""
    section = ([f"## {title}"] if title else []) + [ROW_MARK + line for line in lines]
    if cut:
        section.append(f"（本表超过 {max_rows} 行，其余的行未读入 / rows after the first {max_rows} not read）")
    return "\n".join(section)


def unstack_rows(rows: Iterable[Sequence[object]]) -> list[list[object]]:
    """Rows whose filled cells all hold the same number (> 1) of lines split into that many
    rows: a PDF table drawn without rules between its rows comes out of the table finder
    as one row of stacked cells ("Alabama\\nAlaska", "18,870\\n209").

    >>> unstack_rows([["州", "数"], ["Alabama\\nAlaska", "18,870\\n209"]])
    [['州', '数'], ['Alabama', '18,870'], ['Alaska', '209']]
    """
    out: list[list[object]] = []
    for row in rows:
        counts = {len(str(cell).splitlines()) for cell in row if cell_text(cell)}
        if len(counts) == 1 and (count := counts.pop()) > 1:
            columns = [str(cell).splitlines() if cell_text(cell) else [""] * count for cell in row]
            out.extend([column[i] for column in columns] for i in range(count))
        else:
            out.append(list(row))
    return out


def spread_header(header: Sequence[object]) -> list[str]:
    """A header row whose merged cells (None after them: pdfplumber's spans) hold one line per
    column they cover, or a group name and then one line per column, spread over those columns.

    >>> spread_header(["State", "Permit\\nHandgun", None, "Pre-Pawn\\nHandgun\\nLong Gun", None])
    ['State', 'Permit', 'Handgun', 'Pre-Pawn Handgun', 'Pre-Pawn Long Gun']
    """
    names = [cell_text(cell) for cell in header]
    for i, cell in enumerate(header):
        span = 1
        while i + span < len(header) and header[i + span] is None:
            span += 1
        lines = [cell_text(line) for line in str(cell or "").splitlines() if cell_text(line)]
        if span > 1 and len(lines) == span:
            names[i : i + span] = lines
        elif span > 1 and len(lines) == span + 1:
            names[i : i + span] = [f"{lines[0]} {line}" for line in lines[1:]]
    return names


def pdf_table_text(rows: Sequence[Sequence[object]]) -> str:
    """A table from a PDF's table finder: leading one-cell rows are its caption, the next row
    its header (spread over merged cells), stacked rows unstacked, then :func:`table_block`."""
    rows = [row for row in rows if any(cell_text(cell) for cell in row)]
    captions = []
    while rows and sum(1 for cell in rows[0] if cell_text(cell)) == 1:
        captions.append(next(cell_text(cell) for cell in rows[0] if cell_text(cell)))
        rows = rows[1:]
    if not rows:
        return "\n".join(captions)
    block = table_block([spread_header(rows[0]), *unstack_rows(rows[1:])])
    return "\n".join([*captions, block])
