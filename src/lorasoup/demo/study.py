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
import time
from pathlib import Path
from typing import Any

from lorasoup.artifacts import write_json_atomic
from lorasoup.demo import compose
from lorasoup.demo.base import pretrain_base
from lorasoup.demo.benchmark import Benchmark, build_benchmark, build_tokenizer
from lorasoup.demo.compose import SeedStudy, compose_methods, format_rows, three_skills
from lorasoup.demo.device import resolve_device
from lorasoup.demo.methods import load_study_model
from lorasoup.demo.robustness import BASE_FORMATS, render_in_formats
from lorasoup.demo.scoring import Scorer, write_records
from lorasoup.demo.settings import DemoSettings, MethodResult, StageHook

STAGES = 26
"""Progress steps of the default (two-skill) study."""


def stage_count(settings: DemoSettings) -> int:
    """Progress steps of one seed: the two-skill study, plus the K = 3 study and the format rows if on."""
    extra = compose.EXTRA_STEPS if settings.extra_rows else 0
    k3 = 1 + 2 + 2 + compose.STEPS + extra  # base and two skills rescored, the third skill trained and scored
    formats = compose.FORMAT_STEPS if settings.format_robust else 0
    return STAGES + extra + (k3 if settings.skills == 3 else 0) + formats


def run_seed(
    out: Path, seed: int, settings: DemoSettings, stage: StageHook | None = None
) -> tuple[list[MethodResult], dict[str, Any]]:
    """The whole study for one seed, in ``out`` (which must exist); returns the rows and facts.

    The rows are the two-skill table; with ``skills=3`` the facts hold the K = 3 table under ``"k3"``,
    with ``format_robust`` the format rows under ``"formats"`` (lists of :class:`MethodResult`).
    """
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


BASE_FACTS = "pretraining.json"
"""Written into the base's folder after the model: a base folder holding it is whole (a resumed run
keeps it rather than pre-train again, which on a GPU need not give the same bits under bf16)."""


def _pretrain(benchmark: Benchmark, tokenizer: Any, base_dir: Path, settings: DemoSettings, seed: int) -> Any:
    """The base model (kept where a resumed run finds it whole: :data:`BASE_FACTS`) and its facts."""
    facts_file = base_dir / BASE_FACTS
    if facts_file.is_file():
        return json.loads(facts_file.read_text(encoding="utf-8"))
    facts = _pretrain_base(benchmark, tokenizer, base_dir, settings, seed)
    write_json_atomic(facts_file, facts)
    return facts


def _pretrain_base(
    benchmark: Benchmark, tokenizer: Any, base_dir: Path, settings: DemoSettings, seed: int
) -> Any:
    """Pre-train and save; with ``format_robust`` the base learns its language in every frame
    (robustness.py)."""
    where = {
        "size": settings.base,
        "seed": seed,
        "device": resolve_device(settings.device),
        "group_by_length": settings.group_by_length,
    }
    if not settings.format_robust:
        return pretrain_base(benchmark.base, tokenizer, base_dir, **where)
    records = render_in_formats(benchmark.base, BASE_FORMATS, seed)  # already framed: train verbatim
    return pretrain_base(records, tokenizer, base_dir, template="verbatim", **where)
