"""The error boundary: a LorasoupError from any command is one red line and exit code 2."""

import typer
from typer.testing import CliRunner

from lorasoup.cli.console import CommandGroup, fail
from lorasoup.errors import ConfigError


def test_error_messages_keep_their_brackets():
    """An error naming an extra (lorasoup[search]) must print it, not swallow it as rich markup."""
    probe = typer.Typer()

    @probe.command()
    def run() -> None:
        fail("install it: pip install 'lorasoup[search]'")

    result = CliRunner().invoke(probe, [])
    assert result.exit_code == 2 and "lorasoup[search]" in result.output


def test_library_errors_become_one_line_and_exit_code_2():
    probe = typer.Typer(cls=CommandGroup)

    @probe.command()
    def first() -> None:
        raise ConfigError("train.learning_rate: expected a number, got 'fast'")

    @probe.command()
    def second() -> None:
        raise ValueError("a bug keeps its traceback")

    result = CliRunner().invoke(probe, ["first"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: train.learning_rate: expected a number, got 'fast'"]
    result = CliRunner().invoke(probe, ["second"])
    assert isinstance(result.exception, ValueError)
