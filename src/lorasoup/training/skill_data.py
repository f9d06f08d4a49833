"""The training set of a skill LoRA: each source loaded (file or hub dataset, columns renamed), mixed
by size or proportion (DATA-MIX), tokenised in its template, split into train and held-out, packed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from lorasoup.errors import DataError
from lorasoup.training.config import DataSource, TrainRunConfig
from lorasoup.training.data import (
    MixSpec,
    SupervisedDataset,
    build_dataset,
    load_records,
    mix_records,
    split_eval,
)
from lorasoup.training.packing import pack_examples
from lorasoup.training.templates import check_record

_UNLIMITED = 1 << 62  # tokenisation length when packing: blocks, not examples, are cut to cutoff_len


@dataclass
class SourceCounts:
    """How one data source fed the run (records are rows; examples are what the Trainer saw)."""

    source: str
    loaded: int
    mixed: int
    train_records: int = 0
    eval_records: int = 0
    train_examples: int = 0
    dropped: int = 0


@dataclass
class TrainingData:
    train: SupervisedDataset
    eval: SupervisedDataset | None
    sources: dict[str, SourceCounts]


def load_source(source: DataSource) -> list[dict[str, Any]]:
    """Records of one source; hub datasets with ``columns`` are renamed before they are checked."""
    if source.columns is None:
        return load_records(source.path, split=source.split)
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data source {source.label!r}: 'columns' needs the 'datasets' package; "
            "install it with pip install 'lorasoup[hub-data]'"
        ) from None
    where = f"hub dataset {source.path!r} (split {source.split!r})"
    try:
        rows = datasets.load_dataset(source.path, split=source.split)
    except Exception as err:  # datasets raises many types; the user needs one line, not a traceback
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{where}: cannot be loaded ({first}); check the id, the split and access") from err
    mapping = source.columns.mapping()
    missing = sorted(set(mapping) - set(rows.column_names))
    if missing:
        raise DataError(f"{where}: has no column {missing[0]!r}; its columns are {list(rows.column_names)}")
    records = []
    for i, row in enumerate(rows, 1):
        renamed = {mapping.get(key, key): value for key, value in row.items()}
        records.append(check_record(renamed, f"{where}, row {i}", allow_text="text" in mapping.values()))
    if not records:
        raise DataError(f"{where}: holds no records; choose another split")
    return records


def build_training_data(config: TrainRunConfig, tokenizer: Any) -> TrainingData:
    """Load, mix, split, tokenise (and pack) the data of ``config``; counts per source for ``run.json``."""
    data, seed = config.data, config.train.seed
    loaded = [(source, load_source(source)) for source in data.sources]
    specs = [
        MixSpec(
            source.label,
            size=source.size or (len(rows) if source.proportion is None else None),
            proportion=source.proportion,
        )
        for source, rows in loaded
    ]
    mixed = mix_records(
        [(rows, spec) for (_, rows), spec in zip(loaded, specs, strict=True)], seed=seed, total=data.total
    )
    counts = {
        source.label: SourceCounts(source.path, len(rows), sum(r["_source"] == source.label for r in mixed))
        for source, rows in loaded
    }
    train_records, eval_records = split_eval(mixed, data.eval_size, seed)
    for record in eval_records:
        counts[record["_source"]].eval_records += 1
    tokenize = functools.partial(
        build_dataset,
        tokenizer=tokenizer,
        template=data.template,
        cutoff_len=_UNLIMITED if data.packing else data.cutoff_len,
        train_on_inputs=data.train_on_inputs,
        add_eos=data.add_eos,
    )
    examples: list[dict[str, list[int]]] = []
    for source in data.sources:  # grouped by source, so counts are exact; the Trainer shuffles
        rows = [record for record in train_records if record["_source"] == source.label]
        entry = counts[source.label]
        entry.train_records = len(rows)
        if not rows:
            continue
        built = _maybe_pack(tokenize(rows, name=source.path), data.packing, data.cutoff_len)
        entry.train_examples, entry.dropped = len(built), built.dropped
        examples.extend(built.examples)
    if not examples:
        raise DataError("no training example left after the eval split; lower data.eval_size")
    held_out = None
    if eval_records:
        held_out = _maybe_pack(tokenize(eval_records, name="held-out records"), data.packing, data.cutoff_len)
    dropped = sum(entry.dropped for entry in counts.values())
    return TrainingData(SupervisedDataset(examples, dropped), held_out, counts)


def _maybe_pack(dataset: SupervisedDataset, packing: bool, block_size: int) -> SupervisedDataset:
    if not packing:
        return dataset
    blocks, dropped = pack_examples(dataset.examples, block_size)
    if not blocks:
        raise DataError("packing left no block with a supervised token; check train_on_inputs and the data")
    return SupervisedDataset(blocks, dataset.dropped + dropped)
