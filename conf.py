# Sphinx configuration for the lesson "PyTorch Lightning from laptop to supercomputer".
#
# This file sits at the top of the repository, next to examples/ and slurm/, while the
# pages live in content/.  Build it with the Makefile (`make html`), which runs
#     sphinx-build -W --keep-going -c . content _build/html
# Because the pages include the example scripts and job templates with relative paths
# (for example ../examples/mnist_lightning.py), they always show the tested files.

import os
import shlex
import stat
import subprocess
import zipfile
from pathlib import Path

from docutils.parsers.rst import directives
from sphinx.directives.code import LiteralInclude, LiteralIncludeReader

project = "PyTorch Lightning from laptop to supercomputer"
author = "The lesson contributors"
copyright = "The lesson contributors"

# -- Extensions ---------------------------------------------------------------------
# sphinx_lesson brings in myst_nb (MyST Markdown), sphinx_tabs, sphinx_copybutton and
# sphinx_togglebutton.  Do not list myst_parser as well: myst_nb already registers the
# .md suffix, and a second registration stops the build.
extensions = [
    "sphinx_lesson",
    "sphinx_rtd_theme",
]

# -- MyST -----------------------------------------------------------------------------
# colon_fence: the lesson directives are written as ":::{exercise} ... :::".
# deflist: definition lists for glossary-like sections.
# attrs_block/attrs_inline: classes and ids on blocks and inline text where needed.
myst_enable_extensions = [
    "colon_fence",
    "deflist",
    "attrs_block",
    "attrs_inline",
]
# Give headings stable anchors so pages can link to "page.md#some-heading".
myst_heading_anchors = 3
# Curly quotes and ellipses, but no dashes: "--compile" in a table cell must not become "–compile".
smartquotes_action = "qe"

# The pages are plain Markdown; never run code while building the site.
nb_execution_mode = "off"

# -- Sources --------------------------------------------------------------------------
# The source directory is content/; everything here is relative to it.
exclude_patterns = [
    "_build",
    "_static",
    "**/.ipynb_checkpoints",
    "**/__pycache__",
    ".DS_Store",
    "Thumbs.db",
]
# Code blocks with no language are shown as plain text, not guessed.
highlight_language = "none"

# -- HTML output ----------------------------------------------------------------------
html_theme = "sphinx_rtd_theme"
html_title = project
html_show_sourcelink = False
# Paths here are relative to this file, not to content/.
html_static_path = ["content/_static"]
html_css_files = ["lesson.css"]
html_theme_options = {
    "navigation_depth": 2,
    "collapse_navigation": False,
}
# Everything the pages need is served from the built site itself: no intersphinx,
# no fonts, scripts or styles from a CDN.  The copy button leaves the prompt behind.
copybutton_prompt_text = r"\$ "
copybutton_prompt_is_regexp = True
# A long command goes on over lines that end in a backslash, and the lines after have no
# prompt; without this the button would copy only the first line of such a command.
copybutton_line_continuation_character = "\\"

# -- Highlights that follow the code ------------------------------------------------------
# A listing highlights lines by what they contain, not by their numbers, so the highlight
# moves with the line when the file above it changes:
#     :emphasize-containing: '"sync_dist=True" "OneCycleLR(" ... "pct_start"'
# (The outer single quotes keep MyST, which reads options as YAML, from reading the inner
# ones; a double quote inside a text is written \".)
# Each quoted text highlights every line of the listing that contains it; "A" ... "B" highlights
# from the first line with A to the next line with B. A comment line (# first) counts only for
# a text that starts with #. A text found in no line fails the build.


def lines_containing(listing: str, spec: str) -> list[int]:
    """The 1-based numbers of the listing's lines that the :emphasize-containing: spec names."""
    lines = listing.splitlines()
    words = shlex.split(spec)

    def holds(line: str, text: str) -> bool:
        return text in line and (text.startswith("#") or not line.lstrip().startswith("#"))

    chosen = set()
    i = 0
    while i < len(words):
        found = [n for n, line in enumerate(lines, 1) if holds(line, words[i])]
        if not found:
            raise ValueError(f"no line of the listing contains {words[i]!r}")
        if i + 2 < len(words) and words[i + 1] == "...":
            end = next((n for n, line in enumerate(lines, 1) if n > found[0] and holds(line, words[i + 2])),
                       None)
            if end is None:
                raise ValueError(f"no line after {words[i]!r} contains {words[i + 2]!r}")
            chosen.update(range(found[0], end + 1))
            i += 3
        else:
            chosen.update(found)
            i += 1
    return sorted(chosen)


