"""The demo study: every composition method on the synthetic benchmark, through lorasoup's public API.

One seed: build the benchmark and tokenizer, pre-train the base, train the two skill LoRAs, the
DATA-MIX LoRA and the oracle (``train_skill``), merge (``run_merge``: linear, TIES, DARE, SVD),
compose by CAT (``run_cat``, weights trained on the skills' own data as the paper does), and score
every model on the composite task and on each skill's own task (``evaluate_model``; programs run in
the sandbox). CAT also appears untrained, at its random initialisation and with uniform weights, to
show what learning the weights buys.

Behind settings: ``skills=3`` adds the extra skill and runs every method again over the three
LoRAs on the 3-way composite (``compose.py``; the K-scaling table); ``format_robust=true`` pre-trains
the base in many prompt frames and adds format-robust CAT, scored with plain CAT, DATA-MIX and the
oracle in held-out frames (``robustness.py``). The default run is exactly the two-skill study.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorasoup.demo.base import BaseModelSize, pretrain_base
from lorasoup.demo.benchmark import Benchmark, BenchmarkSizes, build_benchmark, build_tokenizer
from lorasoup.demo.device import check_device, resolve_device
from lorasoup.errors import LorasoupError
from lorasoup.evaluation.generate import GenerationSettings
from lorasoup.evaluation.tasks import SandboxOptions, Task, TaskSpec

StageHook = Callable[[str, int, int], None]
"""``(what is running, stages done, stages in all)``."""

TASKS = ("composite", "math", "code")
TASKS_K3 = ("composite3", "math", "code", "extra")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class DemoSettings:
    """Everything the study's numbers depend on; the GPU study scales ``base`` and the step counts."""

    base: BaseModelSize = field(default_factory=BaseModelSize)
    sizes: BenchmarkSizes = field(default_factory=BenchmarkSizes)
    lora_rank: int = 8
    lora_steps: int = 400
    lora_learning_rate: float = 3e-3
    batch_size: int = 32
    cat_steps: int = 300
    cat_learning_rate: float = 0.1
    density: float = 0.75  # TIES and DARE, as the paper's code
    search_examples: int = 8
    search_population: int = 16
    search_iterations: int = 15
    eval_batch_size: int = 100
    skills: int = 2  # 3: the extra skill joins, and the study runs again at K = 3 (benchmark.py)
    format_robust: bool = False  # the format-robustness rows (robustness.py)
    train_formats: list[str] = field(default_factory=lambda: ["plain", "fmt1", "fmt2", "fmt4"])
    held_out_formats: list[str] = field(default_factory=lambda: ["fmt7", "fmt8", "fmt10"])
    device: str = "auto"  # auto (CUDA if torch sees a GPU, else the CPU) | cpu | cuda; device.py

    def validate(self) -> None:
        from lorasoup.config import require
        from lorasoup.demo.robustness import check_frames

        require(self.skills in (2, 3), f"skills: the demo has 2 or 3 skills, not {self.skills}")
        check_frames(self.train_formats, self.held_out_formats)
        check_device(self.device)


@dataclass
class MethodResult:
    """One row of the table: accuracy on each task, the artifact it came from, and how it was made."""

    method: str
    kind: str
    accuracy: dict[str, float]
    artifact: str | None
    detail: str = ""


def _task_specs(template: str = "plain") -> dict[str, TaskSpec]:
    """Every demo task, prompts in ``template`` (``plain``; a frame of the format-robustness rows)."""
    from lorasoup.evaluation.generate import GenerationOptions

    def spec(name: str, description: str, **scoring: str) -> TaskSpec:
        generation = GenerationOptions(max_new_tokens=16, stop=[])
        return TaskSpec(
            name=name, description=description, template=template, generation=generation, **scoring
        )

    program = {"reference": "value", "scorer": "program_solution", "metric": "numeric"}
    return {
        "composite": spec(
            "demo-composite", "multiplication story → PAL program; the sandbox calls solution()", **program
        ),
        "math": spec(
            "demo-math",
            "multiplication story → 'answer : a * b'",
            reference="output",
            extractor="strip",
            metric="exact_text",
        ),
        "code": spec(
            "demo-code",
            "addition/subtraction story → PAL program (the code skill on its own ground)",
            **program,
        ),
        "composite3": spec(
            "demo-composite3", "multiplication story + 'then ... c more' → PAL program, a * b + c", **program
        ),
        "extra": spec(
            "demo-extra",
            "addition/subtraction story + 'then ... c more' → 'answer : a + b + c'",
            reference="output",
            extractor="strip",
            metric="exact_text",
        ),
    }


