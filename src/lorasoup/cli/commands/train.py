"""``lorasoup train``: one skill LoRA, or several datasets mixed (DATA-MIX)."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from lorasoup.cli.console import console
from lorasoup.cli.options import OverwriteOption, load_run_config, only_if, set_option
from lorasoup.cli.progress import step_progress
from lorasoup.cli.render import print_train_result

TrainSetOption = set_option("train.learning_rate=2e-4")


def train(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/train-example.yaml).")],
    set_: TrainSetOption = None,
    output: Annotated[str | None, typer.Option(help="Adapter directory (overrides `output`).")] = None,
    resume_from: Annotated[
        str | None, typer.Option(help="A checkpoint (OUTPUT.checkpoints/checkpoint-N), or 'last'.")
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Train a LoRA on one skill's data, or on several mixed (DATA-MIX), with the transformers Trainer.

    Writes OUTPUT/ atomically: a plain PEFT adapter and run.json; checkpoints go to OUTPUT.checkpoints/.
    Several GPUs: accelerate launch --config_file configs/accelerate/ddp-2gpu.yaml -m lorasoup train CONFIG.
    """
    from lorasoup.training.config import TrainRunConfig
    from lorasoup.training.skill import train_skill

    flags = {"output": output, "resume_from": resume_from, "overwrite": only_if(overwrite)}
    run_config = load_run_config(TrainRunConfig, config, set_, flags)
    # Under accelerate launch every process runs this command; one progress bar is enough.
    main_process = os.environ.get("RANK", "0") == "0"
    bar = step_progress(console, "training LoRA") if main_process else nullcontext(None)
    with bar as progress:
        result = train_skill(run_config, progress=progress)
    if result.is_main_process:
        print_train_result(console, result)
