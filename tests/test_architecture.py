"""Layering: the library's import graph has no cycle (lazy, in-function imports included), and the preset table,
the dataset base classes and the config sections sit below the modules that use them."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "columnformer"


def _imports() -> dict[str, set[str]]:
    """module -> the library modules it imports anywhere in its source (module level or inside functions)."""
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(("columnformer", *parts)).removesuffix(".__init__")
        mods[name] = path
    edges = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names]
                # `from . import geometry` imports the submodule, not (again) the package's __init__
                candidates = subs if node.module is None and all(c in mods for c in subs) else [target] + subs
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            edges[name] |= {c for c in candidates if c in mods and c != name}
    return edges


def test_no_two_modules_import_each_other():
    edges = _imports()
    pairs = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, ())})
    assert pairs == [], f"modules importing each other: {pairs}"


def test_import_graph_has_no_cycles():
    """Not only pairs: e.g. config -> tasks -> tasks.base -> factory -> config was a cycle of four."""
    edges = _imports()
    done: set[str] = set()
    for start in sorted(edges):
        path, on_path, todo = [], set(), [(start, iter(sorted(edges[start])))]
        if start in done:
            continue
        path.append(start)
        on_path.add(start)
        while todo:
            node, deps = todo[-1]
            nxt = next((d for d in deps if d not in done), None)
            if nxt is None:
                todo.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif nxt in on_path:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            else:
                path.append(nxt)
                on_path.add(nxt)
                todo.append((nxt, iter(sorted(edges[nxt]))))


def test_lower_layers_do_not_reach_up():
    edges = _imports()
    assert edges["columnformer.presets"] <= {"columnformer.errors"}  # the table is plain data
    assert not {m for m in edges["columnformer.data.base"] if m.startswith("columnformer.data.")}  # no loader
    assert "columnformer.presets" not in edges["columnformer.errors"]
    for name, deps in edges.items():
        if name.startswith("columnformer.analysis"):
            assert "columnformer.train" not in deps, name
    assert "columnformer.attention" not in edges["columnformer.sparse_attention"]
    for low in ("columnformer.model_config", "columnformer.data.config", "columnformer.factory"):
        assert not {m for m in edges[low] if m in ("columnformer.config", "columnformer.tasks", "columnformer.train")}, low
    assert not {m for m in edges["columnformer.data.digits"] if m == "columnformer.config"}
