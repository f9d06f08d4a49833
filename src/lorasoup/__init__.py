"""lorasoup: compose skills from LoRA adapters (CAT, exact merges, exact PEFT export).

The public API. Names are imported lazily so that ``lorasoup --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "LoraAdapter": "lorasoup.adapters",
    "LoraFactors": "lorasoup.adapters",
    "load_adapter": "lorasoup.adapters",
    "check_compatibility": "lorasoup.compat",
    "CatComposition": "lorasoup.cat.inject",
    "compose_cat": "lorasoup.cat.inject",
    "remove_cat": "lorasoup.cat.inject",
    "fit_cat_weights": "lorasoup.cat.fit",
    "fold_composition": "lorasoup.cat.fold",
    "CatRunConfig": "lorasoup.cat.config",
    "AdapterRef": "lorasoup.options",
    "DataConfig": "lorasoup.options",
    "FitOptions": "lorasoup.options",
    "ExportOptions": "lorasoup.options",
    "run_cat": "lorasoup.cat.run",
    "save_peft_adapter": "lorasoup.export.peft",
    "merge_factors_into": "lorasoup.export.peft",
    "load_base_model": "lorasoup.models",
    "load_tokenizer": "lorasoup.models",
    "parse_model_spec": "lorasoup.models",
    "load_config": "lorasoup.config",
    "LorasoupError": "lorasoup.errors",
    "recompress": "lorasoup.lowrank",
    "MERGE_METHODS": "lorasoup.merging",
    "MergeParams": "lorasoup.merging",
    "MergeRunConfig": "lorasoup.merging.config",
    "merge_adapters": "lorasoup.merging.run",
    "run_merge": "lorasoup.merging.run",
    "run_compress": "lorasoup.merging.run",
    "TrainRunConfig": "lorasoup.training.config",
    "TrainResult": "lorasoup.training.skill",
    "train_skill": "lorasoup.training.skill",
    "FormatSpec": "lorasoup.training.formats",
    "register_format": "lorasoup.training.formats",
    "build_format_dataset": "lorasoup.training.formats",
    "EvalRunConfig": "lorasoup.evaluation.config",
    "evaluate": "lorasoup.evaluation.runner",
    "evaluate_model": "lorasoup.evaluation.runner",
    "generate": "lorasoup.evaluation.generate",
    "GenerationSettings": "lorasoup.evaluation.generate",
    "Task": "lorasoup.evaluation.tasks",
    "TaskSpec": "lorasoup.evaluation.tasks",
    "get_task_spec": "lorasoup.evaluation.tasks",
    "register_task": "lorasoup.evaluation.tasks",
    "SearchOptions": "lorasoup.search.config",
    "SearchRunConfig": "lorasoup.search.config",
    "SearchResult": "lorasoup.search.run",
    "search_weights": "lorasoup.search.run",
    "run_search": "lorasoup.search.run",
    "score_population": "lorasoup.search.scoring",
    "search_layer_swap": "lorasoup.search.layer_swap",
    "swap_candidates": "lorasoup.search.layer_swap",
    "LayerSwapSearchResult": "lorasoup.search.layer_swap",
    "run_layer_swap_search": "lorasoup.search.layer_swap_run",
    "weights_from_file": "lorasoup.cat.inject",
    "principal_angles": "lorasoup.diagnostics",
    "lora_angles": "lorasoup.diagnostics",
    "adapter_angles": "lorasoup.diagnostics",
    "sign_conflicts": "lorasoup.diagnostics",
    "adapter_sign_conflicts": "lorasoup.diagnostics",
    "energy_kept": "lorasoup.diagnostics",
    "adapter_energy": "lorasoup.diagnostics",
    "accuracy_vs_rank": "lorasoup.diagnostics",
    "ReportConfig": "lorasoup.report.build",
    "build_report": "lorasoup.report.build",
    "MoeComposition": "lorasoup.moe.inject",
    "compose_moe": "lorasoup.moe.inject",
    "remove_moe": "lorasoup.moe.inject",
    "load_balancing_loss": "lorasoup.moe.layer",
    "train_routers": "lorasoup.moe.train",
    "save_moe": "lorasoup.moe.io",
    "load_moe": "lorasoup.moe.io",
    "mean_gates": "lorasoup.moe.distill",
    "distill_to_cat": "lorasoup.moe.distill",
    "RouterOptions": "lorasoup.moe.config",
    "MoeTrainOptions": "lorasoup.moe.config",
    "MoeRunConfig": "lorasoup.moe.config",
    "MoeDistillConfig": "lorasoup.moe.config",
    "train_moe": "lorasoup.moe.run",
    "MoeTrainResult": "lorasoup.moe.run",
    "run_moe": "lorasoup.moe.run",
    "run_distill": "lorasoup.moe.run",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'lorasoup' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
