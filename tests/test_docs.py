"""The repository's own documentation: every ``docs/<file>.md`` reference in the code and
the Markdown points at an existing file and, where it names one (``§3b``, ``section 3b``
or a bare ``3b`` after the file name), an existing numbered section; and nothing cites
documents that live outside the repository."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: ``docs/method.md §3b``, ``docs/method.md section 3b``, ``docs/method.md 3b`` or just the file.
REFERENCE = re.compile(r"\bdocs/(?P<file>[A-Za-z0-9_-]+\.md)(?:(?:\s*§\s*|\s+sections?\s+|\s+)(?P<section>\d+[a-z]?)\b)?")
#: A numbered heading: ``## 3b. Title`` (also ``## §3b Title``).
HEADING = re.compile(r"^#{1,6}\s+§?\s*(?P<section>\d+[a-z]?)[.)]?\s", re.MULTILINE)
#: A relative Markdown link target.
LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?:#[^)]*)?\)")
#: Documents the code once cited that are not part of the repository (spelled so that this
#: file does not match itself).
OUTSIDE = re.compile(r"(?<![\w/])(?:" + "METHOD" + "|" + "DIFFUSERS" + r")\.md|shared/" + "reference")

SKIP_DIRS = {"build", "dist", "__pycache__", "node_modules", "site-packages"}


def source_files(root: Path = ROOT) -> list[Path]:
    """The repository's ``*.py`` and ``*.md`` files (no hidden folders, build output or eggs)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info"))
        found += [Path(folder) / f for f in sorted(files) if f.endswith((".py", ".md"))]
    return found


def references(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, file, section or None)`` of every ``docs/...md`` reference in ``text``."""
    return [(text.count("\n", 0, m.start()) + 1, m["file"], m["section"]) for m in REFERENCE.finditer(text)]


def sections(path: Path) -> set[str]:
    return {m["section"] for m in HEADING.finditer(path.read_text(encoding="utf-8"))}


def broken_references(text: str, docs: Path = DOCS) -> list[str]:
    """What in ``text`` points at a missing docs file or section."""
    problems = []
    for line, name, section in references(text):
        target = docs / name
        if not target.is_file():
            problems.append(f"line {line}: docs/{name} does not exist")
        elif section is not None and section not in sections(target):
            problems.append(f"line {line}: docs/{name} has no section {section} (it has {sorted(sections(target))})")
    return problems


def test_the_reference_check_catches_what_it_should():
    d = "docs" + "/"  # spelled apart so that the repository-wide check does not read this text
    text = f"ok {d}method.md §3b, {d}method.md section 4 and ({d}method.md 3c)\nbad {d}method.md §9z\nbad {d}nothing.md"
    assert [ref[1:] for ref in references(text)[:3]] == [("method.md", "3b"), ("method.md", "4"), ("method.md", "3c")]
    problems = broken_references(text)
    assert len(problems) == 2 and "section 9z" in problems[0] and "nothing.md does not exist" in problems[1]
    assert OUTSIDE.search("see " + "METHOD" + ".md 3") and not OUTSIDE.search("see docs/method.md 3")


def test_method_keeps_the_reference_section_numbers():
    assert {"1", "2", "3", "3b", "3c", "4", "5", "6", "7"} <= sections(DOCS / "method.md")
    assert (DOCS / "diffusers.md").is_file()


def test_every_docs_reference_points_at_a_file_and_section():
    problems = []
    for path in source_files():
        problems += [f"{path.relative_to(ROOT)} {p}" for p in broken_references(path.read_text(encoding="utf-8"))]
    assert not problems, "\n".join(problems)


def test_links_in_docs_resolve():
    problems = []
    for path in sorted(DOCS.glob("*.md")):
        for m in LINK.finditer(path.read_text(encoding="utf-8")):
            target = m["target"]
            if "://" not in target and not (path.parent / target).exists():
                problems.append(f"{path.relative_to(ROOT)}: link {target} does not resolve")
    assert not problems, "\n".join(problems)


def test_no_reference_outside_repository():
    """Code and docs cite the repository's own docs/, not reference files that exist only
    on the machine the project was started on."""
    hits = []
    for path in source_files():
        text = path.read_text(encoding="utf-8")
        hits += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert not hits, "cite docs/method.md or docs/diffusers.md instead:\n" + "\n".join(hits)
