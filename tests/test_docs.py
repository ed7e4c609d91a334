"""The documentation stands on its own: every file a doc, docstring or comment names exists in the repository,
and none points at files a reader who clones the project does not have (a specification kept beside the
checkout, tracker threads by number).

Scanned: every Markdown file of the repository (README.md, ARCHITECTURE.md, docs/, ...) and the docstrings
and comments of the Python code (lm_human_preferences/, launch.py, sample.py, bench.py, tests/).
"""

import ast
import io
import os
import re
import tokenize
from collections.abc import Iterator

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "lm_human_preferences"
SKIPPED_DIRS = {"__pycache__", "node_modules", "build", "dist"}  # plus hidden and *.egg-info directories
PYTHON_ROOTS = [PACKAGE, "launch.py", "sample.py", "bench.py", "tests"]

# A path of a repository file: it starts with one of the repository's directories (or `..`/`.`) and ends in an
# extension of the files it holds, e.g. `lm_human_preferences/ppo.py`, `docs/formats.md`, `tests/test_ppo.py`.
REPO_DIRS = (PACKAGE, "docs", "tests", "language", "utils", "web", "mpi_programs", r"\.ci", r"\.\.", r"\.")
EXTENSIONS = ("py", "md", "html", "toml", "cfg", "ini", "txt", "sh", "awk", "yml", "yaml")
_DIRS, _EXTENSIONS = "|".join(REPO_DIRS), "|".join(EXTENSIONS)
REPO_PATH = re.compile(rf"(?<![\w./-])((?:{_DIRS})/(?:[\w.-]+/)*[\w-]+(?:\.[\w-]+)*\.(?:{_EXTENSIONS}))(?![\w/-])")
# A bare module or page name, `trainer.py`, `README.md`: some file of that name must exist in the repository.
BARE_NAME = re.compile(r"(?<![\w./-])([\w-]+\.(?:py|md))(?![\w/-])")
# A dotted module path, `lm_human_preferences.language.model.Model`: its modules must exist.
MODULE_PATH = re.compile(rf"(?<![\w.])({PACKAGE}(?:\.\w+)+)")
# A relative Markdown link or image: [text](target) with a target that is not a URL or an in-page anchor.
MARKDOWN_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")

# References to what only the project's authors had: a specification file kept outside the repository, a
# shared directory beside the checkout, and issue-tracker threads by number.
OUTSIDE_REFERENCES = [
    (re.compile(r"\.\./shared\b|/work/shared\b"), "a directory outside the repository"),
    (re.compile(r"\bSPEC\.md\b", re.IGNORECASE), "a specification file outside the repository"),
    (re.compile(r"\bSPEC\b(?:\s*(?:section|§|sec\.?)\s*\d*|\s*\d+)?"), "a specification outside the repository"),
    (re.compile(r"\bissues?\s*#?\d+\b", re.IGNORECASE), "an issue-tracker thread (name the behaviour instead)"),
]

# Names that look like repository files but name files of other projects, on purpose.
NOT_REPOSITORY_FILES = {"setup.py", "CHANGELOG.md"}


# ----- what is scanned ---------------------------------------------------------------------------------------------

def _walk(top: str) -> Iterator[str]:
    for directory, subdirs, names in os.walk(top):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and not d.endswith(".egg-info")
                            and d not in SKIPPED_DIRS)
        for name in sorted(names):
            yield os.path.join(directory, name)


def repository_files(root: str = REPO_ROOT) -> list[str]:
    """Every file of the working tree, relative to `root` (hidden, cache and build directories left out)."""
    return [os.path.relpath(path, root) for path in _walk(root)]


def markdown_files(root: str = REPO_ROOT) -> list[str]:
    return [path for path in repository_files(root) if path.endswith(".md")]


def python_files(root: str = REPO_ROOT) -> list[str]:
    found = []
    for entry in PYTHON_ROOTS:
        path = os.path.join(root, entry)
        if os.path.isfile(path):
            found.append(entry)
        elif os.path.isdir(path):
            found += [os.path.relpath(p, root) for p in _walk(path) if p.endswith(".py")]
    return found


