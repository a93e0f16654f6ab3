"""`aigw report --format html` rendered in a real headless Chromium (Debian's `chromium`,
which scripts/test installs): the page loads with nothing fetched, and its charts hold the
report's figures (the SVG elements' data attributes and `<title>`s, read from the DOM Chromium
built), and the bars are drawn (their colours are in the screenshot)."""

import json
import shutil
import struct
import subprocess
import zlib
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from store.cli import cli
from store.db import Store
from store.money import from_usd, to_usd
from tests.test_reports import seed

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on this machine (scripts/test installs it with "
    "`apt-get install -y chromium` where it can)")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Chromium headless, offline and on its own profile, as the README's check runs it."""
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
         # Any fetch the page tried would fail: it must need none.
         "--host-resolver-rules=MAP * ~NOTFOUND", *args],
        capture_output=True, text=True, timeout=120, check=False)


class Elements(HTMLParser):
    """Every element's tag, attributes and the text of a `<title>` inside it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self._in_title: dict | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        element = {"tag": tag, "attrs": dict(attrs), "title": None}
        self.elements.append(element)
        if tag == "title" and self._open:
            self._in_title = self._open[-1]
        if tag not in ("line", "meta", "br", "img", "link"):
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = None
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._in_title is not None:
            self._in_title["title"] = (self._in_title["title"] or "") + data


def png_colours(path: Path) -> set[tuple[int, int, int]]:
    """The RGB colours of an 8-bit, non-interlaced PNG (what Chromium's screenshot writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, defaultdict(bytes)
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks[kind] += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert depth == 8 and colour in (2, 6) and interlace == 0
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = width * channels
    previous = bytearray(stride)
    colours: set[tuple[int, int, int]] = set()
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + pred) & 0xFF
        colours.update(tuple(line[x:x + 3]) for x in range(0, stride, channels))
        previous = line
    return colours


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The seeded store's November report: its JSON answer, the page Chromium loaded (DOM
    elements) and a screenshot's colours."""
    tmp_path = tmp_path_factory.mktemp("report")
    store_dir = tmp_path / "store"
    with Store(store_dir) as store:
        seeded = seed(store)
    page = tmp_path / "report.html"
    runner = CliRunner()
    wrote = runner.invoke(cli, ["--store", str(store_dir), "report", "--month", "2026-11",
                                "--format", "html", "--output", str(page)])
    assert wrote.exit_code == 0, wrote.stderr
    assert json.loads(wrote.stdout)["output"] == str(page)
    answer = runner.invoke(cli, ["--store", str(store_dir), "report", "--month", "2026-11",
                                 "--by", "day"])
    assert answer.exit_code == 0, answer.stderr
    by_model = runner.invoke(cli, ["--store", str(store_dir), "report", "--month", "2026-11",
                                   "--by", "model"])
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0 and "<svg" in dom.stdout, dom.stderr[-2000:]
    parser = Elements()
    parser.feed(dom.stdout)
    shot = tmp_path / "shot.png"
    shown = chromium(tmp_path, "--window-size=1100,2600", f"--screenshot={shot}", page.as_uri())
    assert shown.returncode == 0 and shot.is_file(), shown.stderr[-2000:]
    return {"seeded": seeded, "days": json.loads(answer.stdout),
            "models": json.loads(by_model.stdout), "elements": parser.elements,
            "dom": dom.stdout, "colours": png_colours(shot), "html": page.read_text()}


def _with(elements: list[dict], attribute: str) -> list[dict]:
    return [e for e in elements if attribute in e["attrs"]]


def test_the_page_needs_nothing_from_the_network(rendered):
    elements = rendered["elements"]
    assert not [e for e in elements if e["tag"] in ("script", "link", "img", "iframe")]
    for e in elements:
        for name, value in e["attrs"].items():
            if name in ("src", "href", "xlink:href"):
                pytest.fail(f"{e['tag']} {name}={value}")
    assert "url(" not in rendered["html"] and "@import" not in rendered["html"]
    assert [e for e in elements if e["tag"] == "style"]


def test_the_daily_chart_holds_every_day_of_the_month(rendered):
    bars = _with(rendered["elements"], "data-day")
    assert [b["attrs"]["data-day"] for b in bars] == [f"2026-11-{d:02d}" for d in range(1, 31)]
    expected = {g["day"]: g for g in rendered["days"]["groups"]}
    for bar in bars:
        day = bar["attrs"]["data-day"]
        group = expected.get(day, {"cost_usd": 0.0, "requests": 0})
        assert float(bar["attrs"]["data-cost-usd"]) == group["cost_usd"]
        assert int(bar["attrs"]["data-requests"]) == group["requests"]
        assert bar["title"].startswith(f"{day}: $") and f"{group['requests']:,} requests" in (
            bar["title"])
    seeded = rendered["seeded"].records
    assert sum(from_usd(float(b["attrs"]["data-cost-usd"])) for b in bars) == sum(
        r.cost_nusd for r in seeded)
    heights = {b["attrs"]["data-day"]: float(b["attrs"]["height"]) for b in bars}
    top = max(expected.values(), key=lambda g: g["cost_usd"])["day"]
    assert heights[top] == max(heights.values()) > 0  # the tallest bar is the biggest day


def test_the_model_chart_holds_each_model_s_spend(rendered):
    bars = [b for b in _with(rendered["elements"], "data-model") if b["tag"] == "rect"]
    got = {b["attrs"]["data-model"]: (float(b["attrs"]["data-cost-usd"]),
                                      int(b["attrs"]["data-requests"])) for b in bars}
    expected = {g["model"]: (g["cost_usd"], g["requests"])
                for g in rendered["models"]["groups"]}
    assert got == expected
    hostile = "<img src=x onerror=alert(1)>"
    assert hostile in got  # a client's model name is text on the page, never markup
    (bar,) = [b for b in bars if b["attrs"]["data-model"] == hostile]
    assert bar["title"].startswith(hostile + ": $")


def test_budget_bars_hold_each_org_and_user_against_its_limit(rendered):
    fills = [e for e in _with(rendered["elements"], "data-used-usd") if e["tag"] == "rect"]
    budgets = {(b["level"], b["id"]): b for b in rendered["models"]["budgets"]}
    got = {(f["attrs"]["data-level"], f["attrs"]["data-id"]): f for f in fills}
    assert set(got) == set(budgets)
    seeded = rendered["seeded"]
    metered = [r for r in seeded.records if r.mode == "metered"]
    for (level, level_id), fill in got.items():
        used = sum(r.cost_nusd for r in metered
                   if (r.org_id if level == "org" else r.user_id) == level_id)
        assert float(fill["attrs"]["data-used-usd"]) == to_usd(used)
        assert float(fill["attrs"]["data-limit-usd"]) == budgets[(level, level_id)]["limit_usd"]
        assert "%)" in fill["title"] and " of $" in fill["title"]
    tight = got[("user", seeded.user_ids[2])]  # $1 limit, nearly spent
    assert "warn" in tight["attrs"]["class"] or "over" in tight["attrs"]["class"]
    assert "ok" in got[("user", seeded.user_ids[0])]["attrs"]["class"]


def test_the_charts_are_drawn(rendered):
    colours = rendered["colours"]
    assert (0x3B, 0x6F, 0xD8) in colours  # spend bars
    assert (0x2F, 0x9E, 0x44) in colours  # a budget under 80%
    assert (0xE8, 0x89, 0x0C) in colours or (0xD6, 0x33, 0x6C) in colours  # one near or over
    assert "AI spend, November 2026" in rendered["dom"]
