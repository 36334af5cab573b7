"""The layer rule, checked on the source: each package imports only downward (DESIGN.md "Layers").

    cli.py, cli_*.py, tui/   ->  node.py  ->  claim.py, registry.py  ->  infer/ | shard/ | discovery/  ->  core/

Every import statement counts, including those inside functions (lazy imports still are dependencies), except in
cli.py / cli_mesh.py, whose handlers import the layers they run lazily by design: there only module-level
imports are checked (so ``ekmesh --help`` stays free of torch and libp2p).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ekmesh"

# package -> ekmesh packages and third-party roots it must not import
RULES: dict[str, tuple[set[str], set[str]]] = {
    "core": ({"infer", "shard", "discovery", "node", "registry", "api", "cli", "tui"}, {"torch", "libp2p", "trio"}),
    "discovery": ({"infer", "shard", "node", "registry", "api", "cli", "tui"}, {"torch"}),
    "infer": ({"shard", "discovery", "node", "registry", "api", "cli", "tui"}, {"libp2p", "trio"}),
    "shard": ({"infer", "discovery", "node", "registry", "api", "cli", "tui"}, set()),
    "registry": ({"cli", "tui", "node", "api"}, set()),
    "node": ({"cli", "tui"}, set()),
    "tui": ({"infer", "shard", "discovery", "node", "registry", "api"}, {"torch", "libp2p", "trio"}),
    "api": ({"cli", "tui", "node"}, set()),
}
TOP_LEVEL_ONLY = {"cli": {"torch", "libp2p", "trio"}}


def _package(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imports(tree: ast.AST, top_level_only: bool) -> list[tuple[int, str]]:
    nodes = tree.body if top_level_only and isinstance(tree, ast.Module) else list(ast.walk(tree))
    out = []
    for n in nodes:
        if isinstance(n, ast.Import):
            out += [(n.lineno, a.name) for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out.append((n.lineno, n.module))
            if n.module == "ekmesh":
                out += [(n.lineno, f"ekmesh.{a.name}") for a in n.names]
    return out


def _violations() -> list[str]:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        pkg = _package(path)
        tree = ast.parse(path.read_text(), str(path))
        if pkg in TOP_LEVEL_ONLY:
            for line, mod in _imports(tree, top_level_only=True):
                if mod.split(".")[0] in TOP_LEVEL_ONLY[pkg]:
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {mod} at module level")
            continue
        if pkg not in RULES:
            continue
        banned_pkgs, banned_ext = RULES[pkg]
        for line, mod in _imports(tree, top_level_only=False):
            parts = mod.split(".")
            if parts[0] == "ekmesh" and len(parts) > 1 and parts[1] in banned_pkgs:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} ({pkg}) imports {mod}")
            if parts[0] in banned_ext:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} ({pkg}) imports {mod}")
    return bad


def test_every_import_points_down():
    assert _violations() == []


def test_the_checker_sees_a_wrong_arrow(tmp_path, monkeypatch):
    fake = tmp_path / "ekmesh"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("def f():\n    from ekmesh.infer import loader\n")
    (fake / "tui").mkdir()
    (fake / "tui" / "view.py").write_text("import torch\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    got = _violations()
    assert got == ["ekmesh/core/bad.py:2 (core) imports ekmesh.infer",
                   "ekmesh/tui/view.py:1 (tui) imports torch"]


@pytest.mark.parametrize("pkg", sorted(RULES))
def test_rules_cover_existing_packages(pkg):
    assert (ROOT / pkg).exists() or (ROOT / f"{pkg}.py").exists() or pkg == "shard"
