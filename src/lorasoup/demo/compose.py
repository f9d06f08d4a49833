"""Every composition method over one set of skill LoRAs: the rows of one table of the demo study.

:func:`compose_methods` runs, for the skills given (K = 2: math + code; K = 3: + extra), DATA-MIX,
the four merges, core-space TIES, TSV-Merge and layer swapping, CAT untrained / uniform / trained,
LoraHub search, the MoE and its distilled CAT, with ``extra_rows`` CAT and LoRA-Flow gates trained on
LoraHub's k target examples, and the oracle trained on that K's composite data, all through
lorasoup's public API and scored by one :class:`~lorasoup.demo.study.Scorer`. Artifacts of K = 2 keep
the paths they always had (``adapters/datamix``, ``merges/ties``, ``cat`` ...); other K add a suffix
(``-k3``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorasoup.demo.benchmark import Benchmark
from lorasoup.demo.methods import (
    distil_moe,
    fit_flow_gates,
    fit_moe,
    load_study_model,
    merge_skills,
    search_skill_weights,
    swap_skill_layers,
    train_cat,
    train_lora,
    untrained_cat,
)
from lorasoup.demo.scoring import Scorer, format_specs, task_specs, write_records
from lorasoup.demo.settings import TASKS_K3, DemoSettings, MethodResult

if TYPE_CHECKING:
    from lorasoup.demo.real_study import RealDemoSettings


@dataclass
class SeedStudy:
    """What every method of one seed shares: its folder, settings, base model, data and progress hook."""

    out: Path
    seed: int
    settings: DemoSettings | RealDemoSettings
    base_dir: Path
    tokenizer: Any
    benchmark: Benchmark
    files: dict[str, str]  # training split name → records file
    step: Callable[[str], None]
    template: str = "plain"  # how records become prompts, for every LoRA, CAT, search and MoE
    cutoff_len: int = 64
    gate_examples: int | None = None  # records per skill the MoE's mean gates average over (None: all)

    @property
    def fmt(self) -> dict[str, Any]:
        return {"template": self.template, "cutoff_len": self.cutoff_len}

    def add(
        self,
        rows: list[MethodResult],
        scorer: Scorer,
        method: str,
        kind: str,
        model: torch.nn.Module,
        artifact: Path | None,
        detail: str = "",
    ) -> None:
        """Score ``model`` and append its row."""
        self.step(f"scoring {method}")
        accuracy = scorer.score(method, model)
        rows.append(MethodResult(method, kind, accuracy, str(artifact) if artifact else None, detail))

    def add_skill(self, rows: list[MethodResult], scorer: Scorer, name: str, adapter: Path) -> None:
        """Score skill ``name``'s LoRA as a row of ``rows``."""
        model = load_study_model(self.base_dir, adapter)
        self.add(rows, scorer, f"{name} skill LoRA", "skill", model, adapter)

    def train_skill(self, name: str) -> Path:
        """The skill LoRA of training split ``name`` (``adapters/<name>``)."""
        self.step(f"training the {name} skill LoRA")
        out = self.out / "adapters" / name
        return train_lora(
            self.base_dir, [(name, self.files[name], None)], out, self.settings, self.seed, **self.fmt
        ).output


def compose_methods(
    study: SeedStudy, scorer: Scorer, adapters: dict[str, Path], *, target: str, tag: str = ""
) -> tuple[list[MethodResult], dict[str, Path]]:
    """The rows of every method composing ``adapters`` (skill name → LoRA), and the artifacts the
    format rows reuse (``datamix``, ``cat``, ``oracle``). ``target``: the composite's training
    split (the search's few examples, the oracle's data); ``tag``: the artifact folders' suffix."""
    s, settings = study, study.settings
    rows: list[MethodResult] = []
    s.step("training DATA-MIX")
    sources = [(name, s.files[name], settings.sizes.skill) for name in adapters]
    mix = train_lora(
        s.base_dir, sources, s.out / "adapters" / f"datamix{tag}", settings, s.seed, **s.fmt
    ).output
    s.add(
        rows,
        scorer,
        "DATA-MIX",
        "baseline",
        load_study_model(s.base_dir, mix),
        mix,
        "one LoRA on the skills' mixed data",
    )
    _merge_rows(s, scorer, list(adapters.values()), tag, rows)
    _peer_merge_rows(s, scorer, adapters, tag, rows)
    cat = _cat_rows(s, scorer, adapters, tag, rows)
    _search_and_moe_rows(s, scorer, adapters, target, rows)
    if settings.extra_rows:
        _target_rows(s, scorer, adapters, target, tag, rows)
    s.step("training the oracle")
    oracle = train_lora(
        s.base_dir,
        [(target, s.files[target], None)],
        s.out / "adapters" / f"oracle{tag}",
        settings,
        s.seed,
        **s.fmt,
    ).output
    s.add(
        rows,
        scorer,
        "oracle (composite data)",
        "ceiling",
        load_study_model(s.base_dir, oracle),
        oracle,
        "the ceiling",
    )
    return rows, {"datamix": mix, "cat": cat, "oracle": oracle}


