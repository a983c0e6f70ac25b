"""The package's layout keeps its imports in one direction: no two of shmfeed's modules
import each other (at module level or inside a function), except under TYPE_CHECKING.

A cycle is how the fork server, the pool and the supervisor used to be tied (each
imported another inside a function); it makes a module impossible to read, test or move
on its own.  Checked from the source with `ast`, so it costs nothing to run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import shmfeed

PKG = Path(shmfeed.__file__).parent


def _module(path: Path) -> str:
    parts = ("shmfeed",) + path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PKG / rel).with_suffix(".py").exists() or (PKG / rel / "__init__.py").exists()


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(n) for body in node.body for n in ast.walk(body))
    return inside


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        skip = _type_checking_blocks(tree)
        edges = graph.setdefault(name, set())
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = base + ("." + node.module if node.module else "")
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if _is_module(sub) else target)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("shmfeed.") and _is_module(a.name))
    return graph


def test_no_two_modules_of_shmfeed_import_each_other():
    graph = _imports()
    assert len(graph) > 40, "the walk found too few modules to mean anything"
    cycles = sorted({tuple(sorted((a, b))) for a, outs in graph.items() for b in outs
                     if b != a and a in graph.get(b, ()) and not (a == "shmfeed" or b == "shmfeed")})
    assert not cycles, f"modules that import each other: {cycles}"


def test_each_part_of_the_layout_says_what_it_holds():
    for sub in ("_engine", "_processes", "_order", "_batch", "sources", "_cli", "jax"):
        doc = ast.get_docstring(ast.parse((PKG / sub / "__init__.py").read_text()))
        assert doc, f"shmfeed/{sub}/__init__.py has no docstring saying what the folder holds"


PARTS = ("_engine", "_processes", "_order", "_batch", "sources", "_cli", "jax")


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PARTS else None


def test_the_parts_of_the_package_import_in_one_direction():
    graph = _imports()
    between: dict[str, set[str]] = {}
    for a, outs in graph.items():
        for b in outs:
            pa, pb = _part(a), _part(b)
            if pa and pb and pa != pb:
                between.setdefault(pa, set()).add(pb)
    cycles = sorted({tuple(sorted((a, b))) for a, outs in between.items() for b in outs
                     if a in between.get(b, ())})
    assert not cycles, f"parts of shmfeed/ that import each other: {cycles} ({between})"
