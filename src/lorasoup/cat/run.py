"""``lorasoup cat``, end to end: load, check, compose, train the weights, fold, export, describe.

The artifact directory (written atomically) holds:
- ``adapter_config.json`` + ``adapter_model.safetensors``: a plain PEFT adapter (``r = lora_alpha = R``);
- ``cat_weights.json``: the learned weights per group and adapter, with their starting values;
- ``run.json``: config, versions, seed, timings, losses, and how far the weights moved;
- ``merged/`` with full merged weights when ``export.merge`` is set.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorasoup.adapters import LoraAdapter, LoraFactors, load_adapters
from lorasoup.artifacts import (
    atomic_output_dir,
    inputs_fingerprint,
    require_free_output,
    run_record,
    write_json_atomic,
)
from lorasoup.cat.config import CatRunConfig
from lorasoup.cat.fit import fit_cat_weights
from lorasoup.cat.fold import fold_composition
from lorasoup.cat.inject import CatComposition, compose_cat, remove_cat, start_from_file
from lorasoup.compat import check_compatibility
from lorasoup.devices import DTYPES
from lorasoup.errors import LorasoupError
from lorasoup.export.serving import next_bucket, pad_factors
from lorasoup.lowrank import recompress_modules
from lorasoup.options import DataConfig, ExportOptions
from lorasoup.resources import resource_record
from lorasoup.training.formats import FormatReport
from lorasoup.training.loop import FitResult, ProgressHook


@dataclass
class CatRunResult:
    output: Path
    composition: CatComposition
    fit: FitResult
    export_rank: int
    notices: list[str]
    formats: FormatReport | None = None


def weight_movement(composition: CatComposition) -> dict[str, float]:
    """How far θ and the effective weights moved from their initialisation (max and mean |Δ|)."""
    theta = composition.weights.theta.detach().float().cpu()
    theta0 = composition.theta_init
    w0, w = composition.initial_weights(), composition.effective_weights()
    return {
        "theta_max_abs_change": float((theta - theta0).abs().max()),
        "theta_mean_abs_change": float((theta - theta0).abs().mean()),
        "weight_max_abs_change": float((w - w0).abs().max()),
        "weight_mean_abs_change": float((w - w0).abs().mean()),
    }


def weights_payload(composition: CatComposition) -> dict[str, Any]:
    return {
        "adapters": composition.adapter_names,
        "granularity": composition.granularity,
        "parameterisation": composition.weights.parameterisation,
        "weights": composition.weights_table(),
        "initial_weights": composition.weights_table(composition.initial_weights()),
        "modules": {site.path: composition.group_names[site.group] for site in composition.sites},
    }


def build_training_data(config: CatRunConfig, tokenizer: Any) -> Any:
    return load_training_data(config.data, tokenizer, seed=config.train.seed)[0]


def load_training_data(data: DataConfig, tokenizer: Any, *, seed: int) -> tuple[Any, FormatReport | None]:
    """The tokenised dataset, in ``data.template``, or format-robust when ``data.formats`` lists a pool
    (formats dealt from ``data.format_seed``, else ``seed``; the report counts examples per format)."""
    from lorasoup.training.data import build_dataset, load_records
    from lorasoup.training.formats import as_format_specs, build_format_dataset

    records: list[dict[str, Any]] = []
    for source in data.train:
        records.extend(load_records(source))
    if data.max_examples is not None:
        records = records[: data.max_examples]
    common = {
        "cutoff_len": data.cutoff_len,
        "train_on_inputs": data.train_on_inputs,
        "name": ", ".join(data.train),
    }
    if data.formats:
        format_seed = seed if data.format_seed is None else data.format_seed
        return build_format_dataset(
            records, tokenizer, as_format_specs(data.formats), seed=format_seed, **common
        )
    return build_dataset(records, tokenizer, template=data.template, **common), None


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _export_factors(
    composition: CatComposition, export: ExportOptions
) -> tuple[dict[str, LoraFactors], int, dict[str, dict[str, Any]] | None]:
    """Folded float32 factors, their common rank, and per-module recompression facts (or None)."""
    folded = fold_composition(composition, dtype=torch.float32)
    concatenated = max(f.rank for f in folded.values())  # ΣR: folding keeps every adapter's rows
    if export.rank is None or export.rank >= concatenated:  # exact already, at no more than asked
        return folded, concatenated, None
    folded, facts = recompress_modules(folded, rank=export.rank)
    rank = max(f.rank for f in folded.values())
    return {path: pad_factors(f, rank) for path, f in folded.items()}, rank, facts


@dataclass
class ExportedFactors:
    """What an artifact's PEFT adapter holds: ``path → (A', B')`` of one ``rank``, in the export dtype."""

    factors: dict[str, LoraFactors]
    rank: int
    recompression: dict[str, dict[str, Any]] | None
    notices: list[str]