def task_specs(names: tuple[str, ...] = TASKS) -> dict[str, TaskSpec]:
    """The tasks ``names`` (``TASKS``; ``TASKS_K3`` for the three-skill study), in the plain frame."""
    every = _task_specs()
    return {name: every[name] for name in names}


def format_specs(formats: list[str], task: str = "composite") -> dict[str, TaskSpec]:
    """``task`` once per prompt frame, keyed by the frame's name (the format-robustness rows)."""
    return {name: _task_specs(name)[task] for name in formats}


class Scorer:
    """Scores models on test sets (by default the three of ``TASKS``) and keeps every per-example record.

    ``specs``: the tasks by name; ``splits``: the test split each one reads (default: its own name;
    the format rows read ``composite`` under every frame's name). Models are moved to the settings'
    device before they generate.
    """

    def __init__(
        self,
        benchmark: Benchmark,
        tokenizer: Any,
        settings: DemoSettings,
        out_dir: Path,
        specs: dict[str, TaskSpec] | None = None,
        splits: dict[str, str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.tasks = {name: Task(spec, num_fewshot=0) for name, spec in (specs or task_specs()).items()}
        splits = splits or {}
        self.examples = {
            name: task.examples(benchmark.test[splits.get(name, name)]) for name, task in self.tasks.items()
        }
        self.settings = GenerationSettings(max_new_tokens=16, batch_size=settings.eval_batch_size)
        self.batch_sizes: dict[str, int] = {}
        self.out_dir = out_dir
        self.device = resolve_device(settings.device)
        self.backend = getattr(settings, "eval_backend", "hf")
        self.fallbacks: list[str] = []  # "method / task: why" for each score the hf backend had to redo

    def add_task(self, name: str, task: Task, examples: list[Any], batch_size: int | None = None) -> None:
        """Score ``task`` on ``examples`` too (a task read from files, such as GSM-Hard)."""
        self.tasks[name], self.examples[name] = task, examples
        if batch_size is not None:
            self.batch_sizes[name] = batch_size

    def score(self, method: str, model: torch.nn.Module) -> dict[str, float]:
        model = model.to(self.device)
        accuracy = {}
        folder = self.out_dir / slug(method)
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.tasks:
            outcome = self._evaluate(method, name, model)
            with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
                for result in outcome.results:
                    handle.write(json.dumps(result.to_json()) + "\n")
            accuracy[name] = outcome.summary["accuracy"]
        return accuracy

    def _evaluate(self, method: str, name: str, model: torch.nn.Module) -> Any:
        """One task's outcome through the settings' backend; a model the CUDA-graph backend cannot
        capture is scored again with the hf backend, and the fallback is recorded (``fallbacks``)."""
        from lorasoup.evaluation.runner import evaluate_model

        settings = self.tasks[name].spec.generation.apply(self.settings)  # the task's own token budget
        if name in self.batch_sizes:
            settings = replace(settings, batch_size=self.batch_sizes[name])
        sandbox = SandboxOptions(timeout_s=2.0, memory_mb=256)
        task, examples = self.tasks[name], self.examples[name]
        if self.backend != "hf":
            try:
                return evaluate_model(
                    model, self.tokenizer, task, examples, settings, sandbox=sandbox, backend=self.backend
                )
            except (LorasoupError, RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
                self.fallbacks.append(f"{method} / {name}: {' '.join(str(exc).split())[:200]}")
        return evaluate_model(model, self.tokenizer, task, examples, settings, sandbox=sandbox)


def slug(method: str) -> str:
    """A method's folder name: ``CAT (trained)`` → ``cat-trained``."""
    return "-".join("".join(c if c.isalnum() else " " for c in method.lower()).split())


def write_records(path: Path, records: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def train_lora(
    base_dir: Path,
    sources: list[tuple[str, str, int | None]],
    out: Path,
    settings: DemoSettings,
    seed: int,
    *,
    template: str = "plain",
    cutoff_len: int = 64,
) -> Any:
    """One LoRA through ``train_skill`` (several sources: a DATA-MIX of equal shares)."""
    from lorasoup.config import load_config
    from lorasoup.training.config import TrainRunConfig
    from lorasoup.training.skill import train_skill

    raw = {
        "base_model": str(base_dir),
        "data": {
            "sources": [
                {"path": path, "name": name, **({"size": size} if size else {})}
                for name, path, size in sources
            ],
            "template": template,
            "cutoff_len": cutoff_len,
        },
        "output": str(out),
        "lora": {
            "r": settings.lora_rank,
            "alpha": 2 * settings.lora_rank,
            "dropout": 0.0,
            "target_modules": TARGETS,
        },
        "train": {
            "learning_rate": settings.lora_learning_rate,
            "max_steps": settings.lora_steps * len(sources),
            "batch_size": settings.batch_size,
            "grad_accum": 1,
            "warmup": 0.05,
            "seed": seed,
            "logging_steps": 50,
            "use_cpu": resolve_device(settings.device) == "cpu",
        },
    }
    # A progress hook keeps the Trainer's own bars and log lines out of the demo's output.
    return train_skill(load_config(TrainRunConfig, base=raw), progress=lambda *_: None)


def merge_skills(
    method: str,
    adapters: list[Path],
    weights: list[float],
    params: dict[str, Any],
    out: Path,
    seed: int,
    device: str,
) -> Path:
    from lorasoup.config import load_config
    from lorasoup.merging.config import MergeRunConfig
    from lorasoup.merging.run import run_merge

    raw = {
        "method": method,
        "adapters": [{"path": str(a), "weight": w} for a, w in zip(adapters, weights, strict=True)],
        "parameters": params,
        "output": str(out),
        "seed": seed,
        "device": resolve_device(device),
    }
    return run_merge(load_config(MergeRunConfig, base=raw)).output


def train_cat(
    base_dir: Path,
    adapters: dict[str, Path],
    data: list[str],
    out: Path,
    settings: DemoSettings,
    seed: int,
    *,
    template: str = "plain",
    cutoff_len: int = 64,
    formats: list[str] | None = None,
) -> Any:
    """CAT through ``run_cat``; ``formats``: format-robust CAT, each example in a frame dealt from them."""
    from lorasoup.cat.config import AdapterRef, CatRunConfig, DataConfig, TrainOptions
    from lorasoup.cat.run import run_cat
    from lorasoup.training.formats import as_format_specs

    config = CatRunConfig(
        base_model=str(base_dir),
        adapters=[AdapterRef(str(path), name=name) for name, path in adapters.items()],
        data=DataConfig(
            train=data, template=template, cutoff_len=cutoff_len, formats=as_format_specs(formats or [])
        ),
        output=str(out),
        train=TrainOptions(
            learning_rate=settings.cat_learning_rate,
            max_steps=settings.cat_steps,
            epochs=100,
            batch_size=settings.batch_size,
            seed=seed,
            log_every=50,
            device=resolve_device(settings.device),
        ),
    )
    return run_cat(config)


def search_skill_weights(
    base_dir: Path,
    adapters: dict[str, Path],
    records: list[dict[str, Any]],
    tokenizer: Any,
    settings: DemoSettings,
    seed: int,
    *,
    template: str = "plain",
    cutoff_len: int = 64,
) -> tuple[torch.nn.Module, str]:
    """LoraHub-style: one weight per adapter, searched gradient-free on a handful of target examples."""
    from lorasoup.adapters import load_adapter
    from lorasoup.cat.inject import compose_cat
    from lorasoup.search.config import SearchOptions
    from lorasoup.search.run import search_weights
    from lorasoup.training.data import build_dataset

    composition = compose_cat(
        load_study_model(base_dir, device=resolve_device(settings.device)),
        [load_adapter(p, name=n) for n, p in adapters.items()],
        granularity="global",
        parameterisation="free",
        seed=seed,
    )
    examples = build_dataset(records, tokenizer, template=template, cutoff_len=cutoff_len)
    options = SearchOptions(
        population=settings.search_population, iterations=settings.search_iterations, seed=seed
    )
    result = search_weights(composition, examples, pad_token_id=tokenizer.pad_token_id, options=options)
    composition.set_effective_weights(result.weights)
    found = "(" + ", ".join(f"{name} {w:.2f}" for name, w in result.table["global"].items()) + ")"
    return composition.model.eval(), found


def fit_moe(
    base_dir: Path,
    adapters: dict[str, Path],
    data: list[str],
    settings: DemoSettings,
    seed: int,
    *,
    template: str = "plain",
    cutoff_len: int = 64,
) -> Any:
    """A mixture of the skill LoRAs: per-token routers trained on the skills' data (the paper's MoE row)."""
    from lorasoup.moe.config import MoeTrainOptions
    from lorasoup.moe.run import train_moe

    options = MoeTrainOptions(
        learning_rate=settings.cat_learning_rate,
        max_steps=settings.cat_steps,
        epochs=100,
        batch_size=settings.batch_size,
        seed=seed,
        log_every=50,
        device=resolve_device(settings.device),
    )
    return train_moe(base_dir, adapters, data, train=options, template=template, cutoff_len=cutoff_len)


def distil_moe(
    moe: Any, records: list[dict[str, Any]], *, template: str = "plain", cutoff_len: int = 64
) -> Any:
    """Static CAT weights from the router's mean gates over the skills' data (consumes ``moe``)."""
    import functools

    from lorasoup.moe.distill import distill_to_cat, mean_gates
    from lorasoup.training.data import build_dataset, collate

    dataset = build_dataset(records, moe.tokenizer, template=template, cutoff_len=cutoff_len)
    gates, _ = mean_gates(
        moe.composition, dataset, functools.partial(collate, pad_token_id=moe.tokenizer.pad_token_id)
    )
    return distill_to_cat(moe.composition, gates)


def load_study_model(
    base_dir: Path, adapter: Path | None = None, *, device: str | None = None
) -> torch.nn.Module:
    """The base (with ``adapter``) in eval mode, on ``device`` (None: the CPU, where the scorer moves
    it to the run's device)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if device is not None:
        model = model.to(device)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def untrained_cat(
    base_dir: Path, adapters: dict[str, Path], seed: int, *, uniform: bool, device: str
) -> torch.nn.Module:
    """CAT with weights never trained: at the paper's random initialisation, or uniform (1/K each)."""
    from lorasoup.adapters import load_adapter
    from lorasoup.cat.inject import compose_cat

    composition = compose_cat(
        load_study_model(base_dir, device=resolve_device(device)),
        [load_adapter(p, name=n) for n, p in adapters.items()],
        granularity="module",
        seed=seed,
    )
    if uniform:
        with torch.no_grad():
            composition.weights.theta.zero_()  # softmax of zeros: 1/K
    return composition.model.eval()


STAGES = 23
"""Progress steps of the default (two-skill) study."""


def stage_count(settings: DemoSettings) -> int:
    """Progress steps of one seed: the two-skill study, plus the K = 3 study and the format rows if on."""
    from lorasoup.demo import compose, robustness

    k3 = 1 + 2 + 2 + compose.STEPS  # base and two skills rescored, the third skill trained and scored
    return STAGES + (k3 if settings.skills == 3 else 0) + (robustness.STEPS if settings.format_robust else 0)


def run_seed(
    out: Path, seed: int, settings: DemoSettings, stage: StageHook | None = None
) -> tuple[list[MethodResult], dict[str, Any]]:
    """The whole study for one seed, in ``out`` (which must exist); returns the rows and facts.

    The rows are the two-skill table; with ``skills=3`` the facts hold the K = 3 table under ``"k3"``,
    with ``format_robust`` the format rows under ``"formats"`` (lists of :class:`MethodResult`).
    """
    from lorasoup.demo.compose import SeedStudy, compose_methods, three_skills

    clock: dict[str, float] = {}
    done, total = 0, stage_count(settings)

    def step(name: str) -> None:
        nonlocal done
        if stage is not None:
            stage(name, done, total)
        done += 1

    started = time.perf_counter()
    benchmark, tokenizer = demo_benchmark(seed, settings), demo_tokenizer(settings)
    files = {
        name: write_records(out / "data" / f"{name}.json", records)
        for name, records in benchmark.train.items()
    }
    step("pre-training the base model")
    base_dir = out / "base"
    base_facts = _pretrain(benchmark, tokenizer, base_dir, settings, seed)
    clock["base_s"] = time.perf_counter() - started

    study = SeedStudy(out, seed, settings, base_dir, tokenizer, benchmark, files, step)
    scorer = Scorer(benchmark, tokenizer, settings, out / "eval")
    rows: list[MethodResult] = []
    study.add(rows, scorer, "base model", "reference", load_study_model(base_dir), base_dir)
    adapters: dict[str, Path] = {}
    for name in ("math", "code"):
        adapters[name] = study.train_skill(name)
        study.add_skill(rows, scorer, name, adapters[name])
    clock["skills_s"] = time.perf_counter() - started - clock["base_s"]
    mark = time.perf_counter()
    composed, artifacts = compose_methods(study, scorer, adapters, target="composite")
    rows += composed
    clock["methods_s"] = time.perf_counter() - mark
    facts: dict[str, Any] = {
        "seed": seed,
        "timings_s": clock,
        "base_model": base_facts,
        "cat_weights": str(artifacts["cat"] / "cat_weights.json"),
    }
    if settings.skills == 3:
        mark = time.perf_counter()
        facts["k3"] = three_skills(study, dict(adapters))
        clock["k3_s"] = time.perf_counter() - mark
    if settings.format_robust:
        from lorasoup.demo.robustness import format_rows

        mark = time.perf_counter()
        facts["formats"] = format_rows(study, adapters, artifacts)
        clock["formats_s"] = time.perf_counter() - mark
    clock["total_s"] = time.perf_counter() - started
    return rows, facts


def demo_benchmark(seed: int, settings: DemoSettings) -> Benchmark:
    """The benchmark of a run with ``settings`` (its sizes and number of skills)."""
    return build_benchmark(seed, settings.sizes, skills=settings.skills)


def demo_tokenizer(settings: DemoSettings) -> Any:
    """The tokenizer of a run with ``settings`` (its skills' words; the frames' with ``format_robust``)."""
    return build_tokenizer(skills=settings.skills, frames=settings.format_robust)


def _pretrain(benchmark: Benchmark, tokenizer: Any, base_dir: Path, settings: DemoSettings, seed: int) -> Any:
    """The base model; with ``format_robust`` it learns its language in every frame (robustness.py)."""
    where = {"size": settings.base, "seed": seed, "device": resolve_device(settings.device)}
    if not settings.format_robust:
        return pretrain_base(benchmark.base, tokenizer, base_dir, **where)
    from lorasoup.demo.robustness import BASE_FORMATS, render_in_formats

    records = render_in_formats(benchmark.base, BASE_FORMATS, seed)  # already framed: train verbatim
    return pretrain_base(records, tokenizer, base_dir, template="verbatim", **where)


def aggregate(per_seed: list[list[MethodResult]], tasks: tuple[str, ...] = TASKS) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of every method's accuracy on every task."""
    table = []
    for index, first in enumerate(per_seed[0]):
        row: dict[str, Any] = {"method": first.method, "kind": first.kind, "detail": first.detail}
        for name in tasks:
            values = [rows[index].accuracy[name] for rows in per_seed]
            mean = sum(values) / len(values)
            spread = (
                math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                if len(values) > 1
                else 0.0
            )
            row[name] = {"mean": mean, "std": spread, "values": values}
        table.append(row)
    return table


def settings_record(settings: DemoSettings) -> dict[str, Any]:
    return asdict(settings)
