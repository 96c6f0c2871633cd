"""Imports run one way: no module of kvengine/ imports a module of a higher layer (docs/architecture.md).

Each module is mapped to its layer by its first name under kvengine/ (a package such as `engine`, or a top-level
module such as `config`); modules of one level may import each other. An import under `if TYPE_CHECKING:` is
exempt: it is a type annotation only and never runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvengine

PACKAGE = Path(kvengine.__file__).parent
# Highest first. `kvengine` itself (its __init__) is the public facade over llm.py.
LEVELS: list[set[str]] = [
    {"cli"},
    {"server", "bench", "cluster", "eval"},
    {"llm", "kvengine"},
    {"engine"},
    {"weights"},
    {"models"},
    {"layers"},
    {"accounting"},
    {"tools"},
    {"cache", "config", "batch", "sampling", "structured", "errors"},
]
RANK = {area: len(LEVELS) - i for i, areas in enumerate(LEVELS) for area in areas}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def area(module: str) -> str:
    """The layer name of a dotted kvengine module: `kvengine.engine.runner` -> `engine`, `kvengine` -> itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def is_module(dotted: str, root: Path) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (root / rel).with_suffix(".py").exists() or (root / rel / "__init__.py").exists()


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside an `if TYPE_CHECKING:` block."""
    exempt: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                exempt.update(id(n) for n in ast.walk(stmt))
    return exempt


def imported_modules(tree: ast.AST, root: Path) -> list[tuple[int, str]]:
    """(line, dotted kvengine module) of every import of kvengine code that runs, at any depth."""
    exempt = type_checking_nodes(tree)
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "kvengine"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "kvengine":
                continue
            for alias in node.names:  # `from kvengine import llm` imports the module kvengine.llm
                sub = f"{node.module}.{alias.name}"
                out.append((node.lineno, sub if is_module(sub, root) else node.module))
    return out


def upward_imports(root: Path = PACKAGE) -> list[str]:
    """One line per import from a lower layer to a higher one, e.g. 'kvengine/config.py:212 config -> layers'."""
    found = []
    for path in sorted(root.rglob("*.py")):
        source = area(module_name(path, root))
        for line, target in imported_modules(ast.parse(path.read_text(), str(path)), root):
            if RANK[area(target)] > RANK[source]:
                found.append(f"{path.relative_to(root.parent)}:{line} {source} -> {area(target)}")
    return found


def test_every_area_has_a_level():
    areas = {area(module_name(p, PACKAGE)) for p in PACKAGE.rglob("*.py")}
    assert areas <= set(RANK), f"modules with no layer: {sorted(areas - set(RANK))}; add them to LEVELS"


def test_no_import_runs_upward():
    assert upward_imports() == []


def test_an_upward_import_is_found(tmp_path):
    """The check itself can fail: a lower module importing a higher one (even inside a function) is reported,
    the same import under TYPE_CHECKING is not, and a same-level import is allowed."""
    fake = tmp_path / "kvengine"
    (fake / "engine").mkdir(parents=True)
    (fake / "engine" / "__init__.py").write_text("")
    (fake / "engine" / "config.py").write_text("")
    (fake / "sampling.py").write_text("import kvengine.structured\n")
    (fake / "config.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from kvengine.engine.config import X\n"
        "def f():\n    from kvengine.engine import config\n")
    assert upward_imports(fake) == ["kvengine/config.py:5 config -> engine"]
