"""The shape of the code: `utils/` in layers whose imports only point down, no import cycles, and top-level scripts
that share code through `utils/` rather than importing each other (README, "How the code is organised")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The layer of each part of utils/ (a package prefix or a module). A module may import its own layer and below.
LAYERS = {
    "utils.core": 0,
    "utils.runtime": 1, "utils.prompter": 1, "utils.llm": 1, "utils.compat": 1,
    "utils.model": 2, "utils.data": 2,
    "utils.training": 3, "utils.generation": 3,
    "utils.evaluation": 4, "utils.builder": 4,
    "utils.tiny_base": 5,  # the `python -m utils.tiny_base` tool: builds models, may use anything
}
SCRIPTS = sorted(path.stem for path in REPO.glob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int | None:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def imports(path: Path) -> set[str]:
    """The project modules `path` imports (utils.* and top-level scripts), wherever in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] == "utils" and name != "utils" or name in SCRIPTS:
                found.add(name)
    return found


def project_modules() -> dict[str, Path]:
    files = sorted((REPO / "utils").rglob("*.py")) + sorted(REPO.glob("*.py"))
    return {module_name(path): path for path in files}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """`utils.model.checks.check_adapter` -> `utils.model.checks` (the longest prefix that is a module)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def test_every_utils_module_has_a_layer():
    missing = [name for name in project_modules() if name.startswith("utils.") and layer(name) is None]
    assert not missing, f"give these modules a layer in tests/test_layout.py LAYERS: {missing}"


def test_utils_imports_only_point_down():
    modules = project_modules()
    upward = []
    for name, path in modules.items():
        if not name.startswith("utils."):
            continue
        for imported in imports(path):
            target = resolve(imported, modules)
            if target is None or target in SCRIPTS:
                upward += [f"{name} imports the script {imported}"] if imported in SCRIPTS else []
                continue
            if layer(target) > layer(name):
                upward.append(f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})")
    assert not upward, "imports must point down:\n" + "\n".join(upward)


def test_scripts_do_not_import_each_other():
    modules = project_modules()
    crossing = [f"{script}.py imports {imported}" for script in SCRIPTS
                for imported in imports(modules[script]) if imported.split(".")[0] in SCRIPTS]
    assert not crossing, "what two scripts share belongs in utils/:\n" + "\n".join(crossing)


def test_no_import_cycles():
    modules = project_modules()
    graph = {name: {target for imported in imports(path) if (target := resolve(imported, modules))
                    and target != name and modules[target].name != "__init__.py"}
             for name, path in modules.items()}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> None:
        if node in done:
            return
        if node in visiting:
            cycle = visiting[visiting.index(node):] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            visit(target)
        visiting.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


@pytest.mark.parametrize("script", ["finetune", "infer", "infer_literature", "generate", "evaluate", "build_dataset"])
def test_scripts_that_train_or_answer_import_utils_before_anything_that_loads_torch(script):
    """utils/__init__.py makes OpenMP's threads wait passively (a busy CPU: 6.4 s a step spinning, 0.24 s passive);
    OpenMP reads that when torch loads, so nothing before the script's first utils import may load torch."""
    import sys

    tree = ast.parse((REPO / f"{script}.py").read_text(encoding="utf-8"))
    before = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(name.split(".")[0] == "utils" for name in names):
                break
            before += [name for name in names if name.split(".")[0] not in sys.stdlib_module_names]
    assert before == [], f"{script}.py imports {before} before utils"


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise(monkeypatch):
    import importlib
    import os

    import utils

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    importlib.reload(utils)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    importlib.reload(utils)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
