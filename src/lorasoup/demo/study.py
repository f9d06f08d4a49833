"""The demo study: every composition method on the synthetic benchmark, through lorasoup's public API.

One seed: build the benchmark and tokenizer, pre-train the base, train the two skill LoRAs, the
DATA-MIX LoRA and the oracle (``train_skill``), merge (``run_merge``: linear, TIES, DARE, SVD),
compose by CAT (``run_cat``, weights trained on the skills' own data as the paper does), and score
every model on the composite task and on each skill's own task (``evaluate_model``; programs run in
the sandbox). CAT also appears untrained, at its random initialisation and with uniform weights, to
show what learning the weights buys.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorasoup.demo.base import BaseModelSize, pretrain_base
from lorasoup.demo.benchmark import Benchmark, BenchmarkSizes, build_benchmark, build_tokenizer
from lorasoup.evaluation.generate import GenerationSettings
from lorasoup.evaluation.tasks import SandboxOptions, Task, TaskSpec

StageHook = Callable[[str, int, int], None]
"""``(what is running, stages done, stages in all)``."""

TASKS = ("composite", "math", "code")
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


@dataclass
class MethodResult:
    """One row of the table: accuracy on each task, the artifact it came from, and how it was made."""

    method: str
    kind: str
    accuracy: dict[str, float]
    artifact: str | None
    detail: str = ""


def _task_specs() -> dict[str, TaskSpec]:
    from lorasoup.evaluation.generate import GenerationOptions

    def spec(name: str, description: str, **scoring: str) -> TaskSpec:
        generation = GenerationOptions(max_new_tokens=16, stop=[])
        return TaskSpec(
            name=name, description=description, template="plain", generation=generation, **scoring
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
    }


class Scorer:
    """Scores models on the three test sets and keeps every per-example record."""

    def __init__(self, benchmark: Benchmark, tokenizer: Any, settings: DemoSettings, out_dir: Path) -> None:
        self.tokenizer = tokenizer
        self.tasks = {name: Task(spec, num_fewshot=0) for name, spec in _task_specs().items()}
        self.examples = {name: self.tasks[name].examples(benchmark.test[name]) for name in TASKS}
        self.settings = GenerationSettings(max_new_tokens=16, batch_size=settings.eval_batch_size)
        self.out_dir = out_dir

    def score(self, method: str, model: torch.nn.Module) -> dict[str, float]:
        from lorasoup.evaluation.runner import evaluate_model

        accuracy = {}
        folder = self.out_dir / slug(method)
        folder.mkdir(parents=True, exist_ok=True)
        for name in TASKS:
            outcome = evaluate_model(
                model,
                self.tokenizer,
                self.tasks[name],
                self.examples[name],
                self.settings,
                sandbox=SandboxOptions(timeout_s=2.0, memory_mb=256),
            )
            with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
                for result in outcome.results:
                    handle.write(json.dumps(result.to_json()) + "\n")
            accuracy[name] = outcome.summary["accuracy"]
        return accuracy


def slug(method: str) -> str:
    """A method's folder name: ``CAT (trained)`` → ``cat-trained``."""
    return "-".join("".join(c if c.isalnum() else " " for c in method.lower()).split())


def _write_records(path: Path, records: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def _train_lora(
    base_dir: Path, sources: list[tuple[str, str, int | None]], out: Path, settings: DemoSettings, seed: int
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
            "template": "plain",
            "cutoff_len": 64,
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
            "use_cpu": not torch.cuda.is_available(),
        },
    }
    # A progress hook keeps the Trainer's own bars and log lines out of the demo's output.
    return train_skill(load_config(TrainRunConfig, base=raw), progress=lambda *_: None)


def _merge(
    method: str, adapters: list[Path], weights: list[float], params: dict[str, Any], out: Path, seed: int
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
        "device": "cpu",
    }
    return run_merge(load_config(MergeRunConfig, base=raw)).output


def _cat(
    base_dir: Path, adapters: dict[str, Path], data: list[str], out: Path, settings: DemoSettings, seed: int
) -> Any:
    from lorasoup.cat.config import AdapterRef, CatRunConfig, DataConfig, TrainOptions
    from lorasoup.cat.run import run_cat

    config = CatRunConfig(
        base_model=str(base_dir),
        adapters=[AdapterRef(str(path), name=name) for name, path in adapters.items()],
        data=DataConfig(train=data, template="plain", cutoff_len=64),
        output=str(out),
        train=TrainOptions(
            learning_rate=settings.cat_learning_rate,
            max_steps=settings.cat_steps,
            epochs=100,
            batch_size=settings.batch_size,
            seed=seed,
            log_every=50,
        ),
    )
    return run_cat(config)


