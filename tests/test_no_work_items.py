"""The docs, the README, the code and the tests name no work items of the project's own tracker: users read them,
and the history belongs in CHANGELOG.md (the one file exempt)."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: "issue 12", "issues #3", "work item 4", "pull request 7", and GitHub-style "#12" references
PATTERNS = (re.compile(r"\b(?:issues?|work[ -]?items?|pull requests?)\s*#?\d+", re.IGNORECASE),
            re.compile(r"(?<![\w&#/])#\d{1,5}(?![\w])"))
TEXT_SUFFIXES = {".md", ".txt", ".csv", ".json", ".py", ".cpp", ".h", ".yml", ".yaml", ".cfg", ".toml"}


def _files(*folders):
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts:
                yield path


def _hits(paths):
    hits = []
    for path in paths:
        text = path.read_text(errors="replace")
        for pattern in PATTERNS:
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0)!r}")
    return hits


def test_the_docs_and_the_readme_name_no_work_items():
    hits = _hits([ROOT / "README.md", *_files("docs")])
    assert not hits, "work-item numbers (history goes to CHANGELOG.md):\n" + "\n".join(hits)


def test_the_code_examples_and_tests_name_no_work_items():
    this = pathlib.Path(__file__).resolve()                 # its examples of what the patterns catch
    hits = _hits(p for p in _files("sparse_bias", "tests", "examples", "benchmarks") if p.resolve() != this)
    assert not hits, "work-item numbers (history goes to CHANGELOG.md):\n" + "\n".join(hits)


def test_the_patterns_catch_work_items_and_leave_other_numbers():
    caught = ["see issue 21", "Issue #3", "(issues 2 and 3)", "work item 6", "fixed in #12"]
    passed = ["colour #333333", "&#39;", "page.html#5x", "tests 1192 passed", "issue a warning", "# 1 comment"]
    assert all(any(p.search(s) for p in PATTERNS) for s in caught)
    assert not any(p.search(s) for s in passed for p in PATTERNS)
