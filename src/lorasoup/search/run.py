"""Gradient-free weight search (LoraHub-style, https://arxiv.org/abs/2307.13269), batched, for causal LMs.

:func:`search_weights` is the library call: a CAT composition (any parameterisation) and a few
tokenised target examples in, the best effective weights ``w (G, K)`` out. Every population of P
candidates is scored in one batched forward (``search.scoring``) and the optimiser (``search.optimise``)
proposes the next. Unlike LoraHub, the weights act on each adapter's whole update ``ΔW_i = s_i B_i A_i``
(exact task arithmetic through the CAT layer), not on A and B separately.

:func:`run_search` is ``lorasoup search`` end to end; the artifact directory (written atomically) holds
- ``adapter_config.json`` + ``adapter_model.safetensors``: a plain PEFT adapter (CAT's exact fold);
- ``search_weights.json``: the found weights per group and adapter (the ``cat_weights.json`` schema, so
  ``lorasoup cat`` can start from it with ``cat.init_from``), with the starting weights;
- ``run.json``: config, versions, seed, timings and the loss history per iteration;
- ``cat-warm-start.yaml`` (``warm_start_cat``): a ``lorasoup cat`` config starting from these weights.

With a ``layer_swap:`` section the command chooses a layer swap instead (``search.layer_swap_run``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from lorasoup.adapters import load_adapters
from lorasoup.artifacts import (
    atomic_output_dir,
    inputs_fingerprint,
    require_free_output,
    run_record,
    write_json_atomic,
)
from lorasoup.cat.inject import CatComposition, Granularity, compose_cat, remove_cat, weights_from_file
from lorasoup.cat.run import ExportedFactors, export_factors, load_training_data, weights_payload
from lorasoup.compat import check_compatibility
from lorasoup.devices import DTYPES, default_device
from lorasoup.errors import ConfigError, DataError
from lorasoup.search.config import SearchOptions, SearchRunConfig
from lorasoup.search.optimise import OptimiserSpec, ProgressHook, SearchTrace, minimise
from lorasoup.search.scoring import forward_split, l1_penalty, score_population, target_batches

WEIGHTS_FILE = "search_weights.json"
WARM_START_FILE = "cat-warm-start.yaml"


@dataclass
class SearchResult:
    """What :func:`search_weights` found: ``weights (G, K)`` and how it got there."""

    weights: torch.Tensor
    start: torch.Tensor  # (G, K) where the search began
    table: dict[str, dict[str, float]]
    objective: float  # loss + l1 · mean |w| of the best candidate
    loss: float  # its mean response-token loss alone
    start_objective: float
    trace: SearchTrace
    seconds: float

    @property
    def candidates_per_second(self) -> float:
        return self.trace.evaluations / self.seconds if self.seconds else float("nan")


def search_weights(
    composition: CatComposition,
    examples: Sequence[Mapping[str, list[int]]],
    *,
    pad_token_id: int,
    options: SearchOptions | None = None,
    init: torch.Tensor | None = None,
    progress: ProgressHook | None = None,
) -> SearchResult:
    """Find effective weights ``w (G, K)`` minimising ``loss + l1 · mean |w|`` on ``examples``.

    ``examples``: tokenised records (``input_ids``, ``attention_mask``, ``labels``; e.g. a
    ``build_dataset`` result). ``init (G, K)``: the starting weights (default ``options.init``
    everywhere). The composition's groups set the granularity; of ``options`` only the search fields
    are read (optimiser, population, iterations, l1, bounds, sigma, seed, rows_per_forward). θ and the
    model's train/eval mode are left as they were.
    """
    options = options or SearchOptions()
    groups, adapters = composition.weights.theta.shape
    device = composition.weights.theta.device
    rows = [examples[i] for i in range(len(examples))]
    if not rows:
        raise DataError("the search needs at least one target example; check data.train")
    per_batch, chunk = forward_split(len(rows), options.population, options.rows_per_forward)
    batches = target_batches(rows, pad_token_id=pad_token_id, device=device, examples_per_batch=per_batch)

    def objective(candidates: np.ndarray) -> np.ndarray:  # (P, D) → (P,)
        w = torch.from_numpy(candidates).float().view(-1, groups, adapters)  # (P, G, K)
        losses = score_population(composition, batches, w, candidates_per_forward=chunk)
        return (losses + l1_penalty(w, options.l1)).double().numpy()

    x0 = torch.full((groups, adapters), options.init) if init is None else init.detach().float().cpu()
    spec = OptimiserSpec(
        x0=x0.flatten().double().numpy(),
        bounds=(options.bounds[0], options.bounds[1]),
        population=options.population,
        sigma=options.step_size,
        seed=options.seed,
    )
    was_training = composition.model.training
    composition.model.eval()
    start = time.perf_counter()
    try:
        trace = minimise(
            objective, spec, optimiser=options.optimiser, iterations=options.iterations, progress=progress
        )
    finally:
        composition.model.train(was_training)
    seconds = time.perf_counter() - start
    best = torch.from_numpy(trace.best).float().view(groups, adapters)
    penalty = float(l1_penalty(best[None], options.l1)[0])
    return SearchResult(
        weights=best,
        start=torch.from_numpy(trace.start).float().view(groups, adapters),
        table=composition.weights_table(best),
        objective=trace.best_loss,
        loss=trace.best_loss - penalty,
        start_objective=trace.start_loss,
        trace=trace,
        seconds=seconds,
    )


@dataclass
class SearchRunResult:
    output: Path
    composition: CatComposition
    search: SearchResult
    export_rank: int
    notices: list[str]


@dataclass
class SearchInputs:
    """Everything loaded before a search: checked adapters, tokenised examples, the composition."""

    adapters: list[Any]
    notices: list[str]
    tokenizer: Any
    dataset: Any
    formats: Any
    composition: CatComposition
    init: torch.Tensor | None


def load_search_inputs(config: SearchRunConfig, *, granularity: Granularity | None = None) -> SearchInputs:
    """Adapters (checked), tokenizer, target examples, the base model at ``search.dtype`` on
    ``search.device``, composed by CAT (``free``) at ``granularity`` (default ``search.granularity``)."""
    from lorasoup.models import load_base_model, load_tokenizer, parse_model_spec

    adapters = load_adapters(config.adapters)
    report = check_compatibility(
        adapters, allow_base_mismatch=config.allow_base_mismatch, base_model=config.base_model
    )
    report.raise_if_incompatible()
    spec = parse_model_spec(config.base_model)
    tokenizer = load_tokenizer(spec)
    dataset, formats = load_training_data(config.data, tokenizer, seed=config.search.seed)
    device = default_device(config.search.device)
    model = load_base_model(spec, dtype=DTYPES[config.search.dtype], device=device)
    composition = compose_cat(
        model,
        adapters,
        granularity=granularity or config.search.granularity,
        parameterisation="free",  # θ = w: the found weights fold and export as they are
        allow_base_mismatch=config.allow_base_mismatch,
    )
    init = None
    if config.search.init_from is not None:
        init = weights_from_file(config.search.init_from, composition).clamp(*config.search.bounds)
    return SearchInputs(adapters, list(report.notices), tokenizer, dataset, formats, composition, init)


def run_search(config: SearchRunConfig, *, progress: ProgressHook | None = None) -> SearchRunResult:
    """Search weights for ``config.adapters`` on ``config.data`` and write the artifact directory."""
    if config.layer_swap is not None:
        raise ConfigError(
            "layer_swap: a layer-swap search runs with lorasoup.search.layer_swap_run.run_layer_swap_search"
        )
    output = Path(config.output)
    require_free_output(output, overwrite=config.overwrite)
    clock = time.perf_counter()
    inputs = load_search_inputs(config)
    composition = inputs.composition
    timings = {"load": time.perf_counter() - clock}
    result = search_weights(
        composition,
        inputs.dataset,
        pad_token_id=inputs.tokenizer.pad_token_id,
        options=config.search,
        init=inputs.init,
        progress=progress,
    )
    timings["search"] = result.seconds
    composition.set_effective_weights(result.start, initial=True)
    composition.set_effective_weights(result.weights)

    clock = time.perf_counter()
    exported = export_factors(composition, config.export)
    notices = inputs.notices + exported.notices
    with atomic_output_dir(output, overwrite=config.overwrite) as staging:
        from lorasoup.export.peft import save_merged, save_peft_adapter

        model = composition.model
        fan_in_fan_out = inputs.adapters[0].fan_in_fan_out
        save_peft_adapter(
            exported.factors,
            staging,
            base_model=config.base_model,
            model=model,
            fan_in_fan_out=fan_in_fan_out,
        )
        payload = weights_payload(composition) | {"search": _search_facts(config.search, result)}
        write_json_atomic(staging / WEIGHTS_FILE, payload)
        if config.warm_start_cat:
            write_warm_start(staging / WARM_START_FILE, config, composition, output)
        if config.export.merge:
            save_merged(remove_cat(composition), exported.factors, inputs.tokenizer, staging / "merged")
        timings["export"] = time.perf_counter() - clock
        record = _run_record(config, inputs, result, exported, notices, timings)
        write_json_atomic(staging / "run.json", record)
    return SearchRunResult(
        output=output, composition=composition, search=result, export_rank=exported.rank, notices=notices
    )


def search_inputs_record(config: SearchRunConfig, inputs: SearchInputs) -> dict[str, Any]:
    """``run.json``'s fields every search shares: the command, config, seed, base and adapters, and
    the sha256 of the adapters' weights and of the target data."""
    from lorasoup.models import model_fingerprint

    return {
        "command": "search",
        "config": config,
        "seed": config.search.seed,
        "base_model": model_fingerprint(inputs.composition.model),
        "adapters": {a.name: a.summary() for a in inputs.adapters},
        "inputs_sha256": inputs_fingerprint(
            [Path(ref.path) / "adapter_model.safetensors" for ref in config.adapters]
            + [Path(p) for p in config.data.train]
        ),
    }


