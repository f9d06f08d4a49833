"""Supervised data for LoRA and CAT-weight training: load, template, tokenise with loss masks, mix.

The flow is ``load_records`` → (``mix_records`` / ``split_eval``) → ``build_dataset`` → ``collate``.

* **Records** are alpaca-style dicts ``{"instruction", "input" (optional, default ""), "output"}`` or
  raw-text dicts ``{"text"}``. Loading validates every row once, so later stages can trust them.
* **Loss masking**: labels are ``-100`` on prompt tokens, so the adapter learns the response, not the
  template (as Alpaca-LoRA and the LoRA Soups paper do); ``train_on_inputs=True`` supervises all.
* **Mixing** (DATA-MIX, https://arxiv.org/abs/2410.13025): several skills' records sampled by absolute
  size or by proportion of the mix, reproducibly from one ``random.Random(seed)``.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from lorasoup.errors import ConfigError, DataError
from lorasoup.training.templates import TEMPLATES, check_record, format_example, json_kind

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label value that ``torch.nn.CrossEntropyLoss`` (and transformers' causal-LM loss) skips."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_records(source: str | Path, *, split: str = "train") -> list[dict[str, Any]]:
    """Read instruction records from a local file or a Hugging Face hub dataset.

    * ``.json``: one list of objects; errors name the row (1-based index in the list).
    * ``.jsonl``: one object per line, blank lines skipped; errors name the line (1-based).
    * ``.txt``: a plain corpus; one ``{"text": paragraph}`` record per non-empty paragraph (paragraphs
      are separated by blank lines), stripped of surrounding whitespace.
    * ``owner/name`` that is not an existing path: ``datasets.load_dataset(source, split=split)``
      (the optional ``lorasoup[hub-data]`` extra); its rows are checked like a ``.json`` file's.

    Returns new dicts with ``input`` filled in (``""`` when absent or null); other keys are kept.
    Every problem is a one-line ``DataError`` naming the file, the row and the fix.
    """
    path = Path(source)
    if path.is_file():
        return _load_file(path)
    if path.exists():
        raise DataError(f"{path}: is a directory, not a file; pass a .json, .jsonl or .txt file")
    if path.suffix.lower() not in _READERS and _HUB_ID.match(str(source)):
        return _load_hub(str(source), split)
    raise DataError(f"{path}: file not found; check the path (or pass a hub dataset id such as 'owner/name')")


def _load_file(path: Path) -> list[dict[str, Any]]:
    """Decode the file, dispatch on its suffix, and refuse files that hold no record."""
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use .json (a list of objects), "
            ".jsonl (one object per line) or .txt (plain text)"
        )
    text = _read_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty; add at least one record")
    records = reader(path, text)
    if not records:
        raise DataError(f"{path}: holds no records; add at least one record")
    return records


def _read_utf8(path: Path) -> str:
    """Strict UTF-8 (a BOM is tolerated): a silently mis-decoded corpus would train on mojibake."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror}); check its permissions") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        bad = data[err.start : err.start + 1]
        raise DataError(
            f"{path}, line {line}: not valid UTF-8 (byte {bad!r} at offset {err.start}); "
            "re-save the file as UTF-8"
        ) from err


def _parse_json(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg}); fix the syntax "
            "(a .json file holds one list of objects; use .jsonl for one object per line)"
        ) from err
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON array of records, got {json_kind(data)}; "
            "wrap the records in [...] or use .jsonl for one object per line"
        )
    return [check_record(row, f"{path}, row {i}") for i, row in enumerate(data, 1)]


def _parse_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    # split("\n"), not splitlines(): U+2028 and friends are legal inside JSON strings.
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {lineno}: invalid JSON at column {err.colno} ({err.msg}); "
                "each line must hold one complete JSON object"
            ) from err
        records.append(check_record(row, f"{path}, line {lineno}"))
    return records


def _parse_txt(path: Path, text: str) -> list[dict[str, Any]]:
    paragraphs = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    return [{"text": p.strip()} for p in paragraphs if p.strip()]


_READERS: dict[str, Callable[[Path, str], list[dict[str, Any]]]] = {
    ".json": _parse_json,
    ".jsonl": _parse_jsonl,
    ".txt": _parse_txt,
}


