"""``reports/README.md`` indexes every report, each once, with a question, a command and a
date; archived reports say what replaced them; and every relative link in the repository's
Markdown (README, docs, reports) and every ``reports/...`` path that the README and docs name
points at something that exists (reports move; their readers must move with them)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"
INDEX = REPORTS / "README.md"
#: ``| [name](target) | question | `command` or a word | YYYY-MM-DD |``
ROW = re.compile(r"^\| \[[^\]]+\]\((?P<target>[^)]+)\) \| (?P<question>[^|]+) \| (?P<command>[^|]+) \| (?P<date>\d{4}-\d{2}-\d{2}) \|$", re.M)
LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?:#[^)]*)?\)")
#: a ``reports/...`` path with a file extension or a trailing slash (not an ``--out`` stem)
REPORT_PATH = re.compile(r"(?<![\w./-])reports/[A-Za-z0-9_./-]*(?:\.(?:md|json|png|log)\b|/(?=[`)\s]))")
SKIP_DIRS = {"build", "dist", "__pycache__", "node_modules", "site-packages"}


def markdown_files() -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info"))
        found += [Path(folder) / f for f in sorted(files) if f.endswith(".md")]
    return found


def report_files() -> set[Path]:
    """A report is every Markdown file under reports/ except the index itself."""
    return {p for p in REPORTS.rglob("*.md") if p != INDEX and not any(part.startswith(".") for part in p.relative_to(REPORTS).parts)}


def index_rows() -> list[re.Match]:
    return list(ROW.finditer(INDEX.read_text(encoding="utf-8")))


def test_the_index_lists_every_report_once():
    rows = index_rows()
    listed = [(REPORTS / m["target"]).resolve() for m in rows]
    assert len(listed) == len(set(listed)), "a report is listed twice"
    missing = sorted(str(p.relative_to(REPORTS)) for p in report_files() if p.resolve() not in listed)
    assert not missing, f"reports/README.md does not list: {missing}"
    gone = sorted(m["target"] for m in rows if not (REPORTS / m["target"]).is_file())
    assert not gone, f"reports/README.md lists missing files: {gone}"


def test_every_index_row_has_a_question_a_command_and_a_date():
    for m in index_rows():
        assert len(m["question"].strip()) > 20, m.group(0)
        command = m["command"].strip()
        assert command.startswith("`") or command.startswith("no longer possible"), m.group(0)
        if "archive/" not in m["target"]:
            assert command.startswith("`"), f"a standing report or an experiment needs its command: {m.group(0)}"


def test_standing_report_commands_are_the_reports_own():
    """A standing report's command in the index is the one its header gives (up to ``...``)."""
    for m in index_rows():
        if m["target"].startswith("experiments/"):
            continue
        command = re.search(r"`([^`]+)`", m["command"])[1]
        head = (REPORTS / m["target"]).read_text(encoding="utf-8")[:4000]
        assert command.split(" ...")[0] in head, f"{m['target']}: {command!r} is not in its header"


def test_archived_reports_say_what_replaced_them():
    archived = sorted((REPORTS / "experiments" / "archive").glob("*.md"))
    assert archived
    for path in archived:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("> **Archived**") and "replaced" in first, f"{path.name}: {first}"


def test_relative_links_in_markdown_resolve():
    problems = []
    for path in markdown_files():
        for m in LINK.finditer(path.read_text(encoding="utf-8")):
            target = m["target"]
            if "://" not in target and not target.startswith("mailto:") and not (path.parent / target).exists():
                problems.append(f"{path.relative_to(ROOT)}: link {target} does not resolve")
    assert not problems, "\n".join(problems)


def test_report_paths_named_in_readme_and_docs_exist():
    problems = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for m in REPORT_PATH.finditer(text):
            if not (ROOT / m.group(0)).exists():
                problems.append(f"{path.relative_to(ROOT)}: {m.group(0)} does not exist")
    assert not problems, "\n".join(problems)


def test_the_path_check_catches_what_it_should():
    found = [m.group(0) for m in REPORT_PATH.finditer("see `reports/quality.md`, reports/old/ and --out reports/x/heldout-4x (a stem)")]
    assert found == ["reports/quality.md", "reports/old/"]
