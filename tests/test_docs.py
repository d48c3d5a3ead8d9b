"""The documentation builds in MkDocs strict mode (API pages generated from the docstrings)."""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_mkdocs_strict_build(tmp_path):
    pytest.importorskip("mkdocstrings", reason="mkdocs / mkdocstrings are dev extras")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()
    raw = re.compile(r":(class|func|mod|meth|data|attr|obj|exc):`|Example::")
    for page in (tmp_path / "site").rglob("*.html"):
        hits = raw.findall(page.read_text())
        assert not hits, f"{page.relative_to(tmp_path)}: raw reST in the built site: {hits[:5]}"


def _sections(path):
    """``{heading: source of its python blocks}`` for the ``## `` sections of a Markdown page."""
    text = path.read_text()
    out = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        out[title] = "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))
    return out


RECIPES = {title: code for title, code in _sections(ROOT / "docs" / "migration.md").items()
           if title.startswith("Recipe")}


@pytest.mark.parametrize("title", sorted(RECIPES))
def test_migration_recipe_runs_and_ends_with_the_dense_versions_outputs(title):
    pytest.importorskip("mmengine", reason="the recipes build from configs through mmengine's registry")
    res = subprocess.run([sys.executable, "-c", RECIPES[title]], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "same outputs as the dense version" in res.stdout


def test_migration_has_both_recipes():
    assert {"Recipe: from CMT with a dense bias", "Recipe: from CMTTEST"} <= set(RECIPES)


def _runnable_sections():
    """``(page, section title, code)`` for every ``## `` section of README.md and docs/*.md with python blocks."""
    out = []
    for page in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")):
        for title, code in _sections(page).items():
            if code.strip() and not (page.name == "migration.md" and title in RECIPES):   # run (and checked) above
                out.append(pytest.param(page, code, id=f"{page.name}:{title[:40]}"))
        head = re.split(r"^## ", page.read_text(), flags=re.M)[0]      # blocks before the first section
        code = "\n".join(re.findall(r"```python\n(.*?)```", head, flags=re.S))
        if code.strip():
            out.append(pytest.param(page, code, id=f"{page.name}:top"))
    return out


@pytest.mark.parametrize("page, code", _runnable_sections())
def test_every_python_block_runs_as_written(page, code):
    """Each section's python blocks, in order, as a reader pastes them (a fresh interpreter, the repo as cwd)."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
