"""The CLI's two consoles and its error boundary.

Only the CLI configures the console (library code returns results and raises). Every
``LorasoupError`` a command lets through becomes one red line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any, NoReturn

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from lorasoup.errors import LorasoupError

# rich looks up sys.stdout at each write, so these follow a test runner's captured streams
console = Console(stderr=False)
err_console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """One red line on stderr, exit code 2: how every bad input ends."""
    # escape: messages name extras like lorasoup[search], which rich would take for markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


class CommandGroup(typer.core.TyperGroup):
    """Turns a ``LorasoupError`` from any command into one red line and exit code 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except LorasoupError as err:
            fail(str(err))
