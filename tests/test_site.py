"""The lesson site: it builds with warnings as errors, it renders what a reader needs,
and the strict build really does stop on a broken page.

Sphinx runs as `python -m sphinx` under the interpreter that runs the tests, so
`make test` checks the .venv and `make test PYTHON=python` checks your own environment.
"""

import ast
import html
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import prose

REPO = Path(__file__).resolve().parent.parent
CONTENT = REPO / "content"


def sphinx_build(confdir: Path, srcdir: Path, outdir: Path) -> subprocess.CompletedProcess:
    """The Makefile's `html` build (-W --keep-going), quiet, into outdir."""
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
         "-c", str(confdir), str(srcdir), str(outdir)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the real site once for all the tests in this file."""
    outdir = tmp_path_factory.mktemp("site") / "html"
    result = sphinx_build(REPO, CONTENT, outdir)
    return result, outdir


def html_classes(html: str) -> list[set[str]]:
    """The class list of every element that has one."""
    return [set(value.split()) for value in re.findall(r'class="([^"]*)"', html)]


def test_site_builds_with_warnings_as_errors(site):
    result, outdir = site
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stderr[-5000:]}"
    assert "WARNING" not in result.stderr, result.stderr[-5000:]
    assert (outdir / "index.html").is_file()
    assert (outdir / "why-lightning.html").is_file()


def test_flags_outside_code_keep_their_two_hyphens(site):
    # The benchmark table's rows name flags in plain text; Sphinx's smart quotes would
    # turn "--compile" into "–compile", a flag that no script accepts.
    result, outdir = site
    page = (outdir / "benchmark-details.html").read_text(encoding="utf-8")
    assert "script path + --compile</td>" in page.replace("<p>", "").replace("</p>", "")
    assert "\u2013compile" not in page and "&#8211;compile" not in page


def test_episode_one_renders_exercises_with_hidden_solutions(site):
    result, outdir = site
    assert result.returncode == 0, result.stderr[-5000:]
    classes = html_classes((outdir / "why-lightning.html").read_text(encoding="utf-8"))
    # sphinx-lesson renders each directive as an admonition carrying the directive's name;
    # a solution also carries "dropdown", which sphinx-togglebutton turns into a toggle.
    exercises = [c for c in classes if {"admonition", "exercise"} <= c]
    solutions = [c for c in classes if {"admonition", "solution", "dropdown"} <= c]
    assert exercises, "no exercise block on the Why Lightning page"
    assert len(solutions) == len(exercises), "every exercise needs its solution"
    for name in ("questions", "objectives", "keypoints"):
        assert any({"admonition", name} <= c for c in classes), f"no {name} block"


def test_pages_load_nothing_from_other_hosts(site):
    """The site must work offline and must not pull scripts, styles or images from a CDN.

    If this fails after adding math, a font or a widget: ship the file in the site instead.
    """
    result, outdir = site
    assert result.returncode == 0, result.stderr[-5000:]
    remote = re.compile(
        r'<(?:script|img|iframe)\b[^>]*\bsrc="(?:https?:)?//[^"]*"'
        r'|<link\b[^>]*\bhref="(?:https?:)?//[^"]*"'
    )
    offenders = {
        page.name: remote.findall(page.read_text(encoding="utf-8"))
        for page in outdir.glob("*.html")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_schedule_adds_up():
    """Each row of the schedule on the front page starts when the previous one ends,
    and an episode's own "Teaching: X min, exercises: Y min" line matches its row."""
    rows = re.findall(
        r"^\|\s*(\d\d):(\d\d)\s*\|\s*(?:(\d+) min)?\s*\|\s*(.*?)\s*\|\s*$",
        (CONTENT / "index.md").read_text(encoding="utf-8"),
        flags=re.MULTILINE,
    )
    assert len(rows) > 5, "schedule table not found in content/index.md"
    for (h, m, minutes, what), (h2, m2, _, what2) in zip(rows, rows[1:]):
        assert minutes, f"the row {what!r} needs a duration"
        end = int(h) * 60 + int(m) + int(minutes)
        assert end == int(h2) * 60 + int(m2), f"{what!r} does not end when {what2!r} starts"
    assert not rows[-1][2] and rows[-1][3] == "End", "the last row should be the end time"

    episodes = 0
    for _, _, minutes, what in rows:
        doc = re.search(r"\{doc\}`([\w-]+)`", what)
        if not doc or doc.group(1) == "setup":  # the set-up page is not an episode
            continue
        episodes += 1
        page = (CONTENT / f"{doc.group(1)}.md").read_text(encoding="utf-8")
        timing = re.search(r"^Teaching: (\d+) min, exercises: (\d+) min", page, re.MULTILINE)
        assert timing, f'{doc.group(1)}.md has no "Teaching: X min, exercises: Y min" line'
        total = int(timing.group(1)) + int(timing.group(2))
        assert total == int(minutes), (
            f"{doc.group(1)}.md says {total} min, the schedule in index.md says {minutes} min"
        )
    assert episodes > 5, "no episode rows found in the schedule"


