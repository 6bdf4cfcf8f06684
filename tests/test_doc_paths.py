"""Every repository path the documentation names exists.

A cheap check (no jax import) over README.md, CONTRIBUTING.md and every ``docs/**/*.md``:

(a) markdown links and images to relative targets (resolved against the page's folder);
(b) inline code spans that look like repository paths (``examples/demo.py``,
    ``benchmarks/overhead.py``, ``docs/img/x.png``, ``tests/test_x.py``, ``fop_optax/...``):
    a known top-level folder, or a root-level file such as ``CHANGELOG.md``;
(c) commands, in inline code and in fenced code blocks: ``python3 examples/x.py``,
    ``python3 -m benchmarks.x``, ``python3 -m examples.x``, ``pytest tests/test_x.py``;
(d) test ids ``tests/test_x.py::test_name``: the function is defined in that file.

Paths under ``results/`` are exempt: they are a run's outputs (gitignored), made by the
commands the pages give. Placeholders (``examples/<name>.py``, ``fop_optax/...``) are skipped.
Every missing path is reported at once, with the page and line that names it.
"""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOP_DIRS = ("examples", "benchmarks", "tests", "fop_optax", "docs", "notebooks", "results", ".ci")
EXTENSIONS = ("py", "md", "png", "json", "jsonl", "ipynb", "toml", "sh", "txt", "cfg", "yml",
              "yaml", "csv", "npz")
ROOT_FILE = re.compile(r"^(?:[A-Z][A-Z_]*\.(?:md|cff|in)|pyproject\.toml|MANIFEST\.in)$")
# A path token inside code: a known top-level folder, then path characters.
PATH_TOKEN = re.compile(
    r"(?<![\w./-])((?:%s)/[\w./*<>{}$-]*)" % "|".join(re.escape(d) for d in TOP_DIRS))
PY_SCRIPT = re.compile(r"\bpython3?\s+(?:-\S+\s+)*([\w./-]+\.py)\b")
PY_MODULE = re.compile(r"\bpython3?\s+(?:-[^m\s]\S*\s+)*-m\s+([\w.]+)")
CHECKED_MODULE_ROOTS = ("examples", "benchmarks", "fop_optax", "tests")
MD_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
FENCE = re.compile(r"^\s*(```+|~~~+)")


def _pages():
    pages = [os.path.join(ROOT, name) for name in ("README.md", "CONTRIBUTING.md")]
    pages = [p for p in pages if os.path.exists(p)]
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)):
        rel = os.path.relpath(path, ROOT)
        if rel.startswith(os.path.join("docs", "_build")):
            continue
        pages.append(path)
    return pages


def _is_placeholder(token: str) -> bool:
    return any(c in token for c in "<>{}$") or "..." in token


def _clean(token: str) -> str:
    token = token.split("::", 1)[0]          # tests/test_x.py::test_name
    token = re.sub(r":\d+(?::\d+)?$", "", token)  # fop_optax/x.py:123
    return token.rstrip(".,;:)")


def _exists(rel: str) -> bool:
    full = os.path.join(ROOT, rel)
    if any(c in rel for c in "*?["):
        return bool(glob.glob(full))
    return os.path.exists(full)


def _looks_like_path(token: str) -> bool:
    """A known extension, a trailing slash, or a bare folder/file name we can check."""
    if token.endswith("/"):
        return True
    last = token.rsplit("/", 1)[-1]
    if "." in last:
        return last.rsplit(".", 1)[-1] in EXTENSIONS
    return True


TEST_ID = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def _check_test_ids(text: str, where: str, missing: list) -> None:
    """``tests/test_x.py::test_name``: the test function (or class) is defined in that file."""
    for path, name in TEST_ID.findall(text):
        full = os.path.join(ROOT, path)
        if not os.path.exists(full):
            continue  # reported as a missing path
        with open(full, encoding="utf-8") as f:
            source = f.read()
        if not re.search(r"^\s*(?:async\s+)?(?:def|class)\s+%s\b" % re.escape(name), source, re.M):
            missing.append(f"{where}: test `{path}::{name}`")