def _search(
    base_dir: Path,
    adapters: dict[str, Path],
    records: list[dict[str, Any]],
    tokenizer: Any,
    settings: DemoSettings,
    seed: int,
) -> tuple[torch.nn.Module, str]:
    """LoraHub-style: one weight per adapter, searched gradient-free on a handful of target examples."""
    from lorasoup.adapters import load_adapter
    from lorasoup.cat.inject import compose_cat
    from lorasoup.search.config import SearchOptions
    from lorasoup.search.run import search_weights
    from lorasoup.training.data import build_dataset

    composition = compose_cat(
        _load(base_dir),
        [load_adapter(p, name=n) for n, p in adapters.items()],
        granularity="global",
        parameterisation="free",
        seed=seed,
    )
    examples = build_dataset(records, tokenizer, template="plain", cutoff_len=64)
    options = SearchOptions(
        population=settings.search_population, iterations=settings.search_iterations, seed=seed
    )
    result = search_weights(composition, examples, pad_token_id=tokenizer.pad_token_id, options=options)
    composition.set_effective_weights(result.weights)
    found = "(" + ", ".join(f"{name} {w:.2f}" for name, w in result.table["global"].items()) + ")"
    return composition.model.eval(), found


def _moe(
    base_dir: Path, adapters: dict[str, Path], data: list[str], settings: DemoSettings, seed: int
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
    )
    return train_moe(base_dir, adapters, data, train=options, template="plain", cutoff_len=64)


def _distil(moe: Any, records: list[dict[str, Any]]) -> Any:
    """Static CAT weights from the router's mean gates over the skills' data (consumes ``moe``)."""
    import functools

    from lorasoup.moe.distill import distill_to_cat, mean_gates
    from lorasoup.training.data import build_dataset, collate

    dataset = build_dataset(records, moe.tokenizer, template="plain", cutoff_len=64)
    gates, _ = mean_gates(
        moe.composition, dataset, functools.partial(collate, pad_token_id=moe.tokenizer.pad_token_id)
    )
    return distill_to_cat(moe.composition, gates)


def _load(base_dir: Path, adapter: Path | None = None) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def _untrained_cat(base_dir: Path, adapters: dict[str, Path], seed: int, *, uniform: bool) -> torch.nn.Module:
    """CAT with weights never trained: at the paper's random initialisation, or uniform (1/K each)."""
    from lorasoup.adapters import load_adapter
    from lorasoup.cat.inject import compose_cat

    composition = compose_cat(
        _load(base_dir),
        [load_adapter(p, name=n) for n, p in adapters.items()],
        granularity="module",
        seed=seed,
    )
    if uniform:
        with torch.no_grad():
            composition.weights.theta.zero_()  # softmax of zeros: 1/K
    return composition.model.eval()


STAGES = 23


