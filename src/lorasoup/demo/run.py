"""``lorasoup demo``: run the seeds (here or in worker processes), aggregate them, write the report.

The package docstring (``lorasoup/demo/__init__.py``) says what the output directory holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasoup.demo.real_study import STAGES as REAL_STAGES
from lorasoup.demo.real_study import RealDemoSettings, SeedRunner, report_header, seed_runner
from lorasoup.demo.real_study import tasks as real_tasks
from lorasoup.demo.settings import TASKS, DemoSettings, MethodResult, StageHook, aggregate, settings_record
from lorasoup.demo.study import run_seed
from lorasoup.demo.tables import extra_results, extra_sections
from lorasoup.errors import ConfigError

if TYPE_CHECKING:
    from lorasoup.demo.seeds import Unit


@dataclass
class DemoSummary:
    output: Path
    table: list[dict[str, Any]]
    seeds: list[int]
    seconds: float
    k3_table: list[dict[str, Any]] | None = None  # the three-skill study's table (``skills=3``)


def run_demo(
    output: str | Path,
    *,
    seed: int = 0,
    seeds: int | Sequence[int] = 1,
    settings: DemoSettings | RealDemoSettings | None = None,
    overwrite: bool = False,
    stage: StageHook | None = None,
    model: str = "tiny",
    jobs: int = 1,
    resume: bool = False,
) -> DemoSummary:
    """Run the study for ``seeds`` seeds (``seed``, ``seed + 1``, ...; or a list of seeds) and write
    the report.

    ``model`` picks the mode (``MODES``): ``tiny`` (a base pre-trained from a seed), ``smollm2``, or
    ``real`` (the smollm2 study on ``settings.model``; ``demo_choice`` maps ``--model PATH`` to it).
    ``jobs``: how many seeds run at once, each in a worker process (``seeds.py``; 1: one after
    another in this process). The settings' ``device`` says where everything runs (``device.py``).
    ``resume``: work in ``.OUTPUT.partial`` and keep it if the run is stopped; run again with the
    same settings and the LoRAs already trained and the rows already scored are not done again (a
    run cut by a time limit, say a GPU call's, goes on in the next one).
    """
    from lorasoup.artifacts import atomic_output_dir, require_free_output, resumable_output_dir
    from lorasoup.demo.device import resolve_device
    from lorasoup.demo.seeds import run_units

    mode = demo_mode(model)
    settings = settings or mode.settings()
    chosen = seed_list(seed, seeds)
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    resolve_device(settings.device)  # before any work: a GPU asked for and missing is a one-line error
    output = Path(output)
    require_free_output(output, overwrite=overwrite)
    started = time.perf_counter()
    folder = (
        resumable_output_dir(output, resume_fingerprint(model, chosen, settings), overwrite=overwrite)
        if resume
        else atomic_output_dir(output, overwrite=overwrite)
    )
    with folder as staging:
        clock = RunClock(staging / "elapsed.json" if resume else None, started)
        timed_stage = clock.hook(stage)
        units = seed_units(staging, chosen, settings, model, timed_stage)
        outcomes = run_units(units, jobs=jobs, stage=timed_stage, resume=resume)
        seconds = clock.finish()
        results = write_demo(staging, outcomes, chosen, settings, model, seconds, jobs=jobs)
    return summary_of(output, results, seconds)


def resume_fingerprint(model: str, seeds: list[int], settings: Any) -> dict[str, Any]:
    """What a run's results depend on: a partial run resumes only under the same one
    (``artifacts.resumable_output_dir``)."""
    return {"model": model, "seeds": seeds, "settings": settings_record(settings)}


class RunClock:
    """A run's wall seconds across the calls a resumed run took (a GPU call's time limit cuts it, the
    next call goes on): at every stage it reports, the time so far goes to ``path`` in the work
    folder, and a resumed run starts counting from there. Without ``path``, this call's time."""

    def __init__(self, path: Path | None, started: float) -> None:
        self.path, self.started = path, started
        saved = path is not None and path.is_file()
        self.before = float(json.loads(path.read_text(encoding="utf-8"))["elapsed_s"]) if saved else 0.0

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started

    def save(self) -> None:
        """The time so far into ``path`` (nothing without one)."""
        if self.path is not None:
            from lorasoup.artifacts import write_json_atomic

            write_json_atomic(self.path, {"elapsed_s": self.elapsed()})

    def hook(self, stage: StageHook | None) -> StageHook | None:
        """``stage``, also saving the time so far (the stage that a kill interrupts is not counted)."""
        if self.path is None:
            return stage

        def report(what: str, done: int, total: int) -> None:
            self.save()
            if stage is not None:
                stage(what, done, total)

        return report

    def finish(self) -> float:
        """The total, and the work folder rid of the clock file (run.json records the total)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        return self.elapsed()


def combine_runs(runs: Sequence[str | Path], output: str | Path, *, overwrite: bool = False) -> DemoSummary:
    """One study from demo runs made separately with the same settings (say one seed per run, on GPU
    machines that go back between calls): their seeds are aggregated as if they had run together, and
    each run's ``seed-N/`` folder is copied in (model weights left out).
    """
    import shutil

    from lorasoup.artifacts import atomic_output_dir
    from lorasoup.config import load_config

    folders = [Path(run) for run in runs]
    loaded = [_finished_run(folder) for folder in folders]
    first = loaded[0]
    mode = demo_mode(first["model"])
    settings = load_config(mode.settings, base=first["settings"])
    _check_one_study(folders, loaded, mode, settings)
    seeds = [seed for results in loaded for seed in results["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"the runs share seeds ({seeds}); combine runs of different seeds")
    output = Path(output)
    outcomes: list[tuple[list[MethodResult], dict[str, Any]]] = []
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        for folder, results in zip(folders, loaded, strict=True):
            for seed, rows, facts in zip(
                results["seeds"], results["per_seed"], results["seed_facts"], strict=True
            ):
                shutil.copytree(
                    folder / f"seed-{seed}",
                    staging / f"seed-{seed}",
                    ignore=shutil.ignore_patterns(*_WEIGHTS),
                )
                placed = facts | {"cat_weights": str(staging / facts["cat_weights"])}
                outcomes.append(([MethodResult(**row) for row in rows], placed))
        seconds = sum(
            json.loads((f / "run.json").read_text(encoding="utf-8"))["timings_s"]["total"] for f in folders
        )
        # the machines that ran the seeds, not this one (a GPU study is often combined on a laptop)
        hardware = {"device": first["device"]}
        gpus = sorted({results["gpu"] for results in loaded if "gpu" in results})
        if gpus:
            hardware["gpu"] = ", ".join(gpus)
        results = write_demo(staging, outcomes, seeds, settings, first["model"], seconds, hardware=hardware)
    return summary_of(output, results, seconds)


def _finished_run(folder: Path) -> dict[str, Any]:
    """``folder``'s results, if it is a whole demo run that can be combined (else a one-line error)."""
    path = folder / "results.json"
    if not path.is_file():
        raise ConfigError(f"{folder} is not a finished demo run (no results.json)")
    results = json.loads(path.read_text(encoding="utf-8"))
    if "seed_facts" not in results:
        raise ConfigError(f"{path} was written before runs could be combined; run that seed again")
    missing = [f"seed-{seed}" for seed in results.get("seeds", []) if not (folder / f"seed-{seed}").is_dir()]
    if missing:
        raise ConfigError(
            f"{folder} lacks its work folder {missing[0]}: combine the run folders as the demo wrote them"
        )
    return results


