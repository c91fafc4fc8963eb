# Sphinx configuration for the lesson "PyTorch Lightning from laptop to supercomputer".
#
# This file sits at the top of the repository, next to examples/ and slurm/, while the
# pages live in content/.  Build it with the Makefile (`make html`), which runs
#     sphinx-build -W --keep-going -c . content _build/html
# Because the pages include the example scripts and job templates with relative paths
# (for example ../examples/mnist_lightning.py), they always show the tested files.

import os
import zipfile
from pathlib import Path

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

# -- The lesson files as one download ---------------------------------------------------
# The setup page offers everything a learner runs (scripts, job templates, the tiny-data
# maker, requirements) as one zip file, packed from the tested files at every build, so the
# download never lags behind them.  Fixed time stamps keep the archive the same from one
# build to the next.
_ROOT = Path(__file__).resolve().parent
LESSON_ZIP = _ROOT / "_build" / "lesson-files" / "lightning-lesson.zip"


def _write_lesson_zip(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    files = [_ROOT / "README.md", _ROOT / "requirements.txt"]
    for folder in ("examples", "slurm", "tests"):
        files += sorted(p for p in (_ROOT / folder).rglob("*") if p.is_file()
                        and not any(part.startswith((".", "__")) for part in p.relative_to(_ROOT).parts))
    with zipfile.ZipFile(path, "w") as archive:
        for file in files:
            info = zipfile.ZipInfo(f"lightning-lesson/{file.relative_to(_ROOT).as_posix()}", (2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o755 if os.access(file, os.X_OK) else 0o644) << 16
            archive.writestr(info, file.read_bytes())


_write_lesson_zip(LESSON_ZIP)
