"""The plan of the house, checked on the source: no import runs back up.

    cli/                       the app on top: may import everything
    scheduler/ worker/ trainer/   components: the core and db, never each other
    db/                        the meeting place: the core only
    lightbox/                  the core, the ground floor: nothing above it

Imports inside functions count too (they are the easiest way to sneak an arrow back up), and
`worker/` never imports torch: GPU nodes carry TensorRT or ONNX Runtime only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"lightbox", "db", "scheduler", "worker", "trainer", "cli"}
ALLOWED = {
    "lightbox": {"lightbox"},
    "db": {"lightbox", "db"},
    "scheduler": {"lightbox", "db", "scheduler"},
    "worker": {"lightbox", "db", "worker"},
    "trainer": {"lightbox", "db", "trainer"},
    "cli": OURS,
}
TORCH = {"torch", "monai", "torchvision"}


def imported_roots(path: Path) -> set[str]:
    """Top-level package names a module imports, wherever the import statement stands."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def arrows(package: str) -> dict[str, set[str]]:
    return {str(path.relative_to(ROOT)): imported_roots(path)
            for path in sorted((ROOT / package).rglob("*.py"))}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_runs_back_up(package: str) -> None:
    wrong = {module: sorted((roots & OURS) - ALLOWED[package])
             for module, roots in arrows(package).items()}
    assert {module: bad for module, bad in wrong.items() if bad} == {}


def test_worker_never_imports_torch() -> None:
    found = {module: sorted(roots & TORCH) for module, roots in arrows("worker").items()}
    assert {module: bad for module, bad in found.items() if bad} == {}


def test_the_check_sees_an_arrow_back_up(tmp_path: Path) -> None:
    """The parser finds imports inside functions, so the tests above can fail."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from scheduler.ingest import scp\n    import worker.tasks\n")
    assert imported_roots(module) == {"scheduler", "worker"}
