"""Rows as text: JSON lines, CSV with a header, an aligned table for a terminal."""

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

# Model names and error texts come from clients and providers: a spreadsheet would run a cell
# that starts like a formula, and a terminal would obey control characters.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def jsonl(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """One compact JSON object a line."""
    for item in rows:
        yield json.dumps(item, separators=(",", ":"), ensure_ascii=False) + "\n"


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_lines(rows: Iterable[dict[str, Any]], header: Sequence[str]) -> Iterator[str]:
    """CSV text, the header first, a line at a time (empty cell: no value)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for item in rows:
        writer.writerow([_csv_cell(item.get(name)) for name in header])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():  # the header alone, when there is no row
        yield buffer.getvalue()


def _table_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if value else "0"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return _CONTROL.sub("?", str(value))


def table(rows: Sequence[dict[str, Any]], header: Sequence[str]) -> str:
    """An aligned text table: text left, numbers right."""
    cells = [[_table_cell(item.get(name)) for name in header] for item in rows]
    widths = [max([len(name), *(len(line[i]) for line in cells)]) for i, name in
              enumerate(header)]
    numeric = [all(isinstance(item.get(name), int | float) or item.get(name) is None
                   for item in rows) and bool(rows) for name in header]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]),
                      *(line(values) for values in cells)]) + "\n"