class LiteralIncludeWithHighlights(LiteralInclude):
    """Sphinx's literalinclude, with :emphasize-containing: as well."""

    option_spec = {**LiteralInclude.option_spec, "emphasize-containing": directives.unchanged_required}

    def run(self):
        spec = self.options.pop("emphasize-containing", None)
        if spec is not None:
            try:
                _, filename = self.env.relfn2path(self.arguments[0])
                listing, _ = LiteralIncludeReader(filename, self.options, self.config).read()
                numbers = lines_containing(listing, spec)
            except (OSError, ValueError) as err:
                return [self.state.document.reporter.warning(
                    f"{self.arguments[0]}: :emphasize-containing: {err}", line=self.lineno)]
            self.options["emphasize-lines"] = ",".join(map(str, numbers))
        return super().run()


def setup(app):
    app.add_directive("literalinclude", LiteralIncludeWithHighlights, override=True)


# -- The lesson files as one download ---------------------------------------------------
# The setup page offers what a learner runs (scripts, job templates, requirements, the
# scripts' tests and the throwaway SLURM cluster they can run under) as one zip file, packed
# from the tracked files at every build, so the download never lags behind them.  The tests
# that check the pages stay behind: they need the pages.  Fixed time stamps keep the archive
# the same from build to build.
_ROOT = Path(__file__).resolve().parent
LESSON_ZIP = _ROOT / "_build" / "lesson-files" / "lightning-lesson.zip"
_PAGE_CHECKS = {"test_site.py", "test_consistency.py", "test_page_commands.py", "page_commands.py",
                "test_browser.py"}
_ZIP_README = """PyTorch Lightning from laptop to supercomputer: the lesson's files

examples/          the training scripts the lesson runs (python examples/<script>.py --help);
                   cluster_tools.py holds what the Lightning scripts share: keep it next to them;
                   tiny_data.py makes tiny stand-in data sets: python examples/tiny_data.py tiny
slurm/             job-script templates for SLURM clusters (sbatch slurm/<template>.sbatch)
requirements.txt   pip install -r requirements.txt installs everything
tests/             the scripts' own tests: python -m pytest tests
                   (tests that need a GPU or a SLURM cluster are skipped without one)
.ci/slurm_cluster.sh  a throwaway two-node SLURM cluster on one Linux machine, as root
                   (Debian's slurm-wlm and munge), for the SLURM tests and for practice

Run every command from this folder. The lesson's Setup page says how to begin.
"""


def _tracked_files(folder: str) -> list[Path]:
    """The folder's files under version control; without git, its files less hidden ones and caches."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", folder], cwd=_ROOT, capture_output=True, check=True).stdout
        files = [_ROOT / name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        files = [p for p in (_ROOT / folder).rglob("*")
                 if not any(part.startswith((".", "__")) for part in p.relative_to(_ROOT).parts)]
    return sorted(p for p in files if p.is_file())


def _write_lesson_zip(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    files = [p for p in (_ROOT / "requirements.txt", _ROOT / ".ci" / "slurm_cluster.sh")
             if p.is_file()]
    files += [p for folder in ("examples", "slurm", "tests")
              for p in _tracked_files(folder) if p.name not in _PAGE_CHECKS]

    def entry(name: str, mode: int) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(f"lightning-lesson/{name}", (2026, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = (stat.S_IFREG | mode) << 16
        return info

    # Written under another name and then renamed, so that a build running at the same time
    # (the tests build the site in parallel) never copies a half-written zip.
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with zipfile.ZipFile(partial, "w") as archive:
        archive.writestr(entry("README.txt", 0o644), _ZIP_README)
        for file in files:
            mode = 0o755 if os.access(file, os.X_OK) else 0o644
            archive.writestr(entry(file.relative_to(_ROOT).as_posix(), mode), file.read_bytes())
    os.replace(partial, path)


_write_lesson_zip(LESSON_ZIP)
