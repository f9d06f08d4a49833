"""``lorasoup eval``: score a base model (+ adapter) on a task."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorasoup.cli.console import console
from lorasoup.cli.options import OverwriteOption, load_run_config, only_if, set_option
from lorasoup.cli.progress import score_progress
from lorasoup.cli.render import print_eval_result

EvalSetOption = set_option("generation.max_new_tokens=256")

ModelOption = Annotated[
    str | None, typer.Option(help="Base model: hub id, checkpoint dir, .gguf or builtin.")
]
DataOption = Annotated[
    list[str] | None, typer.Option(help="Data file (repeatable), or a folder such as LoRA Soups' data/.")
]
ResumeOption = Annotated[
    bool, typer.Option("--resume/--no-resume", help="Continue an interrupted run from OUTPUT.partial/.")
]


def eval_(
    config: Annotated[Path | None, typer.Argument(help="YAML config (optional; flags override it).")] = None,
    model: ModelOption = None,
    adapter: Annotated[str | None, typer.Option(help="PEFT adapter directory or hub id.")] = None,
    task: Annotated[
        str | None, typer.Option(help="gsm-hard, qa, rc, prompt-formats, or a task YAML.")
    ] = None,
    data: DataOption = None,
    fewshot: Annotated[str | None, typer.Option(help="Few-shot demos file (.json/.jsonl).")] = None,
    output: Annotated[str | None, typer.Option(help="Result directory (default runs/eval/TASK).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per generation batch.")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="New tokens at most (default: the task's).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N examples of each data file.")] = None,
    backend: Annotated[str | None, typer.Option(help="hf (default), cudagraph (greedy) or vllm.")] = None,
    sampling: Annotated[
        str | None, typer.Option(help="greedy (default) or paper (T=0.1, top-p 0.95).")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1... (default: cuda if present).")
    ] = None,
    set_: EvalSetOption = None,
    resume: ResumeOption = True,
    overwrite: OverwriteOption = False,
) -> None:
    """Score a base model (+ adapter) on a task: generate, extract, score; write per-example results.

    Writes OUTPUT/ when done: examples.jsonl, summary.json, summary.md and run.json. An interrupted
    run resumes from OUTPUT.partial/. Model-written programs (gsm-hard) run in the sandbox.
    """
    from lorasoup.evaluation.config import EvalRunConfig
    from lorasoup.evaluation.runner import evaluate

    flags = {
        "model": model,
        "adapter": adapter,
        "task": task,
        "data": data or None,
        "fewshot": fewshot,
        "output": output,
        "limit": limit,
        "backend": backend,
        "device": device,
        "generation.batch_size": batch_size,
        "generation.max_new_tokens": max_new_tokens,
        "generation.sampling": sampling,
        # --no-resume turns resuming off; the default leaves the config's choice
        "resume": None if resume else False,
        "overwrite": only_if(overwrite),
    }
    run_config = load_run_config(EvalRunConfig, config, set_, flags, set_beats_flags=True)
    with score_progress(console, f"eval {run_config.task}") as progress:
        result = evaluate(run_config, progress=progress)
    print_eval_result(console, run_config.task, result)
