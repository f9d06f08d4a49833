"""``lorasoup report``: one static page about finished runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorasoup.cli.console import console, fail
from lorasoup.cli.options import OverwriteOption, load_run_config, only_if, set_option, split_commas
from lorasoup.cli.progress import spinner
from lorasoup.cli.render import print_report_result

ReportSetOption = set_option("seed=1")
RunsArgument = Annotated[
    list[Path], typer.Argument(help="Run directories (demo, cat, merge, compress, eval, train).")
]
ReportOutputOption = Annotated[
    str | None,
    # the default lives in ReportConfig, so that --set output=... is not beaten by an unset flag
    typer.Option(help="Where report.md, report.html and figures go.", show_default="runs/report"),
]
AdaptersOption = Annotated[
    list[str] | None,
    typer.Option(help="Skill adapters to compare (repeatable or comma-separated); default: the runs'."),
]
DensityOption = Annotated[
    float | None, typer.Option(help="TIES density for sign conflicts (default: the runs', else 0.2).")
]
RankSweepOption = Annotated[
    str | None, typer.Option(help="Recompress each CAT adapter to these ranks and score it: 4,8,16.")
]
DeviceOption = Annotated[str | None, typer.Option(help="Device for --rank-sweep (default: cuda if present).")]


def report(
    runs: RunsArgument,
    output: ReportOutputOption = None,
    adapters: AdaptersOption = None,
    density: DensityOption = None,
    rank_sweep: RankSweepOption = None,
    task: Annotated[str | None, typer.Option(help="Task for --rank-sweep (not needed for a demo).")] = None,
    data: Annotated[list[str] | None, typer.Option(help="Data file for --task (repeatable).")] = None,
    fewshot: Annotated[str | None, typer.Option(help="Few-shot demos file for --task.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N examples of each data file.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model (default: the CAT run's).")] = None,
    device: DeviceOption = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per generation batch.")] = None,
    set_: ReportSetOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Write one static Markdown + HTML page (figures embedded) about the runs given.

    Results tables of every run; for composed skills: CAT's learned weights per layer x module x skill,
    principal angles between the skills' LoRA subspaces, TIES sign-conflict rates, recompression energy
    kept per module, and with --rank-sweep the accuracy of the CAT adapter recompressed to each rank.
    """
    from lorasoup.demo.sweep import demo_sweep_inputs
    from lorasoup.report.build import ReportConfig, build_report

    try:
        ranks = [int(r) for r in rank_sweep.split(",") if r.strip()] if rank_sweep else None
    except ValueError:
        fail(f"--rank-sweep takes ranks separated by commas, e.g. 4,8,16; got {rank_sweep!r}")
    flags = {
        "runs": [str(r) for r in runs],
        "output": output,
        "adapters": split_commas(adapters) or None,
        "density": density,
        "rank_sweep": ranks or None,
        "task": task,
        "data": list(data) if data else None,
        "fewshot": fewshot,
        "limit": limit,
        "base_model": base_model,
        "device": device,
        "batch_size": batch_size,
        "overwrite": only_if(overwrite),
    }
    settings = load_run_config(ReportConfig, None, set_, flags)
    with spinner(console, "report") as status:
        result = build_report(
            settings,
            progress=lambda what: status.update(f"report: {what}"),
            # the demo is an application the library does not import: how to rebuild its task comes from here
            sweep_inputs={"demo": demo_sweep_inputs},
        )
    print_report_result(console, result)
