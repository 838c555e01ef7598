"""The package's layout (docs/design.md "Layout"): every module sits in one tier, imports flow from
stages to components to foundations, stages do not import each other, and nothing imports in a loop.
Read with ast, so imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vaedyn_cli"

FOUNDATIONS = {
    "errors", "config", "artifacts", "faults", "randomness", "hooks", "anatomy", "settings", "labels",
}
COMPONENTS = {
    "model", "data", "store", "store.schema", "store.metadata", "store.reader", "store.writer", "store.info",
    "store.classification", "kernels", "probes", "tracker", "persistence", "classification", "selection",
    "strategies", "live_nudge", "metrics", "loss", "trainer", "ablation", "lens", "grids", "tb", "report_data",
    "figures", "pages", "seedstats", "study_plan", "study_results", "study_report",
}
STAGES = {"train", "track", "classify", "nudge", "evaluate", "compare", "report"}
ORCHESTRATION = {"study", "study_exec"}  # `vaedyn study` runs the other stages
ENTRY = {"", "__main__", "cli"}  # the package itself, `python -m vaedyn_cli` and the CLI call the stages
TIERS = [FOUNDATIONS, COMPONENTS, STAGES, ORCHESTRATION, ENTRY]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
        found[rel.removesuffix("__init__").rstrip(".")] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports (relative to the package: `store.reader`, `config`)."""
    out = set()
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".") if name else []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("vaedyn_cli"):
                base = node.module.removeprefix("vaedyn_cli").lstrip(".")
            else:
                continue
            candidates = [base] + [f"{base}.{a.name}".lstrip(".") for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name.removeprefix("vaedyn_cli").lstrip(".") for a in node.names
                          if a.name.startswith("vaedyn_cli")]
        else:
            continue
        out |= {c for c in candidates if c in known and c != name and c != ""}
    return out


def _tier(name: str) -> int:
    hits = [i for i, tier in enumerate(TIERS) if name in tier]
    assert len(hits) == 1, f"module {name!r} belongs to {len(hits)} tiers: place it in one of TIERS (docs/design.md)"
    return hits[0]


def _problems(modules: dict[str, Path]) -> list[str]:
    """Imports that go up a tier, and stages importing stages."""
    problems = []
    for name, path in sorted(modules.items()):
        tier = _tier(name)
        for dep in sorted(_imports(name, path, set(modules))):
            dep_tier = _tier(dep)
            if dep_tier > tier:
                problems.append(f"{name} (tier {tier}) imports {dep} (tier {dep_tier})")
            elif dep_tier == tier == 2:
                problems.append(f"stage {name} imports stage {dep}")
    return problems


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import loop of the graph, as the path that closes it (empty when there is none)."""
    done: set[str] = set()

    def walk(node: str, trail: list[str]) -> list[str]:
        if node in trail:
            return [*trail[trail.index(node):], node]
        if node in done:
            return []
        for dep in sorted(graph[node]):
            found = walk(dep, [*trail, node])
            if found:
                return found
        done.add(node)
        return []

    for name in sorted(graph):
        found = walk(name, [])
        if found:
            return found
    return []


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_tier_and_imports_only_downwards() -> None:
    problems = _problems(_modules())
    assert not problems, "\n".join(problems)


def test_no_import_circle() -> None:
    assert _cycle(_graph(_modules())) == []


def test_the_layout_check_finds_a_planted_upward_import_and_loop(tmp_path: Path, monkeypatch) -> None:
    """The check itself: a foundation importing a stage inside a function is an upward import and,
    with the stage importing it back, a loop."""
    pkg = tmp_path / "vaedyn_cli"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from vaedyn_cli import train\n")
    (pkg / "train.py").write_text("from vaedyn_cli.config import f\n")
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    modules = _modules()
    assert _problems(modules) == ["config (tier 0) imports train (tier 2)"]
    assert _cycle(_graph(modules)) == ["config", "train", "config"]
