"""`aigw report --format html`: one self-contained page (inline CSS and SVG, no script, no font,
nothing fetched) with the month's daily spend, spend by model, each org's and user's budget use
against its limit, and the tables behind them. Every chart element carries its figures as data
attributes and as an SVG `<title>` (shown on hover), and the values are printed beside it.

Names on the page (models, ids, emails) come from clients and records: every one is escaped."""

import calendar
import math
from collections.abc import Sequence
from html import escape
from typing import Any

from store.money import to_usd
from store.report.summary import Summary, Totals

MODELS_SHOWN = 15  # the rest of the models are one "other" bar
BUDGETS_SHOWN = 100  # per level; the JSON report has every one
WARN_RATIO = 0.8

_CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --grid: #e4e7eb; --bar: #3b6fd8; --ok: #2f9e44;
  --warn: #e8890c; --over: #d6336c; --track: #eef1f5; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--ink); background: #f7f8fa; }
main { max-width: 1000px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 0 0 4px; }
h3 { font-size: 15px; margin: 16px 0 4px; color: var(--muted); }
.sub, .note { color: var(--muted); margin: 0 0 12px; }
section { background: #fff; border: 1px solid var(--grid); border-radius: 8px;
  padding: 16px 18px; margin: 16px 0; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px;
  background: none; border: 0; padding: 0; }