def _merge_rows(s: SeedStudy, scorer: Scorer, paths: list[Path], tag: str, rows: list[MethodResult]) -> None:
    """Linear and SVD with weights 1/K, TIES and DARE with weights 1 (the paper's code)."""
    k, density = len(paths), s.settings.density
    sparse = f"ΔW space, density {density}, weights 1"
    merges = {
        "linear": ("linear", 1 / k, {}, "task arithmetic, weights 1/K (the paper's code)"),
        "TIES": ("ties", 1.0, {"density": density}, sparse),
        "DARE": ("dare_ties", 1.0, {"density": density}, sparse),
        "SVD": ("svd", 1 / k, {}, f"task arithmetic recompressed to rank {s.settings.lora_rank}"),
    }
    for title, (method, weight, params, detail) in merges.items():
        out = s.out / "merges" / f"{method}{tag}"
        path = merge_skills(method, paths, [weight] * k, params, out, s.seed, s.settings.device)
        s.add(rows, scorer, title, "merge", load_study_model(s.base_dir, path), path, detail)


def _peer_merge_rows(
    s: SeedStudy, scorer: Scorer, adapters: dict[str, Path], tag: str, rows: list[MethodResult]
) -> None:
    """The newer merges (cheap, on by default): core-space TIES (weights 1, the TIES row's density),
    TSV-Merge (each task's top 1/K of its rank, the paper's share, weights 1) and layer swapping."""
    paths, k, density = list(adapters.values()), len(adapters), s.settings.density
    merges = {
        "core-space TIES": ("core_ties", {"density": density}, f"core space, density {density}, weights 1"),
        "TSV-Merge": (
            "tsv",
            {"density": 1 / k},
            "each task's top 1/K singular triplets, whitened, weights 1",
        ),
    }
    for title, (method, params, detail) in merges.items():
        out = s.out / "merges" / f"{method}{tag}"
        path = merge_skills(method, paths, [1.0] * k, params, out, s.seed, s.settings.device)
        s.add(rows, scorer, title, "merge", load_study_model(s.base_dir, path), path, detail)
    path, choice = swap_skill_layers(
        s.base_dir, adapters, s.out / "merges" / f"layer_swap{tag}", s.seed, s.settings.device
    )
    detail = "one skill per layer, contiguous blocks: " + " ".join(choice)
    s.add(rows, scorer, "layer swap", "merge", load_study_model(s.base_dir, path), path, detail)


def _target_rows(
    s: SeedStudy, scorer: Scorer, adapters: dict[str, Path], target: str, tag: str, rows: list[MethodResult]
) -> None:
    """The costly rows (``extra_rows``), trained on the same k composite examples LoraHub searches on:
    CAT's weights trained by gradient on them, and LoRA-Flow's per-layer gates and their mean-gate CAT."""
    settings, k = s.settings, s.settings.search_examples
    examples = s.benchmark.train[target][:k]
    data = write_records(s.out / "data" / f"{target}-first{k}.json", examples)
    s.step("training CAT weights on the target examples")
    cat = train_cat(s.base_dir, adapters, [data], s.out / f"cat-target{tag}", settings, s.seed, **s.fmt)
    detail = f"CAT trained on the {k} composite examples LoraHub searches on, {cat.fit.steps} steps"
    model = load_study_model(s.base_dir, cat.output)
    s.add(rows, scorer, "CAT on target examples", "CAT", model, cat.output, detail)
    s.step("training LoRA-Flow gates")
    flow = fit_flow_gates(s.base_dir, adapters, [data], settings, s.seed, **s.fmt)
    detail = f"soft gates per token and layer, {k} composite examples"
    s.add(rows, scorer, "LoRA-Flow (per-layer gates)", "baseline", flow.model, None, detail)
    distilled = distil_moe(flow, examples, **s.fmt)
    detail = f"LoRA-Flow's gates averaged over the {k} examples into static CAT weights"
    s.add(rows, scorer, "LoRA-Flow → CAT (mean gates)", "baseline", distilled.model, None, detail)


