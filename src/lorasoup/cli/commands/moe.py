"""``lorasoup moe [train] CONFIG`` and ``lorasoup moe distill RUN``: mixture of LoRA experts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorasoup.cli.console import CommandGroup, console
from lorasoup.cli.options import (
    OutputOption,
    OverwriteOption,
    SetOption,
    load_run_config,
    only_if,
    set_option,
)
from lorasoup.cli.progress import count_progress, step_progress
from lorasoup.cli.render import print_distill_result, print_moe_result

DistillSetOption = set_option("export_dtype=bfloat16")


class MoeCommands(CommandGroup):
    """``lorasoup moe CONFIG.yaml`` means ``lorasoup moe train CONFIG.yaml``; ``distill`` is the other."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


def moe_app() -> typer.Typer:
    """The ``moe`` group with its two commands."""
    group = typer.Typer(
        cls=MoeCommands,
        help="Mixture of LoRA experts: per-token routers gate the skill LoRAs (a baseline to CAT).",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    group.command("train")(train)
    group.command("distill")(distill)
    return group


def train(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/moe-example.yaml).")],
    set_: SetOption = None,
    output: OutputOption = None,
    resume_from: Annotated[
        str | None, typer.Option(help="A checkpoint directory (OUTPUT.checkpoints/step-N).")
    ] = None,
    flow: Annotated[
        bool,
        typer.Option(
            "--flow",
            help="LoRA-Flow gates (Wang et al. 2024): soft per-layer gates, no balancing loss "
            "(router.preset=lora_flow, granularity=layer, balance_coef=0).",
        ),
    ] = False,
    overwrite: OverwriteOption = False,
) -> None:
    """Train per-token routers over frozen skill LoRAs (the default: `lorasoup moe CONFIG.yaml`).

    Loss: the LM loss plus router.balance_coef x the Switch Transformer load-balancing loss. Writes
    OUTPUT/ atomically: moe_config.json, router.safetensors, adapters/ (copies) and run.json. With
    --flow, LoRA-Flow's gates, usually trained on a few hundred target examples (data.train); then
    `lorasoup moe distill` turns them into static CAT weights and a plain PEFT adapter.
    """
    from lorasoup.moe.config import MoeRunConfig
    from lorasoup.moe.run import run_moe

    flags: dict[str, Any] = {"output": output, "resume_from": resume_from, "overwrite": only_if(overwrite)}
    if flow:
        flags |= {"router.preset": "lora_flow", "router.granularity": "layer", "router.balance_coef": 0.0}
    run_config = load_run_config(MoeRunConfig, config, set_, flags)
    what = "LoRA-Flow gates" if run_config.router.preset == "lora_flow" else "MoE routers"
    with step_progress(console, f"training {what}") as progress:
        result = run_moe(run_config, progress=progress)
    print_moe_result(console, result)


def distill(
    run_dir: Annotated[Path, typer.Argument(help="A MoE artifact written by `lorasoup moe`.")],
    output: Annotated[str, typer.Option(help="Where to write the distilled PEFT adapter.")],
    data: Annotated[
        list[str] | None,
        typer.Option(help="Data to average the gates over (repeatable; default: the training data)."),
    ] = None,
    template: Annotated[str | None, typer.Option(help="Prompt template (default: training's).")] = None,
    cutoff_len: Annotated[int | None, typer.Option(help="Tokens per example at most.")] = None,
    max_examples: Annotated[int | None, typer.Option(help="Only the first N examples.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model (default: the recorded one).")] = None,
    batch_size: Annotated[
        int | None,
        # the default lives in MoeDistillConfig, so that --set batch_size=... is not beaten by an unset flag
        typer.Option(help="Examples per forward pass.", show_default="8"),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1...")] = None,
    set_: DistillSetOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Average the routers' gates over data into static CAT weights; export a plain PEFT adapter.

    Every module gets its router's mean gate per adapter (over all real tokens) as its CAT weight;
    the weights are folded in exactly as `lorasoup cat` does. Writes OUTPUT/ atomically: the PEFT
    adapter, cat_weights.json and run.json.
    """
    from lorasoup.moe.config import MoeDistillConfig
    from lorasoup.moe.run import run_distill

    flags = {
        "run_dir": str(run_dir),
        "output": output,
        "data": list(data) if data else None,
        "template": template,
        "cutoff_len": cutoff_len,
        "max_examples": max_examples,
        "base_model": base_model,
        "batch_size": batch_size,
        "device": device,
        "overwrite": only_if(overwrite),
    }
    settings = load_run_config(MoeDistillConfig, None, set_, flags)
    with count_progress(console, "averaging gates (batches)") as progress:
        result = run_distill(settings, progress=progress)
    print_distill_result(console, result)