def _check_code(text: str, where: str, missing: list, *, fenced: bool) -> None:
    _check_test_ids(text, where, missing)
    for token in PATH_TOKEN.findall(text):
        token = _clean(token)
        if _is_placeholder(token) or token.startswith("results/") or token == "results":
            continue
        if fenced and "." not in token.rsplit("/", 1)[-1] and not token.endswith("/"):
            continue  # in code blocks, check only things that are plainly files or folders
        if _looks_like_path(token) and not _exists(token):
            missing.append(f"{where}: path `{token}`")
    if not fenced:
        stripped = text.strip()
        if ROOT_FILE.match(stripped) and not _exists(stripped):
            missing.append(f"{where}: file `{stripped}`")
    for script in PY_SCRIPT.findall(text):
        script = _clean(script)
        if _is_placeholder(script) or script.startswith(("results/", "/")):
            continue
        if "/" not in script:
            continue  # `python3 demo.py` inside a folder the page names; not checkable here
        if not _exists(script):
            missing.append(f"{where}: script `{script}`")
    for module in PY_MODULE.findall(text):
        module = module.rstrip(".")
        if module.split(".")[0] not in CHECKED_MODULE_ROOTS:
            continue
        base = os.path.join(*module.split("."))
        if not (_exists(base + ".py") or _exists(os.path.join(base, "__init__.py"))):
            missing.append(f"{where}: module `{module}`")


def _check_page(path: str, missing: list) -> None:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    _check_lines(lines, os.path.relpath(path, ROOT), os.path.dirname(path), missing)


def _check_lines(lines, rel_page: str, page_dir: str, missing: list) -> None:
    in_fence = None
    for lineno, line in enumerate(lines, 1):
        where = f"{rel_page}:{lineno}"
        fence = FENCE.match(line)
        if in_fence is not None:
            if fence and fence.group(1)[0] == in_fence[0] and len(fence.group(1)) >= len(in_fence):
                in_fence = None
            else:
                _check_code(line, where, missing, fenced=True)
            continue
        if fence:
            in_fence = fence.group(1)
            continue
        for _, code in INLINE_CODE.findall(line):
            _check_code(code, where, missing, fenced=False)
        prose = INLINE_CODE.sub("", line)
        for target in MD_LINK.findall(prose):
            if re.match(r"^[a-zA-Z][\w+.-]*:", target) or target.startswith("#"):
                continue  # http:, mailto:, {doc}-style or same-page anchors
            target = target.split("#", 1)[0].split("?", 1)[0]
            if not target:
                continue
            resolved = os.path.normpath(os.path.join(page_dir, target))
            rel = os.path.relpath(resolved, ROOT)
            if rel.startswith("results" + os.sep) or rel == "results":
                continue
            if not os.path.exists(resolved):
                missing.append(f"{where}: link ({target})")


def test_pages_found():
    pages = _pages()
    assert any(p.endswith("README.md") for p in pages)
    assert any(os.sep + "docs" + os.sep in p for p in pages)


def test_named_paths_exist():
    missing: list = []
    for page in _pages():
        _check_page(page, missing)
    if missing:
        pytest.fail(f"{len(missing)} path(s), modules or tests named in the docs do not exist:\n  "
                    + "\n  ".join(missing), pytrace=False)


@pytest.mark.parametrize("text, bad", [
    ("see `examples/no_such_example.py`", True),
    ("see `examples/demo.py`", False),
    ("run `python3 -m benchmarks.no_such_bench`", True),
    ("run `python3 -m benchmarks.overhead --quick`", False),
    ("writes `results/anything.png`", False),
    ("see `fop_optax/...` and `examples/<name>.py`", False),
    ("[gone](no_such_page.md)", True),
    ("[ok](stability.md#some-anchor)", False),
    ("`tests/test_doc_paths.py::test_named_paths_exist`", False),
    ("`tests/test_doc_paths.py::test_no_such_test`", True),
])
def test_checker_itself(text, bad):
    """The checker flags a missing path and passes an existing one (a page in docs/)."""
    missing: list = []
    _check_lines([text], "docs/probe.md", os.path.join(ROOT, "docs"), missing)
    assert bool(missing) == bad, missing
