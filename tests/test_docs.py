"""The documentation points to files that exist, and the README stays short."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
CITED = re.compile(r"(?<![\w/.])((?:curvlab|tests|docs|benchmarks|analyses)/[\w/.-]*\w\.(?:py|md|png))")


def _texts():
    yield ROOT / "README.md"
    yield from (ROOT / "docs").glob("*.md")
    yield from (ROOT / "curvlab").rglob("*.py")


def test_every_cited_file_exists():
    missing = {
        f"{path.relative_to(ROOT)}: {cited}"
        for path in _texts()
        for cited in CITED.findall(path.read_text())
        if not (ROOT / cited).exists()
    }
    assert not missing, sorted(missing)


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert pages == {page for page in pages if page in readme}


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
