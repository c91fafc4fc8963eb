# Build and test the lesson.
#
#   make html    build the site into _build/html (warnings are errors)
#   make serve   rebuild and reload the browser on every change
#   make test    run the test suite (scripts, job templates, site)
#   make clean   remove _build
#
# By default every target uses a virtual environment in .venv, created from
# requirements.txt on first use and updated whenever requirements.txt changes.
# To use a Python environment of your own instead, name its interpreter:
#
#   make test PYTHON=python
#
# Then .venv is neither created nor touched.

VENV        := .venv
VENV_STAMP  := $(VENV)/.requirements-installed

ifeq ($(origin PYTHON),command line)
# Your own environment: no set-up step.
SETUP :=
else
PYTHON := $(VENV)/bin/python
SETUP  := $(VENV_STAMP)
endif

SOURCEDIR   := content
BUILDDIR    := _build
SPHINXOPTS  ?=
SPHINXBUILD := $(PYTHON) -m sphinx
PYTESTOPTS  ?=
# Test processes that run at once (pytest-xdist); "auto" starts one per CPU core.
TEST_WORKERS ?= auto
PORT        ?= 8000

.DEFAULT_GOAL := html
.PHONY: html serve test clean

# The stamp is newer than requirements.txt once the install has succeeded, so the
# install runs again only after requirements.txt changes (or after a failed try).
$(VENV_STAMP): requirements.txt
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	touch $@

html: $(SETUP)
	$(SPHINXBUILD) -W --keep-going -c . $(SPHINXOPTS) $(SOURCEDIR) $(BUILDDIR)/html
	@echo "Open $(BUILDDIR)/html/index.html in a browser."

# Live preview on http://127.0.0.1:$(PORT); also rebuilds when an included
# example script or job template changes.
serve: $(SETUP)
	$(PYTHON) -m sphinx_autobuild -c . --port $(PORT) \
		--watch examples --watch slurm --watch conf.py \
		$(SPHINXOPTS) $(SOURCEDIR) $(BUILDDIR)/html

# --dist loadgroup keeps the tests that must run in order in one process (tests/conftest.py).
test: $(SETUP)
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTESTOPTS) tests

clean:
	rm -rf $(BUILDDIR)
