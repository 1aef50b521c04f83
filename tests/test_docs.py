"""README.md and docs/: every relative link points to a file (and heading) that exists; the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_link_points_to_something_that_exists(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target} points to a missing file"
        if anchor:
            assert anchor in anchors(file), f"{page.name}: {target} points to a missing heading"


def test_the_readme_is_read_in_ten_minutes_and_the_docs_pages_stay_short():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
    for page in PAGES[1:]:  # the clinical review is a record (every sampled row quoted), not a page to read through
        assert page.name == "data_review.md" or len(page.read_text(encoding="utf-8").splitlines()) <= 300, page.name
