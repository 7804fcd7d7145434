"""The package's layers: every import (lazy ones inside functions included) points from a layer
to itself or to a layer below it, and only cdimover._native touches cffi."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cdimover

ROOT = Path(cdimover.__file__).parent
# Lowest first; a module may import from its own layer and those before it.
LAYERS = ["base", "io", "formats", "ops", "cdi", "pod", "cli"]
BASE = {"_native", "errors", "types", "units", "sizing", "argtypes", "checksum"}
CLI = {"cli", "__main__"}


def layer_of(module: str) -> str:
    """The layer of dotted module name MODULE (relative to the package, e.g. 'io.endpoints')."""
    head = module.split(".")[0]
    if head in BASE or head == "_cdimover":
        return "base"
    if head in CLI:
        return "cli"
    if head in LAYERS:
        return head
    raise AssertionError(f"module {module!r} belongs to no layer")


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts:
            continue            # the package root re-exports the API of every layer
        out.append((".".join(parts), path))
    return out


def is_module(parts: list[str]) -> bool:
    where = ROOT.joinpath(*parts)
    return where.with_suffix(".py").exists() or (where / "__init__.py").exists() or \
        parts == ["_cdimover"]


def imports(name: str, path: Path) -> list[tuple[str, int]]:
    """The cdimover modules that module NAME (at PATH) imports: (dotted name, line)."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                if node.module is None:      # from . import x / from .. import x
                    for alias in node.names:
                        mod = [*base, alias.name]
                        if not is_module(mod):
                            mod = base       # an attribute of the package itself
                        found.append((".".join(mod), node.lineno))
                    continue
            elif node.module and node.module.startswith("cdimover."):
                target = node.module[len("cdimover."):]
            else:
                continue
            found.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cdimover."):
                    found.append((alias.name[len("cdimover."):], node.lineno))
    return [(t, n) for t, n in found if t]


@pytest.mark.parametrize("name,path", modules(), ids=[m for m, _ in modules()])
def test_imports_point_down(name: str, path: Path) -> None:
    mine = LAYERS.index(layer_of(name))
    wrong = [f"{path.name}:{line} imports {target} ({layer_of(target)})"
             for target, line in imports(name, path)
             if LAYERS.index(layer_of(target)) > mine]
    assert not wrong, f"{name} ({LAYERS[mine]}) imports upwards: {wrong}"


def test_only_native_touches_cffi() -> None:
    for name, path in modules():
        if name == "_native":
            continue
        for target, line in imports(name, path):
            assert target != "_cdimover", f"{name}:{line} imports the cffi module"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("_native", None) and \
                    node.level:
                names = {a.name for a in node.names}
                assert not names & {"ffi", "lib"}, f"{name}:{node.lineno} imports ffi/lib"
            if isinstance(node, ast.Import):
                assert all(a.name != "cffi" for a in node.names), f"{name} imports cffi"


def test_a_layer_violation_is_caught(tmp_path: Path) -> None:
    # The checker itself: an ops module importing the pod layer is reported.
    bad = tmp_path / "bad.py"
    bad.write_text("from ..pod import command\n")
    found = imports("ops.bad", bad)
    assert found == [("pod", 1)]
    assert LAYERS.index(layer_of(found[0][0])) > LAYERS.index(layer_of("ops.bad"))
