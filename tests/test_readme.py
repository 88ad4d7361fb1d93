"""The README's quick start is what CI runs, and its commands name things that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_is_exactly_two_commands_and_ci_runs_the_second():
    commands = quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    install, test = commands
    assert install.startswith("pip install torch==2.13.0") and install.endswith("mlpfusion compress")
    assert test.startswith("pip install torch==2.13.0") and "pytest" in test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci


def test_pyproject_keeps_a_torch_range_that_admits_2_13():
    text = (ROOT / "pyproject.toml").read_text()
    spec = re.search(r'"torch([^"]*)"', text).group(1)
    from packaging.specifiers import SpecifierSet

    assert "2.13.0" in SpecifierSet(spec) and "==" not in spec
