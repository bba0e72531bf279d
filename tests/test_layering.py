"""The package's layering holds by construction: read every module's imports (``ast``, nothing is
imported) and check that there is no import cycle, that no lower layer imports a higher one, and that
nothing outside ``slm_app/engines/`` asks which engine it got (``isinstance`` on an engine type).

Layers, lowest first (docs/architecture.md explains each): a module may import its own layer and the
ones below it, never one above. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "slm_app"

LAYERS: list[tuple[str, ...]] = [
    ("slm_app", "slm_app.errors", "slm_app.memory", "slm_app.presets"),
    ("slm_app.settings", "slm_app.memory_fit", "slm_app.metrics", "slm_app.sampling", "slm_app.backends",
     "slm_app.provisioning"),
    ("slm_app.admission", "slm_app.prefix_cache", "slm_app.scheduler", "slm_app.finetune.serving"),
    ("slm_app.structured",),
    ("slm_app.engines",),
    ("slm_app.service",),
    ("slm_app.conversation", "slm_app.tools", "slm_app.evaluate", "slm_app.feedback", "slm_app.finetune"),
    ("slm_app.api", "slm_app.ui"),
    ("slm_app.server", "slm_app.prepare"),
]
ENGINE_TYPES = {"Engine", "LocalEngine", "RemoteEngine"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer of the longest prefix of ``module`` that ``LAYERS`` names."""
    best, found = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            # "slm_app" itself is the package's __init__ only, not a catch-all.
            if (module == name or (name != "slm_app" and module.startswith(name + "."))) and len(name) > best:
                best, found = len(name), i
    if found is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in {Path(__file__).name}")
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str) -> set[str]:
    """slm_app modules ``module`` imports at run time (anywhere in the file, functions included;
    ``if TYPE_CHECKING:`` blocks excluded: they never run)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _type_checking_only(block)
            for stmt in block.body for n in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            # "from pkg import sub" imports the submodule when there is one, else a name of pkg.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # "import a.b.c" of a name inside a module
                name = name.rpartition(".")[0]
            if name.startswith("slm_app") and name != module:
                found.add(name)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer_and_none_imports_a_higher_one() -> None:
    upward = [f"{m} (layer {layer_of(m)}) imports {dep} (layer {layer_of(dep)})"
              for m, deps in GRAPH.items() for dep in sorted(deps) if layer_of(dep) > layer_of(m)]
    assert not upward, "lower layers import higher ones:\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(GRAPH[m]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [m, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_only_the_engine_package_asks_which_engine_it_got() -> None:
    """Callers ask an engine's ``capabilities``; its type is the engine package's business."""
    offenders = []
    for module, path in MODULES.items():
        if module.startswith("slm_app.engines"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                    "isinstance", "issubclass") and len(node.args) == 2:
                kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                named = {k.id if isinstance(k, ast.Name) else k.attr if isinstance(k, ast.Attribute) else ""
                         for k in kinds}
                if named & ENGINE_TYPES:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "isinstance on engine types outside slm_app/engines/: " + ", ".join(offenders)


@pytest.mark.parametrize("module", ["slm_app.service", "slm_app.api.openai.serving", "slm_app.ui.app"])
def test_surfaces_reach_engines_only_through_the_interface(module: str) -> None:
    """The service and the surfaces above it import no concrete engine (local or remote)."""
    concrete = {m for m in GRAPH[module] if m.startswith(("slm_app.engines.local", "slm_app.engines.remote"))}
    assert not concrete, f"{module} imports {sorted(concrete)}"
