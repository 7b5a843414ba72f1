"""athooks' modules import in one direction, without cycles, and use only each other's public names.

The layers, bottom to top (a module may import its own layer and those below, never above):

errors, version -> checks, specs, tensors, context, _compile, teacher -> layers, models, schedules ->
hookspecs -> registry -> mappings -> losses -> builtins, plugin | taps | discovery -> step, plan ->
distiller -> viz, lightning, demo -> cli -> athooks

Every import statement counts, also one inside a function (a lazy import is still a
dependency). The built-in plugin is loaded by the registry by name (``importlib``), so that the
registry knows no loss or mapping type.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "athooks"

LAYERS: list[tuple[str, ...]] = [
    ("athooks.errors", "athooks.version"),
    (
        "athooks.checks",
        "athooks.specs",
        "athooks.tensors",
        "athooks.context",
        "athooks._compile",
        "athooks.connectors",
        "athooks.teacher",
    ),
    ("athooks.layers", "athooks.models", "athooks.schedules"),
    ("athooks.geometry",),
    ("athooks.hookspecs",),
    ("athooks.registry",),
    ("athooks.mappings",),
    ("athooks.losses.base",),
    (
        "athooks.losses.at",
        "athooks.losses.kd",
        "athooks.losses.fact",
        "athooks.losses.gradient",
        "athooks.losses.lossset",
    ),
    ("athooks.losses",),
    ("athooks.builtins", "athooks.plugin", "athooks.taps", "athooks.discovery"),
    ("athooks.step", "athooks.plan"),
    ("athooks.distiller",),
    (
        "athooks.viz",
        "athooks.lightning",
        "athooks.demo.data",
        "athooks.demo.figure",
        "athooks.demo.run",
        "athooks.demo",
    ),
    ("athooks.cli",),
    ("athooks",),
]
RANK = {module: rank for rank, names in enumerate(LAYERS) for module in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, names imported from it, line)`` for every athooks import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "athooks":
                    found.append((alias.name, [], node.lineno))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "athooks"
        ):
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


def target(module: str, name: str, known: dict[str, Path]) -> str:
    """The module an ``from module import name`` depends on (a submodule when it is one)."""
    sub = f"{module}.{name}"
    return sub if sub in known else module


def test_every_module_has_a_layer():
    missing = sorted(set(modules()) - set(RANK))
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


def dependencies() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        deps: set[str] = set()
        for module, names, _ in imports(path):
            for item in names or [""]:
                dep = target(module, item, known) if item else module
                if dep != name:
                    deps.add(dep)
        graph[name] = deps
    return graph


def test_no_module_imports_upwards():
    known = modules()
    wrong = []
    for name, path in known.items():
        for module, names, line in imports(path):
            for item in names or [""]:
                dep = target(module, item, known) if item else module
                if dep in RANK and RANK[dep] > RANK[name]:
                    wrong.append(f"{name}:{line} imports {dep} (a higher layer)")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = dependencies()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    known = modules()
    wrong = []
    for name, path in known.items():
        for module, names, line in imports(path):
            for item in names:
                if item.startswith("_") and not item.startswith("__"):
                    wrong.append(f"{name}:{line} imports {module}.{item}")
            if module.split(".")[-1].startswith("_") and module != name:
                wrong.append(f"{name}:{line} imports the private module {module}")
    # the one private helper module, shared on purpose, is athooks._compile
    wrong = [w for w in wrong if "athooks._compile" not in w]
    assert not wrong, "\n".join(wrong)


def test_no_module_reads_another_modules_private_attributes():
    """``import athooks.x`` then ``athooks.x._y`` is a private import too."""
    wrong = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__"):
                continue
            text = ast.unparse(node.value)
            if text.startswith("athooks") and text != name:
                wrong.append(f"{name}:{node.lineno} reads {text}.{node.attr}")
    assert not wrong, "\n".join(wrong)
