"""``lorasoup moe`` and ``lorasoup moe distill``, end to end, plus ``train_moe`` for in-memory use.

``run_moe`` writes (atomically) a MoE artifact (``lorasoup.moe.io``) and ``run.json``: config,
versions, seed, timings, the loss and its two parts per step, and the inputs' hashes.
``run_distill`` writes a plain PEFT adapter (the router's mean gates folded in as CAT weights),
``cat_weights.json`` (the distilled weights per module and adapter) and ``run.json``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorasoup.adapters import LoraAdapter, load_adapter, load_adapters
from lorasoup.artifacts import (
    atomic_output_dir,
    inputs_fingerprint,
    require_free_output,
    run_record,
    write_json_atomic,
)
from lorasoup.cat.fold import fold_composition
from lorasoup.cat.inject import CatComposition
from lorasoup.devices import DTYPES
from lorasoup.errors import ConfigError
from lorasoup.moe.config import MoeDataConfig, MoeDistillConfig, MoeRunConfig, MoeTrainOptions, RouterOptions
from lorasoup.moe.distill import CountHook, distill_to_cat, mean_gates
from lorasoup.moe.inject import MoeComposition, compose_moe
from lorasoup.moe.io import load_moe, read_moe_config, save_moe
from lorasoup.moe.train import MoeFitResult, train_routers
from lorasoup.training.loop import ProgressHook

DataSource = str | Path | Mapping[str, Any]


@dataclass
class MoeTrainResult:
    """A trained MoE in memory: ``model`` generates (KV cache included); ``composition`` saves/distills."""

    composition: MoeComposition
    fit: MoeFitResult
    tokenizer: Any
    examples: int
    dropped_examples: int

    @property
    def model(self) -> nn.Module:
        return self.composition.model


@dataclass
class MoeRunResult:
    output: Path
    trained: MoeTrainResult
    notices: list[str] = field(default_factory=list)


@dataclass
class DistillResult:
    output: Path
    composition: CatComposition
    weights: dict[str, dict[str, float]]
    tokens: int
    rank: int


def build_dataset_from(
    data: Sequence[DataSource],
    tokenizer: Any,
    *,
    template: str,
    cutoff_len: int,
    train_on_inputs: bool,
    max_examples: int | None = None,
) -> Any:
    """Tokenised examples from data files / hub ids and in-memory records, in the order given."""
    from lorasoup.training.data import build_dataset, load_records

    if isinstance(data, (str, Path, Mapping)):  # one source given bare, not in a list
        data = [data]
    records: list[Mapping[str, Any]] = []
    for source in data:
        records.extend([source] if isinstance(source, Mapping) else load_records(source))
    if max_examples is not None:
        records = records[:max_examples]
    names = [str(s) for s in data if not isinstance(s, Mapping)] or ["records"]
    return build_dataset(
        records,
        tokenizer,
        template=template,
        cutoff_len=cutoff_len,
        train_on_inputs=train_on_inputs,
        name=", ".join(names),
    )


def _as_adapters(
    adapters: Mapping[str, str | Path] | Sequence[str | Path | LoraAdapter],
) -> list[LoraAdapter]:
    if isinstance(adapters, Mapping):
        return [load_adapter(path, name=name) for name, path in adapters.items()]
    return [a if isinstance(a, LoraAdapter) else load_adapter(a) for a in adapters]


def train_moe(
    base_model: str | Path,
    adapters: Mapping[str, str | Path] | Sequence[str | Path | LoraAdapter],
    data: Sequence[DataSource],
    *,
    router: RouterOptions | None = None,
    train: MoeTrainOptions | None = None,
    template: str = "alpaca",
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    max_examples: int | None = None,
    allow_base_mismatch: bool = False,
    checkpoint_dir: Path | None = None,
    resume_from: str | Path | None = None,
    progress: ProgressHook | None = None,
) -> MoeTrainResult:
    """Load ``base_model``, gate ``adapters`` (name → dir, or dirs) per token, train the routers on
    ``data`` (files, hub ids or alpaca/text records), and return the trained MoE in memory, eval mode.
    """
    from lorasoup.models import load_base_model, load_tokenizer, parse_model_spec
    from lorasoup.training.data import collate

    router = router or RouterOptions()
    train = train or MoeTrainOptions()
    router.validate()
    train.validate()
    loaded = _as_adapters(adapters)
    spec = parse_model_spec(str(base_model))
    tokenizer = load_tokenizer(spec)
    dataset = build_dataset_from(
        data,
        tokenizer,
        template=template,
        cutoff_len=cutoff_len,
        train_on_inputs=train_on_inputs,
        max_examples=max_examples,
    )
    model = load_base_model(spec, dtype=DTYPES[train.dtype], device=train.device)
    composition = compose_moe(
        model,
        loaded,
        granularity=router.granularity,
        top_k=router.top_k,
        renormalize=router.renormalize,
        seed=train.seed,
        init_std=router.init_std,
        dropout=router.dropout,
        allow_base_mismatch=allow_base_mismatch,
    )
    fit = train_routers(
        composition,
        dataset,
        functools.partial(collate, pad_token_id=tokenizer.pad_token_id),
        train,
        balance_coef=router.balance_coef,
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
        progress=progress,
    )
    return MoeTrainResult(composition, fit, tokenizer, len(dataset), dataset.dropped)


def _absolute(source: str) -> str:
    """A local data path made absolute (so the artifact names the same file from anywhere); else as is."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _router_movement(composition: MoeComposition) -> dict[str, Any]:
    """How far the routers moved from zero, for run.json (a run that learned nothing is visible)."""
    weights = torch.stack([r.weight.detach().float().norm() for r in composition.routers])
    biases = torch.stack([r.bias.detach().float().abs().max() for r in composition.routers])
    return {"router_weight_norm_mean": float(weights.mean()), "router_bias_max_abs": float(biases.max())}