def _cat_rows(
    s: SeedStudy, scorer: Scorer, adapters: dict[str, Path], tag: str, rows: list[MethodResult]
) -> Path:
    """CAT at its random initialisation, with uniform weights, and trained on the skills' own data."""
    device = s.settings.device
    model = untrained_cat(s.base_dir, adapters, s.seed, uniform=False, device=device)
    s.add(rows, scorer, "CAT, weights at init", "CAT", model, None, "θ ~ N(0,1), softmax")
    model = untrained_cat(s.base_dir, adapters, s.seed, uniform=True, device=device)
    s.add(rows, scorer, "CAT, uniform weights", "CAT", model, None, "1/K on every module")
    s.step("training CAT weights")
    data = [s.files[name] for name in adapters]
    cat = train_cat(s.base_dir, adapters, data, s.out / f"cat{tag}", s.settings, s.seed, **s.fmt)
    detail = f"weights trained on the skills' own data, {cat.fit.steps} steps; exported PEFT adapter"
    s.add(rows, scorer, "CAT (trained)", "CAT", load_study_model(s.base_dir, cat.output), cat.output, detail)
    return Path(cat.output)


def _search_and_moe_rows(
    s: SeedStudy, scorer: Scorer, adapters: dict[str, Path], target: str, rows: list[MethodResult]
) -> None:
    """LoraHub search on a few target examples; the per-token MoE and its mean-gate CAT."""
    settings = s.settings
    s.step("searching weights on a few composite examples")
    examples = s.benchmark.train[target][: settings.search_examples]
    searched, found = search_skill_weights(
        s.base_dir, adapters, examples, s.tokenizer, settings, s.seed, **s.fmt
    )
    detail = f"global weights {found}, CMA-ES on {settings.search_examples} composite examples (target data)"
    s.add(rows, scorer, "LoraHub search", "search", searched, None, detail)
    s.step("training the MoE routers")
    moe = fit_moe(s.base_dir, adapters, [s.files[name] for name in adapters], settings, s.seed, **s.fmt)
    detail = "soft gates per token and module, skills' data"
    s.add(rows, scorer, "MoE (per-token router)", "baseline", moe.model, None, detail)
    gate_data = [r for name in adapters for r in s.benchmark.train[name][: s.gate_examples]]
    distilled = distil_moe(moe, gate_data, **s.fmt)
    detail = "router gates averaged into static weights"
    s.add(rows, scorer, "MoE → CAT (mean gates)", "baseline", distilled.model, None, detail)


def three_skills(study: SeedStudy, adapters: dict[str, Path]) -> list[MethodResult]:
    """The K = 3 table: base and skills on the 3-way composite and the skills' tasks, then every method."""
    scorer = Scorer(
        study.benchmark, study.tokenizer, study.settings, study.out / "eval-k3", specs=task_specs(TASKS_K3)
    )
    rows: list[MethodResult] = []
    study.add(rows, scorer, "base model", "reference", load_study_model(study.base_dir), study.base_dir)
    for name in ("math", "code"):
        study.add_skill(rows, scorer, name, adapters[name])
    adapters["extra"] = study.train_skill("extra")
    study.add_skill(rows, scorer, "extra", adapters["extra"])
    composed, _ = compose_methods(study, scorer, adapters, target="composite3", tag="-k3")
    return rows + composed


STEPS = 20
"""Progress steps of :func:`compose_methods` (default rows)."""

EXTRA_STEPS = 5
"""Progress steps the ``extra_rows`` add to :func:`compose_methods`."""


def format_rows(
    study: SeedStudy, adapters: dict[str, Path], artifacts: dict[str, Path]
) -> list[MethodResult]:
    """Train format-robust CAT, then score it, plain CAT, DATA-MIX and the oracle in every frame.

    ``adapters``: the K = 2 skill LoRAs; ``artifacts``: the K = 2 study's ``datamix``, ``cat`` and
    ``oracle`` (:func:`~lorasoup.demo.compose.compose_methods`). Rows' accuracies are keyed by frame.
    """
    s, settings = study, study.settings
    pool = list(settings.train_formats)
    s.step("training format-robust CAT weights")
    data = [s.files[name] for name in adapters]
    robust = train_cat(
        s.base_dir, adapters, data, s.out / "cat-format-robust", settings, s.seed, formats=pool
    )
    frames = ["plain", *settings.held_out_formats]
    scorer = Scorer(
        s.benchmark,
        s.tokenizer,
        settings,
        s.out / "eval-formats",
        specs=format_specs(frames),
        splits=dict.fromkeys(frames, "composite"),
    )
    models = [
        ("CAT (trained)", "CAT", artifacts["cat"], "plain CAT: weights trained in the plain frame only"),
        ("CAT, format-robust", "CAT", Path(robust.output), f"weights trained in {', '.join(pool)}"),
        ("DATA-MIX", "baseline", artifacts["datamix"], "one LoRA on the skills' mixed data, plain frame"),
        ("oracle (composite data)", "ceiling", artifacts["oracle"], "composite data, plain frame"),
    ]
    rows: list[MethodResult] = []
    for method, kind, path, detail in models:
        s.add(rows, scorer, method, kind, load_study_model(s.base_dir, path), path, detail)
    return rows


FORMAT_STEPS = 5
"""Progress steps of :func:`format_rows`."""
