"""Every relative link and image of README.md and docs/**/*.md leads to a file that exists, and every #anchor to a
heading of that page, so that moving or renaming a page cannot leave a dead link behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    return [a or b for a, b in LINK.findall(text) if not re.match(r"[a-z]+:", a or b)]


def dead_links(page: Path) -> list[str]:
    """The links of ``page`` whose file does not exist or whose anchor is no heading of that file."""
    dead = []
    for target in links(page):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        missing_anchor = bool(fragment) and file.suffix == ".md" and file.exists() and fragment not in anchors(file)
        if not file.exists() or missing_anchor:
            dead.append(target)
    return dead


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_links_resolve(page: Path):
    dead = dead_links(page)
    assert not dead, f"{page.relative_to(ROOT)}: dead links {dead}"


def test_a_dead_link_is_found(tmp_path: Path):
    (tmp_path / "other.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading) [gone](missing.md) [bad anchor](other.md#nothing) [self](#top)\n"
        '<img src="figure.png">\n```\n[in code](ignored.md)\n```\n# Top\n'
    )
    assert dead_links(page) == ["missing.md", "other.md#nothing", "figure.png"]


def test_anchor_follows_github():
    assert anchor("Where a site's data is") == "where-a-sites-data-is"
    assert anchor("2. Real BraTS data") == "2-real-brats-data"
    assert anchor("fedopt_beta2") == "fedopt_beta2"
