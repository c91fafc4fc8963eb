"""Pages, scripts and job templates stay in step.

- every file a page points at exists (includes, downloads, figures, csv tables);
- every script and template is offered on some page (a download or an include);
- every flag a page or a template passes to a script is one that script accepts;
- every include that selects a part of a file (markers, :pyobject:) selects some code;
- every measured number with a thousands separator on the performance page and the benchmark
  details page comes from a result file that one of them shows (smaller numbers, such as
  seconds, are not checked);
- highlights in listings name the text of their lines (:emphasize-containing:, which fails
  the build when a line loses it), never line numbers that silently drift;
- no test file imports another test file (shared code lives in conftest.py or a helper);
- the two Lightning scripts share no run of six or more code lines, and nothing that
  examples/cluster_tools.py defines is defined again in another script: plumbing lives once;
- a page that offers a script for download offers what it imports from examples/ as well
  (or the lesson zip), so a learner who takes the page's files can run them.

Each rule is a function of the repository's root folder that returns a list of problems,
so the last tests can run it on a broken copy and see it catch the breakage.
"""

import argparse
import ast
import contextlib
import functools
import importlib.util
import re
import shlex
import shutil
import sys
from pathlib import Path
from unittest import mock

from sphinx.config import Config
from sphinx.directives.code import LiteralIncludeReader

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("examples", "slurm")  # the folders whose files learners download

# ```{name} argument  or  :::{name} argument, then :option: value lines.
DIRECTIVE = re.compile(r"^\s*(?:`{3,}|~{3,}|:{3,})\{([\w-]+)\}\s*(.*?)\s*$")
OPTION = re.compile(r"^\s*:([\w-]+):\s*(.*?)\s*$")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*(\S*)")  # the info string: console, {literalinclude}, ...
DOWNLOAD = re.compile(r"\{download\}`(?:[^`<]*<([^>`]+)>|([^`]+))`")
MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)")
INLINE_CODE = re.compile(r"`([^`]+)`")
# python examples/x.py ..., python -u x.py ...; the script must be one of ours to be checked.
PYTHON_COMMAND = re.compile(r"(?<![\w.-])python3?\s+(?:-u\s+)?((?:[\w./-]*/)?([\w-]+\.py))\b(.*)"
                            # or torchrun [its own options] script.py: the script's flags follow it
                            r"|(?<![\w.-])torchrun\s[^#]*?((?:[\w./-]*/)?([\w-]+\.py))\b(.*)")
# sbatch [its own options] slurm/x.sbatch [words passed on to the script]
SBATCH_COMMAND = re.compile(r"(?<![\w.-])sbatch\s[^#]*?((?:[\w./-]*/)?([\w.-]+\.sbatch))\b(.*)")
SHELL_LANGUAGES = {"console", "bash", "shell", "sh"}
HAS_JSONARGPARSE = importlib.util.find_spec("jsonargparse") is not None


def pages(root: Path) -> list[Path]:
    return sorted((root / "content").rglob("*.md"))


def shipped_files(root: Path) -> list[Path]:
    return sorted(p for d in SHIPPED for p in (root / d).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith("."))


def where(root: Path, page: Path, line: int) -> str:
    return f"{page.relative_to(root)}:{line}"


def directives(page: Path):
    """(line number, name, argument, options) of every MyST directive on the page."""
    lines = page.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if m := DIRECTIVE.match(line):
            options = {}
            for following in lines[number:]:
                if not (o := OPTION.match(following)):
                    break
                options[o.group(1)] = o.group(2).strip("\"'")
            yield number, m.group(1), m.group(2), options


def resolve(root: Path, page: Path, target: str) -> Path:
    """A path as Sphinx reads it: relative to the page, or to content/ when it starts with /."""
    if target.startswith("/"):
        return (root / "content" / target.lstrip("/")).resolve()
    return (page.parent / target).resolve()


