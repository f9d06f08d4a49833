"""The ``lorasoup`` command: parse, load the config, make one library call, print.

One module per command family under ``commands/`` (each command: flags and ``--set`` through
:func:`~lorasoup.cli.options.load_run_config` into the typed run config, one library call, one
printer); ``render`` holds the printers, ``progress`` the progress bars, ``console`` the consoles and
the error boundary: every ``LorasoupError`` becomes one red line and exit code 2. Only the CLI
configures the console and logging (in :func:`main`).
"""

from __future__ import annotations

import logging
import os
import warnings

import typer

from lorasoup.cli.commands import cat, compat, demo, evaluation, merge, moe, report, search, train
from lorasoup.cli.console import CommandGroup

__all__ = ["app", "build_app", "main"]


def build_app() -> typer.Typer:
    """The command tree; commands are listed in ``--help`` in the order they are added here."""
    root = typer.Typer(
        cls=CommandGroup,
        name="lorasoup",
        help="Compose skills from LoRA adapters: learnable concatenation (CAT), exact PEFT export.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    root.command()(compat.inspect)
    root.command()(cat.cat)
    root.command()(demo.demo)
    root.command()(demo.study)
    root.command()(merge.merge)
    root.command()(merge.compress)
    root.command()(train.train)
    root.command("eval")(evaluation.eval_)
    root.command()(report.report)
    root.command()(search.search)
    root.add_typer(moe.moe_app(), name="moe")
    return root


app = build_app()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Our own progress bars and tables say what is happening; the libraries' per-file bars and
    # deprecation notices would bury them.
    warnings.filterwarnings("ignore", category=FutureWarning)
    # and in the worker processes the demo spawns, which import transformers afresh: it reads this
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    app()


if __name__ == "__main__":
    main()