def _run_json(
    config: MoeRunConfig,
    trained: MoeTrainResult,
    adapters: list[LoraAdapter],
    notices: list[str],
    timings: dict[str, float],
) -> dict[str, Any]:
    from lorasoup.models import model_fingerprint

    fit = trained.fit
    return run_record(
        command="moe",
        config=config,
        seed=config.train.seed,
        timings=timings,
        base_model=model_fingerprint(trained.model),
        adapters={a.name: a.summary() for a in adapters},
        inputs_sha256=inputs_fingerprint(
            [Path(ref.path) / "adapter_model.safetensors" for ref in config.adapters]
            + [Path(p) for p in config.data.train]
        ),
        routers={"count": len(trained.composition.routers), **_router_movement(trained.composition)},
        training={
            "examples": trained.examples,
            "dropped_examples": trained.dropped_examples,
            "steps": fit.steps,
            "resumed_from_step": fit.resumed_from_step,
            "first_loss": fit.first_loss,
            "last_loss": fit.last_loss,
            "losses": fit.losses,
            "lm_losses": fit.lm_losses,
            "balance_losses": fit.balance_losses,
        },
        notices=notices,
    )


def run_moe(config: MoeRunConfig, *, progress: ProgressHook | None = None) -> MoeRunResult:
    """Train routers over ``config.adapters`` on ``config.base_model`` and write the MoE artifact."""
    from lorasoup.compat import check_compatibility

    output = Path(config.output)
    require_free_output(output, overwrite=config.overwrite)
    clock = time.perf_counter()
    adapters = load_adapters(config.adapters)
    report = check_compatibility(
        adapters, allow_base_mismatch=config.allow_base_mismatch, base_model=config.base_model
    )
    report.raise_if_incompatible()
    trained = train_moe(
        config.base_model,
        adapters,
        config.data.train,
        router=config.router,
        train=config.train,
        template=config.data.template,
        cutoff_len=config.data.cutoff_len,
        train_on_inputs=config.data.train_on_inputs,
        max_examples=config.data.max_examples,
        allow_base_mismatch=config.allow_base_mismatch,
        checkpoint_dir=output.with_name(output.name + ".checkpoints"),
        resume_from=config.resume_from,
        progress=progress,
    )
    fit = trained.fit
    timings = {"load_and_train": time.perf_counter() - clock, "train": fit.seconds}
    clock = time.perf_counter()
    with atomic_output_dir(output, overwrite=config.overwrite) as staging:
        save_moe(
            trained.composition,
            staging,
            base_model=config.base_model,
            copy_adapters=config.save.copy_adapters,
            training_data={**asdict(config.data), "train": [_absolute(p) for p in config.data.train]},
        )
        timings["save"] = time.perf_counter() - clock
        record = _run_json(config, trained, adapters, list(report.notices), timings)
        write_json_atomic(staging / "run.json", record)
    return MoeRunResult(output=output, trained=trained, notices=list(report.notices))


