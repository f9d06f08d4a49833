"""The command tree, its entry points (`lorasoup`, `python -m lorasoup`) and what `main` configures."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from lorasoup.cli import app

runner = CliRunner()
COMMANDS = [
    "inspect",
    "cat",
    "demo",
    "study",
    "merge",
    "compress",
    "train",
    "eval",
    "report",
    "search",
    "moe",
]


def test_help_lists_every_command_in_order():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert re.findall(r"^│ ([a-z]+) {2,}", result.output, re.MULTILINE) == COMMANDS


def test_help_explains():
    result = runner.invoke(app, ["cat", "--help"])
    assert result.exit_code == 0 and "--set" in result.output and "PEFT adapter" in result.output
    for command in [*COMMANDS, "moe train", "moe distill"]:
        result = runner.invoke(app, [*command.split(), "--help"])
        assert result.exit_code == 0, (command, result.output)


def test_every_command_that_reads_a_config_takes_set():
    for command in ["cat", "study", "merge", "compress", "train", "eval", "report", "search", "moe train"]:
        result = runner.invoke(app, [*command.split(), "--help"])
        assert "--set" in result.output, command
    result = runner.invoke(app, ["moe", "distill", "--help"])
    assert "--set" in result.output


def test_python_dash_m_and_the_console_script_run_the_same_app():
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    script = re.search(r'^lorasoup = "([^"]+)"$', pyproject, re.MULTILINE)
    assert script is not None
    module, _, name = script.group(1).partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    done = subprocess.run(
        [sys.executable, "-m", "lorasoup", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Compose skills from LoRA adapters" in done.stdout


def test_worker_processes_inherit_quiet_library_progress_bars() -> None:
    """The demo's spawned workers import transformers afresh: after the CLI has started, a child
    process has transformers' per-file progress bars off (they flooded non-interactive logs)."""
    script = """
import subprocess, sys
from lorasoup import cli
sys.argv = ["lorasoup", "--help"]
try:
    cli.main()
except SystemExit:
    pass
child = "import transformers.utils.logging as l; print(l.is_progress_bar_enabled())"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout.strip())
"""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