.tile { background: #fff; border: 1px solid var(--grid); border-radius: 8px; padding: 12px 14px; }
.tile .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }
.tile .value { font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
svg { display: block; width: 100%; height: auto; }
svg text { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  fill: var(--ink); }
svg .axis-title { fill: var(--muted); font-size: 12px; }
svg .tick { fill: var(--muted); }
svg .grid { stroke: var(--grid); stroke-width: 1; }
svg .bar { fill: var(--bar); }
svg .bar:hover, svg .fill:hover { opacity: .8; }
svg .value { font-size: 10px; font-variant-numeric: tabular-nums; }
svg .day-value { font-size: 9px; }
svg .track { fill: var(--track); }
svg .ok { fill: var(--ok); } svg .warn { fill: var(--warn); } svg .over { fill: var(--over); }
svg .limit { stroke: var(--ink); stroke-width: 1.5; stroke-dasharray: 4 3; }
.legend span { display: inline-block; margin-right: 14px; color: var(--muted); }
.legend i { display: inline-block; width: 10px; height: 10px; border-radius: 2px;
  margin-right: 5px; vertical-align: -1px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 8px; border-bottom: 1px solid var(--grid); text-align: right; }
th:first-child, td:first-child { text-align: left; overflow-wrap: anywhere; }
th { color: var(--muted); font-weight: 600; font-size: 12px; }
details { margin-top: 8px; }
summary { cursor: pointer; color: var(--muted); }
.empty { color: var(--muted); font-style: italic; }
@media print { body { background: #fff; } section, .tile { break-inside: avoid; }
  details { display: block; } }
"""


def usd(value: float) -> str:
    """Dollars for a person: cents above a dollar, three significant digits below."""
    if value == 0:
        return "$0"
    if abs(value) >= 1000:
        return f"${value:,.0f}"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    digits = max(2, 2 - math.floor(math.log10(abs(value))))
    return f"${value:.{digits}f}".rstrip("0").rstrip(".")


def exact_usd(value: float) -> str:
    """Dollars to the nano-dollar, as the ledger holds them: `$1.125`, `$0.000002`."""
    return "$" + (f"{value:,.9f}".rstrip("0").rstrip(".") if value else "0")


def _tick(value: float, top: float) -> str:
    """An axis label: cents on an axis that reaches a dollar, else as `usd`."""
    return f"${value:,.2f}" if top >= 1 and value else usd(value)


def _short(value: float) -> str:
    """A bar's printed value in a few characters (its `<title>` has it exactly)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.2g}"


def _count(value: int) -> str:
    if value >= 10_000_000:
        return f"{value / 1e6:.0f}M"
    if value >= 1_000_000:
        return f"{value / 1e6:.1f}M"
    if value >= 10_000:
        return f"{value / 1e3:.0f}k"
    return f"{value:,}"


def _attr(value: Any) -> str:
    return escape(str(value), quote=True)


def _nice_max(value: float) -> float:
    """A round axis maximum at or above `value` (1, 2, 2.5 or 5 times a power of ten)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value * 1.0000001:
            return step * power
    return 10 * power


def _month_title(month: str) -> str:
    year, mon = (int(part) for part in month.split("-"))
    return f"{calendar.month_name[mon]} {year}"


def daily_chart(summary: Summary) -> str:
    """Bars of each day's spend over the whole month, with a USD axis."""
    year, mon = (int(part) for part in summary.month.split("-"))
    days = calendar.monthrange(year, mon)[1]
    by_day = summary.groups["day"]
    width, height, left, right, top, bottom = 960, 320, 70, 16, 26, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    costs = [to_usd(by_day[f"{summary.month}-{d:02d}"].cost_nusd)
             if f"{summary.month}-{d:02d}" in by_day else 0.0 for d in range(1, days + 1)]
    top_value = _nice_max(max(costs, default=0.0))
    parts = [f'<svg id="daily-chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-labelledby="daily-title"><title id="daily-title">Daily spend, '
             f'{_month_title(summary.month)} (USD, UTC days)</title>']
    for i in range(5):
        value = top_value * i / 4
        y = top + plot_h - plot_h * i / 4
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" '
                     f'y2="{y:.1f}"/><text class="tick" x="{left - 6}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{escape(_tick(value, top_value))}</text>')
    slot = plot_w / days
    for d, cost in enumerate(costs, start=1):
        day = f"{summary.month}-{d:02d}"
        totals = by_day.get(day, Totals())
        h = plot_h * cost / top_value
        x = left + slot * (d - 1) + slot * 0.15
        y = top + plot_h - h
        label = (f"{day}: {exact_usd(cost)}, {totals.requests:,} requests, "
                 f"{totals.total_tokens:,} tokens")
        parts.append(
            f'<rect class="bar" data-day="{day}" data-cost-usd="{cost}" '
            f'data-requests="{totals.requests}" x="{x:.1f}" y="{y:.1f}" '
            f'width="{slot * 0.7:.1f}" height="{h:.1f}"><title>{escape(label)}</title></rect>')
        if cost > 0:
            parts.append(f'<text class="value day-value" x="{x + slot * 0.35:.1f}" '
                         f'y="{y - 4:.1f}" '
                         f'text-anchor="middle">{escape(_short(cost))}</text>')
        parts.append(f'<text class="tick" x="{x + slot * 0.35:.1f}" y="{top + plot_h + 16}" '
                     f'text-anchor="middle">{d}</text>')
    parts.append(
        f'<line class="grid" x1="{left}" x2="{width - right}" y1="{top + plot_h}" '
        f'y2="{top + plot_h}" style="stroke:#9aa5b1"/>'
        f'<text class="axis-title" x="{left + plot_w / 2}" y="{height - 8}" '
        f'text-anchor="middle">Day of {_month_title(summary.month)} (UTC)</text>'
        f'<text class="axis-title" transform="translate(16 {top + plot_h / 2}) rotate(-90)" '
        f'text-anchor="middle">Spend (USD)</text></svg>')
    return "".join(parts)


def _hbars(chart_id: str, title: str, rows: Sequence[dict[str, Any]], axis: str) -> str:
    """Horizontal bars: one row each with `label`, `value` (USD), `text`, and `data` (the
    element's data attributes)."""
    width, left, right, row_h, top = 960, 250, 180, 30, 8
    plot_w = width - left - right
    height = top + row_h * len(rows) + 40
    top_value = _nice_max(max((r["value"] for r in rows), default=0.0))
    parts = [f'<svg id="{chart_id}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-labelledby="{chart_id}-title"><title id="{chart_id}-title">'
             f'{escape(title)}</title>']
    for i in range(5):
        x = left + plot_w * i / 4
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" '
                     f'y2="{height - 34}"/><text class="tick" x="{x:.1f}" y="{height - 20}" '
                     f'text-anchor="middle">{escape(_tick(top_value * i / 4, top_value))}</text>')
    for i, r in enumerate(rows):
        y = top + row_h * i
        w = plot_w * r["value"] / top_value
        data = " ".join(f'data-{k}="{_attr(v)}"' for k, v in r["data"].items())
        label = r["label"] if len(r["label"]) <= 34 else r["label"][:33] + "…"
        parts.append(
            f'<text x="{left - 8}" y="{y + 19}" text-anchor="end">{escape(label)}</text>'
            f'<rect class="bar" {data} x="{left}" y="{y + 6}" width="{w:.1f}" height="18">'
            f'<title>{escape(r["label"] + ": " + r.get("hover", r["text"]))}</title></rect>'
            f'<text class="value" x="{left + w + 6:.1f}" y="{y + 19}">{escape(r["text"])}'
            f'</text>')
    parts.append(f'<text class="axis-title" x="{left + plot_w / 2}" y="{height - 4}" '
                 f'text-anchor="middle">{escape(axis)}</text></svg>')
    return "".join(parts)