def _load_hub(dataset_id: str, split: str) -> list[dict[str, Any]]:
    """Load a hub dataset lazily: ``datasets`` is an optional extra and slow to import."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{dataset_id!r} looks like a Hugging Face hub dataset id but the 'datasets' package is not "
            "installed; install it with pip install 'lorasoup[hub-data]' (or pass a local .json/.jsonl/.txt)"
        ) from None
    where = f"hub dataset {dataset_id!r} (split {split!r})"
    try:
        rows = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # datasets raises many types; the user needs one line, not a traceback
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{where}: cannot be loaded ({first}); check the id, the split and access") from err
    records = [check_record(row, f"{where}, row {i}") for i, row in enumerate(rows, 1)]
    if not records:
        raise DataError(f"{where}: holds no records; choose another split")
    return records


def tokenize_example(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str = "alpaca",
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """Tokenise one record into ``input_ids``, ``attention_mask`` and ``labels`` (all length ≤ cutoff_len).

    The prompt and the response are tokenised **separately** (no special tokens) and their ids
    concatenated, so the prompt/response boundary is exact: every label is either a prompt token
    (``-100`` unless ``train_on_inputs``) or a response token. Tokenising ``prompt + response`` as one
    string and masking ``len(tokenize(prompt))`` tokens can be off by one where a merge crosses the
    boundary; the price of our choice is that the response starts a fresh pre-token (no merge with
    the prompt's last character), which our templates make harmless by ending prompts with "\\n".
    The BOS token is prepended once if the tokenizer adds one and the prompt does not already start
    with it (chat templates often render it); EOS is appended to the response when ``add_eos``.
    Truncation keeps the first ``cutoff_len`` tokens, so long responses lose their tail (and EOS).
    """
    checked = check_record(record, "record", allow_text=True)
    _check_cutoff(cutoff_len)
    example, _ = _tokenize(checked, tokenizer, template, cutoff_len, train_on_inputs, add_eos)
    return example


def _tokenize(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    cutoff_len: int,
    train_on_inputs: bool,
    add_eos: bool,
) -> tuple[dict[str, list[int]], int]:
    """Return the example and how many response tokens survived truncation (0 ⇒ nothing to learn)."""
    prompt, response = format_example(record, tokenizer, template)
    prompt_ids = _encode(tokenizer, prompt)
    response_ids = _encode(tokenizer, response)
    if add_eos:
        response_ids.append(_eos_id(tokenizer))
    prompt_ids = _bos_prefix(tokenizer, prompt_ids or response_ids) + prompt_ids
    input_ids = (prompt_ids + response_ids)[:cutoff_len]
    if train_on_inputs:
        labels = list(input_ids)
    else:
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:cutoff_len]
    example = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
    return example, max(0, len(input_ids) - len(prompt_ids))


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _bos_prefix(tokenizer: PreTrainedTokenizerBase, first_ids: Sequence[int]) -> list[int]:
    """``[bos]`` if the tokenizer's own special-token rule starts sequences with BOS, else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None or (first_ids and first_ids[0] == bos):
        return []
    with_specials = tokenizer("", add_special_tokens=True)["input_ids"]
    return [bos] if with_specials and with_specials[0] == bos else []


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"tokenizer {name!r} has no eos_token; set tokenizer.eos_token or pass add_eos=False")
    return int(tokenizer.eos_token_id)


def _check_cutoff(cutoff_len: int) -> None:
    if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < 1:
        raise ConfigError(f"cutoff_len must be a positive integer, got {cutoff_len!r}")


class SupervisedDataset(Dataset[dict[str, list[int]]]):
    """Tokenised examples in memory; ``dropped`` counts records whose response was truncated away."""

    def __init__(self, examples: list[dict[str, list[int]]], dropped: int = 0) -> None:
        self.examples = examples
        self.dropped = dropped

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def build_dataset(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str = "alpaca",
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    add_eos: bool = True,
    name: str = "records",
) -> SupervisedDataset:
    """Tokenise every record (see :func:`tokenize_example`), dropping those with no response token left.

    A record whose response lies entirely beyond ``cutoff_len`` would teach nothing but the prompt
    (or nothing at all), so it is dropped and counted in ``.dropped``, even with ``train_on_inputs``.
    ``name`` labels the records in error messages (e.g. the file they came from).
    """
    _check_cutoff(cutoff_len)
    TEMPLATES.get(template)  # an unknown name fails before any work
    if not records:
        raise DataError(f"{name}: no records to build a dataset from; check the data source")
    examples, dropped = [], 0
    for row, record in enumerate(records, 1):
        checked = check_record(record, f"{name}, row {row}", allow_text=True)
        example, kept = _tokenize(checked, tokenizer, template, cutoff_len, train_on_inputs, add_eos)
        if kept == 0:
            dropped += 1
        else:
            examples.append(example)
    if not examples:
        raise DataError(
            f"{name}: no example has a response token within cutoff_len={cutoff_len}; raise cutoff_len"
        )
    return SupervisedDataset(examples, dropped)


