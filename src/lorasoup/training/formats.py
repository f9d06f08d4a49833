"""Prompt formats as data, and training data rendered in a format drawn per example (format-robust CAT).

LoRA Soups (https://arxiv.org/abs/2410.13025) lists sensitivity to the prompt format as a limit of CAT:
the weights are trained on one template and the composed model may depend on it. Training them on
the same data rendered in several formats, one drawn per example, removes that dependence on one
template.

**Formats.** A :class:`FormatSpec` (an entry of the CAT config's ``data.formats``) is one of three kinds:

* a **registered template** by name (``alpaca``, ``plain``, ``chat``, ``verbatim``, ``fmt1`` ...);
* a **format string** with ``{instruction}`` / ``{input}`` fields (``prompt``, and optionally
  ``prompt_no_input`` for records whose input is empty), e.g. ``"Q: {instruction}\\n{input}\\nA: "``;
* a **FormatSpread-style spec** (Sclar et al., "Quantifying Language Models' Sensitivity to Spurious
  Features in Prompt Design", https://arxiv.org/abs/2310.11324): each field is
  ``casing(label) + separator + text``, fields are joined by ``joiner``, and the prompt ends with the
  response label and separator: ``Instruction: ...\\nInput: ...\\nAnswer: `` (``casing: title``,
  ``separator: ": "``, ``joiner: "\\n"``) vs ``INSTRUCTION- ... \\n ANSWER- `` (``upper``, ``"- "``,
  ``" \\n "``).

Built-in specs ``fmt1 fmt2 fmt3 fmt4 fmt7 fmt8 fmt10`` copy the casing, separator and joiner of the
FormatSpread formats of the same number in the paper's prompt-format data (1, 2, 4 train; 3, 7, 8, 10
test), with the labels ``Instruction`` / ``Input`` / ``Answer``. They and ``verbatim`` (the record's
instruction is the whole prompt, as is, followed by its input: for data already rendered) are added
to ``TEMPLATES`` when this module is imported; :func:`register_format` adds more by code.

**The draw** (:func:`deal_formats`): fixed per example, dealt like cards from one
``random.Random(seed)``: the pool (in a seeded order) is repeated to the number of records and
shuffled, so every format gets ``⌊n/K⌋`` or ``⌈n/K⌉`` examples (every format is seen once n ≥ K)
and the same seed gives the same formats. The dataset is tokenised once, so epochs revisit the same
(example, format) pairs, and a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lorasoup.errors import ConfigError, DataError
from lorasoup.registry import Registry
from lorasoup.training.templates import TEMPLATES, Template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lorasoup.training.data import SupervisedDataset

Casing = Literal["as-is", "title", "upper", "lower"]
_CASINGS = {"as-is": str, "title": str.title, "upper": str.upper, "lower": str.lower}
_SPREAD_DEFAULTS: dict[str, str] = {
    "casing": "as-is",
    "separator": ": ",
    "joiner": "\n",
    "instruction_label": "Instruction",
    "input_label": "Input",
    "response_label": "Answer",
}
_SPREAD_FIELDS = tuple(_SPREAD_DEFAULTS)
_RECORD_FIELDS = {"instruction", "input"}
TEXT_RECORDS = "(raw text)"
"""The key under which raw-text records (which no format applies to) are counted."""


@dataclass
class FormatSpec:
    """One prompt format: a registered template by name, a format string, or a FormatSpread-style spec.

    Give ``prompt`` (and optionally ``prompt_no_input``) for a format string, any of the spread
    fields for a spec (unset ones take the defaults ``as-is``, ``": "``, ``"\\n"``, ``Instruction``,
    ``Input``, ``Answer``), or only ``name`` to refer to a registered template. A plain string in a
    config list is a name.
    """

    name: str
    prompt: str | None = None
    prompt_no_input: str | None = None
    casing: Casing | None = None
    separator: str | None = None
    joiner: str | None = None
    instruction_label: str | None = None
    input_label: str | None = None
    response_label: str | None = None

    @classmethod
    def from_value(cls, value: Any, where: str) -> FormatSpec:
        if isinstance(value, str) and value:
            return cls(name=value)
        raise ConfigError(f"{where}: expected a template name or a mapping with 'name', got {value!r}")

    @property
    def kind(self) -> Literal["registered", "string", "spread"]:
        if self.prompt is not None or self.prompt_no_input is not None:
            return "string"
        if any(getattr(self, name) is not None for name in _SPREAD_FIELDS):
            return "spread"
        return "registered"

    def validate(self) -> None:
        """Check the fields of one spec (not whether a registered name exists: see :func:`check_pool`)."""
        if self.casing is not None and self.casing not in _CASINGS:
            raise ConfigError(
                f"format {self.name!r}: casing {self.casing!r} is not one of {', '.join(_CASINGS)}"
            )
        if self.kind == "string":
            mixed = [name for name in _SPREAD_FIELDS if getattr(self, name) is not None]
            if mixed:
                raise ConfigError(
                    f"format {self.name!r}: give either prompt (a format string) or spread fields, "
                    f"not both; remove {', '.join(mixed)}"
                )
            if self.prompt is None:
                raise ConfigError(
                    f"format {self.name!r}: prompt_no_input needs prompt (used when input is set)"
                )
            for text in (self.prompt, self.prompt_no_input):
                if text is not None:
                    _check_format_string(self.name, text)
            if "instruction" not in _fields_of(self.prompt):
                raise ConfigError(f"format {self.name!r}: prompt must contain the field {{instruction}}")

    def template(self) -> Template:
        """The ``(record, tokenizer) -> (prompt, response)`` renderer of this spec."""
        self.validate()
        if self.kind == "registered":
            return TEMPLATES.get(self.name)
        if self.kind == "string":
            return _StringFormat(self.name, str(self.prompt), self.prompt_no_input)
        defaults = _SPREAD_DEFAULTS
        value = {name: getattr(self, name) for name in _SPREAD_FIELDS}
        value = {name: defaults[name] if v is None else v for name, v in value.items()}
        return _SpreadFormat(
            casing=value["casing"],
            separator=value["separator"],
            joiner=value["joiner"],
            labels=(value["instruction_label"], value["input_label"], value["response_label"]),
        )


def _fields_of(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]


def _check_format_string(name: str, text: str) -> None:
    try:
        fields = _fields_of(text)
    except ValueError as err:
        raise ConfigError(
            f"format {name!r}: bad format string {text[:40]!r} ({err}); write literal braces as {{{{ and }}}}"
        ) from None
    unknown = sorted(set(fields) - _RECORD_FIELDS)
    if unknown:
        shown = ", ".join(f"{{{f}}}" for f in unknown)
        raise ConfigError(
            f"format {name!r}: unknown field(s) {shown}; use {{instruction}} and {{input}} only "
            "(write literal braces as {{ and }})"
        )


@dataclass(frozen=True)
class _StringFormat:
    """A user format string; ``prompt_no_input`` (if given) renders records whose input is empty."""

    name: str
    prompt: str
    prompt_no_input: str | None

    def __call__(self, record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
        extra = record.get("input") or ""
        text = self.prompt if extra or self.prompt_no_input is None else self.prompt_no_input
        if extra and "input" not in _fields_of(text):
            raise DataError(
                f"format {self.name!r} has no {{input}} field but a record has an input; "
                "add {input} to its prompt"
            )
        return text.format(instruction=record["instruction"], input=extra), record["output"]


@dataclass(frozen=True)
class _SpreadFormat:
    """``casing(label) + separator + text`` per field, joined by ``joiner``; ends with the response label."""

    casing: Casing
    separator: str
    joiner: str
    labels: tuple[str, str, str]

    def __call__(self, record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
        case = _CASINGS[self.casing]
        instruction_label, input_label, response_label = (case(label) for label in self.labels)
        parts = [instruction_label + self.separator + record["instruction"]]
        if record.get("input"):
            parts.append(input_label + self.separator + record["input"])
        parts.append(response_label + self.separator)
        return self.joiner.join(parts), record["output"]


BUILTIN_FORMATS = (
    FormatSpec("fmt1", casing="title", separator=": ", joiner="\n"),
    FormatSpec("fmt2", casing="upper", separator="- ", joiner=" \n "),
    FormatSpec("fmt3", casing="upper", separator="\t", joiner=" <sep> "),
    FormatSpec("fmt4", casing="upper", separator="\n    ", joiner=" \n"),
    FormatSpec("fmt7", casing="title", separator=" ", joiner=" \n"),
    FormatSpec("fmt8", casing="lower", separator="\n    ", joiner="\n"),
    FormatSpec("fmt10", casing="lower", separator=" \n\t", joiner="\n"),
)
"""The FormatSpread formats of the LoRA Soups prompt-format data, as outer prompt frames."""


def register_format(spec: FormatSpec, registry: Registry[Template] = TEMPLATES) -> Template:
    """Add a format-string or spread spec to ``registry`` (default ``TEMPLATES``); a taken name raises."""
    if spec.kind == "registered":
        raise ConfigError(f"format {spec.name!r}: give prompt or spread fields to register a new format")
    return registry.add(spec.name, spec.template())


@TEMPLATES.register("verbatim")
def verbatim(record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The instruction is the whole prompt, as is, followed directly by the input (for rendered data)."""
    return record["instruction"] + (record.get("input") or ""), record["output"]