def model_chart(summary: Summary) -> str:
    """Bars of spend by model, largest first; past MODELS_SHOWN the rest are one bar."""
    rows = summary.rows("model")
    shown, rest = rows[:MODELS_SHOWN], rows[MODELS_SHOWN:]
    bars = [{"label": r["model"] or "(no model)", "value": r["cost_usd"],
             "text": f"{usd(r['cost_usd'])} · {r['requests']:,} req · "
                     f"{_count(r['total_tokens'])} tok",
             "hover": f"{exact_usd(r['cost_usd'])}, {r['requests']:,} requests, "
                      f"{r['total_tokens']:,} tokens",
             "data": {"model": r["model"] or "", "cost-usd": r["cost_usd"],
                      "requests": r["requests"], "tokens": r["total_tokens"]}} for r in shown]
    if rest:
        cost = to_usd(sum(round(r["cost_usd"] * 1e9) for r in rest))
        requests = sum(r["requests"] for r in rest)
        bars.append({"label": f"{len(rest)} other models", "value": cost,
                     "text": f"{usd(cost)} · {requests:,} req",
                     "data": {"model": "", "other-models": len(rest), "cost-usd": cost,
                              "requests": requests}})
    return _hbars("model-chart", f"Spend by model, {_month_title(summary.month)}", bars,
                  "Spend (USD)")


def _ratio_class(ratio: float | None) -> str:
    if ratio is None or ratio < WARN_RATIO:
        return "ok"
    return "warn" if ratio < 1 else "over"


def budget_chart(chart_id: str, title: str, entries: Sequence[dict[str, Any]]) -> str:
    """Each entry's use as a bar against its limit: the track is the scale, the dashed line the
    limit (100%); past the limit the bar goes on, in the alarm colour."""
    width, left, right, row_h, top = 960, 250, 230, 30, 8
    plot_w = width - left - right
    scale = min(2.0, max([1.0, *(e["used_ratio"] or 0 for e in entries)]))
    limit_x = left + plot_w / scale
    height = top + row_h * len(entries) + 40
    parts = [f'<svg id="{chart_id}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-labelledby="{chart_id}-title"><title id="{chart_id}-title">'
             f'{escape(title)}</title>']
    for i, e in enumerate(entries):
        y = top + row_h * i
        who = f"{e['name']} ({e['id']})" if e["name"] else e["id"]
        label = who if len(who) <= 34 else who[:33] + "…"
        ratio, limit, used = e["used_ratio"], e["limit_usd"], e["used_usd"]
        if limit:
            text = f"{usd(used)} of {usd(limit)} ({ratio * 100:.0f}%)"
            hover = f"{exact_usd(used)} of {exact_usd(limit)} ({ratio * 100:.1f}%)"
            w = plot_w * min(ratio, scale) / scale
        else:
            text = f"{usd(used)}, no limit" if limit is None else f"{usd(used)} of $0"
            hover = text
            w = plot_w if limit == 0 and used else 0.0
        data = (f'data-level="{_attr(e["level"])}" data-id="{_attr(e["id"])}" '
                f'data-used-usd="{used}" data-limit-usd="{"" if limit is None else limit}" '
                f'data-ratio="{"" if ratio is None else ratio}"')
        klass = _ratio_class(ratio) if limit else ("over" if limit == 0 and used else "ok")
        parts.append(
            f'<text x="{left - 8}" y="{y + 19}" text-anchor="end">{escape(label)}</text>'
            f'<rect class="track" x="{left}" y="{y + 6}" width="{plot_w}" height="18"/>'
            f'<rect class="fill {klass}" {data} x="{left}" y="{y + 6}" width="{w:.1f}" '
            f'height="18"><title>{escape(who + ": " + hover)}</title></rect>'
            f'<text class="value" x="{left + plot_w + 8}" y="{y + 19}">{escape(text)}</text>')
    parts.append(
        f'<line class="limit" x1="{limit_x:.1f}" x2="{limit_x:.1f}" y1="{top}" '
        f'y2="{height - 34}"/><text class="tick" x="{limit_x:.1f}" y="{height - 20}" '
        f'text-anchor="middle">limit (100%)</text><text class="tick" x="{left}" '
        f'y="{height - 20}" text-anchor="middle">0%</text>'
        f'<text class="axis-title" x="{left + plot_w / 2}" y="{height - 4}" '
        f'text-anchor="middle">Share of the monthly limit used</text></svg>')
    return "".join(parts)