def test_every_episode_fits_its_time_slot(site):
    """At most prose.BUDGET words of prose per minute that the schedule gives an episode, so
    an instructor can teach it in its slot; what does not fit belongs on a reference page."""
    result, outdir = site
    assert result.returncode == 0, result.stderr[-5000:]
    rows = prose.table(outdir, CONTENT / "index.md")
    print("\n" + prose.report(rows))  # every episode's headroom, with pytest -s
    assert len(rows) >= 8, f"the schedule names only {[r[0] for r in rows]}"
    over = [f"{page}: {words} words in {minutes} min, {rate:.0f} per minute"
            for page, minutes, words, rate in rows if rate > prose.BUDGET]
    assert not over, f"over {prose.BUDGET} words of prose per minute:\n" + "\n".join(over)


def test_prose_count_leaves_out_code_blocks_and_heading_links(tmp_path):
    page = tmp_path / "page.html"
    page.write_text(
        '<div class="nav">Menu words here</div><div itemprop="articleBody">'
        '<h1>Two words<a class="headerlink" href="#x">\u00b6</a></h1>'
        '<div class="admonition solution"><p>Run <code>--max-epochs</code> don\'t stop.</p></div>'
        '<div class="highlight"><pre><span>python train.py --lots of code words</span></pre></div>'
        '<table><tr><td>one-GPU cell</td></tr></table></div><footer>Footer words</footer>',
        encoding="utf-8")
    # "Two words", "Run max-epochs don't stop", "one-GPU cell": nothing from the menu,
    # the heading link, the code block or the footer.
    assert prose.prose_words(page) == 2 + 4 + 2


def test_episodes_link_each_glossary_term_at_its_first_use(site):
    """A learner who meets "gloo" or "rank" on any episode is one click from what it means,
    except on the page that teaches it (the page its glossary entry names)."""
    result, outdir = site
    assert result.returncode == 0, result.stderr[-5000:]
    terms = prose.glossary_terms(CONTENT / "glossary.md")
    assert len(terms) > 30 and terms["gloo"] is None and terms["DDP"] == "ddp", terms
    problems = [problem for page in prose.schedule(CONTENT / "index.md")
                for problem in prose.unlinked_first_uses(outdir / f"{page}.html", terms)]
    assert not problems, "\n".join(problems)


