"""The demo: the benchmark keeps its design promises, and a reduced study writes consistent artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorasoup.cli import app
from lorasoup.demo.benchmark import MUL_STORIES, BenchmarkSizes, build_benchmark, build_tokenizer
from lorasoup.demo.study import TASKS, slug


def _value(expression: str) -> int:
    a, op, b = expression.split()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def _is_mul_story(record: dict) -> bool:
    return "compute" not in record["instruction"] and " * " in record["output"]


def test_benchmark_separates_the_skills_from_the_composite() -> None:
    bench = build_benchmark(3, BenchmarkSizes(base=600, skill=200, test=50))
    program = "write a program ."
    # The base never sees a multiplication story; the math skill never writes a program; the code skill
    # never sees a multiplication story; the composite (and the oracle's data) is exactly their meeting.
    assert not any(_is_mul_story(r) for r in bench.base)
    assert all(_is_mul_story(r) and not r["instruction"].startswith(program) for r in bench.train["math"])
    assert not any(_is_mul_story(r) for r in bench.train["code"])
    assert all(r["output"].startswith("def solution ( ) : return") for r in bench.train["code"])
    for split in (bench.train["composite"], bench.test["composite"]):
        assert all(_is_mul_story(r) and r["instruction"].startswith(program) for r in split)
        assert all(_value(r["output"].split("return")[1]) == r["value"] for r in split)
    assert MUL_STORIES == [("*", "story")]
    assert build_benchmark(3, BenchmarkSizes(base=600, skill=200, test=50)).test == bench.test
    assert build_benchmark(4, BenchmarkSizes(base=600, skill=200, test=50)).test != bench.test


def test_tokenizer_knows_every_word_and_round_trips() -> None:
    tokenizer = build_tokenizer()
    bench = build_benchmark(0, BenchmarkSizes(base=300, skill=50, test=20))
    for record in bench.all_records():
        text = f"{record['instruction']} {record['output']}"
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


TINY = [
    "base.steps=20",
    "base.layers=1",
    "base.hidden=32",
    "base.intermediate=64",
    "sizes.base=240",
    "sizes.skill=48",
    "sizes.test=12",
    "lora_steps=4",
    "cat_steps=3",
    "batch_size=8",
    "eval_batch_size=12",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "run"
    args = ["demo", "--output", str(out), "--seeds", "2", "--seed", "5"]
    for item in TINY:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_reduced_demo_writes_every_artifact(demo_run: tuple[Path, str]) -> None:
    out, printed = demo_run
    for name in ("report.md", "report.html", "results.json", "run.json", "methods.png", "cat_weights.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "![accuracy per method](methods.png)" in report and "| CAT (trained) |" in report
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page
    assert "CAT (trained)" in printed and "oracle" in printed
    for seed in (5, 6):
        folder = out / f"seed-{seed}"
        assert (folder / "cat" / "adapter_config.json").is_file()
        assert (folder / "adapters" / "datamix" / "run.json").is_file()
        assert (folder / "merges" / "ties" / "merge_report.json").is_file()


def test_reduced_demo_numbers_agree_with_the_per_example_files(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [5, 6] and results["tasks"] == list(TASKS)
    methods = [row["method"] for row in results["table"]]
    assert {"DATA-MIX", "linear", "TIES", "DARE", "SVD", "CAT (trained)", "CAT, uniform weights"} <= set(
        methods
    )
    for s, rows in zip(results["seeds"], results["per_seed"], strict=True):
        for row in rows:
            for task in TASKS:
                lines = (
                    (out / f"seed-{s}" / "eval" / slug(row["method"]) / f"{task}.jsonl")
                    .read_text()
                    .splitlines()
                )
                records = [json.loads(line) for line in lines]
                assert len(records) == 12
                assert row["accuracy"][task] == sum(r["correct"] for r in records) / len(records)
                assert 0.0 <= row["accuracy"][task] <= 1.0
    for row in results["table"]:
        per_seed = [
            r["accuracy"]["composite"]
            for rows in results["per_seed"]
            for r in rows
            if r["method"] == row["method"]
        ]
        assert row["composite"]["values"] == per_seed
        assert row["composite"]["mean"] == pytest.approx(sum(per_seed) / 2)


def test_same_seed_same_numbers(demo_run: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = demo_run
    args = ["demo", "--output", str(tmp_path / "again"), "--seed", "5"]
    for item in TINY:
        args += ["--set", item]
    assert CliRunner().invoke(app, args).exit_code == 0
    first = json.loads((out / "results.json").read_text())["per_seed"][0]
    again = json.loads((tmp_path / "again" / "results.json").read_text())["per_seed"][0]
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in first]


def test_bad_setting_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--output", str(tmp_path / "x"), "--set", "base.stepz=3"])
    assert result.exit_code == 2 and "did you mean 'steps'" in result.output
    assert not (tmp_path / "x").exists()
