"""The folder tree is the architecture: imports run one way, from the command line down.

Each subpackage of vlrt has a rank (vlrt/README.md); a module may import modules of its own rank or
lower, never higher. The imports are read from the source with `ast` (module-level and
function-level alike), so a lazy import inside a function cannot hide an upward edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. vlrt's root modules (errors, frames, the package itself) and the demo model's
# data are the base everything may use.
RANKS: dict[str, int] = {
    "vlrt": 0,
    "vlrt.demo": 0,
    "vlrt.io": 1,
    "vlrt.image": 2,
    "vlrt.settings": 3,
    "vlrt.model": 4,
    "vlrt.engines": 5,
    "vlrt.fastdvdnet": 5,
    "vlrt.export": 6,
    "vlrt.executor": 7,
    "vlrt.stages": 8,
    "vlrt.render": 9,
    "vlrt.scale": 10,
    "vlrt.tools": 11,
    "vlrt.ui": 11,
    "vlrt.cli": 12,
    "vlrt.__main__": 12,
}

# Where each installed package's source lives in the checkout (pyproject's package-dir).
SOURCE_DIRS = {"vlrt": ROOT / "vlrt", "vlrt.export": ROOT / "export", "vlrt.fastdvdnet": ROOT / "fastdvdnet"}


def layer(module: str) -> str:
    """The ranked layer a dotted vlrt module belongs to: its longest prefix in RANKS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANKS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} belongs to no ranked layer: add its package to RANKS in {__file__}")


def module_files() -> dict[str, Path]:
    """Every vlrt module by dotted name."""
    found: dict[str, Path] = {}
    for package, folder in SOURCE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports_of(module: str, path: Path) -> list[str]:
    """The vlrt modules `path` imports, absolute and relative, at any depth of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.append(target)
            names += [f"{target}.{a.name}" for a in node.names]
    return sorted({n for n in names if n == "vlrt" or n.startswith("vlrt.")})


def upward_imports(files: dict[str, Path]) -> list[str]:
    wrong = []
    for module, path in sorted(files.items()):
        # `from vlrt.x import name` names vlrt.x.name: the module imported is vlrt.x.
        targets = {t if t in files else t.rpartition(".")[0] for t in imports_of(module, path)}
        for target in sorted(targets & files.keys()):
            if RANKS[layer(target)] > RANKS[layer(module)]:
                wrong.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
    return wrong


def test_every_module_has_a_layer_and_no_import_runs_upward() -> None:
    files = module_files()
    assert "vlrt.render.pipeline" in files and "vlrt.image.blend" in files  # the walk found the tree
    assert upward_imports(files) == []


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """A pixel-maths module importing the render driver is reported (the test above can fail)."""
    bad = tmp_path / "blend.py"
    bad.write_text("def f():\n    from vlrt.render.pipeline import render\n")
    files = module_files() | {"vlrt.image.blend": bad}
    assert upward_imports(files) == ["vlrt.image.blend (vlrt.image) imports vlrt.render.pipeline (vlrt.render)"]


def test_no_module_is_left_at_the_top_but_the_base_types() -> None:
    """vlrt/ holds subpackages; only the base types, the package and the command line sit at its top."""
    top = sorted(p.stem for p in (ROOT / "vlrt").glob("*.py"))
    assert top == ["__init__", "__main__", "cli", "errors", "frames"]


@pytest.mark.parametrize("package", sorted(n for n in RANKS if n.count(".") == 1 and (ROOT / n.replace(".", "/")).is_dir()))
def test_each_package_is_described_in_the_layout_notes(package: str) -> None:
    notes = (ROOT / "vlrt" / "README.md").read_text()
    assert f"`{package.split('.')[1]}/`" in notes