def _check_one_study(
    folders: list[Path], loaded: list[dict[str, Any]], mode: DemoMode, settings: Any
) -> None:
    """Every run has the first's model, tasks and ``settings`` (the first's, loaded). Settings are
    compared with the fields a later lorasoup added at their defaults (which is what a run recorded
    before them did)."""
    from lorasoup.config import load_config

    first, expected = loaded[0], settings_record(settings)
    for folder, results in zip(folders[1:], loaded[1:], strict=True):
        for key in ("model", "tasks", "settings"):
            if key == "settings":
                same = settings_record(load_config(mode.settings, base=results["settings"])) == expected
            else:
                same = results[key] == first[key]
            if not same:
                raise ConfigError(
                    f"{folder} differs from {folders[0]} in {key}: only runs of one study combine"
                )


_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def demo_mode(model: str) -> DemoMode:
    """The mode of ``--model`` (``MODES``), or a one-line error listing them."""
    if model not in MODES:
        raise ConfigError(f"unknown demo model {model!r}; choose one of: {', '.join(MODES)}")
    return MODES[model]


def seed_list(seed: int, seeds: int | Sequence[int]) -> list[int]:
    """``seeds`` seeds from ``seed`` on, or the list given; at least one, none twice."""
    chosen = [seed + i for i in range(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
    if not chosen or len(set(chosen)) != len(chosen):
        raise ConfigError(f"seeds: give at least one seed and no seed twice, got {chosen}")
    return chosen


def seed_units(
    folder: Path, seeds: list[int], settings: Any, model: str, stage: StageHook | None = None, label: str = ""
) -> list[Unit]:
    """One unit per seed (``folder/seed-N``), after the work the seeds share (``DemoMode.runner``).

    ``label`` prefixes the units' progress lines (the scaling study's size name).
    """
    from lorasoup.demo.device import resolve_device
    from lorasoup.demo.seeds import Unit
    from lorasoup.demo.study import stage_count

    resolve_device(settings.device)
    mode = demo_mode(model)
    run_one = mode.runner(folder, settings, stage)
    stages = stage_count(settings) if model == "tiny" else REAL_STAGES
    prefix = f"{label} " if label else ""
    return [Unit(run_one, folder / f"seed-{s}", s, settings, stages, f"{prefix}seed {s}") for s in seeds]


def summary_of(output: Path, results: dict[str, Any], seconds: float) -> DemoSummary:
    """What the CLI prints of a run whose ``results.json`` holds ``results``."""
    k3 = results.get("k3", {}).get("table")
    return DemoSummary(
        output=output, table=results["table"], seeds=results["seeds"], seconds=seconds, k3_table=k3
    )


def write_demo(
    folder: Path,
    outcomes: Sequence[tuple[list[MethodResult], dict[str, Any]]],
    seeds: list[int],
    settings: Any,
    model: str,
    seconds: float,
    *,
    jobs: int = 1,
    hardware: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Aggregate the seeds' outcomes and write ``results.json``, the report and ``run.json`` into
    ``folder``; returns what ``results.json`` holds (``table``: mean ± std over seeds). ``hardware``:
    what ran the seeds, when it was not this machine (runs combined); by default this machine's
    device for ``settings.device``."""
    from lorasoup.artifacts import run_record, write_json_atomic
    from lorasoup.demo.device import device_facts

    hardware = hardware or device_facts(settings.device)
    per_seed: list[list[MethodResult]] = [rows for rows, _ in outcomes]
    facts: list[dict[str, Any]] = [seed_facts for _, seed_facts in outcomes]
    # Paths inside the run, relative to it: the staging folder is renamed, and runs are combined.
    kept_facts = [f | {"cat_weights": str(Path(f["cat_weights"]).relative_to(folder))} for f in facts]
    columns = demo_mode(model).tasks(settings)
    table = aggregate(per_seed, columns)
    results = {
        "model": model,
        "tasks": list(columns),
        "seeds": seeds,
        "table": table,
        "per_seed": [[vars(row) for row in rows] for rows in per_seed],
        "settings": settings_record(settings),
        **hardware,
        **extra_results(table, facts, settings),  # K = 3 and format rows, when they ran
        "seed_facts": kept_facts,
    }
    write_json_atomic(folder / "results.json", results)
    header = demo_mode(model).header
    _write_report(folder, table, seeds, settings, facts, seconds, header=header, results=results)
    record = run_record(
        command="demo",
        config=settings_record(settings),
        seed=seeds[0],
        timings={
            "total": seconds,
            **{f"seed_{f['seed']}_{k}": v for f in facts for k, v in f["timings_s"].items()},
        },
        seeds=seeds,
        jobs=jobs,
        model=model,
        base_models=[f["base_model"] for f in facts],
        **hardware,
    )
    write_json_atomic(folder / "run.json", record)
    return results


def _cell(value: dict[str, Any], seeds: int) -> str:
    mean = f"{100 * value['mean']:.1f}"
    return f"{mean} ± {100 * value['std']:.1f}" if seeds > 1 else mean


def _tiny_header(
    seeds: list[int], settings: DemoSettings, facts: list[dict[str, Any]], seconds: float
) -> list[str]:
    """The tiny study's title and the paragraph that says what was run."""
    base = settings.base
    return [
        "# lorasoup demo: composing a math skill and a code skill",
        "",
        "Composite task: a multiplication word problem answered by a Python program that defines "
        "`solution()`, run in the sandbox. The math skill LoRA knows multiplication stories but "
        "writes `answer : a * b`; the code skill LoRA writes `def solution ( ) : return ...` but "
        "has never seen a multiplication story. See docs/demo.md for the design.",
        "",
        f"Seeds: {', '.join(map(str, seeds))}. Base model: Llama, {base.layers} layers, "
        f"hidden {base.hidden}, "
        f"{facts[0]['base_model']['parameters']:,} parameters, pre-trained {base.steps} steps. "
        f"Skill LoRAs r={settings.lora_rank}, {settings.lora_steps} steps. Test sets: "
        f"{settings.sizes.test} examples per task. Wall time {seconds:.0f} s.",
        "",
    ]


def _write_report(
    folder: Path,
    table: list[dict[str, Any]],
    seeds: list[int],
    settings: Any,
    facts: list[dict[str, Any]],
    seconds: float,
    header: Callable[..., list[str]] = _tiny_header,
    results: dict[str, Any] | None = None,
) -> None:
    from lorasoup.report import markdown_table, markdown_to_html, methods_bar_chart, weights_heatmap

    extra, extra_images = extra_sections(folder, results or {}, len(seeds))
    columns = tuple((results or {}).get("tasks", TASKS))
    bars = methods_bar_chart(
        table, columns, folder / "methods.png", title=f"accuracy per method ({len(seeds)} seed(s))"
    )
    weights = json.loads(Path(facts[0]["cat_weights"]).read_text(encoding="utf-8"))
    heatmap = weights_heatmap(
        weights["weights"], folder / "cat_weights.png", title=f"CAT's learned weights (seed {seeds[0]})"
    )
    names = {
        "composite": "composite task",
        "math": "math skill",
        "code": "code skill",
        "gsm-hard": "GSM-Hard",
    }
    headers = ["method", *(f"{names[t]} (%)" for t in columns), "how"]
    rows = [[row["method"], *(_cell(row[t], len(seeds)) for t in columns), row["detail"]] for row in table]
    best = max((r for r in table if r["kind"] != "ceiling"), key=lambda r: r["composite"]["mean"])
    cat = next(r for r in table if r["method"] == "CAT (trained)")
    mix = next(r for r in table if r["method"] == "DATA-MIX")
    text = "\n".join(
        [
            *header(seeds, settings, facts, seconds),
            markdown_table(headers, rows),
            f"Best composition (oracle excluded): **{best['method']}**, "
            f"{100 * best['composite']['mean']:.1f} % on the composite task. "
            f"CAT (trained): {100 * cat['composite']['mean']:.1f} %; "
            f"DATA-MIX: {100 * mix['composite']['mean']:.1f} %.",
            "",
            *(paper_gsm_hard_lines(table) if "gsm-hard" in columns else []),
            "![accuracy per method](methods.png)",
            "",
            "![CAT weights](cat_weights.png)",
            "",
            *extra,
        ]
    )
    (folder / "report.md").write_text(text, encoding="utf-8")
    page = markdown_to_html(
        text,
        title="lorasoup demo",
        images={"methods.png": bars, "cat_weights.png": heatmap, **extra_images},
    )
    (folder / "report.html").write_text(page, encoding="utf-8")


def paper_gsm_hard_lines(table: list[dict[str, Any]]) -> list[str]:
    """Our GSM-Hard column beside the LoRA Soups paper's figures, labelled as another model's."""
    from lorasoup.demo.real_study import PAPER_GSM_HARD
    from lorasoup.report import markdown_table

    ours = {row["method"]: row["gsm-hard"] for row in table}
    rows = [
        [method, f"{100 * ours[method]['mean']:.1f}" if method in ours else "–", str(paper)]
        for method, paper in PAPER_GSM_HARD.items()
    ]
    return [
        "GSM-Hard beside the paper's figures. **The paper's column is another model** (a 7B Llama with "
        "MetaMathQA and CodeAlpaca LoRAs; figures from public notes, ../shared/PAPER.md §6.2): it gives "
        "scale, not a like-for-like comparison.",
        "",
        markdown_table(["method", "this run (%)", "LoRA Soups paper, 7B Llama (%)"], rows),
    ]


@dataclass(frozen=True)
class DemoMode:
    """One ``--model`` choice: its settings class, how a run prepares its seeds, its report header,
    and the table's columns for its settings.

    ``runner(output folder, settings, stage)`` does the work the seeds share (the smollm2 mode
    converts the base model once) and returns ``run(seed folder, seed, settings, stage)``.
    """

    settings: type
    runner: Callable[[Path, Any, StageHook | None], SeedRunner]
    header: Callable[..., list[str]]
    tasks: Callable[[Any], tuple[str, ...]] = lambda settings: TASKS


MODES: dict[str, DemoMode] = {
    "tiny": DemoMode(DemoSettings, lambda folder, settings, stage: run_seed, _tiny_header),
    "smollm2": DemoMode(RealDemoSettings, seed_runner, report_header, real_tasks),
    # The same study on the model its settings name (`--model PATH` sets it; ``demo_choice``).
    "real": DemoMode(RealDemoSettings, seed_runner, report_header, real_tasks),
}


def demo_choice(model: str) -> tuple[str, dict[str, Any]]:
    """``--model``'s mode and the settings it fixes: ``tiny`` and ``smollm2`` are modes; any other
    model ``lorasoup.models.parse_model_spec`` accepts (a .gguf file, a checkpoint directory, a hub
    id) runs the real-model study (mode ``real``) on it, as ``--model smollm2 --set model=...`` does.
    Local paths become absolute, so run.json names the same files from any directory."""
    from lorasoup.errors import ModelError
    from lorasoup.models import parse_model_spec

    if model in MODES:
        return model, {}
    try:
        parse_model_spec(model)  # a typo fails here, in one line, before any work
    except ModelError as exc:
        raise ConfigError(f"--model must be one of tiny, smollm2 or a model: {exc}") from exc
    local = Path(model).expanduser()
    return "real", {"model": str(local.resolve()) if local.exists() else model}
