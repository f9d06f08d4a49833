"""``lorasoup search``: gradient-free adapter weights (LoraHub-style), or the best layer swap of a small
family of rules, exported as a PEFT adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorasoup.cli.console import console
from lorasoup.cli.options import OutputOption, OverwriteOption, load_run_config, only_if, set_option
from lorasoup.cli.progress import count_progress, step_progress
from lorasoup.cli.render import print_layer_swap_search_result, print_search_result

SearchSetOption = set_option("search.iterations=40")


def search(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/search-example.yaml).")],
    set_: SearchSetOption = None,
    output: OutputOption = None,
    overwrite: OverwriteOption = False,
    layer_swap: Annotated[
        bool,
        typer.Option(
            "--layer-swap",
            help="Choose a layer swap instead: score every rule of a small family (options in a "
            "`layer_swap:` section, e.g. --set layer_swap.families=[blocks,edges]).",
        ),
    ] = False,
) -> None:
    """Search adapter weights on a few target examples (LoraHub-style, CMA-ES) and export a PEFT adapter.

    Each iteration scores a whole population of weightings in one batched forward and keeps the best
    (loss on response tokens + l1 * mean |w|). Writes OUTPUT/ atomically: a plain PEFT adapter,
    search_weights.json (lorasoup cat can start from it: cat.init_from), cat-warm-start.yaml, run.json.

    With --layer-swap (or a `layer_swap:` section) it scores layer-swap rules instead (each layer takes
    one adapter whole: one adapter everywhere, the lowest n layers from one and the rest from another,
    the first and last n from one and the middle from another; every n and ordered pair) and writes the
    best as the adapter `lorasoup merge --method layer_swap` would, with every candidate's loss in
    run.json.
    """
    from lorasoup.search.config import SearchRunConfig

    flags = {"output": output, "overwrite": only_if(overwrite)}
    # the section with its defaults, under whatever the file and --set give it
    base = {"layer_swap": {}} if layer_swap else None
    run_config = load_run_config(SearchRunConfig, config, set_, flags, base=base)
    if run_config.layer_swap is not None:
        from lorasoup.search.layer_swap_run import run_layer_swap_search

        with count_progress(console, "scoring layer-swap rules") as progress:
            swap = run_layer_swap_search(run_config, progress=progress)
        print_layer_swap_search_result(console, swap)
        return

    from lorasoup.search.run import run_search

    with step_progress(console, "searching weights (best loss so far)") as progress:
        result = run_search(run_config, progress=progress)
    print_search_result(console, result)
