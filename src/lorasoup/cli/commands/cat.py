"""``lorasoup cat``: learn CAT weights and export a plain PEFT adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorasoup.cli.console import console
from lorasoup.cli.options import OutputOption, OverwriteOption, SetOption, load_run_config, only_if
from lorasoup.cli.progress import step_progress
from lorasoup.cli.render import print_cat_result


def cat(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/cat-example.yaml).")],
    set_: SetOption = None,
    output: OutputOption = None,
    merge: Annotated[
        bool | None, typer.Option(help="Also write merged full weights to OUTPUT/merged.")
    ] = None,
    rank_bucket: Annotated[
        str | None, typer.Option(help="'vllm' pads the rank with zero rows to vLLM's next bucket.")
    ] = None,
    resume_from: Annotated[
        str | None, typer.Option(help="A checkpoint directory (OUTPUT.checkpoints/step-N).")
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Compose adapters by CAT (learnable concatenation) and export a plain PEFT adapter.

    Learns one weight per adapter per module (or per layer, or global) on your data with base and
    adapters frozen, then writes OUTPUT/ atomically: a PEFT adapter with the weights folded in
    (r = lora_alpha = sum of ranks), cat_weights.json and run.json. See configs/cat-example.yaml.
    """
    from lorasoup.cat.config import CatRunConfig
    from lorasoup.cat.run import run_cat

    flags = {
        "output": output,
        "export.merge": merge,
        "export.rank_bucket": rank_bucket,
        "resume_from": resume_from,
        "overwrite": only_if(overwrite),
    }
    run_config = load_run_config(CatRunConfig, config, set_, flags)
    with step_progress(console, "training CAT weights") as progress:
        result = run_cat(run_config, progress=progress)
    print_cat_result(console, result)
