"""The documentation holds together: every relative link in README.md, BENCHMARKS.md and
docs/*.md points at a file that exists, and every #anchor at a heading of that file (the
slug GitHub gives it); every docs page is reachable from the README, which stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans blanked."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (code spans and link targets
    dropped), lower-cased, punctuation other than '-' and '_' removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = text.replace("`", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w: unicode letters, digits and '_'
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 ... suffixes for repeats."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


def links(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    return [(n, m.group(1)) for n, line in prose_lines(text) for m in LINK.finditer(line)]


def test_the_slug_function_matches_github_on_known_headings():
    assert slug("What a run leaves (`outputs/<experiment>/<time>/`)") == (
        "what-a-run-leaves-outputsexperimenttime"
    )
    assert slug("Leaderboards, sweeps, resume, several processes, loggers") == (
        "leaderboards-sweeps-resume-several-processes-loggers"
    )
    assert slug("Your own model / your own data") == "your-own-model--your-own-data"
    assert slug("Results of `make run`") == "results-of-make-run"
    assert slug("End to end: embedded retrieval (CPU)") == "end-to-end-embedded-retrieval-cpu"


def test_headings_inside_code_blocks_are_not_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n```bash\n# a comment\n```\n\n## Title\n", encoding="utf-8")
    assert anchors(page) == {"title", "title-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        if not linked.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{where} (no heading with anchor #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Real heading\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#real-heading) [file](missing.md) [anchor](other.md#nope) "
        "`[code](missing.md)` [web](https://example.org/x.md)\n",
        encoding="utf-8",
    )
    found = [t for _, t in links(page)]
    assert found == ["other.md#real-heading", "missing.md", "other.md#nope",
                     "https://example.org/x.md"]  # fmt: skip
    assert "real-heading" in anchors(tmp_path / "other.md")
    assert "nope" not in anchors(tmp_path / "other.md")


def test_every_docs_page_is_linked_from_the_readme_and_the_readme_stays_short():
    readme = ROOT / "README.md"
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(readme)}
    pages = set((ROOT / "docs").glob("*.md"))
    assert pages and not {p.resolve() for p in pages} - linked
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= 300


def test_no_development_log_language_in_the_documentation():
    """Readers cannot follow commit ids, issue numbers or design notes outside the repo."""
    patterns = [
        r"\b(since|before|at|after) [0-9a-f]{7,40}\b",
        r"\bissue('s)? ?\d+",
        r"the issue's",
        r"DESIGN §",
        r"\b(this|the previous) README\b",
    ]
    found = []
    for page in PAGES:
        for number, line in prose_lines(page.read_text(encoding="utf-8")):
            for pattern in patterns:
                if re.search(pattern, line, flags=re.IGNORECASE):
                    found.append(f"{page.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_methods_page_counts_and_lists_every_method_config():
    """The counts quoted in docs/methods.md are the configs that ship, and each config has
    a row in its table (a new method is documented, a count never goes stale)."""
    page = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    configs = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
    default = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())["methods"]
    counted = re.search(r"holds (\d+) configs: (\d+) explanation methods", page)
    assert counted, "docs/methods.md must say how many method configs ship"
    assert (int(counted.group(1)), int(counted.group(2))) == (len(configs), len(configs) - 1)
    listed = re.search(r"default list\s+\(`methods` in `conf/config.yaml`\) has (\d+)", page)
    assert listed and int(listed.group(1)) == len(default)
    rows = set(re.findall(r"^\| `(\w+)` \|", page, flags=re.MULTILINE))
    assert set(configs) <= rows, f"methods without a row: {sorted(set(configs) - rows)}"
