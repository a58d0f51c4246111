"""agent/ is grouped by job and its imports point one way (tests/support/layers.py has the rules).

The checker is proven on a copy of the tree with one fixture module added that breaks a rule:
the real tree is never broken to show that the test can fail.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from support.layers import layer, violations

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def test_the_tree_imports_one_way_without_circles() -> None:
    assert violations(ROOT) == []


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for top in ("agent", "drivers", "simulator"):
        shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_an_upward_import_is_caught(tree: Path) -> None:
    (tree / "agent" / "store" / "upward.py").write_text(
        '"""Fixture: the buffer side reaching up into the wiring."""\n\n'
        "from agent.service.runtime import Agent\n")
    found = violations(tree)
    assert len(found) == 1
    assert found[0].startswith("agent/store/upward.py:3: agent.store.upward imports agent.service.runtime: upward")


def test_a_sideways_import_and_a_hidden_circle_are_caught(tree: Path) -> None:
    (tree / "agent" / "uplink" / "sideways.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from agent.poller import LinkWorker\n")
    (tree / "agent" / "uplink" / "ring_a.py").write_text("from agent.uplink import ring_b\n")
    (tree / "agent" / "uplink" / "ring_b.py").write_text("def f() -> None:\n    from agent.uplink import ring_a\n")
    found = violations(tree)
    assert any(f.startswith("agent/uplink/sideways.py:4:") and "sideways" in f for f in found), found
    assert "import circle: agent.uplink.ring_a -> agent.uplink.ring_b -> agent.uplink.ring_a" in found
    assert len(found) == 2


def test_drivers_never_import_the_agent(tree: Path) -> None:
    (tree / "drivers" / "leak.py").write_text("import agent.config\n")
    assert violations(tree) == ["drivers/leak.py:1: drivers.leak imports agent.config: "
                                "drivers/ imports nothing of agent/ or simulator/"]


def test_every_agent_module_belongs_to_a_layer_and_every_package_says_what_it_owns() -> None:
    for path in (ROOT / "agent").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        assert layer(".".join(parts)) is not None, path
    for init in (ROOT / "agent").glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and "Owns:" in doc and "May import:" in doc, f"{init}: say what it owns and may import"


def test_modules_and_functions_stay_small() -> None:
    too_big = []
    for top in ("agent", "drivers", "simulator"):
        for path in (ROOT / top).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if len(text.splitlines()) > MAX_MODULE_LINES:
                too_big.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = (node.end_lineno or node.lineno) - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        too_big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}(): {n} lines")
    assert too_big == []
