"""``lorasoup inspect``: can these adapters be composed?"""

from __future__ import annotations

from typing import Annotated

import typer

from lorasoup.cli.console import console, err_console, fail
from lorasoup.cli.render import adapters_table, print_notices


def inspect(
    adapters: Annotated[list[str], typer.Argument(help="PEFT adapter directories or hub ids.")],
    allow_base_mismatch: Annotated[
        bool, typer.Option(help="Treat differing base_model_name_or_path as the same model.")
    ] = False,
) -> None:
    """Check that adapters can be composed, before any work.

    Reports each adapter's base model, ranks, alpha, scaling (alpha/r or rsLoRA), target modules,
    dtype and size, the union of adapted modules and the gaps. Exits with code 2 when the adapters
    cannot be composed (different base models or hidden sizes).
    """
    from lorasoup.adapters import load_adapter
    from lorasoup.compat import check_compatibility

    loaded = [load_adapter(a) for a in adapters]
    report = check_compatibility(
        loaded, allow_base_mismatch=allow_base_mismatch, mismatch_hint="--allow-base-mismatch"
    )
    console.print(adapters_table(loaded))
    console.print(f"union of adapted modules: {len(report.modules)}")
    print_notices(console, report.notices)
    if not report.composable:
        for problem in report.problems[1:]:
            err_console.print(f"[red]problem:[/] {problem}", highlight=False)
        fail(report.problems[0])
    console.print("[bold green]composable[/]")