def test_glossary_check_finds_an_unlinked_first_use(tmp_path):
    terms = {"rank": None, "DDP": "ddp"}
    body = ('<div itemprop="articleBody"><h1>Ranks</h1><div class="admonition questions"><p>What'
            ' is a rank?</p></div><p>Each {} holds <code>rank</code> data, as in '
            '<a href="ddp.html">the rank page</a>.</p><p>DDP and ranks.</p></div>')
    page = tmp_path / "ddp.html"
    page.write_text(body.format("rank"), encoding="utf-8")
    assert prose.unlinked_first_uses(page, terms) == [
        "ddp: 'rank' first used without a glossary link: ...Each rank holds..."]
    # Linked at its first use; DDP is taught on this page (ddp.html), so it needs no link here.
    page.write_text(body.format('<a href="glossary.html#term-rank">rank</a>'), encoding="utf-8")
    assert prose.unlinked_first_uses(page, terms) == []


def test_code_on_pages_comes_from_tested_files():
    """Pages show code only by including files from examples/ or slurm/ (which the tests
    run); a code block pasted into a page could drift from what was tested.
    Console blocks with the commands a learner types are fine."""
    allowed_languages = {"console", "text", "none", "output"}
    forbidden_directives = {"code-block", "code", "sourcecode", "code-cell"}
    include = re.compile(r"^\s*(?:`{3,}|~{3,}|:{3,})\{literalinclude\}\s+(\S+)")
    fence = re.compile(r"^\s*(?:`{3,}|~{3,}|:{3,})\s*(\{[\w-]+\}|[\w+-]+)")
    problems = []
    for page in sorted(CONTENT.rglob("*.md")):
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{page.relative_to(REPO)}:{number}"
            if m := include.match(line):
                target = (page.parent / m.group(1)).resolve()
                if not any(target.is_relative_to(REPO / d) for d in ("examples", "slurm")):
                    problems.append(f"{where}: include a file from examples/ or slurm/, not {m.group(1)}")
            elif m := fence.match(line):
                info = m.group(1)
                if info.startswith("{"):
                    if info.strip("{}") in forbidden_directives:
                        problems.append(f"{where}: pasted code ({info}); use literalinclude")
                elif info not in allowed_languages:
                    problems.append(f"{where}: pasted {info} code; use literalinclude")
    assert not problems, "\n".join(problems)


# The narrowest code block of the theme is 646 px wide, at 7.2 px per monospace character.
CODE_BLOCK_CHARACTERS = 88


def test_code_fits_its_code_block(site):
    """A reader sees every line of code without scrolling sideways: included files are wrapped
    at CODE_BLOCK_CHARACTERS, and a longer command goes on over indented lines that follow a
    line ending in a backslash. What a program prints (console output) is shown as printed."""
    result, outdir = site
    assert result.returncode == 0, result.stderr[-5000:]
    block = re.compile(r'<div class="highlight-(\w+)[^"]*"><div class="highlight"><pre>(.*?)</pre>', re.DOTALL)
    too_long, counted = [], {"code": 0, "command": 0}
    for page in sorted(outdir.glob("*.html")):
        for language, code in block.findall(page.read_text(encoding="utf-8")):
            previous = ""
            for line in html.unescape(re.sub(r"<[^>]+>", "", code)).splitlines():
                if language != "console":
                    kind = "code"
                elif line.startswith("$ ") or previous.endswith("\\"):
                    kind = "command"
                else:
                    kind = None  # output
                previous = line
                if kind:
                    counted[kind] += 1
                    if len(line) > CODE_BLOCK_CHARACTERS:
                        too_long.append(f"{page.name}: {kind}, {len(line)} characters: {line}")
    assert counted["code"] > 500 and counted["command"] > 50, f"too little code found: {counted}"
    assert not too_long, ("wrap these (a command: with a backslash and indented lines):\n"
                          + "\n".join(too_long))


