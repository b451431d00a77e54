"""The documentation is honest: README.md and docs/*.md say each thing once, every repository path and ``fomo_ray.*``
name they give exists, every generated table lives in exactly one page, and nothing cites a design file outside the
repository (issue 30)."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: a block of this many consecutive identical non-blank lines in two pages is a copy: link to one instead
COPY_LINES = 8
#: top-level folders of the repository: a path a page names under one of them must exist
REPO_DIRS = ("fomo_ray", "scripts", "docs", "experiments", "tests", "bench", "cluster", "data_prep", ".ci")
#: what a run, a sweep, a check or the user makes, never shipped: pages may name paths under these without them
#: existing (runs/ and data/ under the working directory, a sweep's report/, the GPU check's OUTDIR/, export targets)
GENERATED = ("runs/", "data/", ".venv/", "report/", "OUTDIR/", "model/", "DIR/", "/")
#: files of other projects that pages name: the FoMo-in-Flux authors' clone, Ray's wheel
EXTERNAL = ("download_", "fomo_in_flux/", "data_lib/", "fake_multi_node/")
#: names under a repo folder that are not paths: the on-disk format's version tag
NOT_PATHS = {"fomo_ray/v1"}
#: every generated table, the script that writes it, and the one page it lives in
TABLES = {
    "main-job-results": ("scripts/main_job_table.py", "README.md"),
    "config-reference": ("fomo_ray/config.py", "docs/CONFIG.md"),
    "findings": ("experiments/check_findings.py", "docs/FINDINGS.md"),
    "size-ladder": ("scripts/ladder_table.py", "docs/BENCHMARK.md"),
    "paper-budget": ("scripts/paper_budget_table.py", "docs/REAL_DATA.md"),
}


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _windows(page: Path) -> dict[tuple[str, ...], int]:
    """Every run of COPY_LINES consecutive non-blank lines of ``page`` (stripped) -> the line number it starts at."""
    lines = [(n, line.strip()) for n, line in enumerate(page.read_text().splitlines(), 1) if line.strip()]
    out: dict[tuple[str, ...], int] = {}
    for i in range(len(lines) - COPY_LINES + 1):
        out.setdefault(tuple(text for _, text in lines[i:i + COPY_LINES]), lines[i][0])
    return out


def test_no_page_copies_another():
    windows = {page: _windows(page) for page in PAGES}
    copies = []
    for a, b in itertools.combinations(PAGES, 2):
        for block in windows[a].keys() & windows[b].keys():
            copies.append(f"{_rel(a)}:{windows[a][block]} = {_rel(b)}:{windows[b][block]}: {block[0][:70]!r}")
    assert not copies, f"blocks of {COPY_LINES}+ identical lines in two pages (keep one, link to it):\n" + \
        "\n".join(sorted(copies)[:20])


PATH = re.compile(r"(?<![\w./<>-])((?:%s)/[\w.*<>/-]*)" % "|".join(re.escape(d) for d in REPO_DIRS))


def _exists(name: str) -> bool:
    name = name.rstrip(".,;:)")
    if name in NOT_PATHS or (REPO / name).exists():
        return True
    pattern = re.sub(r"<[^>]*>", "*", name)  # placeholders such as <name> stand for any file name
    return "*" in pattern and any(REPO.glob(pattern))


def test_every_repository_path_a_page_names_exists():
    missing = [f"{_rel(page)}: {name}" for page in PAGES for name in PATH.findall(page.read_text())
               if not _exists(name)]
    assert not missing, "pages name files that are not in the repository:\n" + "\n".join(missing)


def test_backticked_paths_are_in_the_repository_or_generated():
    """A relative path in backticks with a source file's suffix is either in the repo or under a GENERATED prefix."""
    span = re.compile(r"`([\w.<>*\[\]-]+(?:/[\w.<>*\[\]-]+)+\.(?:py|sh|md|yaml|yml|cfg))`")
    outside = []
    for page in PAGES:
        for name in span.findall(page.read_text()):
            if not (_exists(name) or name.startswith(GENERATED + EXTERNAL)):
                outside.append(f"{_rel(page)}: {name}")
    assert not outside, "\n".join(outside)