def _table(by: str, rows: Sequence[dict[str, Any]]) -> str:
    head = (f"<tr><th>{escape(by)}</th><th>requests</th><th>spend</th><th>input tokens</th>"
            "<th>cached input</th><th>output tokens</th><th>total tokens</th></tr>")
    body = "".join(
        f"<tr><td>{escape(str(r[by]) if r[by] is not None else '-')}</td>"
        f"<td>{r['requests']:,}</td><td title=\"{r['cost_usd']}\">{escape(usd(r['cost_usd']))}"
        f"</td><td>{r['input_tokens']:,}</td><td>{r['cached_input_tokens']:,}</td>"
        f"<td>{r['output_tokens']:,}</td><td>{r['total_tokens']:,}</td></tr>" for r in rows)
    return f'<table id="table-{_attr(by)}">{head}{body}</table>'


def _tile(label: str, value: str, ident: str) -> str:
    return (f'<div class="tile" id="tile-{ident}"><div class="label">{escape(label)}</div>'
            f'<div class="value">{escape(value)}</div></div>')


def page(summary: Summary, budgets: Sequence[dict[str, Any]], *, generated_at: str,
         node: str | None = None) -> str:
    """The whole report page for `summary`'s month."""
    month = _month_title(summary.month)
    total = summary.total
    orgs = sorted((b for b in budgets if b["level"] == "org"),
                  key=lambda b: (-(b["used_ratio"] or 0), -b["used_usd"], b["id"]))
    users = sorted((b for b in budgets if b["level"] == "user"),
                   key=lambda b: (-(b["used_ratio"] or 0), -b["used_usd"], b["id"]))
    legend = ('<p class="legend"><span><i style="background:var(--ok)"></i>under 80%</span>'
              '<span><i style="background:var(--warn)"></i>80% to 100%</span>'
              '<span><i style="background:var(--over)"></i>over the limit</span></p>')

    def budget_block(level: str, title: str, entries: list[dict[str, Any]]) -> str:
        if not entries:
            return f'<h3>{title}</h3><p class="empty">None in the records.</p>'
        more = len(entries) - BUDGETS_SHOWN
        note = (f'<p class="note">The {BUDGETS_SHOWN} closest to their limit are shown; '
                f'{more} more in <code>aigw report --format json</code>.</p>'
                if more > 0 else "")
        return (f"<h3>{title}</h3>" + budget_chart(
            f"budget-{level}", f"{title}: budget use, {month}", entries[:BUDGETS_SHOWN]) + note)

    tables = "".join(
        f"<details{' open' if by in ('org', 'model') else ''}><summary>By {by}</summary>"
        f"{_table(by, summary.rows(by))}</details>"
        for by in ("org", "user", "key", "model", "provider", "day"))
    empty = ('<p class="empty">No usage records for this month (none metered, or pruned '
             'past <code>policy.usage_log_retention_days</code>).</p>' if not total.requests
             else "")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>aigw spend report: {escape(month)}</title><style>{_CSS}</style></head><body>"
        f'<main><header><h1>AI spend, {escape(month)}</h1><p class="sub">aigw report from the '
        f"usage records of this store{', node ' + escape(node) if node else ''}; generated "
        f"{escape(generated_at)}. Times are UTC.</p></header>"
        '<section class="tiles">'
        + _tile("Spend", usd(to_usd(total.cost_nusd)), "spend")
        + _tile("Requests", f"{total.requests:,}", "requests")
        + _tile("Tokens", _count(total.total_tokens), "tokens")
        + _tile("Models", f"{len(summary.groups['model']):,}", "models")
        + _tile("Estimated", f"{total.estimated_requests:,}", "estimated")
        + "</section>"
        f'<section id="daily"><h2>Daily spend</h2>{empty}{daily_chart(summary)}</section>'
        f'<section id="models"><h2>Spend by model</h2>{model_chart(summary)}</section>'
        '<section id="budgets"><h2>Budget use</h2><p class="note">What the gateway counts '
        "against each monthly limit (this node, the other nodes, the Workers quota record), "
        "against the limit in the records today.</p>"
        f"{legend}{budget_block('org', 'Organizations', orgs)}"
        f"{budget_block('user', 'Users', users)}</section>"
        f'<section id="tables"><h2>Details</h2>{tables}</section>'
        "</main></body></html>\n"
    )
