"""The layer rules of README's architecture table, enforced on the imports of ms_diffusion/.

Every ``import`` / ``from ... import`` in the package counts, module-level or inside a function. A
package may import from a lower layer, from an earlier package of its own layer (the order within a
layer is part of the table), and from itself; nothing else. Module-level cycles are refused too.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parent.parent / "ms_diffusion"

# (layer, packages in their order within the layer): README.md "Architecture" and docs/architecture.md
LAYERS: List[Tuple[int, Tuple[str, ...]]] = [
    (0, ("schedules", "runtime", "imageio", "registry", "kernels")),
    (1, ("nn", "io")),
    (2, ("models", "text")),
    (3, ("samplers", "losses", "diffusion", "__root__")),
    (4, ("data", "training", "metrics")),
    (5, ("config", "experiment", "pipeline", "evaluation", "interop", "stable_diffusion", "cli")),
]
RANK: Dict[str, Tuple[int, int]] = {pkg: (layer, i) for layer, pkgs in LAYERS for i, pkg in enumerate(pkgs)}
# same-layer imports that are not allowed although the order would permit them (DESIGN: training imports
# neither metrics nor interop; a sampler knows nothing of training objectives)
FORBIDDEN = {("metrics", "training")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> List[Tuple[str, int, bool]]:
    """(imported ms_diffusion module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:   # ``from ms_diffusion import runtime`` imports a module
                sub = f"{module}.{alias.name}"
                targets.append(sub if sub in modules else module)
        for target in targets:
            if target == "ms_diffusion" or target.startswith("ms_diffusion."):
                found.append((target, node.lineno, id(node) in top_level))
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__root__"


def test_every_package_is_in_the_table():
    missing = sorted({_package(m) for m in _modules()} - set(RANK))
    assert not missing, f"packages missing from the architecture table (LAYERS here, README, docs): {missing}"


def test_imports_follow_the_layer_table():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        src = _package(name)
        for target, line, _ in _imports(name, path, modules):
            dst = _package(target)
            if dst == src:
                continue
            if RANK[dst] >= RANK[src] or (src, dst) in FORBIDDEN:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {src} (layer {RANK[src][0]}) imports "
                             f"{target} ({dst}, layer {RANK[dst][0]})")
    assert not wrong, "imports against the architecture table:\n" + "\n".join(wrong)


def test_no_import_cycles():
    """No cycle among modules, counting every import (a function-level import that closes a loop is a
    layering problem hidden from the interpreter, not a fix)."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, modules):
            while target not in modules and "." in target:   # ``pkg.module.attr`` -> ``pkg.module``
                target = target.rsplit(".", 1)[0]
            # a package's __init__ re-exporting its own submodules is not a cycle with them
            if target != name and not name.startswith(target + ".") and target in modules:
                graph[name].add(target)
    state: Dict[str, int] = {}
    stack: List[str] = []
    cycles: List[List[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_catches_what_it_should(tmp_path):
    """The rules above are live: an upward import and a cycle in a scratch package are reported."""
    fake = {"ms_diffusion.nn.x": "from ms_diffusion.training import y\n",
            "ms_diffusion.training.y": "import ms_diffusion.nn.x\n"}
    modules = {}
    for name, text in fake.items():
        p = tmp_path / (name.replace(".", "/") + ".py")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        modules[name] = p
    modules["ms_diffusion.training"] = tmp_path / "ms_diffusion/training/__init__.py"
    modules["ms_diffusion.training"].write_text("")
    up = _imports("ms_diffusion.nn.x", modules["ms_diffusion.nn.x"], modules)
    assert [(_package(t), line) for t, line, _ in up] == [("training", 1)]
    assert RANK["training"] > RANK["nn"]
    down = _imports("ms_diffusion.training.y", modules["ms_diffusion.training.y"], modules)
    assert [t for t, _, _ in down] == ["ms_diffusion.nn.x"]
