"""``lorasoup search`` with a ``layer_swap:`` section, end to end: choose a layer swap, export it.

The inputs are the weight search's (``search.run.load_search_inputs``), composed by CAT per layer; the
family of rules is scored by :func:`lorasoup.search.layer_swap.search_layer_swap`. The artifact
directory (written atomically) holds
- ``adapter_config.json`` + ``adapter_model.safetensors``: the chosen rule's swap as a plain PEFT
  adapter, the one ``lorasoup merge --method layer_swap`` writes for that rule
  (``merging.layer_swap.layer_swap_factors``: CAT's exact fold, the other adapters' zero rank rows
  dropped; ``r = lora_alpha`` = the largest chosen rank);
- ``search_weights.json``: the chosen one-hot table per layer (the ``cat_weights.json`` schema);
- ``run.json``: config, versions, timings, inputs' hashes and ``layer_swap``: the chosen rule (a
  ``layer_swap:`` section for ``lorasoup merge``), its loss, and every candidate's family, rule,
  layers and loss;
- ``cat-warm-start.yaml`` (``warm_start_cat``): a ``lorasoup cat`` config starting from the swap;
- ``merged/`` (``export.merge``): the base model with the swap merged in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasoup.artifacts import (
    atomic_output_dir,
    require_free_output,
    run_record,
    write_json_atomic,
)
from lorasoup.cat.inject import remove_cat
from lorasoup.cat.run import weights_payload
from lorasoup.devices import DTYPES
from lorasoup.errors import ConfigError
from lorasoup.merging.layer_swap import LAYER_SWAP, layer_swap_factors
from lorasoup.merging.run import adapters_target_leaves, pad_all
from lorasoup.search.config import SearchRunConfig
from lorasoup.search.layer_swap import (
    CandidateProgress,
    LayerSwapSearchResult,
    describe_rule,
    rule_section,
    search_layer_swap,
)
from lorasoup.search.run import (
    WARM_START_FILE,
    WEIGHTS_FILE,
    SearchInputs,
    load_search_inputs,
    search_inputs_record,
    write_warm_start,
)


@dataclass
class LayerSwapRunResult:
    output: Path
    adapter_names: list[str]
    search: LayerSwapSearchResult
    export_rank: int
    notices: list[str]


def run_layer_swap_search(
    config: SearchRunConfig, *, progress: CandidateProgress | None = None
) -> LayerSwapRunResult:
    """Score the layer-swap rules of ``config.layer_swap`` on ``config.data``; write the chosen swap."""
    if config.layer_swap is None:
        raise ConfigError("layer_swap: add a layer_swap: section (or pass --layer-swap) to choose a swap")
    output = Path(config.output)
    require_free_output(output, overwrite=config.overwrite)
    clock = time.perf_counter()
    inputs = load_search_inputs(config, granularity="layer")
    timings = {"load": time.perf_counter() - clock}
    composition = inputs.composition
    result = search_layer_swap(
        composition,
        inputs.dataset,
        pad_token_id=inputs.tokenizer.pad_token_id,
        families=config.layer_swap.families,
        other=config.layer_swap.other,
        rows_per_forward=config.search.rows_per_forward,
        progress=progress,
    )
    timings["search"] = result.seconds

    clock = time.perf_counter()
    factors = layer_swap_factors(inputs.adapters, result.rule, num_layers=result.num_layers)
    padded, rank = pad_all(factors, DTYPES[config.export.dtype])
    with atomic_output_dir(output, overwrite=config.overwrite) as staging:
        from lorasoup.export.peft import save_merged, save_peft_adapter

        save_peft_adapter(
            padded,
            staging,
            base_model=config.base_model,
            target_modules=adapters_target_leaves(inputs.adapters, list(padded)),
            fan_in_fan_out=inputs.adapters[0].fan_in_fan_out,
        )
        write_json_atomic(staging / WEIGHTS_FILE, weights_payload(composition))
        if config.warm_start_cat:
            write_warm_start(staging / WARM_START_FILE, config, composition, output)
        record = _run_record(config, inputs, result, rank, timings)  # before the merge changes the model
        if config.export.merge:
            save_merged(remove_cat(composition), padded, inputs.tokenizer, staging / "merged")
        record["timings_s"]["export"] = round(time.perf_counter() - clock, 4)
        write_json_atomic(staging / "run.json", record)
    return LayerSwapRunResult(
        output=output,
        adapter_names=list(composition.adapter_names),
        search=result,
        export_rank=rank,
        notices=list(inputs.notices),
    )


def _run_record(
    config: SearchRunConfig,
    inputs: SearchInputs,
    result: LayerSwapSearchResult,
    rank: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    return run_record(
        **search_inputs_record(config, inputs),
        timings=timings,
        layer_swap={
            "method": LAYER_SWAP,
            "objective": "mean response-token loss",
            "families": list(config.layer_swap.families) if config.layer_swap else [],
            "num_layers": result.num_layers,
            "examples": len(inputs.dataset),
            "dropped_examples": inputs.dataset.dropped,
            **({"formats": inputs.formats} if inputs.formats is not None else {}),
            "rule": rule_section(result.rule),
            "layers": describe_rule(result.rule, result.num_layers),
            "best_loss": result.loss,
            "best_index": result.best,
            "candidates_scored": len(result.candidates),
            "candidates_per_second": len(result.candidates) / result.seconds if result.seconds else None,
            "candidates": result.table(),
        },
        export={"rank": rank, "merged": config.export.merge, "dtype": config.export.dtype},
        notices=list(inputs.notices),
    )
