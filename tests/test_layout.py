"""The package's layout: its modules import one another without cycles (imports at module level;
those inside functions are deferred on purpose, as the command line's are)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "lora_inject"  # read, not imported: a cycle may not import


def module_name(path: Path) -> str:
    parts = ("lora_inject", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The package's modules that ``path`` imports at module level."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lora_inject")}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            if not target.startswith("lora_inject"):
                continue
            if node.module:  # `from . import _quant` imports _quant (its package is under way already)
                out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}  # `from .io import ours`: a module, if one
    return out


def graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    names = {module_name(p) for p in paths}
    return {module_name(p): {m for m in imports(p) if m in names and m != module_name(p)} for p in paths}


def test_no_import_cycles():
    edges = graph()
    assert "lora_inject.surgery" in edges and edges["lora_inject.surgery"]  # the walk sees the imports
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            cycle = path[path.index(m):] + [m]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if m in done:
            return
        for n in sorted(edges[m]):
            visit(n, [*path, m])
        done.add(m)

    for m in sorted(edges):
        visit(m, [])