def references(root: Path, page: Path):
    """(line number, kind, target) of every file the page points at."""
    for number, name, argument, options in directives(page):
        if name == "literalinclude":
            yield number, "literalinclude", argument
        elif name in ("figure", "image"):
            yield number, name, argument
        elif name == "csv-table" and "file" in options:
            yield number, "csv-table :file:", options["file"]
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        for m in DOWNLOAD.finditer(line):
            yield number, "download", (m.group(1) or m.group(2)).strip()
        for m in MARKDOWN_IMAGE.finditer(line):
            if not re.match(r"[a-z]+://", m.group(1)):
                yield number, "image", m.group(1)


# ------------------------------------------------------------------ the rules

def missing_references(root: Path) -> list[str]:
    # Files under _build/ are made by conf.py when the site is built (the lesson zip);
    # test_site.py checks them in the built site.
    return [f"{where(root, page, number)}: {kind} {target} does not exist"
            for page in pages(root)
            for number, kind, target in references(root, page)
            if not resolve(root, page, target).is_file()
            and not resolve(root, page, target).is_relative_to(root.resolve() / "_build")]


def unreferenced_files(root: Path) -> list[str]:
    offered = {resolve(root, page, target)
               for page in pages(root)
               for _, kind, target in references(root, page)
               if kind in ("download", "literalinclude")}
    return [f"{path.relative_to(root)} is not offered on any page (add a {{download}} link or a literalinclude)"
            for path in shipped_files(root) if path.resolve() not in offered]


def empty_includes(root: Path) -> list[str]:
    """Includes that select part of a file must select some code; read as Sphinx reads them."""
    selectors = ("pyobject", "start-after", "start-at", "end-before", "end-at", "lines")
    problems = []
    for page in pages(root):
        for number, name, argument, options in directives(page):
            chosen = {k: v for k, v in options.items() if k in selectors}
            path = resolve(root, page, argument)
            if name != "literalinclude" or not chosen or not path.is_file():
                continue  # a missing file is missing_references' business
            try:
                text, _ = LiteralIncludeReader(str(path), chosen, Config()).read()
            except ValueError as err:  # a marker or an object that is not in the file
                problems.append(f"{where(root, page, number)}: {err}")
                continue
            if not text.strip():
                problems.append(f"{where(root, page, number)}: {argument} with {chosen} selects no code")
    return problems


class _CaughtParser(Exception):
    def __init__(self, parser):
        self.parser = parser


@functools.cache
def script_parser(path: Path) -> argparse.ArgumentParser:
    """The parser a script builds, caught just before it parses anything.

    The Lightning scripts build theirs in parse_args(argv), the others in main(argv);
    both call parser.parse_args, which is where we take the parser and stop.
    """
    # The script imports its neighbours (cluster_tools, ...) as it would when run: from its
    # own folder, which may be a broken copy of examples/ in a test below.
    neighbours = {p.stem for p in path.parent.glob("*.py")}
    saved = {name: sys.modules.pop(name) for name in neighbours if name in sys.modules}
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"checked_{path.stem}_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
        for name in neighbours:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    builds_parser = getattr(module, "parse_args", None) or module.main

    def catch(parser, *args, **kwargs):
        raise _CaughtParser(parser)

    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(argparse.ArgumentParser, "parse_args", catch))
        patches.enter_context(mock.patch.object(sys, "argv", [str(path)]))  # not pytest's arguments
        if HAS_JSONARGPARSE:  # LightningCLI's parser (mnist_cli.py) has its own parse_args
            import jsonargparse

            patches.enter_context(mock.patch.object(jsonargparse.ArgumentParser, "parse_args", catch))
        try:
            builds_parser([])
        except _CaughtParser as caught:
            return caught.parser
    raise AssertionError(f"{path}: {builds_parser.__name__}([]) built no argparse parser")


def arguments(rest: str) -> list[str]:
    """The words after the script name, up to the end of the shell command."""
    lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = []
    try:
        for word in lexer:
            if set(word) <= set("();<>|&"):  # ; && || | > ... end the command
                break
            words.append(word)
    except ValueError:  # an unbalanced quote in a shortened example: take what we have
        pass
    return words