def _distill_data(config: MoeDistillConfig, moe_config: dict[str, Any]) -> MoeDataConfig:
    """The data to average the gates over: each unset field from the routers' training data."""
    recorded = moe_config.get("training_data") or {}
    train = config.data or recorded.get("train")
    if not train:
        raise ConfigError(f"{config.run_dir}: no training data is recorded in moe_config.json; pass --data")
    same = not config.data
    data = MoeDataConfig(
        train=list(train),
        template=config.template or recorded.get("template", "alpaca"),
        cutoff_len=config.cutoff_len or recorded.get("cutoff_len", 256),
        max_examples=config.max_examples or (recorded.get("max_examples") if same else None),
    )
    data.validate()
    return data


def run_distill(config: MoeDistillConfig, *, progress: CountHook | None = None) -> DistillResult:
    """Average a MoE artifact's gates over data into CAT weights; write them as a plain PEFT adapter."""
    from lorasoup.models import load_tokenizer, parse_model_spec
    from lorasoup.training.data import collate

    config.validate()
    output = Path(config.output)
    require_free_output(output, overwrite=config.overwrite)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    moe_config = read_moe_config(config.run_dir)
    data = _distill_data(config, moe_config)
    base_model = config.base_model or moe_config["base_model"]
    tokenizer = load_tokenizer(parse_model_spec(base_model))
    dataset = build_dataset_from(
        data.train,
        tokenizer,
        template=data.template,
        cutoff_len=data.cutoff_len,
        train_on_inputs=data.train_on_inputs,
        max_examples=data.max_examples,
    )
    composition = load_moe(
        config.run_dir, base_model=base_model, dtype=DTYPES[config.dtype], device=config.device
    )
    timings["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    collate_fn = functools.partial(collate, pad_token_id=tokenizer.pad_token_id)
    gates, tokens = mean_gates(
        composition, dataset, collate_fn, batch_size=config.batch_size, progress=progress
    )
    fan_in_fan_out = composition.adapters[0].fan_in_fan_out
    cat = distill_to_cat(composition, gates)
    timings["distill"] = time.perf_counter() - clock
    folded = fold_composition(cat, dtype=DTYPES[config.export_dtype])
    rank = next(iter(folded.values())).rank
    with atomic_output_dir(output, overwrite=config.overwrite) as staging:
        from lorasoup.export.peft import save_peft_adapter

        save_peft_adapter(
            folded, staging, base_model=base_model, model=cat.model, fan_in_fan_out=fan_in_fan_out
        )
        write_json_atomic(staging / "cat_weights.json", distilled_weights_payload(cat))
        record = run_record(
            command="moe distill",
            config=config,
            seed=0,  # nothing random: the gates are averaged in data order
            timings=timings,
            moe_run=str(Path(config.run_dir).resolve()),
            data=asdict(data),
            distillation={"examples": len(dataset), "tokens": tokens, "rank": rank},
            inputs_sha256=inputs_fingerprint([Path(p) for p in data.train]),
        )
        write_json_atomic(staging / "run.json", record)
    return DistillResult(
        output=output, composition=cat, weights=cat.weights_table(), tokens=tokens, rank=rank
    )


def distilled_weights_payload(cat: CatComposition) -> dict[str, Any]:
    """``cat_weights.json`` of a distilled adapter: the same layout as ``lorasoup cat`` writes."""
    return {
        "adapters": cat.adapter_names,
        "granularity": "module",
        "parameterisation": "free",
        "source": "mean router gates over the data (lorasoup moe distill)",
        "weights": cat.weights_table(),
        "modules": {site.path: cat.group_names[site.group] for site in cat.sites},
    }