def python_prose(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring (any string that stands alone as a statement)."""
    pieces = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            pieces.append((token.start[0], token.string))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            pieces.append((node.lineno, node.value.value))
    return sorted(pieces)


def markdown_prose(text: str) -> list[tuple[int, str]]:
    return [(number, line) for number, line in enumerate(text.splitlines(), start=1)]


# ----- the checks ----------------------------------------------------------------------------------------------------

def _exists(root: str, relative: str) -> bool:
    return os.path.exists(os.path.normpath(os.path.join(root, relative)))


def _path_exists(reference: str, where: str, root: str) -> bool:
    """A path named in file `where`: relative to the repository root, to the file's directory, or to the
    package (docstrings say `language/model.py`)."""
    bases = ["", os.path.dirname(where), PACKAGE]
    return any(_exists(root, os.path.join(base, reference)) for base in bases)


def _module_exists(dotted: str, root: str) -> bool:
    """`lm_human_preferences.language.model.Model`: follow packages, then one module; what follows may be any
    attribute."""
    parts = dotted.split(".")
    path = parts[0]
    for part in parts[1:]:
        if os.path.isdir(os.path.join(root, path, part)):
            path = os.path.join(path, part)
            continue
        return os.path.isfile(os.path.join(root, path, part + ".py")) or part == "__init__"
    return True


def _anchors(markdown: str) -> set:
    """GitHub's anchors of a Markdown file's headings."""
    anchors = set()
    for line in markdown.splitlines():
        heading = re.match(r"#+\s+(.*)", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower().replace("`", ""))
            anchors.add(text.replace(" ", "-"))
    return anchors


def problems_in(where: str, pieces: list[tuple[int, str]], root: str = REPO_ROOT, *,
                markdown: bool = False) -> list[str]:
    """What is wrong with the references in `pieces` (lines or docstrings/comments of file `where`)."""
    basenames = {os.path.basename(path) for path in repository_files(root)}
    found = []
    for line, text in pieces:
        place = f"{where}:{line}"
        links = [match.group(1) for match in MARKDOWN_LINK.finditer(text)] if markdown else []
        if markdown:  # a link's target is checked as a link below, not again as a path
            text = MARKDOWN_LINK.sub("[]()", text)
        for pattern, what in OUTSIDE_REFERENCES:
            for match in pattern.finditer(text):
                found.append(f"{place}: {match.group(0).strip()!r} points at {what}")
        for match in REPO_PATH.finditer(text):
            if not _path_exists(match.group(1), where, root):
                found.append(f"{place}: names {match.group(1)!r}, which is not in the repository")
        for match in BARE_NAME.finditer(text):
            name = match.group(1)
            if name not in basenames and name not in NOT_REPOSITORY_FILES:
                found.append(f"{place}: names {name!r}; no file of that name is in the repository")
        for match in MODULE_PATH.finditer(text):
            if not _module_exists(match.group(1), root):
                found.append(f"{place}: names module {match.group(1)!r}, which is not in the repository")
        for target in links:
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor in the same page
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(where), path))
            if not _exists(root, resolved):
                found.append(f"{place}: links to {target!r}, which is not in the repository")
            elif anchor and resolved.endswith(".md"):
                with open(os.path.join(root, resolved), encoding="utf-8") as f:
                    if anchor not in _anchors(f.read()):
                        found.append(f"{place}: links to {target!r}, but {resolved} has no heading "
                                     f"#{anchor}")
    return found


def repository_problems(root: str = REPO_ROOT) -> list[str]:
    found = []
    for path in markdown_files(root):
        with open(os.path.join(root, path), encoding="utf-8") as f:
            found += problems_in(path, markdown_prose(f.read()), root, markdown=True)
    for path in python_files(root):
        with open(os.path.join(root, path), encoding="utf-8") as f:
            found += problems_in(path, python_prose(f.read()), root)
    return found


# ----- tests ---------------------------------------------------------------------------------------------------------

def test_docs_and_docstrings_reference_only_what_the_repository_holds():
    problems = repository_problems()
    assert not problems, ("references a reader of the repository cannot follow (write the fact into docs/, or "
                          "point at the paper's section or the 2019 behaviour; a file of another project named on "
                          "purpose goes into NOT_REPOSITORY_FILES):\n  " + "\n  ".join(problems))


def test_the_scan_covers_the_docs_and_the_code():
    docs, code = markdown_files(), python_files()
    for expected in ["README.md", "ARCHITECTURE.md", os.path.join("docs", "formats.md"),
                     os.path.join("docs", "algorithms.md")]:
        assert expected in docs
    for expected in ["launch.py", "sample.py", "bench.py", os.path.join(PACKAGE, "ppo.py"),
                     os.path.join(PACKAGE, "language", "model.py"), os.path.join("tests", "test_docs.py")]:
        assert expected in code


def test_readme_and_architecture_link_the_docs():
    for page in ["README.md", "ARCHITECTURE.md"]:
        with open(os.path.join(REPO_ROOT, page), encoding="utf-8") as f:
            text = f.read()
        for doc in sorted(os.listdir(os.path.join(REPO_ROOT, "docs"))):
            if doc.endswith(".md"):
                assert f"](docs/{doc}" in text, f"{page} does not link docs/{doc}"


@pytest.fixture
def planted_repo(tmp_path):
    """A small copy of the repository's shape to plant bad references in."""
    for path in [f"{PACKAGE}/__init__.py", f"{PACKAGE}/ppo.py", f"{PACKAGE}/language/model.py", "docs/formats.md",
                 "tests/test_ppo.py", "README.md", "launch.py"]:
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("# Formats\n\n## Padding semantics\n" if path.endswith(".md") else '"""Fine."""\n')
    return tmp_path


def _plant(repo, path, text):
    (repo / path).write_text(text)
    return repository_problems(str(repo))


@pytest.mark.parametrize("markdown", [
    "See lm_human_preferences/gone.py for the loss.",
    "The layout is in docs/missing.md.",
    "Run `pytest tests/test_missing.py`.",
    "See [the formats](docs/nothing.md).",
    "See [padding](docs/formats.md#no-such-heading).",
    "Kept as in 2019 (SPEC section 8).",
    "Kept as in 2019 (SPEC § 4).",
    "The facts are in ../shared/SPEC.md.",
    "Fixed in issue 6.",
    "Fixed in issue #12.",
    "The model lives in `lm_human_preferences.language.modle`.",
    "Written by `gone_module.py`.",
])
def test_a_planted_bad_reference_in_a_doc_is_caught(planted_repo, markdown):
    assert _plant(planted_repo, "docs/formats.md", f"# Formats\n\n## Padding semantics\n\n{markdown}\n")


@pytest.mark.parametrize("source", [
    '"""Losses as in lm_human_preferences/gone.py."""\n',
    'x = 1  # see docs/missing.md\n',
    'def f():\n    """PPO math (SPEC 8)."""\n',
    '# the demo end to end (issue 6)\n',
    'class A:\n    """Uses language/missing.py."""\n',
])
def test_a_planted_bad_reference_in_code_is_caught(planted_repo, source):
    assert _plant(planted_repo, f"{PACKAGE}/ppo.py", source)


@pytest.mark.parametrize("markdown", [
    "See lm_human_preferences/ppo.py, docs/formats.md and tests/test_ppo.py.",
    "See [the formats](formats.md) and [padding](formats.md#padding-semantics), [readme](../README.md).",
    "The model is `lm_human_preferences.language.model.Model`; `ppo.py` holds the losses.",
    "Released files: https://example.com/labels/offline_5k.json, SAVE_DIR/reward_model/hparams.json.",
    "A spec of the random model (JSON); the issues of 2019; section 2.2 of the paper.",
])
def test_good_references_pass(planted_repo, markdown):
    assert _plant(planted_repo, "docs/formats.md", f"# Formats\n\n## Padding semantics\n\n{markdown}\n") == []


def test_string_values_in_code_are_not_prose(planted_repo):
    """Only comments and docstrings are read: test data may name paths that do not exist."""
    assert _plant(planted_repo, f"{PACKAGE}/ppo.py", 'PATH = "lm_human_preferences/gone.py"\n') == []