for _spec in BUILTIN_FORMATS:
    register_format(_spec)


def check_pool(specs: Sequence[FormatSpec], where: str = "data.formats") -> None:
    """Names unique, registered names known, inline specs valid and not shadowing a registered name."""
    names = [spec.name for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"{where}: format names must be unique, {', '.join(map(repr, repeated))} repeats")
    for spec in specs:
        spec.validate()
        if spec.kind == "registered":
            if spec.name not in TEMPLATES:
                raise ConfigError(f"{where}: {TEMPLATES.unknown_message(spec.name)}")
        elif spec.name in TEMPLATES:
            raise ConfigError(
                f"{where}: format {spec.name!r} is already a registered template; rename yours, "
                f"or list {spec.name!r} alone to use the registered one"
            )


def deal_formats(count: int, pool_size: int, seed: int) -> list[int]:
    """The format index of each of ``count`` examples: a seeded, balanced deal from ``pool_size`` formats.

    The pool, in an order drawn from ``random.Random(seed)``, is repeated to ``count`` entries and
    shuffled by the same generator: counts differ by at most one, and which formats get the extra
    examples is random too.
    """
    if pool_size < 1:
        raise ConfigError("the format pool is empty; list at least one format")
    rng = random.Random(seed)
    order = rng.sample(range(pool_size), pool_size)
    deck = [order[i % pool_size] for i in range(count)]
    rng.shuffle(deck)
    return deck


