"""The package's layout as the wheel sees it: every subpackage listed, the model repository shipped."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
NOT_IN_WHEEL = {"tests", ".venv", "build", "results", "deploy"}


def test_every_subpackage_is_in_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"triton_rerank"}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and rel.parts[0] not in NOT_IN_WHEEL and not any(p.startswith(".") for p in rel.parts):
            found.add(".".join(("triton_rerank", *rel.parts)))
    assert listed == found, "pyproject.toml [tool.setuptools] packages must list every folder with an __init__.py"


def test_model_repository_files_are_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["triton_rerank"]
    shipped = {p for pattern in patterns for p in ROOT.glob(pattern)}
    tracked = {p for p in (ROOT / "model_repository").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert tracked and tracked <= shipped, sorted(str(p.relative_to(ROOT)) for p in tracked - shipped)
