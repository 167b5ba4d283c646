"""Imports run down the layers only: train.py → stages → evaluation → pl_modules → datamodules →
foundation. Every import counts: module level, inside functions, under TYPE_CHECKING, and
``importlib.import_module`` / ``__import__`` with a literal name."""
import ast
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.unit

LAYERS = ["foundation", "datamodules", "pl_modules", "evaluation", "stages", "train"]


def imported_names(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            yield node.lineno, node.args[0].value


def upward_imports(root: Path = ROOT) -> list[str]:
    found = []
    for layer, package in enumerate(LAYERS):
        files = [root / "train.py"] if package == "train" else sorted((root / package).rglob("*.py"))
        for path in files:
            for line, name in imported_names(ast.parse(path.read_text(), str(path))):
                top = name.split(".")[0]
                if top in LAYERS and LAYERS.index(top) > layer:
                    found.append(f"{path.relative_to(root)}:{line} imports {name}")
    return found


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports() == []


def test_the_check_sees_function_level_type_checking_and_importlib_imports(tmp_path):
    for package in LAYERS[:-1]:
        (tmp_path / package).mkdir()
    (tmp_path / "train.py").write_text("import stages\n")
    (tmp_path / "pl_modules" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from stages.x import Y\n"
        "def f():\n    from evaluation import metrics\n    import importlib\n"
        "    return importlib.import_module('stages.registry')\n")
    (tmp_path / "foundation" / "b.py").write_text("__import__('datamodules')\n")
    assert upward_imports(tmp_path) == [
        "foundation/b.py:1 imports datamodules",
        "pl_modules/a.py:3 imports stages.x", "pl_modules/a.py:5 imports evaluation",
        "pl_modules/a.py:7 imports stages.registry"]
