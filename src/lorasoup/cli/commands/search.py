"""``lorasoup search``: gradient-free adapter weights (LoraHub-style) exported as a PEFT adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorasoup.cli.console import console
from lorasoup.cli.options import OutputOption, OverwriteOption, SetOption, load_run_config, only_if
from lorasoup.cli.progress import step_progress
from lorasoup.cli.render import print_search_result


def search(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/search-example.yaml).")],
    set_: SetOption = None,
    output: OutputOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Search adapter weights on a few target examples (LoraHub-style, CMA-ES) and export a PEFT adapter.

    Each iteration scores a whole population of weightings in one batched forward and keeps the best
    (loss on response tokens + l1 * mean |w|). Writes OUTPUT/ atomically: a plain PEFT adapter,
    search_weights.json (lorasoup cat can start from it: cat.init_from), cat-warm-start.yaml, run.json.
    """
    from lorasoup.search.config import SearchRunConfig
    from lorasoup.search.run import run_search

    flags = {"output": output, "overwrite": only_if(overwrite)}
    run_config = load_run_config(SearchRunConfig, config, set_, flags)
    with step_progress(console, "searching weights (best loss so far)") as progress:
        result = run_search(run_config, progress=progress)
    print_search_result(console, result)