def run_seed(
    out: Path, seed: int, settings: DemoSettings, stage: StageHook | None = None
) -> tuple[list[MethodResult], dict[str, Any]]:
    """The whole study for one seed, in ``out`` (which must exist); returns the rows and timings."""
    clock: dict[str, float] = {}
    done = 0

    def step(name: str) -> None:
        nonlocal done
        if stage is not None:
            stage(name, done, STAGES)
        done += 1

    started = time.perf_counter()
    benchmark = build_benchmark(seed, settings.sizes)
    tokenizer = build_tokenizer()
    data = out / "data"
    files = {
        name: _write_records(data / f"{name}.json", records) for name, records in benchmark.train.items()
    }
    step("pre-training the base model")
    base_dir = out / "base"
    base_facts = pretrain_base(benchmark.base, tokenizer, base_dir, size=settings.base, seed=seed)
    clock["base_s"] = time.perf_counter() - started

    scorer = Scorer(benchmark, tokenizer, settings, out / "eval")
    rows: list[MethodResult] = []

    def add(method: str, kind: str, model: torch.nn.Module, artifact: Path | None, detail: str = "") -> None:
        step(f"scoring {method}")
        rows.append(
            MethodResult(
                method, kind, scorer.score(method, model), str(artifact) if artifact else None, detail
            )
        )

    add("base model", "reference", _load(base_dir), base_dir)
    adapters: dict[str, Path] = {}
    for name, title in (("math", "math skill LoRA"), ("code", "code skill LoRA")):
        step(f"training the {name} skill LoRA")
        adapters[name] = _train_lora(
            base_dir, [(name, files[name], None)], out / "adapters" / name, settings, seed
        ).output
        add(title, "skill", _load(base_dir, adapters[name]), adapters[name])
    clock["skills_s"] = time.perf_counter() - started - clock["base_s"]

    step("training DATA-MIX and the oracle")
    mix = _train_lora(
        base_dir,
        [("math", files["math"], settings.sizes.skill), ("code", files["code"], settings.sizes.skill)],
        out / "adapters" / "datamix",
        settings,
        seed,
    ).output
    add("DATA-MIX", "baseline", _load(base_dir, mix), mix, "one LoRA on the skills' mixed data")

    pair = [adapters["math"], adapters["code"]]
    merges = {
        "linear": ("linear", [0.5, 0.5], {}, "task arithmetic, weights 1/K (the paper's code)"),
        "TIES": (
            "ties",
            [1.0, 1.0],
            {"density": settings.density},
            f"ΔW space, density {settings.density}, weights 1",
        ),
        "DARE": (
            "dare_ties",
            [1.0, 1.0],
            {"density": settings.density},
            f"ΔW space, density {settings.density}, weights 1",
        ),
        "SVD": ("svd", [0.5, 0.5], {}, f"task arithmetic recompressed to rank {settings.lora_rank}"),
    }
    for title, (method, weights, params, detail) in merges.items():
        path = _merge(method, pair, weights, params, out / "merges" / method, seed)
        add(title, "merge", _load(base_dir, path), path, detail)

    add(
        "CAT, weights at init",
        "CAT",
        _untrained_cat(base_dir, adapters, seed, uniform=False),
        None,
        "θ ~ N(0,1), softmax",
    )
    add(
        "CAT, uniform weights",
        "CAT",
        _untrained_cat(base_dir, adapters, seed, uniform=True),
        None,
        "1/K on every module",
    )
    step("training CAT weights")
    cat = _cat(base_dir, adapters, [files["math"], files["code"]], out / "cat", settings, seed)
    add(
        "CAT (trained)",
        "CAT",
        _load(base_dir, cat.output),
        cat.output,
        f"weights trained on the skills' own data, {cat.fit.steps} steps; exported PEFT adapter",
    )
    step("searching weights on a few composite examples")
    searched, found = _search(
        base_dir,
        adapters,
        benchmark.train["composite"][: settings.search_examples],
        tokenizer,
        settings,
        seed,
    )
    add(
        "LoraHub search",
        "search",
        searched,
        None,
        f"global weights {found}, CMA-ES on {settings.search_examples} composite examples (target data)",
    )
    step("training the MoE routers")
    moe = _moe(base_dir, adapters, [files["math"], files["code"]], settings, seed)
    add(
        "MoE (per-token router)", "baseline", moe.model, None, "soft gates per token and module, skills' data"
    )
    distilled = _distil(moe, [*benchmark.train["math"], *benchmark.train["code"]])
    add(
        "MoE → CAT (mean gates)",
        "baseline",
        distilled.model,
        None,
        "router gates averaged into static weights",
    )
    step("training the oracle")
    oracle = _train_lora(
        base_dir, [("composite", files["composite"], None)], out / "adapters" / "oracle", settings, seed
    )
    add("oracle (composite data)", "ceiling", _load(base_dir, oracle.output), oracle.output, "the ceiling")
    clock["total_s"] = time.perf_counter() - started
    facts = {
        "seed": seed,
        "timings_s": clock,
        "base_model": base_facts,
        "cat_weights": str(cat.output / "cat_weights.json"),
    }
    return rows, facts


def aggregate(per_seed: list[list[MethodResult]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of every method's accuracy on every task."""
    table = []
    for index, first in enumerate(per_seed[0]):
        row: dict[str, Any] = {"method": first.method, "kind": first.kind, "detail": first.detail}
        for name in TASKS:
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
