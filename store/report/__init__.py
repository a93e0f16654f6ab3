"""What the usage log shows a person: `aigw log` (the records, streamed) and `aigw report` (a
month grouped, as JSON, CSV, a table or an HTML page with charts).

`query` reads the log (times, filters, rows), `summary` groups a month and reads budget use,
`text` writes rows as JSON lines, CSV or a table, `html` draws the page."""

from collections.abc import Iterator

from store.db import Store
from store.report import html, text
from store.report.query import (
    FIELDS,
    LogFilter,
    iso_utc,
    month_bounds,
    parse_month,
    parse_time,
    read_log,
    row,
)
from store.report.summary import (
    GROUPS,
    TOTAL_FIELDS,
    Summary,
    Totals,
    budgets,
    month_report,
    month_summary,
    report_of,
    summarize,
)

LOG_FORMATS = ("jsonl", "csv")
REPORT_FORMATS = ("json", "csv", "table", "html")

__all__ = [
    "FIELDS",
    "GROUPS",
    "LOG_FORMATS",
    "REPORT_FORMATS",
    "TOTAL_FIELDS",
    "LogFilter",
    "Summary",
    "Totals",
    "budgets",
    "iso_utc",
    "log_lines",
    "month_bounds",
    "month_report",
    "month_summary",
    "parse_month",
    "parse_time",
    "read_log",
    "report_of",
    "report_text",
    "row",
    "summarize",
]


def log_lines(store: Store, where: LogFilter, fmt: str) -> Iterator[str]:
    """`aigw log`'s output a line at a time: JSON lines, or CSV with a header."""
    rows = (row(record) for record in read_log(store, where))
    return text.jsonl(rows) if fmt == "jsonl" else text.csv_lines(rows, FIELDS)


def report_text(store: Store, month: str, by: str, fmt: str) -> str:
    """`aigw report` as CSV, a table or the HTML page (JSON: `month_report`)."""
    summary = month_summary(store, month)
    answer = report_of(store, summary, by)
    if fmt == "html":
        node = store.ledger.meta("node_id")  # read only: a report never writes the store
        return html.page(summary, answer["budgets"], generated_at=answer["generated_at"],
                         node=node if isinstance(node, str) else None)
    header = (by, *TOTAL_FIELDS)
    if fmt == "csv":
        return "".join(text.csv_lines(answer["groups"], header))
    return text.table([*answer["groups"], {by: "total", **answer["total"]}], header)
