"""Every number on the results page and in the README's results summary comes from a committed report.

A section of ``docs/results.md`` (and the README's "Results and benchmarks" section) may state a number only if it
appears in one of the reports that section links (a report's folder counts whole: its ``results.json``,
``comparison.json``, ``report.md``...). A number appears when one of its roundings (0 to 4 decimals) matches, so
``0.743`` is found as ``0.74312...`` in a JSON report. Not results, and so not checked: numbers inside backticks
(commands, options, settings), and a target or threshold written after ``≥``, ``≤``, ``<`` or ``>``.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS_PAGE = REPO / "docs" / "results.md"
README = REPO / "README.md"
#: Where committed reports live: a link into one of these is a link to an artifact.
ARTIFACT_ROOTS = (REPO / "docs" / "results", REPO / "benchmarks" / "results")
REPORT_SUFFIXES = (".json", ".md", ".csv", ".jsonl")

#: A reported number: a decimal (``0.743``, ``+0.057``, ``-0.042``) or a grouped integer (``4,707,518``).
NUMBER = re.compile(r"(?<![\w.,/-])[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+\.\d+)(?![\w.]|,\d)")
#: A target or threshold: the number after a comparison sign.
THRESHOLD = re.compile(r"[≥≤<>]\s*[-+]?\d[\d.,]*")
LINK = re.compile(r"\]\(([^)#\s]+)")
ANY_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?")


def _key(token: str) -> str:
    return token.replace("−", "-").lstrip("+-").replace(",", "")


@cache
def _numbers_in(path: Path) -> frozenset[str]:
    """Every number of a report, as written and rounded to 0-4 decimals (signs dropped)."""
    found: set[str] = set()
    for token in ANY_NUMBER.findall(path.read_text(encoding="utf-8", errors="ignore")):
        try:
            value = abs(float(token.replace(",", "")))
        except ValueError:
            continue
        found.add(_key(token))
        found.update(f"{value:.{digits}f}" for digits in range(5))
    return frozenset(found)


def _artifacts(link: str, base: Path) -> list[Path]:
    """The report files a link points to: a report folder whole, or a report file with its folder's siblings."""
    target = (base / link).resolve()
    if not any(target == root or root in target.parents for root in ARTIFACT_ROOTS):
        return []
    if target.is_dir():
        return sorted(p for p in target.rglob("*") if p.suffix in REPORT_SUFFIXES)
    if target.is_file():
        return sorted(p for p in target.parent.iterdir() if p.suffix in REPORT_SUFFIXES)
    return []


def _sections(text: str) -> list[str]:
    return re.split(r"\n(?=#{2,4} )", text)


def unbacked_numbers(text: str, base: Path) -> dict[str, list[str]]:
    """Per section title, the numbers it states that none of its linked reports holds."""
    problems: dict[str, list[str]] = {}
    for section in _sections(text):
        title = section.strip().splitlines()[0] if section.strip() else ""
        reports = {p for link in LINK.findall(section) for p in _artifacts(link, base)}
        pool = frozenset().union(*(_numbers_in(p) for p in reports))
        prose = re.sub(r"`[^`]*`", "", section)
        prose = re.sub(r"\]\([^)]*\)", "]", prose)
        prose = THRESHOLD.sub("", prose)
        missing = [token for token in NUMBER.findall(prose) if _key(token) not in pool]
        if missing:
            problems[title] = missing
    return problems


def _readme_results() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Results and benchmarks")
    return text[start : text.index("\n## ", start + 1)]


@pytest.mark.parametrize(
    ("name", "text", "base"),
    [
        ("docs/results.md", lambda: RESULTS_PAGE.read_text(encoding="utf-8"), RESULTS_PAGE.parent),
        ("README results summary", _readme_results, README.parent),
    ],
)
def test_every_reported_number_has_a_committed_report(name: str, text, base: Path) -> None:
    problems = unbacked_numbers(text(), base)
    report = "\n".join(f"- {title}: {', '.join(numbers)}" for title, numbers in problems.items())
    assert not problems, f"{name}: numbers without a report linked from their section:\n{report}"


def test_the_check_finds_a_number_without_a_report(tmp_path: Path) -> None:
    reports = tmp_path / "docs" / "results" / "run"
    reports.mkdir(parents=True)
    (reports / "results.json").write_text('{"mean_dice": 0.74312, "bytes": 4707518}')
    page = (
        "## A\n\nMean 0.743 and 4,707,518 B ([report](results/run/results.json)), target ≥ 0.70, `--set lr=0.003`.\n\n"
        "## B\n\nMean 0.743 with no report.\n"
    )
    global ARTIFACT_ROOTS
    saved = ARTIFACT_ROOTS
    ARTIFACT_ROOTS = (tmp_path / "docs" / "results",)
    try:
        problems = unbacked_numbers(page, tmp_path / "docs")
    finally:
        ARTIFACT_ROOTS = saved
    assert problems == {"## B": ["0.743"]}
