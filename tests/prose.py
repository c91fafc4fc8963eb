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
from dataclasses import dataclass
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


# ------------------------------------------------------------------ glossary links

FRAME = {"questions", "objectives", "keypoints"}  # the boxes that frame an episode


@dataclass
class Piece:
    """A run of article text, and where it sits."""
    text: str
    aside: bool  # a heading, inline code, a frame box, or the text of a link to another place
    term: str | None  # the glossary anchor ("term-rank") it links to, if any


class _Pieces(_Prose):
    """The article's text in order, each piece marked as a heading, code or a glossary link."""

    def __init__(self):
        super().__init__()
        self.open: list[tuple[str, str | None, bool]] = []  # (tag, glossary anchor, aside?)
        self.pieces: list[Piece] = []

    def handle_starttag(self, tag, attrs):
        before = self.depth
        super().handle_starttag(tag, attrs)
        if before and tag not in {"br", "img", "hr", "input", "meta", "link", "col", "wbr"}:
            attrs = dict(attrs)
            href = attrs.get("href") or ""
            term = href.split("#", 1)[1] if href.startswith("glossary.html#") else None
            # A heading, inline code, a tab's label (a button), a link elsewhere, a frame box.
            aside = (re.fullmatch(r"h\d|code|button", tag) is not None or (tag == "a" and not term)
                     or bool(FRAME & set((attrs.get("class") or "").split())))
            self.open.append((tag, term, aside))

    def handle_endtag(self, tag):
        if self.depth and self.open:
            for i in range(len(self.open) - 1, -1, -1):  # close up to the matching tag
                if self.open[i][0] == tag:
                    del self.open[i:]
                    break
        super().handle_endtag(tag)

    def handle_data(self, data):
        if self.depth and not self.skip_stack and data.strip():
            term = next((a for _, a, _ in reversed(self.open) if a), None)
            self.pieces.append(Piece(data, any(aside for _, _, aside in self.open), term))


def glossary_terms(glossary_md: Path) -> dict[str, str | None]:
    """Each term of glossary.md, with the page its definition says teaches it (or None)."""
    text = Path(glossary_md).read_text(encoding="utf-8")
    body = text.split(":::{glossary}", 1)[1].split("\n:::", 1)[0]
    terms, current = {}, None
    for line in body.splitlines():
        if line and not line.startswith(" "):
            current = line.strip()
            terms[current] = None
        elif current and terms[current] is None:
            taught = re.search(r"\{doc\}`([\w-]+)`", line)
            terms[current] = taught.group(1) if taught else None
    return terms


def anchor(term: str) -> str:
    """Sphinx's anchor for a glossary term: "term-" and the term, spaces as hyphens."""
    return "term-" + re.sub(r"[^\w.]+", "-", term).strip("-")


def unlinked_first_uses(html_file: Path, terms: dict[str, str | None]) -> list[str]:
    """Glossary terms whose first use in an episode's body is not a link to the glossary,
    except on the page that teaches the term. Headings, inline code, the text of links to
    other places, and the questions, objectives and keypoints boxes do not count as uses."""
    parser = _Pieces()
    parser.feed(Path(html_file).read_text(encoding="utf-8"))
    page = Path(html_file).stem
    problems = []
    for term, taught_on in terms.items():
        if taught_on == page:
            continue
        flags = 0 if term.isupper() or term[:1].isupper() else re.IGNORECASE
        pattern = re.compile(r"(?<![\w-])" + re.escape(term) + r"(?:s|es)?(?![\w-])", flags)
        for piece in parser.pieces:
            if piece.aside:
                continue
            if piece.term == anchor(term):
                break
            found = pattern.search(piece.text)
            if found:
                start = max(0, found.start() - 40)
                problems.append(f"{page}: {term!r} first used without a glossary link: "
                                f"...{piece.text[start:found.end() + 40].strip()}...")
                break
    return problems


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