def export_factors(composition: CatComposition, export: ExportOptions) -> ExportedFactors:
    """Fold the composition's weights, recompress (``export.rank``), pad to a bucket, cast: ready to save."""
    notices = []
    folded, largest, recompression = _export_factors(composition, export)
    rank = largest
    if export.rank_bucket == "vllm":
        try:
            rank = next_bucket(largest)
        except ValueError as err:
            raise LorasoupError(f"export.rank_bucket=vllm: {err}; set export.rank to 512 or less") from None
        notices.append(f"rank padded with zero rows from {largest} to vLLM bucket {rank} (exact)")
    concatenated = max(sum(site.ranks) for site in composition.sites)
    if recompression is not None:
        worst = max(f["discarded_energy"] for f in recompression.values())
        notices.append(
            f"recompressed from the concatenated rank {concatenated} to rank {largest} "
            f"(export.rank = {export.rank}); the largest loss is {worst:.2%} of a module's ‖ΔW‖²"
        )
    elif export.rank is not None:
        notices.append(
            f"export.rank = {export.rank} is at least the concatenated rank {concatenated}: exported "
            f"exactly at rank {concatenated}, not recompressed"
        )
    folded = {path: pad_factors(f, rank, DTYPES[export.dtype]) for path, f in folded.items()}
    return ExportedFactors(folded, rank, recompression, notices)


def _training_record(dataset: Any, fit: FitResult, formats: FormatReport | None) -> dict[str, Any]:
    """run.json's ``training``: the data used and how the fit went."""
    return {
        "examples": len(dataset),
        "dropped_examples": dataset.dropped,
        "steps": fit.steps,
        "resumed_from_step": fit.resumed_from_step,
        "first_loss": fit.first_loss,
        "last_loss": fit.last_loss,
        "losses": fit.losses,
        "throughput": fit.throughput,
        **({"formats": formats} if formats is not None else {}),
    }


@dataclass
class _CatInputs:
    """What ``run_cat`` loads before composing: the checked adapters, the data and the base model."""

    adapters: list[LoraAdapter]
    notices: list[str]  # the compatibility report's
    tokenizer: Any
    dataset: Any
    formats: FormatReport | None
    model: torch.nn.Module


def _load_inputs(config: CatRunConfig) -> _CatInputs:
    """Load and check the adapters first, so an incompatible set fails before the base model is read."""
    from lorasoup.models import load_base_model, load_tokenizer, parse_model_spec

    adapters = load_adapters(config.adapters)
    report = check_compatibility(
        adapters, allow_base_mismatch=config.allow_base_mismatch, base_model=config.base_model
    )
    report.raise_if_incompatible()
    spec = parse_model_spec(config.base_model)
    tokenizer = load_tokenizer(spec)
    dataset, formats = load_training_data(config.data, tokenizer, seed=config.train.seed)
    model = load_base_model(spec, dtype=DTYPES[config.train.dtype], device=config.train.device)
    return _CatInputs(adapters, list(report.notices), tokenizer, dataset, formats, model)


def _compose(config: CatRunConfig, inputs: _CatInputs) -> CatComposition:
    """CAT over the base model as ``config.cat`` asks, started from ``cat.init_from`` when given."""
    composition = compose_cat(
        inputs.model,
        inputs.adapters,
        granularity=config.cat.granularity,
        parameterisation=config.cat.parameterisation,
        seed=config.train.seed,
        dropout=config.cat.dropout,
        allow_base_mismatch=config.allow_base_mismatch,
    )
    if config.cat.init_from is not None:
        start_from_file(composition, config.cat.init_from)
    return composition


