"""Words of prose on the built lesson pages, against the minutes the schedule gives them.

An episode can hold at most BUDGET words of prose per minute that the schedule in
content/index.md gives it: about what an instructor can teach in that time, with the
exercises. Well-regarded hands-on lessons have a median near 41 words per minute.

Prose is the text of the page's article: solutions, tables and inline code included, code
blocks and the "¶" of heading links left out. Run it on a built site to see every
episode's figure:

    python tests/prose.py _build/html
"""

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

BUDGET = 50  # words of prose per scheduled minute
WORD = re.compile(r"[^\W_]+(?:['’.\-][^\W_]+)*")  # "don't", "e.g", "one-GPU", "2.6" are one word each


class _Prose(HTMLParser):
    """Collects the text inside the article body, leaving out <pre> blocks and headerlinks."""

    SKIP = {"pre", "script", "style"}

    def __init__(self):
        super().__init__()
        self.depth = 0  # open <div>s since the article body began, 0 = outside it
        self.skip = 0
        self.skip_stack: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth == 0:
            if tag == "div" and attrs.get("itemprop") == "articleBody":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if self.skip_stack or tag in self.SKIP or "headerlink" in (attrs.get("class") or ""):
            self.skip_stack.append(tag)

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if self.skip_stack and self.skip_stack[-1] == tag:
            self.skip_stack.pop()
        if tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth and not self.skip_stack:
            self.text.append(data)


def prose_words(html_file: Path) -> int:
    """The number of words of prose on one built page."""
    parser = _Prose()
    parser.feed(Path(html_file).read_text(encoding="utf-8"))
    return len(WORD.findall(" ".join(parser.text)))


def schedule(index_md: Path) -> dict[str, int]:
    """The minutes that the schedule table in index.md gives each page it names."""
    rows = re.findall(r"^\|\s*\d\d:\d\d\s*\|\s*(\d+) min\s*\|.*?\{doc\}`([\w-]+)`",
                      Path(index_md).read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {page: int(minutes) for minutes, page in rows if page != "setup"}


def table(html_dir: Path, index_md: Path) -> list[tuple[str, int, int, float]]:
    """(episode, minutes, prose words, words per minute) for each scheduled episode."""
    rows = []
    for page, minutes in schedule(index_md).items():
        words = prose_words(Path(html_dir) / f"{page}.html")
        rows.append((page, minutes, words, words / minutes))
    return rows


def report(rows) -> str:
    lines = [f"{'episode':<22}{'minutes':>8}{'words':>8}{'per min':>9}{'headroom':>10}"]
    for page, minutes, words, rate in rows:
        lines.append(f"{page:<22}{minutes:>8}{words:>8}{rate:>9.0f}{minutes * BUDGET - words:>10}")
    minutes = sum(r[1] for r in rows)
    words = sum(r[2] for r in rows)
    lines.append(f"{'all episodes':<22}{minutes:>8}{words:>8}{words / minutes:>9.0f}"
                 f"{minutes * BUDGET - words:>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1], "index.html").is_file():
        sys.exit("usage: python tests/prose.py BUILT_SITE_FOLDER   (e.g. _build/html)")
    print(report(table(Path(sys.argv[1]), Path(__file__).resolve().parent.parent / "content/index.md")))
