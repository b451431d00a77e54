"""The architecture map of docs/ARCHITECTURE.md, enforced: every folder of fomo_ray is a part, the parts are layered,
no part imports a part the map does not let it use (lazy imports inside functions and "module:function" dispatch
strings included), third-party packages stay in the modules allowed to use them, and no two modules import each
other in a cycle."""
from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"
DISPATCH = re.compile(r"^(fomo_ray(?:\.\w+)+):\w+$")  # "fomo_ray.cli.run:main" names a module too


def architecture_map() -> dict:
    text = DOC.read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block, f"{DOC} must open with the parts map in a ```yaml block"
    return yaml.safe_load(block.group(1))


def modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under fomo_ray/."""
    out = {}
    for f in sorted((root / "fomo_ray").rglob("*.py")):
        rel = f.relative_to(root).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """Every module name ``path`` imports, anywhere in the file, relative imports resolved, plus the fomo_ray modules
    named in dispatch strings."""
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (m := DISPATCH.match(node.value)):
            found.add(m.group(1))
    return found


def internal(target: str, mods: dict[str, Path]) -> str | None:
    """The fomo_ray module ``target`` resolves to (``from pkg import name`` may name a module or an attribute)."""
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def part_of(path: Path, parts: dict[str, str | list[str]]) -> list[str]:
    """The parts a file belongs to: the part naming the file itself, else the part naming its folder (a folder's part
    owns every .py directly in it; a sub-folder needs its own line)."""
    rel = path.relative_to(REPO).as_posix()
    entries = {p: [e] if isinstance(e, str) else e for p, e in parts.items()}
    return ([p for p, es in entries.items() if rel in es]
            or [p for p, es in entries.items() if Path(rel).parent.as_posix() in es])


def graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for t in imports_of(m, f):
            t = internal(t, mods) if t.startswith("fomo_ray") else None
            if t and t != m and not m.startswith(t + "."):  # a module importing its own package is not a cycle
                edges[m].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


# --------------------------------------------------------------------------------------------------- the checks
def test_every_module_belongs_to_exactly_one_part():
    parts = architecture_map()["parts"]
    for name, path in modules().items():
        owners = part_of(path, parts)
        assert len(owners) == 1, f"{path.relative_to(REPO)} belongs to {owners or 'no part'} of {DOC.name}'s map"


def test_every_folder_is_a_part_with_its_own_docstring():
    """Folders are the architecture: each one with code is named in the map, and its ``__init__.py`` says what it
    holds."""
    parts = architecture_map()["parts"]
    named = {e for es in parts.values() for e in ([es] if isinstance(es, str) else es)}
    for folder in sorted({p.parent for p in modules().values()}):
        rel = folder.relative_to(REPO).as_posix()
        assert rel in named, f"folder {rel} is not a part of {DOC.name}'s map"
        init = folder / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{rel}/__init__.py needs a docstring"


def test_the_parts_are_layered():
    """Each part uses only parts listed before it in ``uses:``, so no two folders depend on each other."""
    uses = architecture_map()["uses"]
    order = list(uses)
    assert set(order) == set(architecture_map()["parts"]), "every part needs a uses: line"
    late = [f"{p} uses {q}" for i, p in enumerate(order) for q in uses[p] if q not in order[:i]]
    assert not late, "uses: lines out of layer order: " + ", ".join(late)


# the one upward import: ``fomo_ray.run`` etc. are loaded from the API on first use (``fomo_ray.__getattr__``)
LAZY_REEXPORT = ("fomo_ray", "fomo_ray.api")


def test_no_part_imports_what_the_map_forbids():
    arch = architecture_map()
    parts, uses = arch["parts"], arch["uses"]
    mods = modules()
    bad = []
    for name, path in mods.items():
        (owner,) = part_of(path, parts)
        for target in sorted(imports_of(name, path)):
            if not target.startswith("fomo_ray"):
                continue
            t = internal(target, mods)
            if t is None:
                continue
            (other,) = part_of(mods[t], parts)
            if (name, t) == LAZY_REEXPORT:
                continue
            if other != owner and other not in uses[owner]:
                bad.append(f"{name} ({owner}) imports {t} ({other})")
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_no_module_name_shadows_an_api_function():
    """``fomo_ray.run`` and ``fomo_ray.sweep`` are functions: a folder or module of that name would shadow them."""
    import fomo_ray

    api = set(fomo_ray.__all__)
    clash = sorted(n.split(".")[1] for n in modules() if n.count(".") >= 1 and n.split(".")[1] in api)
    assert not clash, f"modules shadowing the API: {clash}"
    assert callable(fomo_ray.run) and callable(fomo_ray.sweep)


def test_third_party_packages_stay_in_their_modules():
    only = architecture_map()["only"]
    bad = []
    for name, path in modules().items():
        rel = path.relative_to(REPO).as_posix()
        for target in imports_of(name, path):
            top = target.split(".")[0]
            if top in only and not any(fnmatch.fnmatch(rel, g) for g in only[top]):
                bad.append(f"{rel} imports {top} (allowed only in {only[top]})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_cycles():
    found = cycles(graph(modules()))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_lazy_imports_dispatch_strings_and_cycles(tmp_path):
    """The checks above can fail: a lazy import inside a function, a dispatch string and a two-module cycle are
    found in a throw-away package."""
    pkg = tmp_path / "fomo_ray"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from fomo_ray import b\n    return b\n")
    (pkg / "b.py").write_text("TABLE = {'x': 'fomo_ray.a:main'}\nimport ray\n")
    mods = modules(tmp_path)
    assert imports_of("fomo_ray.a", mods["fomo_ray.a"]) >= {"fomo_ray", "fomo_ray.b"}
    assert imports_of("fomo_ray.b", mods["fomo_ray.b"]) >= {"fomo_ray.a", "ray"}
    assert cycles(graph(mods)) == [["fomo_ray.a", "fomo_ray.b"]]


@pytest.mark.parametrize("limit", [600])
def test_no_module_is_over_the_size_limit(limit):
    big = {p.relative_to(REPO).as_posix(): n for p in modules().values()
           if (n := len(p.read_text().splitlines())) > limit}
    assert not big, f"modules over {limit} lines: {big}"
    assert len((REPO / "fomo_ray" / "core" / "loop.py").read_text().splitlines()) <= 300  # the loop reads in one sitting


# --------------------------------------------------------------------------------------------------- one owner per name
STATUS_WORD = re.compile(r"""["'](finished|failed|stopped|interrupted|pending)["']""")
SCORE_TUPLE = re.compile(r"""["']A_KA["']\s*,\s*["']A_ZS["']\s*,\s*["']GM["']""")
# a file conversion's row status ("failed") is another concept than a trial's: prep/convert_fif.py keeps its own
STATUS_OWNERS = {"fomo_ray/trial_report.py", "fomo_ray/prep/convert_fif.py"}


def test_trial_statuses_and_score_names_are_spelled_in_one_place():
    """Trial statuses come from ``trial_report.TrialStatus`` and the three scores from ``trial_report.SCORES``: a module
    that spells them itself drifts (as ``ReportKind.DONE`` beside a bare ``"finished"`` did)."""
    bare, scores = [], []
    for path in sorted((REPO / "fomo_ray").rglob("*.py")):
        rel, text = path.relative_to(REPO).as_posix(), path.read_text()
        if rel not in STATUS_OWNERS:
            bare += [f"{rel}: {m.group(0)}" for m in STATUS_WORD.finditer(text)]
        if rel != "fomo_ray/trial_report.py":
            scores += [rel for _ in SCORE_TUPLE.finditer(text)]
    assert not bare, "trial statuses spelled outside trial_report.TrialStatus: " + ", ".join(bare)
    assert not scores, "the score names spelled outside trial_report.SCORES: " + ", ".join(scores)


# the string "task" names a task index or a dataset's kind, never the evaluation point (the tables' and reports'
# column is "point": issue 30, item 2). The scopes that may spell it, how often, and what it means there:
TASK_WORD = {
    ("fomo_ray/models/metrics.py", "<module>"): (1, "LEGACY_POINT_COLUMN: the compatibility read of older tables"),
    ("fomo_ray/trial_report.py", "checkpoint_report"): (1, "a checkpoint's cursor: the task index and step"),
    ("fomo_ray/engine/local_run.py", "execute_run"): (1, "FAILED.json: the task index a run diverged in"),
    ("fomo_ray/data/stream.py", "task_rows"): (1, "an error message's word for the task's entries"),
    ("fomo_ray/data/format.py", "DatasetInfo.to_json"): (1, "a dataset's kind (classification / retrieval)"),
    ("fomo_ray/data/format.py", "DatasetInfo.from_json"): (1, "a dataset's kind"),
    ("fomo_ray/data/writer.py", "BenchmarkWriter.add_dataset"): (1, "a dataset's kind"),
    ("fomo_ray/prep/convert_fif.py", "<module>"): (1, "the conversion report's column: a dataset's kind"),
    ("fomo_ray/prep/convert_fif.py", "_summary_row"): (1, "a dataset's kind"),
    ("fomo_ray/prep/convert_fif.py", "_missing_rows"): (1, "a dataset's kind"),
    ("fomo_ray/prep/convert_fif.py", "assemble"): (2, "a dataset's kind"),
    ("fomo_ray/prep/convert_webdataset.py", "assemble_pool"): (1, "a dataset's kind"),
    ("fomo_ray/prep/fifmini.py", "describe"): (1, "a dataset's kind"),
}


def task_words(path: Path) -> dict[str, int]:
    """How often each scope (``<module>``, ``function`` or ``Class.method``) of ``path`` spells the string "task"."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, child.name if scope == "<module>" else f"{scope}.{child.name}")
                continue
            if isinstance(child, ast.Constant) and child.value == "task":
                found[scope] = found.get(scope, 0) + 1
            visit(child, scope)

    visit(ast.parse(path.read_text()), "<module>")
    return found


def test_the_evaluation_point_is_never_called_task_again():
    """A results table, tidy row, summary or eval report that names its evaluation point "task" (a dict key, a column
    list, ``df["task"]``, ``sort_values("task")``) spells the string "task" in a scope not listed in
    :data:`TASK_WORD`, or once more than its entry allows; the word there means a task index or a dataset's kind."""
    from fomo_ray.models.metrics import COLUMNS

    bad = []
    for path in sorted((REPO / "fomo_ray").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for scope, n in task_words(path).items():
            allowed = TASK_WORD.get((rel, scope), (0, ""))[0]
            if n > allowed:
                bad.append(f"{rel} ({scope}): \"task\" {n} time(s), {allowed} allowed")
    assert not bad, ("the string \"task\" outside the scopes where it means a task index or a dataset's kind (the "
                     "evaluation point is \"point\"; add a scope to TASK_WORD only for those meanings):\n"
                     + "\n".join(bad))
    assert "point" in COLUMNS and "task" not in COLUMNS


def test_the_task_word_check_finds_a_table_that_names_its_point_task(tmp_path):
    (tmp_path / "m.py").write_text('ROWS = [{"run": "r", "task": 0}]\n\n\nclass C:\n    def f(self, df):\n'
                                   '        return df.sort_values("task")\n')
    assert task_words(tmp_path / "m.py") == {"<module>": 1, "C.f": 1}