def flag_problems(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    # A subcommand (LightningCLI's fit, test, ...) has a parser of its own for the flags after it.
    parsers = [parser] + [action.choices[word] for action in parser._actions
                          if isinstance(action, argparse._SubParsersAction)
                          for word in words if word in action.choices]
    actions = {option: action for p in parsers for action in p._actions for option in action.option_strings}
    problems = []
    for i, word in enumerate(words):
        if not word.startswith("--"):
            continue
        flag, _, value = word.partition("=")
        if flag not in actions:
            problems.append(f"{flag} is not a flag of the script")
            continue
        if not value and i + 1 < len(words) and actions[flag].nargs != 0:
            value = words[i + 1]
        # A literal value must be one of the flag's choices ($VARIABLES and <placeholders> pass).
        choices = actions[flag].choices
        if choices and value and not re.match(r"[$<-]|\.\.\.", value) and value not in choices:
            problems.append(f"{flag} {value}: not one of {sorted(choices)}")
    return problems


def logical_lines(path: Path):
    """(number, line) with the lines continued by a backslash joined into their first.

    The backslash goes, and each continued line joins with one space, without its indentation:
    a page shows a long command over several lines, and here it reads as the one it is.
    """
    joined, start = None, None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if joined is None:
            joined, start = line, number
        else:
            joined += " " + line.lstrip()
        if joined.endswith("\\"):
            joined = joined[:-1].rstrip()
            continue
        yield start, joined
        joined = None
    if joined is not None:  # the last line ends in a backslash
        yield start, joined


def shell_commands(root: Path):
    """(place, text) of every shell line on the pages and in the templates.

    Page lines come from console/bash code blocks and from inline code; a template is
    shell throughout.
    """
    for page in pages(root):
        in_shell, fence = False, None
        for number, line in logical_lines(page):
            if m := FENCE.match(line):
                if fence is None:
                    fence, in_shell = m.group(1), m.group(2) in SHELL_LANGUAGES
                elif m.group(1).startswith(fence) and not m.group(2):
                    fence, in_shell = None, False
                continue
            if in_shell:
                yield where(root, page, number), line
            elif fence is None:
                for code in INLINE_CODE.findall(line):
                    yield where(root, page, number), code
    for template in sorted((root / "slurm").glob("*.sbatch")):
        for number, line in logical_lines(template):
            yield where(root, template, number), line


def command(match: re.Match) -> tuple[str, str, str]:
    """A PYTHON_COMMAND match as (the script as written, its file name, the words after it)."""
    groups = match.groups()
    return groups[:3] if groups[0] is not None else groups[3:]


def template_script(template: Path) -> Path | None:
    """The example script a job template starts (its python or torchrun command)."""
    if not template.is_file():
        return None
    for _, line in logical_lines(template):
        if (m := PYTHON_COMMAND.search(line)) and not line.lstrip().startswith("#"):
            return template.parent.parent / "examples" / command(m)[1]
    return None


def unknown_flags(root: Path) -> list[str]:
    problems = []
    for place, line in shell_commands(root):
        if m := PYTHON_COMMAND.search(line):
            written, name, rest = command(m)
            script = root / "examples" / name
            if "examples/" in written and not script.is_file():
                problems.append(f"{place}: {written} does not exist")
                continue
        elif m := SBATCH_COMMAND.search(line):
            # Words after the template's name are passed on to the script ("$@").
            script, rest = template_script(root / "slurm" / m.group(2)), m.group(3)
            if script is None:
                problems.append(f"{place}: {m.group(1)} is not a template that starts an example script")
                continue
        else:
            continue
        if not script.is_file():
            continue  # python some_other_tool.py: not ours to check
        if not HAS_JSONARGPARSE and "LightningCLI" in script.read_text(encoding="utf-8"):
            continue  # its parser needs jsonargparse, which this environment lacks (test_cli.py skips too)
        parser = script_parser(script)
        problems += [f"{place}: {line.strip()}\n    {problem}"
                     for problem in flag_problems(parser, arguments(rest))]
    return problems


# -------------------------------------------------------- the repository obeys

# Numbers on the benchmark's pages that are not measurements: the training images of CIFAR-10,
# a batch size, and the ceiling worked out from FLOPs (3.3 GFLOP per image, ~800 TFLOP/s).
NOT_MEASURED = {"45,000", "1,024", "240,000"}
THOUSANDS = re.compile(r"(?<![\d,.])\d{1,3}(?:,\d{3})+(?![\d,])")
# The episode quotes the measurements; the reference page shows the result files they come from.
BENCHMARK_PAGES = ("performance.md", "benchmark-details.md")


def unsourced_numbers(root: Path) -> list[str]:
    """Measured numbers written with a thousands separator (45,182) on the benchmark's pages
    must come from the result files that these pages show."""
    benchmark_pages = [root / "content" / name for name in BENCHMARK_PAGES]
    tables = [resolve(root, page, target) for page in benchmark_pages for _, kind, target in references(root, page)
              if kind == "csv-table :file:"]
    if not tables:
        return [f"none of {list(BENCHMARK_PAGES)} shows a result file (a csv-table with :file:)"]
    measured = {n for table in tables if table.is_file() for n in THOUSANDS.findall(table.read_text(encoding="utf-8"))}
    return [f"{where(root, page, number)}: {value} is in none of the result files {[t.name for t in tables]}"
            for page in benchmark_pages
            for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
            for value in THOUSANDS.findall(line) if value not in measured | NOT_MEASURED]


def numeric_highlights(root: Path) -> list[str]:
    return [f"{where(root, page, number)}: :emphasize-lines: {options['emphasize-lines']}; name the lines' "
            "text with :emphasize-containing: instead"
            for page in pages(root) for number, name, _, options in directives(page)
            if "emphasize-lines" in options]


def imports_between_test_files(root: Path) -> list[str]:
    problems = []
    for path in sorted((root / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            problems += [f"{path.relative_to(root)}:{node.lineno} imports {name}; move what it shares "
                         "to conftest.py or a helper module" for name in names if name.startswith("test_")]
    return problems


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(number, text) of a file's lines of code: no blank, comment, import or lone bracket
    lines, white space folded."""
    kept = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = " ".join(line.split())
        if text and not text.startswith(("#", "import ", "from ")) and not re.fullmatch(r"[()\[\]{},:]+", text):
            kept.append((number, text))
    return kept


def copied_plumbing(root: Path, least: int = 6) -> list[str]:
    examples = root / "examples"
    problems = []
    a, b = code_lines(examples / "mnist_lightning.py"), code_lines(examples / "cifar10_lightning.py")
    for i in range(len(a)):
        for j in range(len(b)):
            if a[i][1] != b[j][1] or (i and j and a[i - 1][1] == b[j - 1][1]):
                continue  # not the start of a shared run
            n = 0
            while i + n < len(a) and j + n < len(b) and a[i + n][1] == b[j + n][1]:
                n += 1
            if n >= least:
                problems.append(f"examples/mnist_lightning.py:{a[i][0]}-{a[i + n - 1][0]} = "
                                f"examples/cifar10_lightning.py:{b[j][0]}-{b[j + n - 1][0]} ({n} lines)")
    shared = {node.name for node in ast.parse((examples / "cluster_tools.py").read_text(encoding="utf-8")).body
              if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    for path in sorted(examples.glob("*.py")):
        if path.name != "cluster_tools.py":
            problems += [f"examples/{path.name}:{node.lineno} defines {node.name} again; import it from cluster_tools"
                         for node in ast.parse(path.read_text(encoding="utf-8")).body
                         if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in shared]
    return problems


def companions(script: Path) -> set[Path]:
    """The files of the script's folder that it imports, and what they import in turn."""
    found, todo = set(), [script]
    while todo:
        for node in ast.walk(ast.parse(todo.pop().read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                neighbour = script.parent / f"{name}.py"
                if neighbour.is_file() and neighbour not in found:
                    found.add(neighbour)
                    todo.append(neighbour)
    return found


def missing_companions(root: Path) -> list[str]:
    problems = []
    for page in pages(root):
        # A download offers a whole file; a listing may show only a part of one.
        offered = {resolve(root, page, target) for _, kind, target in references(root, page) if kind == "download"}
        if any(path.name == "lightning-lesson.zip" for path in offered):
            continue
        for script in sorted(p for p in offered if p.suffix == ".py" and p.is_file()):
            problems += [f"{page.relative_to(root)} offers {script.name} but not {needed.name}, which it imports"
                         for needed in sorted(companions(script) - offered)]
    return problems


def test_parallel_runs_keep_a_files_tests_in_one_process(request):
    # make test runs with --dist loadgroup: each worker marks a test's group in its node id
    # ("...@group") so that module fixtures and SLURM jobs are not shared out. pytest 9.2
    # changed how node ids are stored, and the marks silently stopped working.
    if getattr(request.config.option, "loadgroup", False):
        assert "@" in request.node.nodeid, ("pytest-xdist could not mark this test's group; "
                                            "install the pytest version that requirements.txt names")


def test_every_referenced_file_exists():
    problems = missing_references(REPO)
    assert not problems, "\n".join(problems)


def test_every_script_and_template_is_offered_on_a_page():
    problems = unreferenced_files(REPO)
    assert not problems, "\n".join(problems)


def test_commands_on_pages_and_in_templates_use_flags_the_scripts_accept():
    problems = unknown_flags(REPO)
    assert not problems, "\n".join(problems)


def test_numbers_on_the_performance_page_come_from_its_result_files():
    assert not unsourced_numbers(REPO), "\n".join(unsourced_numbers(REPO))


def test_highlights_follow_the_code_not_line_numbers():
    problems = numeric_highlights(REPO)
    assert not problems, "\n".join(problems)


def test_no_test_file_imports_another():
    problems = imports_between_test_files(REPO)
    assert not problems, "\n".join(problems)


def test_the_scripts_share_their_plumbing_through_one_module():
    problems = copied_plumbing(REPO)
    assert not problems, "\n".join(problems)


def test_a_page_that_offers_a_script_offers_what_it_imports():
    problems = missing_companions(REPO)
    assert not problems, "\n".join(problems)


def test_partial_includes_select_some_code():
    problems = empty_includes(REPO)
    assert not problems, "\n".join(problems)


def test_the_checks_see_commands_from_pages_and_templates():
    """Guards against a regex that silently matches nothing, which would pass every rule."""
    places = {place.split(":")[0] for place, line in shell_commands(REPO)
              if PYTHON_COMMAND.search(line) or SBATCH_COMMAND.search(line)}
    assert "content/setup.md" in places
    assert any(p.startswith("slurm/") for p in places)
    included = [d for page in pages(REPO) for d in directives(page) if d[1] == "literalinclude"]
    assert any("pyobject" in d[3] for d in included) and any("start-after" in d[3] for d in included)


# -------------------------------------------------- the rules catch breakage

def copy_of_repo(tmp_path: Path) -> Path:
    for folder in ("content", *SHIPPED):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def replace_in(path: Path, old: str, new: str):
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}; update this test"
    path.write_text(text.replace(old, new), encoding="utf-8")


def test_removed_file_is_reported_missing_and_unoffered(tmp_path):
    root = copy_of_repo(tmp_path)
    (root / "slurm" / "mnist-gpu.sbatch").unlink()
    (root / "content" / "setup.md").write_text(
        (root / "content" / "setup.md").read_text() + "\n{download}`gone <../examples/gone.py>`\n")
    (root / "examples" / "extra.py").write_text("print('not on any page')\n")

    missing = "\n".join(missing_references(root))
    assert "content/slurm.md" in missing and "mnist-gpu.sbatch does not exist" in missing
    assert "content/setup.md" in missing and "gone.py does not exist" in missing
    assert "examples/extra.py is not offered on any page" in "\n".join(unreferenced_files(root))


def test_renamed_flag_is_reported_on_pages_and_in_templates(tmp_path):
    root = copy_of_repo(tmp_path)
    # The shared flags rename --no-progress-bar; the templates and pages still pass the old name.
    replace_in(root / "examples" / "cluster_tools.py", '"--no-progress-bar"', '"--quiet"')
    # A page shows a flag the script never had, and a value outside a flag's choices; then a
    # command that goes on over two lines, with a misspelt flag on its second.
    setup = root / "content" / "setup.md"
    last = len(setup.read_text(encoding="utf-8").splitlines())
    with open(setup, "a", encoding="utf-8") as page:
        page.write("\n```console\n$ python examples/cifar10_lightning.py --epochs 3 --model resnet50\n"
                   "$ python examples/cifar10_lightning.py --accelerator cpu \\\n    --max-epochs 1 --batchsize 32\n```\n")

    problems = "\n".join(unknown_flags(root))
    assert "slurm/mnist-gpu.sbatch:" in problems and "--no-progress-bar is not a flag" in problems
    assert "content/setup.md" in problems and "--epochs is not a flag" in problems
    assert "--model resnet50: not one of" in problems
    # Reported at its first line, as the one command it is.
    assert (f"content/setup.md:{last + 4}: $ python examples/cifar10_lightning.py --accelerator cpu --max-epochs 1 "
            "--batchsize 32\n    --batchsize is not a flag of the script") in problems


def test_marker_that_moved_away_is_reported(tmp_path):
    root = copy_of_repo(tmp_path)
    replace_in(root / "examples" / "mnist_lightning.py", "# [docs:model]", "# [docs:network]")
    # Markers with only a blank line between them select no code.
    replace_in(root / "examples" / "mnist_pytorch.py", "# [/docs:model]\n", "")
    replace_in(root / "examples" / "mnist_pytorch.py", "# [docs:model]\n", "# [docs:model]\n\n# [/docs:model]\n")

    problems = "\n".join(empty_includes(root))
    assert "start-after pattern not found: [docs:model]" in problems
    assert "mnist_pytorch.py with {'start-after': '[docs:model]', 'end-before': '[/docs:model]'} selects no code" in problems


def test_a_number_typed_into_the_performance_page_is_reported(tmp_path):
    root = copy_of_repo(tmp_path)
    replace_in(root / "content" / "performance.md", "37,432 → 45,917", "37,432 → 47,000")
    assert [p for p in unsourced_numbers(root) if "47,000" in p and "performance.md" in p]


def test_a_numeric_highlight_and_a_test_importing_a_test_are_reported(tmp_path):
    root = copy_of_repo(tmp_path)
    shutil.copytree(REPO / "tests", root / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    replace_in(root / "content" / "ddp.md", ":pyobject: LitClassifier.configure_optimizers\n",
               ":pyobject: LitClassifier.configure_optimizers\n:emphasize-lines: 7\n")
    (root / "tests" / "test_extra.py").write_text("from test_slurm import sbatch\n")
    assert [p for p in numeric_highlights(root) if p.startswith("content/ddp.md:")]
    assert imports_between_test_files(root) == [
        "tests/test_extra.py:1 imports test_slurm; move what it shares to conftest.py or a helper module"]


def test_copied_plumbing_is_reported(tmp_path):
    root = copy_of_repo(tmp_path)
    # The CIFAR-10 script gets the MNIST script's main() pasted in, and a copy of a helper.
    mnist = (root / "examples" / "mnist_lightning.py").read_text(encoding="utf-8")
    main = mnist[mnist.index("def main("):mnist.index("# [/docs:main]")].replace("def main(", "def main2(")
    with open(root / "examples" / "cifar10_lightning.py", "a", encoding="utf-8") as script:
        script.write("\n\n" + main + "\n\ndef usable_cpus():\n    return 1\n")
    problems = "\n".join(copied_plumbing(root))
    assert "examples/mnist_lightning.py:" in problems and "= examples/cifar10_lightning.py:" in problems
    assert "defines usable_cpus again; import it from cluster_tools" in problems


def test_a_script_offered_without_its_module_is_reported(tmp_path):
    root = copy_of_repo(tmp_path)
    replace_in(root / "content" / "pytorch-to-lightning.md",
               "{download}`cluster_tools.py <../examples/cluster_tools.py>`", "`cluster_tools.py`")
    assert missing_companions(root) == [
        "content/pytorch-to-lightning.md offers mnist_lightning.py but not cluster_tools.py, which it imports"]
