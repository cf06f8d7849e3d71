"""The package layout keeps its rules: docs/architecture.md's list of layers, read here, is the dependency order;
every import of the package (inside functions too) goes from a later layer to an earlier one or within one,
with no cycle and no private name taken from another module; `--help` and `import hybridprune` cost no
torch; every declared name has its registered object."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "hybridprune"


def readme_layers(text: str) -> list[list[str]]:
    """docs/architecture.md's list of layers: for each numbered item, the backticked names before its first colon."""
    section = text.split("# Architecture", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^\d+\. (.+?(?:\n   .+?)*)$", section, re.M)
    return [re.findall(r"`([\w.]+)`", item.split(":", 1)[0]) for item in items]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(name: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) of every hybridprune import in `path`, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("hybridprune")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if node.module else package
            if base.startswith("hybridprune"):
                found += [(base, a.name, node.lineno) for a in node.names]
    return found


def layer_of(module: str, layers: list[list[str]]) -> int:
    """Index of the layer holding `module` (a layer names top-level modules or packages of hybridprune)."""
    short = module.removeprefix("hybridprune").lstrip(".") or "hybridprune"
    top = short.split(".")[0]
    for i, names in enumerate(layers):
        if short in names or top in names:
            return i
    raise AssertionError(f"{module} is in no layer of the README's architecture list")


def import_graph() -> dict[str, list[tuple[str, str | None, int]]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = []
        for target, imported, line in imports_of(name, path):
            sub = f"{target}.{imported}" if imported else None
            dest = sub if sub in modules else target
            edges.append((dest, imported if dest == target else None, line))
        graph[name] = edges
    return graph


def cycles(graph: dict[str, list[tuple[str, str | None, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _, _ in graph.get(v, []):
            if w not in graph or w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer_violations(graph: dict, layers: list[list[str]]) -> list[str]:
    bad = []
    for module, edges in graph.items():
        for dest, _, line in edges:
            if layer_of(dest, layers) > layer_of(module, layers):
                bad.append(f"{module}:{line} imports {dest}, a later layer")
    return bad


def test_the_readme_lists_every_package_in_layers():
    layers = readme_layers((ROOT / "docs" / "architecture.md").read_text())
    assert len(layers) >= 8 and all(layers), layers
    tops = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    named = {n for names in layers for n in names}
    assert tops - {"__init__", "__main__"} <= named, f"not in the README's layers: {tops - named}"


def test_imports_follow_the_layers_with_no_cycle():
    layers = readme_layers((ROOT / "docs" / "architecture.md").read_text())
    graph = import_graph()
    assert cycles(graph) == []
    assert layer_violations(graph, layers) == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    layers = [["errors", "config"], ["pruning"], ["cli"]]
    graph = {
        "hybridprune.config": [("hybridprune.pruning.nm", "x", 3)],  # core reaching up into pruning
        "hybridprune.pruning.nm": [("hybridprune.pruning.plan", "y", 4)],
        "hybridprune.pruning.plan": [("hybridprune.pruning.nm", "z", 5)],  # and a cycle
    }
    assert cycles(graph) == [["hybridprune.pruning.nm", "hybridprune.pruning.plan"]]
    assert layer_violations(graph, layers) == ["hybridprune.config:3 imports hybridprune.pruning.nm, a later layer"]


def test_no_module_test_or_benchmark_imports_a_private_name_of_another():
    graph = import_graph()
    private = [f"{m}:{line} imports {dest}.{name}" for m, edges in graph.items() for dest, name, line in edges
               if name and name.startswith("_") and not name.startswith("__")]  # fmt: skip
    for folder in ("tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for target, name, line in imports_of("x", path):
                if name and name.startswith("_") and not name.startswith("__"):
                    private.append(f"{path.name}:{line} imports {target}.{name}")
    assert private == []


@pytest.mark.parametrize("command", [[], ["run"], ["prune"], ["bench"], ["export"], ["experiment"], ["report"]])
def test_help_and_import_cost_no_torch(command):
    code = (
        "import sys, hybridprune\n"
        "from hybridprune.cli import main\n"
        f"try: main({command + ['--help']!r})\n"
        "except SystemExit: pass\n"
        "print('torch' in sys.modules, 'torch_pruning' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_the_public_api_resolves_lazily():
    import hybridprune as hp

    for name in hp.__all__:
        assert getattr(hp, name) is not None, name
    with pytest.raises(AttributeError):
        hp.no_such_name  # noqa: B018


def test_every_declared_name_has_its_object():
    from hybridprune import config
    from hybridprune.data.formats import DATASETS
    from hybridprune.models.sources import MODELS
    from hybridprune.pruning.metrics import METRICS

    for registry, declared in ((METRICS, config.METRIC_NAMES), (MODELS, config.BUILTIN_MODELS),
                               (DATASETS, config.DATASET_NAMES)):  # fmt: skip
        assert registry.missing() == [] and registry.names() == list(declared)
    with pytest.raises(KeyError, match="not declared"):
        METRICS.register("undeclared")


def defined_names(path: Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assigned names), not those it imports."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def test_every_name_is_imported_from_its_one_home():
    """No module re-exports another's names for others to import: each import names the module that defines it
    (the package's lazy `__init__` aside), so a concept has one home."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    defined = {name: defined_names(path) for name, path in modules.items()}
    stray = []
    for folder in (PACKAGE, ROOT / "tests", ROOT / "benchmarks"):
        for path in folder.rglob("*.py"):
            for target, name, line in imports_of(module_name(path) if folder == PACKAGE else "x", path):
                if target in modules and target != "hybridprune" and name and f"{target}.{name}" not in modules:
                    if name not in defined[target]:
                        stray.append(f"{path.relative_to(ROOT)}:{line} imports {name} from {target}")
    assert stray == []
