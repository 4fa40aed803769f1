"""README.md is a front page (at most 10 KB, the layout tree in its first half naming every
top-level module), the reference manual lives in docs/, and every relative link resolves."""

import re

import pytest
from conftest import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_readme_is_a_front_page_with_the_whole_layout_in_its_first_half():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) <= 10 * 1024
    tree = text.index("## Layout")
    assert tree < len(text) / 2
    layout = text[tree : text.index("```", text.index("```", tree) + 3)]
    package = ROOT / "dpo_lit"
    modules = [p.name for p in package.iterdir() if p.suffix == ".py" and not p.name.startswith("__")]
    folders = [f"{p.name}/" for p in package.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))]
    missing = [name for name in modules + folders if f"  {name}" not in layout]
    assert not missing, f"the layout tree leaves out {missing}"
    assert all(f"{name}" in layout for name in ("configs/", "docs/", "tests/", "benchmarks/", "experiments/"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    links = [target for target in LINK.findall(page.read_text(encoding="utf-8")) if "://" not in target]
    broken = [t for t in links if not (page.parent / t.split("#")[0]).exists()]
    assert not broken, f"{page.name}: {broken}"


def test_the_docs_are_linked_from_the_readme():
    text = README.read_text(encoding="utf-8")
    unlinked = [p.name for p in (ROOT / "docs").glob("*.md") if f"(docs/{p.name})" not in text]
    assert not unlinked
