"""The shape of the code base, read from the source with `ast` (nothing is imported or run).

Layers, lowest first: `flows/core` (plain typed logic, no Prefect) -> `flows/tasks` -> `flows/*.py` (the
flows) -> `deployments`; `blocks` sits beside core. A module imports only from its own layer or below, no
module reaches into another's private names, flows/core has no import cycle, and no flows/core module
grows past the size a newcomer can read in one sitting.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYERED = ("flows", "blocks", "deployments")
#: where private-name imports are looked for as well (they import the layered code)
ALSO_READ = ("tests", "bench")
MAX_CORE_LINES = 450


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted (for `from a import b`: "a" and "a.b" are both candidates)
    names: tuple[str, ...]  # for `from a import x, y`: ("x", "y"); empty for `import a`
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(*tops: str) -> Iterator[Path]:
    for top in tops:
        yield from sorted((REPO_ROOT / top).rglob("*.py"))


def resolve(module: str, path: Path, level: int, name: str | None) -> str:
    """The absolute module of a (possibly relative) `from ... import`."""
    if level == 0:
        return name or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(path: Path) -> list[Import]:
    module = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(Import(module, alias.name, (), node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, path, node.level, node.module)
            found.append(Import(module, target, tuple(a.name for a in node.names), node.lineno))
    return found


def imported_modules(imp: Import, known: set[str]) -> set[str]:
    """Every module of ours an import statement loads (`from a import b` loads a.b when that is a module)."""
    mods = {imp.target}
    mods |= {f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in known}
    return mods


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sources(*LAYERED)}


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "deployments":
        return "deployments"
    if parts[0] == "blocks":
        return "blocks"
    if parts[0] != "flows":
        return None
    if len(parts) > 1 and parts[1] == "core":
        return "core"
    if len(parts) > 1 and parts[1] == "tasks":
        return "tasks"
    return "flows" if len(parts) > 1 else "package"


def layer_violations(source_layer: str, forbidden: set[str]) -> list[str]:
    known = set(all_modules())
    bad = []
    for mod, path in all_modules().items():
        if layer(mod) != source_layer:
            continue
        for imp in imports_of(path):
            for target in imported_modules(imp, known):
                ours = layer(target)
                if ours in forbidden or (ours is None and target.split(".")[0] in forbidden):
                    bad.append(f"{path.relative_to(REPO_ROOT)}:{imp.line} imports {target}")
    return sorted(set(bad))


def test_core_imports_no_prefect_and_nothing_above_it() -> None:
    """flows/core is plain typed logic: no Prefect, no task, flow or deployment module."""
    assert layer_violations("core", {"prefect", "tasks", "flows", "deployments"}) == []


def test_tasks_import_no_flow_module_and_no_deployment() -> None:
    assert layer_violations("tasks", {"flows", "deployments"}) == []


def test_flows_import_no_deployment() -> None:
    assert layer_violations("flows", {"deployments"}) == []


def test_the_cli_gets_its_rows_from_core_and_blocks_not_from_a_flow_module() -> None:
    """`dbops backups list` and the list-backups flow share flows.core.listing; the CLI imports no flow.
    (A task module's plain function is fine: `dbops health` runs the same inspection as the flow's task.)"""
    known = set(all_modules())
    cli = REPO_ROOT / "deployments" / "cli.py"
    flows_imported = sorted(
        target
        for imp in imports_of(cli)
        for target in imported_modules(imp, known)
        if layer(target) == "flows"
    )
    assert flows_imported == []


def test_blocks_import_no_task_flow_or_deployment() -> None:
    assert layer_violations("blocks", {"tasks", "flows", "deployments"}) == []


def private_uses(path: Path) -> list[str]:
    """`from x import _name` from another module, and `module._name` on an imported module."""
    module = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    modules_bound: set[str] = set()  # local names bound to an imported module of ours
    ours = set(all_modules()) | {module_name(p) for p in sources(*ALSO_READ)}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = resolve(module, path, node.level, node.module)
            for alias in node.names:
                if f"{target}.{alias.name}" in ours:
                    modules_bound.add(alias.asname or alias.name)
                elif is_private(alias.name) and target != module:
                    bad.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports {target}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ours or alias.name.split(".")[0] in (*LAYERED, *ALSO_READ):
                    modules_bound.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            base = node.value
            dotted = []
            while isinstance(base, ast.Attribute):
                dotted.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules_bound:
                name = ".".join([base.id, *reversed(dotted), node.attr])
                bad.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} uses {name}")
    return bad


def test_no_module_imports_a_private_name_of_another_module() -> None:
    bad = [use for path in sources(*LAYERED, *ALSO_READ) for use in private_uses(path)]
    assert bad == [], "\n".join(bad)


def core_graph() -> dict[str, set[str]]:
    modules = all_modules()
    core = {m for m in modules if layer(m) == "core"}
    graph: dict[str, set[str]] = {}
    for mod in core:
        edges: set[str] = set()
        for imp in imports_of(modules[mod]):
            edges |= {t for t in imported_modules(imp, set(modules)) if t in core and t != mod}
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_flows_core_has_no_import_cycle() -> None:
    """A package's __init__ importing its own submodules is not a cycle of two jobs; anything else is."""
    graph = core_graph()
    for mod in graph:  # a package and its submodules: parent -> child edges are how packages load
        graph[mod] = {t for t in graph[mod] if not t.startswith(mod + ".")}
    assert find_cycle(graph) is None


def test_find_cycle_sees_a_cycle() -> None:
    """The cycle finder itself: a test of the test, so an empty answer above means something."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "path",
    sorted((REPO_ROOT / "flows" / "core").rglob("*.py")),
    ids=lambda p: str(p.relative_to(REPO_ROOT)),
)
def test_no_core_module_is_over_450_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_CORE_LINES, f"{path.name} has {lines} lines: split it by job"
