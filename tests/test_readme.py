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


def cli_synopsis() -> dict[str, str]:
    """{command: its lines} of the README's CLI synopsis block."""
    section = (ROOT / "README.md").read_text().split("\n## CLI\n", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    out: dict[str, str] = {}
    for line in block.splitlines():
        match = re.match(r"mlpfusion (\w+)", line)
        if match:
            command = match.group(1)
        out[command] = out.get(command, "") + line + "\n"
    return out


def test_the_readme_cli_synopsis_names_every_option_of_every_command():
    import typer.main

    from hf_mlpfusion.cli.main import app

    synopsis = cli_synopsis()
    group = typer.main.get_command(app)
    assert set(group.commands) == set(synopsis)
    for name, command in group.commands.items():
        def named(opt):
            return re.search(r"(?<![\w-])" + re.escape(opt) + r"(?![\w-])", synopsis[name])

        missing = []
        for p in command.params:
            if p.param_type_name != "option" or p.name in ("help", "version"):
                continue
            if not any(named(o) for o in p.opts):  # --output or -o
                missing.append(max(p.opts, key=len))
            missing += [o for o in p.secondary_opts if not named(o)]  # --data-free beside --data-aware
        assert not missing, f"README's synopsis of `mlpfusion {name}` lacks {missing}"