def test_python_listings_are_whole_statements(site):
    """An included region that starts or ends inside a statement (a :start-at:/:end-at:
    left behind when a script's lines moved) shows code that is not Python: every Python
    listing on the pages must parse on its own."""
    result, outdir = site
    assert result.returncode == 0, result.stderr[-5000:]
    block = re.compile(r'<div class="highlight-python[^"]*"><div class="highlight"><pre>(.*?)</pre>', re.DOTALL)
    broken, count = [], 0
    for page in sorted(outdir.glob("*.html")):
        for code in block.findall(page.read_text(encoding="utf-8")):
            text = textwrap.dedent(html.unescape(re.sub(r"<[^>]+>", "", code)))
            count += 1
            try:
                ast.parse(text)
            except SyntaxError as error:
                broken.append(f"{page.name}: {error.msg}, in:\n{textwrap.indent(text, '    ')}")
    assert count > 20, f"only {count} Python listings found"
    assert not broken, "listings that are not whole Python statements:\n" + "\n".join(broken)


def test_strict_build_fails_on_a_missing_include_or_a_lost_highlight(tmp_path):
    """-W turns a literalinclude of a file that does not exist, and a highlight whose text
    no line of the listing holds any more (conf.py's :emphasize-containing:), into a failed
    build."""
    for name in ("conf.py", "README.md", "requirements.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    for name in ("examples", "slurm", "tests", ".ci"):
        (tmp_path / name).symlink_to(REPO / name)
    shutil.copytree(CONTENT, tmp_path / "content")
    (tmp_path / "content" / "broken-page.md").write_text(
        "---\norphan: true\n---\n\n# A broken page\n\n"
        "```{literalinclude} ../examples/no_such_script.py\n```\n\n"
        # The first text is in the listing; the second was, before a change to the script.
        "```{literalinclude} ../examples/mnist_lightning.py\n:pyobject: LitMLP.validation_step\n"
        ":emphasize-containing: '\"sync_dist=True\" \"sync_dist=False\"'\n```\n",
        encoding="utf-8",
    )
    result = sphinx_build(tmp_path, tmp_path / "content", tmp_path / "html")
    assert result.returncode != 0, "the build passed although an included file is missing"
    assert "no_such_script.py" in result.stderr, result.stderr[-5000:]
    assert "broken-page" in result.stderr, result.stderr[-5000:]
    assert "no line of the listing contains 'sync_dist=False'" in result.stderr, result.stderr[-5000:]


def test_setup_page_offers_the_tested_files_as_one_zip(site, tmp_path):
    result, outdir = site
    assert result.returncode == 0, result.stderr[-5000:]
    links = re.findall(r'href="(_downloads/[^"]+/lightning-lesson\.zip)"', (outdir / "setup.html").read_text())
    assert links, "setup.html has no download link for lightning-lesson.zip"
    with zipfile.ZipFile(outdir / links[0]) as archive:
        names = set(archive.namelist())
        for path in ["requirements.txt", "examples/cifar10_lightning.py", "examples/cluster_tools.py",
                     "examples/tiny_data.py", "slurm/mnist-cpu-ddp.sbatch", "tests/conftest.py",
                     "tests/test_cifar10.py", "tests/test_cluster_tools.py", ".ci/slurm_cluster.sh"]:
            assert f"lightning-lesson/{path}" in names
            assert archive.read(f"lightning-lesson/{path}") == (REPO / path).read_bytes(), f"{path} differs"
        assert "lightning-lesson/README.txt" in names
        # The checks of the pages need the pages, which the zip does not hold.
        assert "lightning-lesson/tests/test_site.py" not in names
        assert "lightning-lesson/tests/page_commands.py" not in names
        # No caches or hidden files, but for the one hidden folder shipped on purpose.
        assert not [n for n in names if "__pycache__" in n or ("/." in n and not n.startswith("lightning-lesson/.ci/"))]
        mode = archive.getinfo("lightning-lesson/.ci/slurm_cluster.sh").external_attr >> 16
        assert stat.S_ISREG(mode) and mode & 0o111, "the zip lost the executable bit of a shell script"
        archive.extractall(tmp_path)
    # Unpacked, the tests it ships find everything they import.
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                "tests"], cwd=tmp_path / "lightning-lesson", capture_output=True, text=True,
                               timeout=120)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert "test_cifar10.py::" in collected.stdout