def collate(
    batch: Sequence[Mapping[str, list[int]]], pad_token_id: int | None, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: ids with ``pad_token_id``, labels with -100, mask with 0.

    Right padding keeps positions 0..n-1 identical to the unpadded sequence, which is what training
    (not batched generation) wants. Use ``functools.partial(collate, pad_token_id=...)`` as
    ``collate_fn``. Returns long tensors of shape ``(batch, width)``: the longest example rounded up
    to ``pad_to_multiple_of`` (a few fixed widths let compiled and CUDA-graph steps be reused).
    """
    if pad_token_id is None:
        raise DataError(
            "pad_token_id is None: the tokenizer has no pad token; set one, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token"
        )
    if not batch:
        raise DataError("collate got an empty batch; check the DataLoader and dataset size")
    longest = max(len(example["input_ids"]) for example in batch)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of

    def pad(key: str, value: int) -> torch.Tensor:
        rows = [list(example[key]) + [value] * (width - len(example[key])) for example in batch]
        return torch.tensor(rows, dtype=torch.long)  # (batch, width)

    return {
        "input_ids": pad("input_ids", pad_token_id),
        "attention_mask": pad("attention_mask", 0),
        "labels": pad("labels", IGNORE_INDEX),
    }


@dataclass(frozen=True)
class MixSpec:
    """How many records one source contributes to a mix: an absolute ``size`` or a ``proportion``.

    ``proportion`` is a fraction of ``total``, the size of the whole mix passed to :func:`mix_records`.
    Exactly one of the two is given; they are validated here, once.
    """

    name: str
    size: int | None = None
    proportion: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a data source needs a non-empty name, got {self.name!r}")
        if (self.size is None) == (self.proportion is None):
            raise ConfigError(
                f"data source {self.name!r}: give exactly one of size or proportion "
                f"(got size={self.size!r}, proportion={self.proportion!r})"
            )
        if self.size is not None and (
            isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1
        ):
            raise ConfigError(f"data source {self.name!r}: size must be an integer >= 1, got {self.size!r}")
        p = self.proportion
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ConfigError(f"data source {self.name!r}: proportion must be in (0, 1], got {p!r}")


def mix_records(
    sources: Sequence[tuple[Sequence[Mapping[str, Any]], MixSpec]],
    *,
    seed: int,
    total: int | None = None,
) -> list[dict[str, Any]]:
    """Sample each source to its size, tag it, and shuffle everything together, reproducibly.

    A source of ``n`` records asked for ``k`` is sampled **without replacement** when ``k <= n``
    (each record at most once) and **with replacement** when ``k > n`` (``random.choices``: some
    records repeat, some may be missed). ``proportion`` counts are ``proportion * total``, rounded by
    largest remainder so they sum to ``round(sum(proportions) * total)``; every count, sizes included,
    must fit within ``total`` when it is given. Each output record is a new dict with ``"_source"``
    set to its spec's name. All randomness comes from one ``random.Random(seed)``.
    """
    specs = [spec for _, spec in sources]
    counts = _mix_counts(specs, total)
    rng = random.Random(seed)
    mixed: list[dict[str, Any]] = []
    for (records, spec), count in zip(sources, counts, strict=True):
        if not records:
            raise DataError(f"data source {spec.name!r} has no records; check its data or drop it")
        picked = rng.sample(list(records), count) if count <= len(records) else rng.choices(records, k=count)
        mixed.extend({**record, "_source": spec.name} for record in picked)
    rng.shuffle(mixed)
    return mixed


def _mix_counts(specs: Sequence[MixSpec], total: int | None) -> list[int]:
    """Per-source record counts; validates names, ``total`` and the sum of proportions."""
    if not specs:
        raise ConfigError("mix_records needs at least one data source")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"data source names must be unique, got {names}")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
        raise ConfigError(f"total must be a positive integer, got {total!r}")
    shares = {i: spec.proportion for i, spec in enumerate(specs) if spec.proportion is not None}
    if shares and total is None:
        raise ConfigError("data sources given by proportion need total= (the size of the whole mix)")
    if sum(shares.values()) > 1 + 1e-9:
        raise ConfigError(f"proportions sum to {sum(shares.values()):.6g} > 1; lower them")
    counts = [spec.size or 0 for spec in specs]
    if shares and total is not None:
        exact = {i: p * total for i, p in shares.items()}
        for i, value in exact.items():
            counts[i] = math.floor(value)
        missing = round(sum(exact.values())) - sum(counts[i] for i in shares)
        by_remainder = sorted(shares, key=lambda i: (-(exact[i] - counts[i]), i))
        for i in by_remainder[: max(0, missing)]:
            counts[i] += 1
    for spec, count in zip(specs, counts, strict=True):
        if count == 0:
            raise ConfigError(f"data source {spec.name!r} gets 0 of total={total} records; raise its share")
    if total is not None and sum(counts) > total:
        raise ConfigError(f"the mix asks for {sum(counts)} records but total={total}; lower sizes or shares")
    return counts


def split_eval(
    records: Sequence[Mapping[str, Any]], eval_size: int | float, seed: int
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Hold out ``eval_size`` records (a count, or a fraction in (0, 1) rounded, at least 1).

    Returns ``(train, eval)``; both keep the records' original order, and which records go to eval
    depends only on ``seed`` and ``len(records)`` (``random.Random(seed)``). ``eval_size=0`` holds
    out nothing. At least one training record must remain.
    """
    n = len(records)
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float)):
        raise ConfigError(f"eval_size must be a count or a fraction in (0, 1), got {eval_size!r}")
    if isinstance(eval_size, float):
        if not 0 < eval_size < 1:
            raise ConfigError(f"eval_size as a fraction must be in (0, 1), got {eval_size!r}")
        count = max(1, round(eval_size * n))
    else:
        count = eval_size
    if not 0 <= count < n:
        raise ConfigError(
            f"eval_size={eval_size!r} holds out {count} of {n} records; it must leave at least one "
            "training record (and not be negative)"
        )
    held = set(random.Random(seed).sample(range(n), count))
    train = [record for i, record in enumerate(records) if i not in held]
    return train, [records[i] for i in sorted(held)]
