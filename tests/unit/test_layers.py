"""Imports run down the layers only: train.py → stages → evaluation → pl_modules → datamodules →
foundation; inside ``pl_modules`` the method groups import only what they may (``GROUP_IMPORTS``);
and no module imports itself back through a chain (a cycle). Every import counts: module level,
inside functions, under TYPE_CHECKING, relative ones, and ``importlib.import_module`` /
``__import__`` with a literal name."""
import ast
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.unit

LAYERS = ["foundation", "datamodules", "pl_modules", "evaluation", "stages", "train"]
GROUP_IMPORTS = {
    "core": set(), "prior": set(), "scoring": {"core", "prior"},
    "llicm": {"core", "prior", "scoring"}, "difficmh": {"core", "prior", "scoring"},
    "vlic": {"core", "prior", "scoring", "llicm", "difficmh"},
}
"""Which ``pl_modules`` groups each group may import; ``finals.py`` and ``codec_io.py`` may import any."""


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, module: str, is_package: bool):
    """(line, absolute module name) of every import in a module's tree, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)] if package else []
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            for alias in node.names:
                # `from a import b` may name the module a.b; the cycle check resolves which.
                yield node.lineno, f"{parent}.{alias.name}" if alias.name != "*" else parent
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            yield node.lineno, node.args[0].value


def project_imports(root: Path):
    """{module: (path, [(line, imported name)])} over train.py and every layer's package."""
    found = {}
    for package in LAYERS:
        files = [root / "train.py"] if package == "train" else sorted((root / package).rglob("*.py"))
        for path in files:
            if not path.is_file():
                continue
            name = module_name(path, root)
            found[name] = (path, list(imported_names(ast.parse(path.read_text(), str(path)), name,
                                                     path.name == "__init__.py")))
    return found


def upward_imports(root: Path = ROOT) -> list[str]:
    found = []
    for module, (path, names) in project_imports(root).items():
        layer = LAYERS.index(module.split(".")[0])
        for line, name in names:
            top = name.split(".")[0]
            if top in LAYERS and LAYERS.index(top) > layer:
                found.append(f"{path.relative_to(root)}:{line} imports {name}")
    return found


def group_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "pl_modules" and parts[1] in GROUP_IMPORTS else None


def group_violations(root: Path = ROOT) -> list[str]:
    found = []
    for module, (path, names) in project_imports(root).items():
        group = group_of(module)
        if group is None:
            continue
        for line, name in names:
            parts = name.split(".")
            if parts[0] != "pl_modules":
                continue
            target = parts[1] if len(parts) > 1 else None
            if target == group:
                continue
            if target not in GROUP_IMPORTS[group]:
                found.append(f"{path.relative_to(root)}:{line} ({group}) imports {name}")
    return found


def import_cycles(root: Path = ROOT) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    modules = project_imports(root)
    graph = {}
    for module, (_, names) in modules.items():
        targets = set()
        for _, name in names:
            while name and name not in modules:  # `from a import b` where b is an attribute of a
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
        graph[module] = targets
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports() == []


def test_method_groups_import_only_what_they_may():
    assert group_violations() == []


def test_no_import_cycle():
    assert import_cycles() == []


def write_tree(root: Path, files: dict[str, str]) -> None:
    for package in LAYERS[:-1]:
        (root / package).mkdir(exist_ok=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_check_sees_function_level_type_checking_and_importlib_imports(tmp_path):
    write_tree(tmp_path, {
        "train.py": "import stages\n",
        "pl_modules/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from stages.x import Y\n"
                           "def f():\n    from evaluation import metrics\n    import importlib\n"
                           "    return importlib.import_module('stages.registry')\n",
        "foundation/b.py": "__import__('datamodules')\n"})
    assert upward_imports(tmp_path) == [
        "foundation/b.py:1 imports datamodules",
        "pl_modules/a.py:3 imports stages.x.Y", "pl_modules/a.py:5 imports evaluation.metrics",
        "pl_modules/a.py:7 imports stages.registry"]


def test_the_group_check_resolves_relative_imports(tmp_path):
    write_tree(tmp_path, {
        "pl_modules/core/__init__.py": "", "pl_modules/core/base.py": "from ..prior import presets\n",
        "pl_modules/prior/__init__.py": "", "pl_modules/prior/presets.py": "",
        "pl_modules/llicm/__init__.py": "",
        "pl_modules/llicm/module.py": "from . import losses\nfrom ..difficmh.module import X\nfrom ..core import base\n",
        "pl_modules/llicm/losses.py": "",
        "pl_modules/difficmh/__init__.py": "", "pl_modules/difficmh/module.py": "from pl_modules.llicm import module\n",
        "pl_modules/finals.py": "from pl_modules.llicm import module\n",
        "datamodules/x.py": "from ..pl_modules import finals\n"})
    assert group_violations(tmp_path) == [
        "pl_modules/core/base.py:1 (core) imports pl_modules.prior.presets",
        "pl_modules/difficmh/module.py:1 (difficmh) imports pl_modules.llicm.module",
        "pl_modules/llicm/module.py:2 (llicm) imports pl_modules.difficmh.module.X"]
    assert upward_imports(tmp_path) == ["datamodules/x.py:1 imports pl_modules.finals"]


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    write_tree(tmp_path, {
        "pl_modules/prior/__init__.py": "",
        "pl_modules/prior/presets.py": "from pl_modules.prior import trained\n",
        "pl_modules/prior/trained.py": "def f():\n    from .presets import root\n",
        "foundation/a.py": "import foundation.b\n", "foundation/b.py": "x = 1\n"})
    assert import_cycles(tmp_path) == [["pl_modules.prior.presets", "pl_modules.prior.trained"]]
