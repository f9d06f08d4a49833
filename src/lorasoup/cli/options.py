"""What every command shares on its way in: the common options and one way from flags to a config.

A command's flags are typed values for fields of its run config (``--merge`` is ``export.merge``).
They go into the config data as values, beside the YAML and the ``--set`` overrides, and the one
strict loader validates the whole once: a flag meets the same checks and messages as the same key in
a file. Nothing is turned back into ``key=value`` text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from lorasoup.config import load_config

T = TypeVar("T")


def set_option(example: str) -> Any:
    """The ``--set`` option, with an example key of the command's own config."""
    return Annotated[
        list[str] | None,
        typer.Option("--set", help=f"Override a config value, e.g. --set {example} (repeatable)."),
    ]


SetOption = set_option("train.learning_rate=0.05")
OutputOption = Annotated[str | None, typer.Option(help="Artifact directory (overrides `output`).")]
OverwriteOption = Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")]


def load_run_config(
    cls: type[T],
    path: Path | None,
    set_: list[str] | None,
    flags: Mapping[str, Any],
    *,
    base: dict[str, Any] | None = None,
    set_beats_flags: bool = False,
) -> T:
    """The run config from ``path`` (YAML) and ``--set``, with the flags that were given on top.

    ``flags`` maps dotted config keys to flag values; ``None`` means "not given" and leaves the key
    alone. A flag beats a ``--set`` of its key, except where ``set_beats_flags`` keeps an older
    command's order (``eval`` applied ``--set`` last).
    """
    overrides = list(set_ or [])
    given = {key: value for key, value in flags.items() if value is not None}
    if set_beats_flags:
        named = {item.partition("=")[0].strip() for item in overrides}
        given = {key: value for key, value in given.items() if key not in named}
    return load_config(cls, path, overrides, base=base, values=given)


def only_if(flag: bool) -> bool | None:
    """A switch that can only turn a setting on: off means "not given", so YAML and --set decide."""
    return True if flag else None


def split_commas(items: Iterable[str] | None) -> list[str]:
    """``["a,b", "c"]`` (a repeatable option that also takes comma-separated lists) → ``["a", "b", "c"]``."""
    return [part.strip() for item in items or [] for part in item.split(",") if part.strip()]
