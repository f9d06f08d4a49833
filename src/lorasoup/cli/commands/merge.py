"""``lorasoup merge`` and ``lorasoup compress``: classic merges and exact recompression."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorasoup.cli.console import console, fail
from lorasoup.cli.options import (
    OutputOption,
    OverwriteOption,
    load_run_config,
    only_if,
    set_option,
)
from lorasoup.cli.progress import count_progress
from lorasoup.cli.render import merge_methods_table, print_merge_result

EnergyOption = Annotated[
    float | None, typer.Option(help="Keep the fewest ranks holding this share of ‖ΔW‖².")
]
BaseModelOption = Annotated[str | None, typer.Option(help="Base model (needed for --merge).")]


CompressSetOption = set_option("dtype=bfloat16")
MergeSetOption = set_option("parameters.density=0.5")

MergeConfigArgument = Annotated[
    Path | None,
    typer.Argument(help="YAML config (see configs/merge-example.yaml); flags may replace it."),
]
WeightedAdaptersOption = Annotated[
    list[str] | None,
    typer.Option("--adapter", "-a", help="PATH or PATH:WEIGHT (repeatable), e.g. -a runs/math:0.7."),
]


def merge(
    config: MergeConfigArgument = None,
    method: Annotated[
        str | None, typer.Option(help="Merge method; `lorasoup merge --list` shows them.")
    ] = None,
    adapter: WeightedAdaptersOption = None,
    output: OutputOption = None,
    density: Annotated[
        float | None, typer.Option(help="Fraction of entries kept (TIES, DARE, magnitude).")
    ] = None,
    rank: Annotated[
        int | None, typer.Option(help="Rank of the result (svd, and ΔW-space re-extraction).")
    ] = None,
    energy: EnergyOption = None,
    base_model: BaseModelOption = None,
    merge_weights: Annotated[
        bool | None, typer.Option("--merge", help="Also write merged full weights to OUTPUT/merged.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for DARE's random drops.")] = None,
    set_: MergeSetOption = None,
    list_methods: Annotated[bool, typer.Option("--list", help="List the merge methods and exit.")] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Merge LoRA adapters into one plain PEFT adapter: linear, svd, ties, dare_*, core_*, tsv, ...

    The ΔW-space methods are exact task arithmetic (linear, svd) or act on each module's update as
    their papers define (ties, dare_linear, dare_ties, magnitude_prune), re-extracting a low-rank
    adapter and reporting the discarded energy. core_* merge small cores in shared bases and tsv
    whitens task singular vectors, never dense. layer_swap gives each layer one adapter whole (rule in
    a `layer_swap:` section, e.g. --set layer_swap.first=2 --set layer_swap.edges=math --set
    layer_swap.rest=code; `lorasoup search --layer-swap` chooses the rule on a few target examples).
    `*_factor` methods reproduce PEFT's add_weighted_adapter, which merges A and B separately (cross
    terms included).
    """
    from lorasoup.merging import MERGE_METHODS
    from lorasoup.merging.config import MergeRunConfig
    from lorasoup.merging.run import run_merge

    if list_methods:
        console.print(merge_methods_table(MERGE_METHODS))
        return
    if config is None and not adapter:
        fail("give a config file or at least one --adapter PATH[:WEIGHT] (see lorasoup merge --help)")
    base = {"adapters": [weighted_adapter(item) for item in adapter]} if adapter else None
    flags = {
        "method": method,
        "output": output,
        "parameters.density": density,
        "parameters.rank": rank,
        "parameters.energy": energy,
        "base_model": base_model,
        "merge": merge_weights,
        "seed": seed,
        "overwrite": only_if(overwrite),
    }
    run_config = load_run_config(MergeRunConfig, config, set_, flags, base=base)
    with count_progress(console, f"merging ({run_config.method})") as progress:
        result = run_merge(run_config, progress=progress)
    print_merge_result(console, result)


def weighted_adapter(item: str) -> dict[str, Any]:
    """``-a PATH:WEIGHT`` → ``{"path": PATH, "weight": WEIGHT}``; a colon not followed by a number is
    part of the path (``C:\\adapters``, ``hub/id:revision``)."""
    path, sep, weight = item.rpartition(":")
    if sep and path:
        try:
            return {"path": path, "weight": float(weight)}
        except ValueError:
            pass
    return {"path": item}


def compress(
    adapter: Annotated[str, typer.Argument(help="PEFT adapter directory or hub id.")],
    output: Annotated[str, typer.Option(help="Where to write the recompressed adapter.")],
    rank: Annotated[int | None, typer.Option(help="Target rank k.")] = None,
    energy: EnergyOption = None,
    base_model: BaseModelOption = None,
    merge_weights: Annotated[bool, typer.Option("--merge", help="Also write merged full weights.")] = False,
    set_: CompressSetOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Recompress an adapter to a lower rank with the exact truncated SVD of each module's update.

    Computed from the factors (thin QR of A and B, then an R x R SVD), never from the dense ΔW: seconds
    for a 7B adapter. Reports the energy each module loses.
    """
    from lorasoup.merging.run import CompressConfig, run_compress

    flags = {
        "adapter": adapter,
        "output": output,
        "rank": rank,
        "energy": energy,
        "base_model": base_model,
        "merge": only_if(merge_weights),
        "overwrite": only_if(overwrite),
    }
    settings = load_run_config(CompressConfig, None, set_, flags)
    with count_progress(console, "recompressing") as progress:
        result = run_compress(settings, progress=progress)
    print_merge_result(console, result)