MODULE = re.compile(r"(?<![\w.])fomo_ray(?:\.\w+)+")


def _code_strings() -> set[str]:
    """``fomo_ray.*`` names the code spells out as strings: MLflow tags such as ``fomo_ray.platform``, schema tags."""
    found: set[str] = set()
    for path in [*(REPO / "fomo_ray").rglob("*.py"), *(REPO / "bench").glob("*.*")]:
        found.update(re.findall(r"[\"'](fomo_ray\.[\w.]+)", path.read_text()))
    return found


def _defines(path: Path, name: str) -> bool:
    text = path.read_text()
    return bool(re.search(rf"^\s*(?:def|class|async def)\s+{name}\b|^\s*{name}\s*[:=]|import .*\b{name}\b|"
                          rf"[\"']{name}[\"']", text, re.M))


def _resolves(dotted: str, tags: set[str]) -> bool:
    """A module (file or package), a name one defines, a lazy API name of ``fomo_ray``, or a string the code uses."""
    if dotted in tags or any(t.startswith(dotted + ".") for t in tags):
        return True
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:i])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[i:]
            return not rest or _defines(module, rest[0])
    return False


def test_every_module_a_page_names_exists():
    tags = _code_strings()
    missing = sorted({f"{_rel(page)}: {name}" for page in PAGES for name in MODULE.findall(page.read_text())
                      if not _resolves(name, tags)})
    assert not missing, "pages name fomo_ray modules or names that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("marker", sorted(TABLES))
def test_each_generated_table_lives_in_one_page_and_its_writer_names_it(marker):
    writer, home = TABLES[marker]
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    where = {_rel(p): p.read_text().count(start) for p in PAGES}
    assert where[home] == 1 and (REPO / home).read_text().count(end) == 1, f"{home} must hold one {marker} block"
    assert sum(where.values()) == 1, f"{marker} is in {[p for p, n in where.items() if n]}: one page only"
    text = (REPO / writer).read_text()
    assert start in text or marker == "config-reference", f"{writer} does not write the {marker} block"
    if home != "README.md":
        assert home in text, f"{writer} must name {home}, where its table lives"


SECTION = re.compile(r"(docs/[A-Z_]+\.md),? §([A-Z][a-z]+(?: [a-z]+)*)")


def test_every_cited_docs_section_exists():
    """Code and docs cite sections as ``docs/BENCHMARK.md §Budgets``: each must be a heading of that page."""
    bad = []
    for path in _repo_files():
        if path.suffix not in {".py", ".md", ".sh", ".yaml"}:
            continue
        for page, section in SECTION.findall(path.read_text()):
            headings = [h.lstrip("#").strip() for h in (REPO / page).read_text().splitlines() if h.startswith("##")]
            if not any(h == section or h.startswith(section + " ") or h.startswith(section + ":") for h in headings):
                bad.append(f"{path.relative_to(REPO)}: {page} §{section}")
    assert not bad, "cited sections that are not headings:\n" + "\n".join(sorted(set(bad)))


def _repo_files():
    skip = {".git", ".venv", "runs", "data", "build", "node_modules"}
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if path.is_file() and not (set(rel.parts) & skip) and not rel.parts[0].startswith(".pytest") \
                and "__pycache__" not in rel.parts and path.suffix not in {".pyc", ".png", ".whl"}:
            yield path


def test_nothing_cites_a_design_file_outside_the_repository():
    """Code and docs cite the paper (arXiv 2408.14471) or a page under docs/, never the old out-of-repo design notes."""
    banned = ("DESIGN" + " §", "shared/" + "DESIGN")  # split, so this file does not name them itself
    hits = []
    for path in _repo_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(REPO)}: {b}" for b in banned if b in text]
    assert not hits, "\n".join(hits)
