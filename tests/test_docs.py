"""The docs are a contract: their examples and rules are checked here."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from butlerfs.layout import dataset_path

DOCS = Path(__file__).parent.parent / "docs"
PACKAGE = Path(__file__).parent.parent / "butlerfs"


def _example_rows() -> list[list[str]]:
    text = (DOCS / "SEMANTICS.md").read_text()
    block = text.split("<!-- examples:", 1)[1].split("<!-- /examples -->", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("|")][2:]  # skip header and rule
    return [[cell.strip().strip("`") for cell in row.strip("|").split("|")] for row in rows]


def test_semantics_examples_match_the_layout():
    rows = _example_rows()
    assert len(rows) >= 8
    for dataset_type, data_id, component, extension, path in rows:
        items = list(json.loads(data_id).items())
        assert dataset_path(dataset_type, items, extension, component or None) == path
        assert re.fullmatch(r"[A-Za-z0-9._/-]+", path), path


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_design_import_rules():
    """docs/DESIGN.md: one module per outside dependency."""
    rules = {
        "mfusepy": {"fuse_ops.py"},
        "lsst.daf.butler": {"registry.py", "demo.py", "formatter.py"},
        "boto3": {"remote.py"},
        "botocore": {"remote.py"},
    }
    for module in PACKAGE.glob("*.py"):
        imported = _imports(module)
        for dependency, allowed in rules.items():
            uses = any(name == dependency or name.startswith(dependency + ".") for name in imported)
            if uses:
                assert module.name in allowed, f"{module.name} imports {dependency}: see docs/DESIGN.md"