def _run_record(
    config: SearchRunConfig,
    inputs: SearchInputs,
    result: SearchResult,
    exported: ExportedFactors,
    notices: list[str],
    timings: dict[str, float],
) -> dict[str, Any]:
    dataset = inputs.dataset
    return run_record(
        **search_inputs_record(config, inputs),
        timings=timings,
        search=_search_facts(config.search, result)
        | {
            "examples": len(dataset),
            "dropped_examples": dataset.dropped,
            **({"formats": inputs.formats} if inputs.formats is not None else {}),
            "history": {
                "best_so_far": result.trace.best_so_far,
                "iteration_best": result.trace.iteration_best,
                "iteration_mean": result.trace.iteration_mean,
            },
        },
        export={
            "rank": exported.rank,
            "merged": config.export.merge,
            "recompression": exported.recompression,
        },
        notices=notices,
    )


def _search_facts(options: SearchOptions, result: SearchResult) -> dict[str, Any]:
    trace = result.trace
    return {
        "optimiser": options.optimiser,
        "objective": "mean response-token loss + l1 * mean |w|",
        "l1": options.l1,
        "bounds": options.bounds,
        "best_objective": result.objective,
        "best_loss": result.loss,
        "start_objective": result.start_objective,
        "best_iteration": trace.best_iteration,
        "iterations_run": len(trace.best_so_far),
        "evaluations": trace.evaluations,
        "stop_reason": trace.stop_reason,
        "candidates_per_second": result.candidates_per_second,
    }


def write_warm_start(path: Path, config: SearchRunConfig, composition: CatComposition, output: Path) -> None:
    """A ``lorasoup cat`` config that starts CAT from the found weights (module granularity spreads
    global or per-layer weights over every module)."""
    refs = [
        {"path": ref.path, "name": name}
        for ref, name in zip(config.adapters, composition.adapter_names, strict=True)
    ]
    warm = {
        "base_model": config.base_model,
        "adapters": refs,
        "data": {
            "train": list(config.data.train),
            "template": config.data.template,
            "cutoff_len": config.data.cutoff_len,
            "train_on_inputs": config.data.train_on_inputs,
        },
        "output": str(output.with_name(output.name + "-cat")),
        "cat": {
            "granularity": "module",
            "parameterisation": "free",
            "init_from": str(output.resolve() / WEIGHTS_FILE),
        },
    }
    header = (
        f"# lorasoup cat {path.name}: CAT training that starts from the weights `lorasoup search` found.\n"
        "# data.train holds the search's target examples: point it at your CAT training data.\n"
    )
    path.write_text(header + yaml.safe_dump(warm, sort_keys=False), encoding="utf-8")
