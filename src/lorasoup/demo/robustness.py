"""Format robustness on the demo: does a composition still work when the prompt's frame changes?

LoRA Soups (https://arxiv.org/abs/2410.13025) names CAT's sensitivity to the prompt format as a
limit: its weights are trained in one template. With ``DemoSettings.format_robust`` the demo measures
it, as docs/format-robust.md does for real models:

* the **base** learns its language in every frame of :mod:`lorasoup.training.formats`
  (:data:`BASE_FORMATS`: ``plain`` and the FormatSpread frames ``fmt1`` … ``fmt10``, one dealt per
  example), standing in for a pretrained model that has met many formats;
* the skill LoRAs, DATA-MIX, the oracle and **plain CAT** see one frame, ``plain``;
* **format-robust CAT** trains the same CAT weights on the same skills' data with each example in a
  frame dealt from ``DemoSettings.train_formats`` (``plain fmt1 fmt2 fmt4``; ``DataConfig.formats``);
* every one is scored on the composite test set rendered in ``held_out_formats`` (``fmt7 fmt8
  fmt10``, in no LoRA's or CAT's training data) and in ``plain``; :func:`held_out_stats` gives the
  mean, worst, best and spread (best − worst) across the held-out frames.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lorasoup.training.formats  # noqa: F401  (registers fmt1 … fmt10 and verbatim as templates)
from lorasoup.training.formats import deal_formats
from lorasoup.training.templates import TEMPLATES

BASE_FORMATS = ("plain", "fmt1", "fmt2", "fmt3", "fmt4", "fmt7", "fmt8", "fmt10")
"""The frames the base model learns its language in (every built-in one)."""
STATS = ("mean", "worst", "best", "spread")


def check_frames(train: Sequence[str], held_out: Sequence[str]) -> None:
    """Both pools non-empty and among the base's frames, disjoint, and ``plain`` (the skills') trained."""
    from lorasoup.config import require

    for name, pool in (("train_formats", train), ("held_out_formats", held_out)):
        unknown = [f for f in pool if f not in BASE_FORMATS]
        require(not unknown, f"{name}: {unknown} not among the base's frames {list(BASE_FORMATS)}")
        require(bool(pool), f"{name}: list at least one format")
    shared = sorted(set(train) & set(held_out))
    require(not shared, f"held_out_formats {shared} are also in train_formats; hold them out")
    require("plain" in train, "train_formats: keep 'plain', the skills' own frame")


def render_in_formats(
    records: Sequence[Mapping[str, Any]], formats: Sequence[str], seed: int
) -> list[dict[str, Any]]:
    """Each record with its prompt rendered in a frame dealt from ``formats`` (train them ``verbatim``).

    The deal is :func:`lorasoup.training.formats.deal_formats`: balanced and fixed by ``seed``.
    """
    renderers = [TEMPLATES.get(name) for name in formats]
    rendered = []
    for record, index in zip(records, deal_formats(len(records), len(formats), seed), strict=True):
        prompt, response = renderers[index](record, None)  # registered frames never read the tokenizer
        rendered.append({**record, "instruction": prompt, "input": "", "output": response})
    return rendered


def held_out_stats(accuracy: Mapping[str, float], held_out: Sequence[str]) -> dict[str, float]:
    """Mean, worst, best and spread (best − worst) of the accuracies in the ``held_out`` frames."""
    values = [accuracy[name] for name in held_out]
    worst, best = min(values), max(values)
    return {"mean": sum(values) / len(values), "worst": worst, "best": best, "spread": best - worst}


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std" (sample, 0 for one value), "values"}`` of one number over seeds."""
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": spread, "values": list(values)}


def format_table(
    per_seed: Sequence[Sequence[Any]], formats: Sequence[str], held_out: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per method: each frame's accuracy over seeds, and ``held_out`` stats (per seed, then
    mean ± std over seeds). ``per_seed``: each seed's rows (``MethodResult``), same order."""
    table = []
    for index, first in enumerate(per_seed[0]):
        row: dict[str, Any] = {"method": first.method, "kind": first.kind, "detail": first.detail}
        for name in formats:
            row[name] = summarise([rows[index].accuracy[name] for rows in per_seed])
        stats = [held_out_stats(rows[index].accuracy, held_out) for rows in per_seed]
        row["held_out"] = {stat: summarise([s[stat] for s in stats]) for stat in STATS}
        table.append(row)
    return table
