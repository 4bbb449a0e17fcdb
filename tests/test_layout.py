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


# ---- one floor per layer --------------------------------------------------------------------------------------
#: The package's floors, lowest first: a module may import its own floor and those below, never one above. Each
#: entry is a module prefix (a module takes the floor of its longest matching prefix).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("constants", "utils", "logging_setup", "commands", "precision", "lr_schedule", "registry", "_moved", "__init__"),
    ("data",),
    ("networks", "losses"),
    ("federated.protocol", "runs", "scoring"),
    (
        "federated.events",
        "federated.tracking",
        "federated.memory",
        "federated.compression",
        "federated.filters",
        "federated.server.aggregation",
        "federated.server.update_checks",
        "federated.server.selection",
        "federated.server.mlflow_receiver",
        "federated.methods.base",
    ),
    ("federated.methods",),
    ("federated.client", "federated.server"),
    ("evaluation",),
    ("jobgen", "recipe"),
    ("job", "simulate"),
    ("cli",),
)


def _floor(module: str) -> int:
    """The floor of a module named relative to the package (``federated.server.controller``)."""
    best, floor = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), index
    assert floor is not None, f"{module} is on no floor of LAYERS: add it"
    return floor


def _package_imports(path: Path) -> list[tuple[int, str]]:
    """Every ``fedbrats`` module a file imports, anywhere in it (functions too), relative to the package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("fedbrats."):
                found.append((node.lineno, name[len("fedbrats.") :]))
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _is_module(name: str) -> bool:
    """Whether ``name`` (relative to the package) is a module or package of it, not a name inside one."""
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_no_module_imports_a_floor_above_its_own() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for line, imported in _package_imports(path):
            if not _is_module(imported):
                continue
            if _floor(imported) > _floor(module):
                upward.append(f"{module}:{line} imports {imported}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_federated_imports_nothing_of_the_evaluation_apps_or_the_job_tools() -> None:
    above = ("evaluation", "jobgen", "recipe", "job", "simulate", "cli")
    offenders = [
        f"{_module_name(path)}:{line} imports {imported}"
        for path in sorted((PACKAGE / "federated").rglob("*.py"))
        for line, imported in _package_imports(path)
        if imported.split(".")[0] in above
    ]
    assert not offenders, offenders


# ---- a method is one folder -----------------------------------------------------------------------------------
METHODS_DIR = PACKAGE / "federated" / "methods"
#: What every method may build on: the declaration types and the supervised baseline's loss.
SHARED_METHOD_MODULES = ("base", "supervised")


def _method_of(module: str) -> str | None:
    prefix = "federated.methods."
    if not module.startswith(prefix):
        return None
    name = module[len(prefix) :].split(".")[0]
    return None if name in SHARED_METHOD_MODULES or name == "" else name


def test_a_method_imports_no_other_method() -> None:
    offenders = []
    for path in sorted(METHODS_DIR.rglob("*.py")):
        own = _method_of(_module_name(path))
        for line, imported in _package_imports(path):
            other = _method_of(imported)
            if own and other and other != own:
                offenders.append(f"{_module_name(path)}:{line} imports {imported}")
    assert not offenders, offenders


def test_shared_losses_and_networks_hold_nothing_named_after_a_method() -> None:
    methods = {
        p.stem for p in METHODS_DIR.iterdir() if p.stem not in (*SHARED_METHOD_MODULES, "__init__", "__pycache__")
    }
    assert {"fedkd", "mstkd", "isofed", "mmccd", "fedmic"} <= methods
    for folder in ("losses", "networks"):
        named = sorted(p.name for p in (PACKAGE / folder).glob("*.py") if any(m in p.stem for m in methods))
        assert not named, f"{folder}/ holds {named}: a method's own parts belong in its folder"


def test_the_main_methods_are_one_folder_each() -> None:
    for method, parts in {
        "fedkd": {"client", "network", "drl", "rcl", "distillation", "strategy", "privacy"},
        "mstkd": {"client", "network", "losses"},
    }.items():
        folder = METHODS_DIR / method
        assert {p.stem for p in folder.glob("*.py")} == parts | {"__init__"}
        source = (folder / "__init__.py").read_text(encoding="utf-8")
        assert "METHOD = Method(" in source
