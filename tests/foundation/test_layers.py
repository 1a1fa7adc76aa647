"""Imports point one way: config <- selection <- scoring/training <- distributed <- pipeline <- cli."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "edsft"
HEAVY = {"torch", "ray", "transformers", "peft", "deepspeed", "sentence_transformers"}

# For each layer: third-party roots and edsft sub-packages it must NOT import.
UPPER = {"models", "scoring", "training", "distributed", "pipeline", "cli"}
RULES = {
    "config": (HEAVY, UPPER | {"selection", "pools", "annotation", "report"}),
    "storage": (HEAVY, UPPER | {"selection", "pools", "annotation", "report"}),
    "errors": (HEAVY, UPPER | {"config", "storage", "selection", "pools", "annotation", "report"}),
    "selection": (HEAVY | {"pandas", "pyarrow"}, UPPER | {"pools", "annotation", "report"}),
    "pools": (HEAVY, UPPER),
    "annotation": (HEAVY, UPPER),
    "exports": (HEAVY, UPPER | {"annotation"}),
    "console": (HEAVY, UPPER | {"selection", "pools", "annotation", "report"}),
    "compute": (HEAVY | {"pandas"}, UPPER | {"selection", "pools", "annotation", "report"}),
    "report": (HEAVY, UPPER),
    "validate": (HEAVY, UPPER),
    "results": (HEAVY | {"pandas", "pyarrow"}, UPPER | {"config", "storage", "selection", "pools", "annotation", "report"}),
    "models": ({"ray"}, {"distributed", "pipeline", "cli"}),
    "scoring": ({"ray"}, {"distributed", "pipeline", "cli"}),
    "training": ({"ray"}, {"distributed", "pipeline", "cli"}),
    "distributed": (set(), {"pipeline", "cli"}),
    "pipeline": (set(), {"cli"}),
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) for every import, resolving relative ones inside edsft."""
    tree = ast.parse(path.read_text())
    pkg_parts = ["edsft", *path.relative_to(PKG).with_suffix("").parts[:-1]]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import x
                    out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
                    continue
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
    return out


def _violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        layer = _layer(path)
        if layer not in RULES:
            continue
        third, internal = RULES[layer]
        for mod, line in _imports(path):
            root = mod.split(".")[0]
            if root in third:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} layer {layer!r} imports {mod}")
            if root == "edsft" and len(mod.split(".")) > 1 and mod.split(".")[1] in internal:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} layer {layer!r} imports {mod} (upward)")
    return bad


def test_imports_point_one_way():
    assert _violations() == []


def test_checker_catches_a_violation(tmp_path, monkeypatch):
    """The checker itself must fail on a bad import (a guard that cannot fail guards nothing)."""
    fake = tmp_path / "edsft"
    (fake / "selection").mkdir(parents=True)
    (fake / "selection" / "bad.py").write_text("import torch\nfrom ..distributed import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    found = _violations()
    assert len(found) == 2 and "torch" in found[0] and "upward" in found[1]


@pytest.mark.parametrize("module", ["edsft.config", "edsft.storage", "edsft.selection", "edsft.annotation", "edsft.cli"])
def test_light_modules_do_not_load_torch_or_ray(module):
    code = (
        f"import {module}, sys; heavy = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(HEAVY)!r}); "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing {module} loaded {out}"
