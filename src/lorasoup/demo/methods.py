"""Every way the demo makes a model, each one call of lorasoup's public API with the demo's settings:
skill LoRAs and DATA-MIX (``train_skill``), merges (``run_merge``), CAT (``run_cat``), weight search,
the MoE baseline and its distillation, and CAT untrained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorasoup.demo.device import resolve_device
from lorasoup.demo.settings import TARGETS, DemoSettings


@dataclass(frozen=True)
class FinishedAdapter:
    """A skill LoRA a resumed demo run found already trained (``output``, as ``TrainResult`` has)."""

    output: Path


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
    """One LoRA through ``train_skill`` (several sources: a DATA-MIX of equal shares). A LoRA already
    at ``out`` (a resumed run; ``train_skill`` writes its folder atomically, so it is whole) is kept."""
    if (out / "adapter_config.json").is_file():
        return FinishedAdapter(out)
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
            "group_by_length": settings.group_by_length,
            "tf32": getattr(settings, "tf32", False) or None,  # only the real study has it
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
    """One merge through ``run_merge``; a merge already at ``out`` (a resumed run) is kept."""
    raw = {
        "method": method,
        "adapters": [{"path": str(a), "weight": w} for a, w in zip(adapters, weights, strict=True)],
        "parameters": params,
    }
    return run_study_merge(raw, out, seed, device)


def run_study_merge(raw: dict[str, Any], out: Path, seed: int, device: str) -> Path:
    """``run_merge`` of the merge config ``raw`` into ``out``; a merge already at ``out`` (a resumed
    run: written atomically, so whole) is kept."""
    if (out / "adapter_config.json").is_file():
        return out
    from lorasoup.config import load_config
    from lorasoup.merging.config import MergeRunConfig
    from lorasoup.merging.run import run_merge

    raw = raw | {"output": str(out), "seed": seed, "device": resolve_device(device)}
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
    from lorasoup.cat.config import CatRunConfig
    from lorasoup.cat.run import run_cat
    from lorasoup.options import AdapterRef, DataConfig, FitOptions
    from lorasoup.training.formats import as_format_specs

    config = CatRunConfig(
        base_model=str(base_dir),
        adapters=[AdapterRef(str(path), name=name) for name, path in adapters.items()],
        data=DataConfig(
            train=data, template=template, cutoff_len=cutoff_len, formats=as_format_specs(formats or [])
        ),
        output=str(out),
        overwrite=True,  # a resumed run trains the weights again (seconds) rather than keep a stale export
        train=FitOptions(**weight_fit(settings, seed)),
    )
    return run_cat(config)


def weight_fit(settings: DemoSettings, seed: int) -> dict[str, Any]:
    """How the study fits mixing weights (CAT's, the MoE's routers): ``FitOptions`` fields."""
    return {
        "learning_rate": settings.cat_learning_rate,
        "max_steps": settings.cat_steps,
        "epochs": 100,
        "batch_size": settings.batch_size,
        "seed": seed,
        "logging_steps": 50,
        "device": resolve_device(settings.device),
    }


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
    router: Any = None,
) -> Any:
    """A mixture of the skill LoRAs: per-token routers trained on the skills' data (the paper's MoE
    row); ``router``: moe's ``RouterOptions`` (None: its defaults)."""
    from lorasoup.moe.config import MoeTrainOptions
    from lorasoup.moe.run import train_moe

    options = MoeTrainOptions(**weight_fit(settings, seed))
    return train_moe(
        base_dir, adapters, data, router=router, train=options, template=template, cutoff_len=cutoff_len
    )


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


def swap_skill_layers(
    base_dir: Path, adapters: dict[str, Path], out: Path, seed: int, device: str
) -> tuple[Path, list[str]]:
    """Layer swapping by the simplest rule: the layers in contiguous blocks, one per skill in order
    (K = 2: the lower half takes the first skill, the upper half the second), through ``run_merge``."""
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(base_dir).num_hidden_layers
    names = list(adapters)
    choice = [names[layer * len(names) // layers] for layer in range(layers)]
    raw = {
        "method": "layer_swap",
        "adapters": [{"path": str(path), "name": name} for name, path in adapters.items()],
        "layer_swap": {"layers": choice, "other": names[-1], "num_layers": layers},
    }
    return run_study_merge(raw, out, seed, device), choice


def fit_flow_gates(
    base_dir: Path,
    adapters: dict[str, Path],
    data: list[str],
    settings: DemoSettings,
    seed: int,
    *,
    template: str = "plain",
    cutoff_len: int = 64,
) -> Any:
    """LoRA-Flow (``router.preset: lora_flow``): soft per-layer gates trained on ``data`` (the few target
    examples), no balancing loss; moe's training with the MoE row's steps and learning rate."""
    from lorasoup.moe.config import RouterOptions

    router = RouterOptions(preset="lora_flow", granularity="layer", balance_coef=0.0)
    return fit_moe(
        base_dir, adapters, data, settings, seed, template=template, cutoff_len=cutoff_len, router=router
    )
