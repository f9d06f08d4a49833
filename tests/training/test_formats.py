"""Prompt formats as data, and the per-example format deal of format-robust training."""

from __future__ import annotations

from collections import Counter

import pytest

from lorasoup.config import build
from lorasoup.errors import ConfigError, DataError
from lorasoup.options import DataConfig
from lorasoup.registry import Registry
from lorasoup.training.data import IGNORE_INDEX, build_dataset
from lorasoup.training.formats import (
    BUILTIN_FORMATS,
    FormatSpec,
    build_format_dataset,
    deal_formats,
    register_format,
)
from lorasoup.training.templates import TEMPLATES

RECORD = {"instruction": "count the words", "input": "the cat", "output": "2"}
RECORDS = [
    {"instruction": f"what is {a} plus {b} ?", "input": "", "output": f"the answer is {a + b}"}
    for a in range(5)
    for b in range(3)
]


def render(spec: FormatSpec, record=RECORD, tokenizer=None) -> tuple[str, str]:
    return spec.template()(record, tokenizer)


def test_spread_specs_render_label_separator_joiner():
    upper = FormatSpec("x", casing="upper", separator="- ", joiner=" \n ", response_label="answer")
    assert render(upper) == ("INSTRUCTION- count the words \n INPUT- the cat \n ANSWER- ", "2")
    lower = FormatSpec("y", casing="lower", instruction_label="Sentence")
    no_input = {**RECORD, "input": ""}
    assert render(lower, no_input) == ("sentence: count the words\nanswer: ", "2")
    # The paper's format 7 ("Sentence '…' … \nAnswer ") and format 3 ("SENTENCE\t'…' … <sep> ANSWER\t").
    builtin = {spec.name: spec for spec in BUILTIN_FORMATS}
    assert render(builtin["fmt7"], no_input)[0] == "Instruction count the words \nAnswer "
    assert render(builtin["fmt3"], no_input)[0] == "INSTRUCTION\tcount the words <sep> ANSWER\t"


def test_builtin_formats_are_registered_templates_and_differ():
    prompts = {TEMPLATES.get(spec.name)(RECORD, None)[0] for spec in BUILTIN_FORMATS}
    assert len(prompts) == len(BUILTIN_FORMATS)
    assert TEMPLATES.get("verbatim")({"instruction": "Q? ", "input": "x", "output": "y"}, None) == (
        "Q? x",
        "y",
    )


def test_format_strings_and_their_errors():
    spec = FormatSpec("qa", prompt="Q: {instruction}\n{input}\nA: ", prompt_no_input="Q: {instruction}\nA: ")
    assert render(spec) == ("Q: count the words\nthe cat\nA: ", "2")
    assert render(spec, {**RECORD, "input": ""}) == ("Q: count the words\nA: ", "2")
    braces = FormatSpec("b", prompt="{{literal}} {instruction} -> ")
    with pytest.raises(DataError, match=r"format 'b' has no \{input\} field"):
        render(braces)
    assert render(braces, {**RECORD, "input": ""})[0] == "{literal} count the words -> "
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \{question\}"):
        FormatSpec("q", prompt="{question}").validate()
    with pytest.raises(ConfigError, match=r"must contain the field \{instruction\}"):
        FormatSpec("q", prompt="just {input}").validate()
    with pytest.raises(ConfigError, match="literal braces"):
        FormatSpec("q", prompt="{instruction").validate()
    with pytest.raises(ConfigError, match="not both; remove separator"):
        FormatSpec("q", prompt="{instruction}", separator=": ").validate()


def data_config(**data) -> DataConfig:
    return build(DataConfig, {"train": ["x.json"], **data}, "data")


def test_config_takes_names_strings_and_specs():
    config = data_config(
        formats=[
            "alpaca",
            "fmt2",
            {"name": "qa", "prompt": "Q: {instruction}\nA: "},
            {"name": "s", "casing": "upper"},
        ],
        format_seed=4,
    )
    assert [spec.kind for spec in config.formats] == ["registered", "registered", "string", "spread"]
    assert config.format_seed == 4


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"formats": ["fmt5"]}, "unknown prompt template 'fmt5' \\(did you mean"),
        ({"formats": ["plain", "plain"]}, "'plain' repeats"),
        ({"formats": [{"name": "alpaca", "prompt": "{instruction}"}]}, "already a registered template"),
        ({"formats": [{"name": "q", "promt": "{instruction}"}]}, "did you mean 'prompt'"),
        ({"formats": [{"name": "q", "casing": "shout"}]}, "choose one of 'as-is'"),
        ({"formats": ["fmt1"], "template": "plain"}, "list it in data.formats"),
        ({"format_seed": 3}, "data.format_seed needs data.formats"),
    ],
)
def test_bad_format_configs_fail_at_load(data, message):
    with pytest.raises(ConfigError, match=message):
        data_config(**data)


