"""The README and docs/ hold together: every relative link points at a file that exists, every #anchor at a heading of
the file it names (GitHub's heading ids), every doc is reachable from the README, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_LIMIT_BYTES = 8 * 1024

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.MULTILINE)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text with fenced code blocks and code spans removed: a link inside code is not a link."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def link_targets(text: str) -> list[str]:
    body = prose(text)
    return _INLINE_LINK.findall(body) + _REFERENCE.findall(body)


def slug(heading: str) -> str:
    """GitHub's heading id: markup and punctuation other than - and _ dropped, lowercase, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading counts by its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The ids of a Markdown file's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        ids.add(base if count == 0 else f"{base}-{count}")
    return ids


def broken_links(document: Path) -> list[str]:
    """Every relative link of ``document`` that does not resolve, as ``file: target: why``."""
    problems = []
    for target in link_targets(document.read_text()):
        if _EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        linked = (document.parent / unquote(path_part)).resolve() if path_part else document
        where = f"{document.relative_to(ROOT) if document.is_relative_to(ROOT) else document}: {target}"
        if not linked.exists():
            problems.append(f"{where}: no such file")
        elif anchor and linked.suffix == ".md" and unquote(anchor) not in anchors(linked):
            problems.append(f"{where}: no heading with that id in {linked.name}")
    return problems


@pytest.mark.parametrize("document", documents(), ids=lambda path: path.name)
def test_every_relative_link_resolves(document: Path) -> None:
    assert broken_links(document) == []


def test_every_doc_is_reachable_from_the_readme() -> None:
    reached = {ROOT / "README.md"}
    waiting = [ROOT / "README.md"]
    while waiting:
        document = waiting.pop()
        for target in link_targets(document.read_text()):
            path_part = target.partition("#")[0]
            if _EXTERNAL.match(target) or not path_part.endswith(".md"):
                continue
            linked = (document.parent / unquote(path_part)).resolve()
            if linked.exists() and linked not in reached:
                reached.add(linked)
                waiting.append(linked)
    assert {path.name for path in documents() if path not in reached} == set()


def test_the_readme_stays_short() -> None:
    size = (ROOT / "README.md").stat().st_size
    assert size < README_LIMIT_BYTES, f"README.md is {size} bytes; move detail into docs/"


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("Health, readiness and signals", "health-readiness-and-signals"),
        ("Idempotent check (replay)", "idempotent-check-replay"),
        ("`CheckStream` and a batched `check.lua`", "checkstream-and-a-batched-checklua"),
        ("What was done, and what was tried and not kept", "what-was-done-and-what-was-tried-and-not-kept"),
        ("test_tiers and make-targets", "test_tiers-and-make-targets"),
    ],
)
def test_slugs_follow_github(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n\n```md\n## Not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#a-section) [ok](#page) [web](https://example.com/x.md) `[code](missing.md)`\n"
        "[gone](missing.md) [no anchor](other.md#not-a-heading) [no local anchor](#nowhere)\n"
    )
    assert broken_links(page) == [
        f"{page}: missing.md: no such file",
        f"{page}: other.md#not-a-heading: no heading with that id in other.md",
        f"{page}: #nowhere: no heading with that id in page.md",
    ]
