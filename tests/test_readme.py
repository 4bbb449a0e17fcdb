"""The README's commands stay true: CI runs exactly its test command; the jobs it names exist."""

from __future__ import annotations

import re

from conftest import REPO_ROOT


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run must run the README's test command verbatim, or CI would test something else."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    test_cmd = next(b.strip() for b in _bash_blocks(readme) if "pytest" in b)
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_cmd in ci.splitlines()


def test_readme_main_command_names_an_existing_job() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    main_cmd = _bash_blocks(readme)[0]
    job = re.search(r"nvflare simulator (\S+)", main_cmd).group(1)
    assert (REPO_ROOT / job / "meta.json").is_file()