def _fit(
    config: CatRunConfig,
    inputs: _CatInputs,
    composition: CatComposition,
    output: Path,
    progress: ProgressHook | None,
) -> FitResult:
    """Train the composition's weights on the data; checkpoints go to ``OUTPUT.checkpoints``."""
    from lorasoup.training.data import collate

    return fit_cat_weights(
        composition,
        inputs.dataset,
        functools.partial(
            collate,
            pad_token_id=inputs.tokenizer.pad_token_id,
            pad_to_multiple_of=config.data.pad_to_multiple_of,
        ),
        config.train,
        checkpoint_dir=output.with_name(output.name + ".checkpoints"),
        resume_from=config.resume_from,
        progress=progress,
    )


def _write_exports(
    staging: Path,
    config: CatRunConfig,
    inputs: _CatInputs,
    composition: CatComposition,
    exported: ExportedFactors,
) -> None:
    """The PEFT adapter, ``cat_weights.json``, and ``merged/`` when ``export.merge`` is set."""
    from lorasoup.export.peft import save_merged, save_peft_adapter

    save_peft_adapter(
        exported.factors,
        staging,
        base_model=config.base_model,
        model=inputs.model,
        fan_in_fan_out=inputs.adapters[0].fan_in_fan_out,
    )
    write_json_atomic(staging / "cat_weights.json", weights_payload(composition))
    if config.export.merge:
        save_merged(remove_cat(composition), exported.factors, inputs.tokenizer, staging / "merged")


def _cat_run_json(
    config: CatRunConfig,
    inputs: _CatInputs,
    composition: CatComposition,
    exported: ExportedFactors,
    fit: FitResult,
    timings: dict[str, float],
    resources: dict[str, Any],
    notices: list[str],
) -> dict[str, Any]:
    """``run.json``: config, versions, seed, timings, inputs, the fit, weight movement, the export."""
    from lorasoup.models import model_fingerprint

    return run_record(
        command="cat",
        config=config,
        seed=config.train.seed,
        timings=timings,
        base_model=model_fingerprint(inputs.model),
        adapters={a.name: a.summary() for a in inputs.adapters},
        inputs_sha256=inputs_fingerprint(
            [Path(ref.path) / "adapter_model.safetensors" for ref in config.adapters]
            + [Path(p) for p in config.data.train]
        ),
        training=_training_record(inputs.dataset, fit, inputs.formats),
        resources=resources,
        weight_movement=weight_movement(composition),
        export={
            "rank": exported.rank,
            "concatenated_rank": max(sum(site.ranks) for site in composition.sites),
            "merged": config.export.merge,
            "recompression": exported.recompression,
        },
        notices=notices,
    )


def run_cat(config: CatRunConfig, *, progress: ProgressHook | None = None) -> CatRunResult:
    """Compose ``config.adapters`` by CAT on ``config.base_model`` and write the artifact directory."""
    output = Path(config.output)
    require_free_output(output, overwrite=config.overwrite)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    inputs = _load_inputs(config)
    timings["load"] = time.perf_counter() - clock

    composition = _compose(config, inputs)
    clock = time.perf_counter()
    fit = _fit(config, inputs, composition, output, progress)
    timings["train"] = time.perf_counter() - clock
    resources = resource_record(torch.device(fit.device))  # every process takes part

    clock = time.perf_counter()
    exported = export_factors(composition, config.export)
    notices = inputs.notices + exported.notices
    if not _is_main_process():  # under `accelerate launch`, one process writes the artifact
        return CatRunResult(
            output=output, composition=composition, fit=fit, export_rank=exported.rank, notices=notices
        )
    with atomic_output_dir(output, overwrite=config.overwrite) as staging:
        _write_exports(staging, config, inputs, composition, exported)
        timings["export"] = time.perf_counter() - clock
        record = _cat_run_json(config, inputs, composition, exported, fit, timings, resources, notices)
        write_json_atomic(staging / "run.json", record)
    return CatRunResult(
        output=output,
        composition=composition,
        fit=fit,
        export_rank=exported.rank,
        notices=notices,
        formats=inputs.formats,
    )
