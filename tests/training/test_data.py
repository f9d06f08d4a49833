"""Tests for supervised data: loading, templates, loss masks, truncation, collation, mixing, splitting."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lorasoup.errors import ConfigError, DataError
from lorasoup.training.data import (
    IGNORE_INDEX,
    MixSpec,
    build_dataset,
    collate,
    load_records,
    mix_records,
    split_eval,
    tokenize_example,
)
from lorasoup.training.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, TEMPLATES, format_example

CORPUS = [
    ALPACA_WITH_INPUT,
    ALPACA_NO_INPUT,
    "What is the capital of France? The capital of France is Paris.",
    "Add the numbers 2 and 3. The answer is 5.",
    "Translate to German: good morning. Guten Morgen.",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer (exact decode round trip) that adds BOS like Llama's does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


RECORD = {"instruction": "What is the capital of France?", "input": "Answer briefly.", "output": "Paris."}


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------- loss masking


def test_labels_cover_exactly_the_response_and_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    example = tokenize_example(RECORD, tokenizer)
    ids, labels = example["input_ids"], example["labels"]
    prompt = ALPACA_WITH_INPUT.format(instruction=RECORD["instruction"], input=RECORD["input"])
    boundary = 1 + len(encode(tokenizer, prompt))  # BOS + prompt

    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids[1:boundary]) == prompt
    assert labels[:boundary] == [IGNORE_INDEX] * boundary
    assert labels[boundary:] == ids[boundary:]
    assert labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(labels[boundary:-1]) == RECORD["output"]
    assert example["attention_mask"] == [1] * len(ids)
    assert len(labels) == len(ids)


def test_no_input_uses_the_short_alpaca_template(tokenizer: PreTrainedTokenizerFast) -> None:
    record = {"instruction": "Add the numbers 2 and 3.", "output": "5"}
    prompt, response = format_example(record, tokenizer)
    assert prompt == ALPACA_NO_INPUT.format(instruction=record["instruction"])
    assert "### Input:" not in prompt and response == "5"
    with_input = format_example({**record, "input": "Show work."}, tokenizer)[0]
    assert "### Input:\nShow work.\n\n### Response:\n" in with_input


def test_train_on_inputs_supervises_every_token(tokenizer: PreTrainedTokenizerFast) -> None:
    example = tokenize_example(RECORD, tokenizer, train_on_inputs=True)
    assert example["labels"] == example["input_ids"]


def test_add_eos_false_leaves_the_response_open(tokenizer: PreTrainedTokenizerFast) -> None:
    example = tokenize_example(RECORD, tokenizer, add_eos=False)
    assert tokenizer.eos_token_id not in example["input_ids"]
    assert tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]) == RECORD["output"]


def test_cutoff_truncates_the_tail(tokenizer: PreTrainedTokenizerFast) -> None:
    full = tokenize_example(RECORD, tokenizer)
    boundary = full["labels"].count(IGNORE_INDEX)
    cut = tokenize_example(RECORD, tokenizer, cutoff_len=boundary + 1)
    assert cut["input_ids"] == full["input_ids"][: boundary + 1]
    assert cut["labels"] == full["labels"][: boundary + 1]
    assert len(cut["attention_mask"]) == boundary + 1
    assert cut["labels"][-1] != IGNORE_INDEX  # one response token survives


def test_fully_truncated_responses_are_dropped_and_counted(tokenizer: PreTrainedTokenizerFast) -> None:
    short = {"instruction": "Hi", "output": "Paris."}
    boundary = tokenize_example(RECORD, tokenizer)["labels"].count(IGNORE_INDEX)
    dataset = build_dataset([RECORD, short, RECORD], tokenizer, cutoff_len=boundary)
    assert len(dataset) == 1 and dataset.dropped == 2
    assert dataset[0] == tokenize_example(short, tokenizer, cutoff_len=boundary)
    # train_on_inputs does not rescue a record whose response is gone
    assert build_dataset([RECORD, short], tokenizer, cutoff_len=boundary, train_on_inputs=True).dropped == 1


def test_no_example_left_is_an_error(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(
        DataError, match=r"records: no example has a response token within cutoff_len=3; raise"
    ):
        build_dataset([RECORD], tokenizer, cutoff_len=3)


def test_text_records_are_all_response(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "The capital of France is Paris."
    example = tokenize_example({"text": text}, tokenizer)
    assert example["input_ids"][0] == tokenizer.bos_token_id
    assert example["labels"][0] == IGNORE_INDEX
    assert tokenizer.decode(example["labels"][1:-1]) == text
    assert example["labels"][-1] == tokenizer.eos_token_id


def test_plain_and_chat_templates(
    tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert format_example(RECORD, tokenizer, "plain") == (
        "What is the capital of France?\nAnswer briefly.\n",
        "Paris.",
    )
    chat = "{% for m in messages %}<s>[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    monkeypatch.setattr(tokenizer, "chat_template", chat)
    prompt, _ = format_example(RECORD, tokenizer, "chat")
    assert prompt == "<s>[user] What is the capital of France?\n\nAnswer briefly.\n[assistant] "
    ids = tokenize_example(RECORD, tokenizer, template="chat")["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1  # the rendered BOS is not doubled


def test_chat_without_template_and_unknown_template(tokenizer: PreTrainedTokenizerFast) -> None:
    assert not tokenizer.chat_template
    with pytest.raises(DataError, match="has no chat template; use template='alpaca'"):
        tokenize_example(RECORD, tokenizer, template="chat")
    with pytest.raises(ConfigError, match="did you mean 'alpaca'"):
        build_dataset([{"text": "x"}], tokenizer, template="alpacca")
    with pytest.raises(ConfigError, match="unknown prompt template 'alpacca'"):
        tokenize_example({"text": "x"}, tokenizer, template="alpacca")
    import lorasoup.training.formats  # noqa: F401  (registers the prompt formats; the CAT config imports it)

    formats = ["fmt1", "fmt10", "fmt2", "fmt3", "fmt4", "fmt7", "fmt8"]
    assert TEMPLATES.names() == ["alpaca", "chat", *formats, "plain", "verbatim"]


def test_malformed_record_in_build_names_the_row(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(DataError, match=r"^skills\.json, row 2: missing field 'output'"):
        build_dataset([RECORD, {"instruction": "x"}], tokenizer, name="skills.json")


# ------------------------------------------------------------------------------------------ loading


def test_load_json_jsonl_txt(tmp_path: Path) -> None:
    rows = [RECORD, {"instruction": "Add 2 and 3.", "output": "5\u2028six", "category": "math"}]
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]  # a raw U+2028 is legal inside a JSON string
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("First para\nline two.\n\n  \n\nSecond para.\r\n\r\nThird é.\n", "utf-8")

    expected = [RECORD, {**rows[1], "input": ""}]
    assert load_records(tmp_path / "a.json") == expected
    assert load_records(str(tmp_path / "a.jsonl")) == expected
    assert load_records(tmp_path / "a.txt") == [
        {"text": "First para\nline two."},
        {"text": "Second para."},
        {"text": "Third é."},
    ]


BAD_FILES = [
    ("empty.json", b"", "empty.json: file is empty"),
    ("blank.jsonl", b"\n  \n", "blank.jsonl: file is empty"),
    ("none.json", b"[]", "none.json: holds no records"),
    (
        "syntax.json",
        b'[\n {"instruction": "a" "output": "b"}]',
        "syntax.json: invalid JSON at line 2, column",
    ),
    (
        "syntax.jsonl",
        b'{"instruction": "a", "output": "b"}\n{"instruction": ',
        "syntax.jsonl, line 2: invalid JSON",
    ),
    (
        "latin1.jsonl",
        b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9"}',
        "latin1.jsonl, line 2: not valid UTF-8",
    ),
    (
        "missing.json",
        b'[{"instruction": "a", "output": "b"}, {"instruction": "c"}]',
        "missing.json, row 2: missing field 'output'",
    ),
    (
        "number.jsonl",
        b'{"instruction": "a", "output": 5}',
        "number.jsonl, line 1: field 'output' must be a string, got number 5",
    ),
    (
        "input.json",
        b'[{"instruction": "a", "input": ["x"], "output": "b"}]',
        "input.json, row 1: field 'input' must be a string",
    ),
    (
        "list.jsonl",
        b'{"instruction": "a", "output": "b"}\n["a", "b"]',
        "list.jsonl, line 2: a record must be a JSON object",
    ),
    (
        "object.json",
        b'{"instruction": "a", "output": "b"}',
        "object.json: expected a JSON array of records, got object",
    ),
    ("data.csv", b"instruction,output\na,b\n", "data.csv: unsupported file type '.csv'"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_raise_one_line_errors(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_records(path)
    text = str(info.value)
    assert text.startswith(str(tmp_path / message.split(":")[0].split(",")[0]))
    assert message in text and "\n" not in text


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found; check the path"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        load_records(tmp_path)


def test_hub_id_without_datasets_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"pip install 'lorasoup\[hub-data\]'") as info:
        load_records("someone/skills")
    assert "'someone/skills'" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="file not found"):  # a path-like name is never sent to the hub
        load_records("someone/skills.json")


def test_hub_rows_are_validated_and_errors_wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    calls: list[tuple[str, str]] = []

    def load_dataset(name: str, split: str) -> list[dict[str, str]]:
        calls.append((name, split))
        if name == "someone/broken":
            raise FileNotFoundError("Dataset 'someone/broken' doesn't exist\non the Hub")
        return [RECORD, {"instruction": "x"}] if name == "someone/bad" else [RECORD]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_records("someone/good", split="test") == [RECORD]
    assert calls == [("someone/good", "test")]
    with pytest.raises(DataError, match=r"hub dataset 'someone/bad' \(split 'train'\), row 2: missing field"):
        load_records("someone/bad")
    with pytest.raises(
        DataError, match=r"cannot be loaded \(Dataset 'someone/broken' doesn't exist\)"
    ) as info:
        load_records("someone/broken")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ collate


def test_collate_right_pads(tokenizer: PreTrainedTokenizerFast) -> None:
    batch = [
        {"input_ids": [1, 5, 6], "attention_mask": [1, 1, 1], "labels": [-100, 5, 6]},
        {"input_ids": [1, 7], "attention_mask": [1, 1], "labels": [-100, 7]},
    ]
    out = collate(batch, pad_token_id=0)
    assert {k: v.shape for k, v in out.items()} == {k: torch.Size([2, 3]) for k in batch[0]}
    assert all(v.dtype == torch.long for v in out.values())
    assert out["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch[1]["input_ids"] == [1, 7]  # inputs untouched


def test_collate_needs_a_pad_token() -> None:
    with pytest.raises(DataError, match=r"set one, e\.g\. tokenizer\.pad_token = tokenizer\.eos_token"):
        collate([{"input_ids": [1], "attention_mask": [1], "labels": [1]}], None)


def test_dataset_through_collate(tokenizer: PreTrainedTokenizerFast) -> None:
    dataset = build_dataset([RECORD, {"instruction": "Hi", "output": "5"}], tokenizer)
    out = collate([dataset[0], dataset[1]], tokenizer.pad_token_id)
    lengths = out["attention_mask"].sum(dim=1).tolist()
    assert lengths == [len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])]
    assert out["input_ids"].shape == (2, max(lengths))


# ------------------------------------------------------------------------------------------- mixing


def make_source(name: str, n: int) -> list[dict[str, str]]:
    return [{"instruction": f"{name}-{i}", "output": "x"} for i in range(n)]


def test_mix_sizes_are_exact_and_tagged() -> None:
    math_rows, code_rows = make_source("math", 50), make_source("code", 5)
    mixed = mix_records(
        [(math_rows, MixSpec("math", size=20)), (code_rows, MixSpec("code", size=12))], seed=0
    )
    assert Counter(r["_source"] for r in mixed) == {"math": 20, "code": 12}
    math_picked = [r["instruction"] for r in mixed if r["_source"] == "math"]
    assert len(set(math_picked)) == 20  # size <= len: without replacement
    code_picked = {r["instruction"] for r in mixed if r["_source"] == "code"}
    assert code_picked <= {r["instruction"] for r in code_rows}  # size > len: drawn with replacement
    assert all(r["instruction"].startswith(r["_source"]) for r in mixed)
    assert "_source" not in math_rows[0]  # inputs not mutated


def test_mix_proportions_are_exact() -> None:
    sources = [
        (make_source("a", 100), MixSpec("a", proportion=0.3)),
        (make_source("b", 10), MixSpec("b", proportion=0.7)),
    ]
    mixed = mix_records(sources, seed=1, total=200)
    assert Counter(r["_source"] for r in mixed) == {"a": 60, "b": 140}
    partial = mix_records([(make_source("a", 100), MixSpec("a", proportion=0.29))], seed=1, total=100)
    assert len(partial) == 29  # float 0.29 * 100 = 28.999... still rounds to 29


def test_mix_is_reproducible_and_seed_dependent() -> None:
    sources = [(make_source("a", 30), MixSpec("a", size=30)), (make_source("b", 30), MixSpec("b", size=30))]
    first, again = mix_records(sources, seed=7), mix_records(sources, seed=7)
    other = mix_records(sources, seed=8)
    assert first == again
    assert first != other
    assert sorted(r["instruction"] for r in first) == sorted(r["instruction"] for r in other)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 3, "proportion": 0.5}, "exactly one of size or proportion"),
        ({}, "exactly one of size or proportion"),
        ({"size": 0}, "size must be an integer >= 1"),
        ({"size": True}, "size must be an integer >= 1"),
        ({"proportion": 0.0}, r"proportion must be in \(0, 1\]"),
        ({"proportion": 1.5}, r"proportion must be in \(0, 1\]"),
        ({"proportion": float("nan")}, r"proportion must be in \(0, 1\]"),
    ],
)
def test_mixspec_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MixSpec("math", **kwargs)


def test_mix_rejects_bad_combinations() -> None:
    rows = make_source("a", 10)
    half, most = MixSpec("a", proportion=0.5), MixSpec("b", proportion=0.6)
    with pytest.raises(ConfigError, match=r"proportions sum to 1\.1 > 1"):
        mix_records([(rows, half), (rows, most)], seed=0, total=10)
    with pytest.raises(ConfigError, match="need total="):
        mix_records([(rows, half)], seed=0)
    with pytest.raises(ConfigError, match="names must be unique"):
        mix_records([(rows, MixSpec("a", size=1)), (rows, MixSpec("a", size=2))], seed=0)
    with pytest.raises(ConfigError, match="asks for 15 records but total=10"):
        mix_records([(rows, half), (rows, MixSpec("b", size=10))], seed=0, total=10)
    with pytest.raises(DataError, match="data source 'a' has no records"):
        mix_records([([], MixSpec("a", size=1))], seed=0)
    assert sum(1 for _ in mix_records([(rows, MixSpec("a", proportion=1))], seed=0, total=10)) == 10


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 80)), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
)
def test_mix_sizes_property(parts: list[tuple[int, int]], seed: int) -> None:
    sources = [(make_source(f"s{i}", n), MixSpec(f"s{i}", size=k)) for i, (n, k) in enumerate(parts)]
    mixed = mix_records(sources, seed=seed)
    assert Counter(r["_source"] for r in mixed) == {f"s{i}": k for i, (_, k) in enumerate(parts)}
    for i, (n, k) in enumerate(parts):
        picked = [r["instruction"] for r in mixed if r["_source"] == f"s{i}"]
        assert set(picked) <= {f"s{i}-{j}" for j in range(n)}
        if k <= n:
            assert len(set(picked)) == k
    assert mixed == mix_records(sources, seed=seed)


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(1, 10), min_size=1, max_size=5), total=st.integers(50, 500))
def test_mix_proportions_property(weights: list[int], total: int) -> None:
    shares = [w / sum(weights) for w in weights]
    sources = [(make_source(f"s{i}", 5), MixSpec(f"s{i}", proportion=p)) for i, p in enumerate(shares)]
    counts = Counter(r["_source"] for r in mix_records(sources, seed=0, total=total))
    assert sum(counts.values()) == total
    assert all(abs(counts[f"s{i}"] - p * total) < 1 for i, p in enumerate(shares))


# ---------------------------------------------------------------------------------------- splitting


def test_split_eval() -> None:
    rows = make_source("r", 20)
    train, held = split_eval(rows, 5, seed=3)
    assert len(train) == 15 and len(held) == 5
    assert sorted(r["instruction"] for r in train + held) == sorted(r["instruction"] for r in rows)
    assert train == [r for r in rows if r in train]  # original order kept
    assert split_eval(rows, 5, seed=3) == (train, held)
    assert split_eval(rows, 5, seed=4)[1] != held
    assert len(split_eval(rows, 0.25, seed=0)[1]) == 5
    assert split_eval(rows, 0, seed=0) == (rows, [])


@pytest.mark.parametrize("eval_size", [20, 25, -1, 1.0, 0.0, True, "5"])
def test_split_eval_rejects_bad_sizes(eval_size: object) -> None:
    with pytest.raises(ConfigError, match="eval_size"):
        split_eval(make_source("r", 20), eval_size, seed=0)  # type: ignore[arg-type]