def test_register_format_adds_a_named_template_once():
    registry = Registry("prompt template")  # not the global one: other tests list TEMPLATES
    spec = FormatSpec("mine", casing="lower", separator=" = ")
    register_format(spec, registry)
    assert registry.get("mine")(RECORD, None)[0].startswith("instruction = count")
    with pytest.raises(ValueError, match="registered twice"):
        register_format(spec, registry)
    with pytest.raises(ConfigError, match="give prompt or spread fields"):
        register_format(FormatSpec("alpaca"), registry)


@pytest.mark.parametrize(("count", "pool"), [(15, 4), (7, 7), (100, 3), (5, 2)])
def test_deal_is_balanced_seeded_and_covers_every_format(count, pool):
    dealt = deal_formats(count, pool, seed=11)
    counts = Counter(dealt)
    assert set(counts) == set(range(pool))
    assert max(counts.values()) - min(counts.values()) <= 1
    assert deal_formats(count, pool, seed=11) == dealt
    if count > pool:
        assert any(deal_formats(count, pool, seed=s) != dealt for s in (12, 13))


def test_every_format_is_seen_and_each_example_is_in_its_format(tokenizer):
    pool = [FormatSpec("plain"), FormatSpec("fmt2"), FormatSpec("qa", prompt="Q: {instruction}\nA: ")]
    dataset, report = build_format_dataset(RECORDS, tokenizer, pool, seed=3, cutoff_len=96)
    assert report.pool == ["plain", "fmt2", "qa"]
    assert report.examples == {"plain": 5, "fmt2": 5, "qa": 5} and sum(report.dropped.values()) == 0
    dealt = deal_formats(len(RECORDS), 3, seed=3)
    seen = Counter()
    for record, fmt, example in zip(RECORDS, dealt, dataset.examples, strict=True):
        prompt, _ = pool[fmt].template()(record, tokenizer)
        text = tokenizer.decode(example["input_ids"], skip_special_tokens=True)
        assert text.startswith(prompt) and text.endswith(record["output"]), (text, prompt)
        seen[pool[fmt].name] += 1
    assert seen == Counter(report.examples)
    again, _ = build_format_dataset(RECORDS, tokenizer, pool, seed=3, cutoff_len=96)
    assert again.examples == dataset.examples
    other, _ = build_format_dataset(RECORDS, tokenizer, pool, seed=4, cutoff_len=96)
    assert other.examples != dataset.examples


LONG = {"instruction": "what is " * 60, "input": "", "output": "nothing"}  # its prompt fills any cutoff here


@pytest.mark.parametrize(("template", "cutoff"), [("alpaca", 240), ("plain", 40), ("fmt4", 72)])
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_a_pool_of_one_template_equals_the_single_template_path(tokenizer, template, cutoff, train_on_inputs):
    records = [*RECORDS[:6], {"text": "the cat sat on the mat"}, LONG, {**RECORD}]
    kwargs = {"cutoff_len": cutoff, "train_on_inputs": train_on_inputs}
    single = build_dataset(records, tokenizer, template=template, **kwargs)
    pooled, report = build_format_dataset(records, tokenizer, [FormatSpec(template)], seed=0, **kwargs)
    assert pooled.examples == single.examples
    assert pooled.dropped == single.dropped == report.dropped[template] == 1
    assert report.examples == {template: 7, "(raw text)": 1}


def test_truncated_examples_are_dropped_and_counted_per_format(tokenizer):
    # Alpaca's preamble alone is about 160 tokens of this tiny tokenizer: at 100 no response is left.
    pool = [FormatSpec("alpaca"), FormatSpec("plain")]
    with pytest.raises(DataError, match="format\\(s\\) 'alpaca' kept no example within cutoff_len=100"):
        build_format_dataset(RECORDS, tokenizer, pool, seed=0, cutoff_len=100)
    records = [*RECORDS, LONG, LONG]
    dataset, report = build_format_dataset(records, tokenizer, pool, seed=0, cutoff_len=200)
    dealt = Counter(deal_formats(len(records), 2, 0))
    assert report.dropped["alpaca"] + report.dropped["plain"] == 2 == dataset.dropped
    assert report.examples["alpaca"] + report.dropped["alpaca"] == dealt[0]
    assert report.examples["plain"] + report.dropped["plain"] == dealt[1]
    assert len(dataset) == sum(report.examples.values()) == len(RECORDS)
    for example in dataset.examples:
        assert any(label != IGNORE_INDEX for label in example["labels"])


def test_too_few_records_for_the_pool_is_an_error(tokenizer):
    with pytest.raises(DataError, match="2 instruction records cannot cover 3 formats"):
        build_format_dataset(
            RECORDS[:2], tokenizer, [FormatSpec(n) for n in ("plain", "fmt1", "fmt2")], seed=0
        )
