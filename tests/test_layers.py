"""The package's layers point down only: a module may import from its own layer and the layers
below it, never above, function-level imports included. The order (docs/ARCHITECTURE.md):"""
import ast
import os

import pytest

LAYERS = ["utils", "backends", "models", "data", "reference", "kernels", "ops", "attacks", "nn", "train", "prune",
          "benchmarks", "study", "cli"]
PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastprune")


def imported_fastprune_modules(path: str, package: list[str]):
    """(line, absolute module name) of every fastprune import in a file, at any depth of the code."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                if node.module:
                    yield node.lineno, ".".join(base + [node.module])
                else:
                    for alias in node.names:
                        yield node.lineno, ".".join(base + [alias.name])
            elif node.module:
                yield node.lineno, node.module


def upward_imports(root: str = PACKAGE) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    found = []
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            layer = rel.split(os.sep)[0].removesuffix(".py")
            if layer not in rank:  # the package's __init__ re-exports the public API from every layer
                continue
            package = ["fastprune"] + rel.split(os.sep)[:-1]
            for line, module in imported_fastprune_modules(path, package):
                parts = module.split(".")
                if parts[0] == "fastprune" and len(parts) > 1 and parts[1] in rank and rank[parts[1]] > rank[layer]:
                    found.append(f"fastprune/{rel}:{line} ({layer}) imports {module} ({parts[1]})")
    return found


def test_every_layer_is_known():
    on_disk = {n.removesuffix(".py") for n in os.listdir(PACKAGE) if not n.startswith(("_", "."))}
    on_disk -= {"_C"}
    assert {n.split(".")[0] for n in on_disk if not n.endswith(".so")} <= set(LAYERS)


def test_no_layer_imports_a_layer_above_it():
    assert upward_imports() == []


def test_the_check_catches_an_upward_import(tmp_path):
    # A copy of two layers with a planted function-level import of a higher layer.
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "checks.py").write_text("def f():\n    from ..nn import sparsify\n    return sparsify\n")
    (tmp_path / "nn").mkdir()
    (tmp_path / "nn" / "sparse.py").write_text("from ..utils.checks import f\n")
    found = upward_imports(str(tmp_path))
    assert found == ["fastprune/utils/checks.py:2 (utils) imports fastprune.nn (nn)"]


@pytest.mark.parametrize("module", ["fastprune.utils", "fastprune.models", "fastprune.reference", "fastprune.ops",
                                    "fastprune.attacks", "fastprune.nn", "fastprune.train", "fastprune.prune"])
def test_each_layer_imports_on_its_own(module):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