@dataclass
class FormatReport:
    """What ``run.json`` records about a format-robust dataset: per format, examples kept and dropped."""

    pool: list[str]
    seed: int
    examples: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    draw: str = "fixed per example; seeded balanced deal (counts differ by at most one)"


def _deal(checked: Sequence[Mapping[str, Any]], pool_size: int, seed: int, name: str) -> dict[int, int]:
    """``{record index: format index}`` for the instruction records (raw text takes no format)."""
    rows = [i for i, record in enumerate(checked) if "instruction" in record]
    if len(rows) < pool_size:
        raise DataError(
            f"{name}: {len(rows)} instruction records cannot cover {pool_size} formats; "
            "add data or list fewer formats"
        )
    return dict(zip(rows, deal_formats(len(rows), pool_size, seed), strict=True))


def build_format_dataset(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    formats: Sequence[FormatSpec],
    *,
    seed: int,
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    add_eos: bool = True,
    name: str = "records",
) -> tuple[SupervisedDataset, FormatReport]:
    """Tokenise every record in the format dealt to it (:func:`deal_formats`), with its loss mask.

    Each record is rendered by its format into ``(prompt, response)`` and tokenised exactly as
    :func:`lorasoup.training.data.build_dataset` would under that template (same BOS/EOS, masking and
    truncation): a pool of one registered template gives the very same examples. Raw-text records
    take no format; they are counted under ``"(raw text)"``. Records whose response is truncated
    away are dropped and counted per format. Every format must keep at least one example.
    """
    from lorasoup.training.data import IGNORE_INDEX, SupervisedDataset, tokenize_example
    from lorasoup.training.templates import check_record

    check_pool(formats)
    if not records:
        raise DataError(f"{name}: no records to build a dataset from; check the data source")
    renderers = [spec.template() for spec in formats]
    pool = [spec.name for spec in formats]
    checked = [check_record(r, f"{name}, row {i}", allow_text=True) for i, r in enumerate(records, 1)]
    dealt = _deal(checked, len(pool), seed, name)
    report = FormatReport(
        pool=pool, seed=seed, examples=dict.fromkeys(pool, 0), dropped=dict.fromkeys(pool, 0)
    )
    examples = []
    for i, record in enumerate(checked):
        label = pool[dealt[i]] if i in dealt else TEXT_RECORDS
        if i in dealt:
            try:
                prompt, response = renderers[dealt[i]](record, tokenizer)
            except DataError as err:
                raise DataError(f"{name}, row {i + 1}: {err}") from None
            # The rendered prompt goes through ``verbatim``: tokenised exactly as under its own template.
            record = {"instruction": prompt, "input": "", "output": response}
        example = tokenize_example(
            record, tokenizer, template="verbatim", cutoff_len=cutoff_len, add_eos=add_eos
        )
        if all(label_id == IGNORE_INDEX for label_id in example["labels"]):
            report.dropped[label] = report.dropped.get(label, 0) + 1
            continue
        if train_on_inputs:
            example["labels"] = list(example["input_ids"])
        report.examples[label] = report.examples.get(label, 0) + 1
        examples.append(example)
    empty = [fmt for fmt in pool if report.examples[fmt] == 0]
    if empty:
        raise DataError(
            f"{name}: format(s) {', '.join(map(repr, empty))} kept no example within "
            f"cutoff_len={cutoff_len}; raise cutoff_len or drop them"
        )
    return SupervisedDataset(examples, sum(report.dropped.values())), report


def as_format_specs(entries: Sequence[FormatSpec | str]) -> list[FormatSpec]:
    """Specs from a list mixing specs and template names (as a config built in Python may give)."""
    return [FormatSpec(name=entry) if isinstance(entry, str) else entry for entry in entries]
