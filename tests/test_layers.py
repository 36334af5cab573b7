"""The tree's rules, checked on the source (docs/ARCHITECTURE.md "Packages"): imports point only down, no module
imports itself back through any chain, and the package root holds no code.

    cli  ->  node  ->  api  ->  registry  ->  infer | shard | discovery  ->  core
    cli  ->  tui   ->  core
    hf   ->  registry  (the transformers bridge: reaches the node only through node.json and a socket)

Every import statement counts: inside functions (lazy imports are still dependencies) and under
``if TYPE_CHECKING:`` (a type-only cycle is still two modules that cannot be understood apart). The one exception
is third-party weight in ``cli``: its handlers import torch and libp2p lazily by design, so there only module-level
imports of those are refused (``ekmesh --help`` stays free of them).

The checker is tested on wrong trees built in ``tmp_path``, so it is known to see a wrong arrow, a cycle and a
module at the root.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ekmesh"

# package -> the ekmesh packages it may import (itself always; the root ``ekmesh`` holds only ``__version__``)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "discovery": {"core"},
    "shard": {"core"},
    "infer": {"core"},
    "registry": {"core", "discovery", "shard", "infer"},
    "api": {"core", "registry", "infer"},
    "tui": {"core"},
    "node": {"core", "discovery", "shard", "infer", "registry", "api"},
    "cli": {"core", "discovery", "shard", "infer", "registry", "api", "node", "tui"},
    "builtin": set(),
    "hf": {"core", "discovery", "shard", "infer", "registry"},
}
# single modules held to less than their package
MODULE_ALLOWED: dict[str, set[str]] = {
    "ekmesh.cli.localmesh": {"core", "discovery"},  # the demo runs peers as processes and only reads their status
}
# package (or single module) -> third-party roots it must not import; for ``cli`` at module level only
HEAVY = {"torch", "libp2p", "trio"}
BANNED_EXT: dict[str, set[str]] = {
    "core": HEAVY,
    "discovery": {"torch"},
    "infer": {"libp2p", "trio"},
    "tui": HEAVY,
    "hf": {"libp2p"},
    "ekmesh.cli.localmesh": HEAVY,  # the demo's own process stays light: its time goes to the peers
    "ekmesh.node.claim": {"torch"},  # a node without a model never loads torch (test_tui_imports checks node.node)
}
TOP_LEVEL_ONLY = {"cli": HEAVY}
ROOT_FILES = {"__init__.py", "__main__.py"}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _imports(tree: ast.Module, modules: dict[str, Path], here: str,
             top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported name) for every import, the ekmesh ones resolved to the most specific module that exists."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: list[tuple[int, str]] = []
    for n in nodes:
        if isinstance(n, ast.Import):
            out += [(n.lineno, a.name) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:  # relative: resolved against this module's package
                pkg = here.split(".") if modules[here].name == "__init__.py" else here.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - n.level + 1] + ([base] if base else []))
            for a in n.names:
                sub = f"{base}.{a.name}"
                out.append((n.lineno, sub if sub in modules else base))
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph(root: Path) -> dict[str, set[str]]:
    """module -> the ekmesh modules it imports (anywhere in it, TYPE_CHECKING included)."""
    modules = _modules(root)
    out: dict[str, set[str]] = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        out[mod] = {name for _, name in _imports(tree, modules, mod) if name in modules and name != mod}
    return out


def layer_violations(root: Path) -> list[str]:
    modules = _modules(root)
    bad = [f"{root.name}/{p.name}: a module at the package root (put it in the package it belongs to)"
           for p in sorted(root.glob("*.py")) if p.name not in ROOT_FILES]
    for mod, path in modules.items():
        pkg = _package(mod)
        if path.parent == root:
            continue
        where = f"{path.relative_to(root.parent)}"
        tree = ast.parse(path.read_text(), str(path))
        if pkg not in ALLOWED:
            bad.append(f"{where}: package {pkg!r} has no place in the layer rules")
            continue
        allowed = MODULE_ALLOWED.get(mod, ALLOWED[pkg])
        for line, name in _imports(tree, modules, mod):
            parts = name.split(".")
            if parts[0] == root.name and len(parts) > 1 and parts[1] != pkg and parts[1] not in allowed:
                bad.append(f"{where}:{line} ({pkg}) imports {name}")
            elif mod in MODULE_ALLOWED and parts[:2] == [root.name, pkg] and name != mod:
                bad.append(f"{where}:{line} ({mod}) imports {name}")
        for key in (mod, pkg):
            for line, name in _imports(tree, modules, mod, top_level_only=False):
                if key in BANNED_EXT and name.split(".")[0] in BANNED_EXT[key]:
                    bad.append(f"{where}:{line} ({key}) imports {name}")
        if pkg in TOP_LEVEL_ONLY:
            for line, name in _imports(tree, modules, mod, top_level_only=True):
                if name.split(".")[0] in TOP_LEVEL_ONLY[pkg]:
                    bad.append(f"{where}:{line} ({pkg}) imports {name} at module level")
    return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``g`` with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(g):
        if start in index:
            continue
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(g.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def test_every_import_points_down():
    assert layer_violations(ROOT) == []


def test_no_import_cycle_anywhere():
    g = graph(ROOT)
    assert len(g) > 80  # the walk saw the whole tree
    assert cycles(g) == []


def test_every_package_has_a_place_in_the_rules():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "ekmesh" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root / "ekmesh").parents:
            (root / "ekmesh" / parent / "__init__.py").touch()
        path.write_text(text)
    return root / "ekmesh"


def test_the_checker_sees_wrong_arrows(tmp_path):
    root = _write(tmp_path, {
        "core/bad.py": "def f():\n    from ekmesh.infer import loader\n",
        "infer/loader.py": "from ekmesh.node.node import Node\n",
        "shard/store.py": "from ekmesh.discovery.advert import Advert\n",
        "tui/view.py": "import torch\n",
        "cli/main.py": "import libp2p\n\ndef run():\n    import torch\n",
        "cli/localmesh.py": "from ekmesh.node.node import Node\nfrom ekmesh.cli import main\n",
        "node/node.py": "",
        "discovery/advert.py": "",
        "helpers.py": "X = 1\n",
    })
    assert layer_violations(root) == [
        "ekmesh/helpers.py: a module at the package root (put it in the package it belongs to)",
        "ekmesh/cli/localmesh.py:1 (cli) imports ekmesh.node.node",
        "ekmesh/cli/localmesh.py:2 (ekmesh.cli.localmesh) imports ekmesh.cli.main",
        "ekmesh/cli/main.py:1 (cli) imports libp2p at module level",
        "ekmesh/core/bad.py:2 (core) imports ekmesh.infer.loader",
        "ekmesh/infer/loader.py:1 (infer) imports ekmesh.node.node",
        "ekmesh/shard/store.py:1 (shard) imports ekmesh.discovery.advert",
        "ekmesh/tui/view.py:1 (tui) imports torch",
    ]


def test_the_checker_sees_a_cycle_through_type_checking_imports(tmp_path):
    root = _write(tmp_path, {
        "shard/fetch/fetcher.py": "from ekmesh.shard.fetch.run import Run\n",
        "shard/fetch/run.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from ekmesh.shard.fetch.fetcher import Fetcher\n",
        "shard/store.py": "from ekmesh.shard import placement\n",
        "shard/placement.py": "def f():\n    from ekmesh.shard.store import Store\n",
        "infer/a.py": "from ekmesh.infer import b\n",
        "infer/b.py": "",
    })
    assert cycles(graph(root)) == [["ekmesh.shard.fetch.fetcher", "ekmesh.shard.fetch.run"],
                                   ["ekmesh.shard.placement", "ekmesh.shard.store"]]


@pytest.mark.parametrize("relative,expected", [("from . import b", "ekmesh.infer.b"),
                                               ("from .. import core", "ekmesh.core"),
                                               ("from ..core.errors import X", "ekmesh.core.errors")])
def test_relative_imports_resolve(tmp_path, relative, expected):
    root = _write(tmp_path, {"infer/a.py": relative + "\n", "infer/b.py": "", "core/errors.py": ""})
    assert expected in graph(root)["ekmesh.infer.a"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
