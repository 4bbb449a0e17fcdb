"""The package is what a site and a server run: the tooling (benchmarks, deployment, experiments) stays outside it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "custom" / "fedbrats"
TOOLING = ("benchmarks", "deploy", "experiments")


def test_the_package_never_imports_the_tooling() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            offenders += [f"{path.relative_to(PACKAGE)}: {n}" for n in names if n.split(".")[0] in TOOLING]
    assert not offenders, offenders


def test_the_deployment_finds_the_project_file_of_the_checkout() -> None:
    from deploy.project import PROJECT_FILE, REPO_ROOT

    assert REPO_ROOT == PACKAGE.parents[1]
    assert PROJECT_FILE.is_file()


def test_fedbrats_compare_points_to_the_experiment_driver(capsys: pytest.CaptureFixture[str]) -> None:
    from fedbrats.cli import COMMANDS, main

    assert "compare" not in COMMANDS
    assert main(["compare", "--seeds", "0,1,2"]) == 2
    assert "python experiments/compare.py" in capsys.readouterr().err
