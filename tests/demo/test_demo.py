"""The demo: the benchmark keeps its design promises, and a reduced study writes consistent artifacts."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorasoup.cli import app
from lorasoup.demo.benchmark import MUL_STORIES, BenchmarkSizes, build_benchmark, build_tokenizer
from lorasoup.demo.robustness import BASE_FORMATS, STATS, held_out_stats
from lorasoup.demo.scoring import slug
from lorasoup.demo.settings import TASKS, TASKS_K3
from lorasoup.errors import ConfigError
from lorasoup.training.templates import TEMPLATES
from tests.conftest import TINY_DEMO

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _value(expression: str) -> int:
    a, op, b = expression.split()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def _is_mul_story(record: dict) -> bool:
    """A story (not ``compute ...``) whose operation, between the first two numbers, is ``*``."""
    words = record["output"].split()
    first = next(i for i, w in enumerate(words) if w.isdigit())
    return "compute" not in record["instruction"] and words[first + 1] == "*"


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


TINY = TINY_DEMO


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
        # issue 20: the adapters name the final base folder, not the staging one
        declared = json.loads((folder / "adapters" / "math" / "adapter_config.json").read_text())
        assert declared["base_model_name_or_path"] == str((folder / "base").resolve())
    assert ".tmp-" not in (out / "results.json").read_text()


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


def test_default_rows_include_the_newer_merges_and_not_the_costly_rows(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    methods = [row["method"] for row in json.loads((out / "results.json").read_text())["table"]]
    assert methods[methods.index("SVD") + 1 : methods.index("SVD") + 4] == [
        "core-space TIES",
        "TSV-Merge",
        "layer swap",
    ]
    assert "CAT on target examples" not in methods and "LoRA-Flow (per-layer gates)" not in methods
    merges = out / "seed-5" / "merges"
    assert json.loads((merges / "layer_swap" / "run.json").read_text())["method"]["name"] == "layer_swap"
    assert (merges / "core_ties" / "adapter_config.json").is_file()


def test_same_seed_same_numbers(demo_run: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = demo_run
    args = ["demo", "--output", str(tmp_path / "again"), "--seed", "5"]
    for item in TINY:
        args += ["--set", item]
    assert CliRunner().invoke(app, args).exit_code == 0
    first = json.loads((out / "results.json").read_text())["per_seed"][0]
    again = json.loads((tmp_path / "again" / "results.json").read_text())["per_seed"][0]
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in first]


def test_single_seed_runs_combine_into_the_two_seed_study(demo_run: tuple[Path, str], tmp_path: Path) -> None:
    """Seeds run apart (GPU calls that end between seeds) and combined give the study run at once."""
    from lorasoup.demo import combine_runs

    out, _ = demo_run
    for seed in (5, 6):
        args = ["demo", "--output", str(tmp_path / f"alone-{seed}"), "--seed", str(seed)]
        for item in TINY:
            args += ["--set", item]
        assert CliRunner().invoke(app, args).exit_code == 0
    combined = combine_runs([tmp_path / "alone-5", tmp_path / "alone-6"], tmp_path / "combined")
    together = json.loads((out / "results.json").read_text())
    assert combined.seeds == [5, 6] and combined.table == together["table"]
    written = json.loads((tmp_path / "combined" / "results.json").read_text())
    assert written["table"] == together["table"]
    assert written["device"] == together["device"]  # the seeds' machine, read from their results
    accuracies = [[(r["method"], r["accuracy"]) for r in rows] for rows in written["per_seed"]]
    assert accuracies == [[(r["method"], r["accuracy"]) for r in rows] for rows in together["per_seed"]]
    assert (tmp_path / "combined" / "cat_weights.png").is_file()
    assert (tmp_path / "combined" / "seed-6" / "eval" / "cat-trained" / "composite.jsonl").is_file()
    assert not list((tmp_path / "combined").rglob("*.safetensors"))  # weights stay behind
    with pytest.raises(ConfigError, match="share seeds"):
        combine_runs([tmp_path / "alone-5", tmp_path / "alone-5"], tmp_path / "twice")
    assert not (tmp_path / "twice").exists()
    # a run recorded before a settings field existed (its default is what that run did) still combines
    older = json.loads((tmp_path / "alone-6" / "results.json").read_text())
    assert older["settings"].pop("group_by_length") is False
    (tmp_path / "alone-6" / "results.json").write_text(json.dumps(older))
    assert (
        combine_runs([tmp_path / "alone-5", tmp_path / "alone-6"], tmp_path / "again").table
        == together["table"]
    )
    stripped = tmp_path / "results-only"  # a results folder without its work folder: one line, no output
    stripped.mkdir()
    shutil.copy(tmp_path / "alone-6" / "results.json", stripped / "results.json")
    with pytest.raises(ConfigError, match="lacks its work folder seed-6"):
        combine_runs([tmp_path / "alone-5", stripped], tmp_path / "partial")
    assert not (tmp_path / "partial").exists()


class Stop(Exception):
    """What a GPU call's time limit does to a run, here raised from the progress hook."""


def test_a_stopped_run_resumes_without_redoing_finished_work(
    demo_run: tuple[Path, str], tmp_path: Path
) -> None:
    from lorasoup.config import load_config
    from lorasoup.demo import DemoSettings, run_demo
    from lorasoup.errors import LorasoupError

    settings = load_config(DemoSettings, None, TINY)
    out = tmp_path / "run"

    def stop_after_the_merges(what: str, done: int, total: int) -> None:
        if "scoring CAT, weights at init" in what:  # every merge (layer swap included) is written
            raise Stop

    with pytest.raises(Stop):
        run_demo(out, seed=5, settings=settings, stage=stop_after_the_merges, resume=True)
    partial = tmp_path / ".run.partial" / "seed-5"
    math_lora = partial / "adapters" / "math" / "adapter_model.safetensors"
    scored = partial / "eval" / "linear" / "composite.jsonl"
    swapped = partial / "merges" / "layer_swap" / "adapter_config.json"
    assert math_lora.is_file() and scored.is_file() and swapped.is_file() and not out.exists()
    before = (math_lora.stat().st_mtime_ns, scored.stat().st_mtime_ns)
    first_call = json.loads((tmp_path / ".run.partial" / "elapsed.json").read_text())["elapsed_s"]
    other = load_config(DemoSettings, None, [*TINY, "cat_steps=4"])
    with pytest.raises(LorasoupError, match="partial run of other settings"):
        run_demo(out, seed=5, settings=other, resume=True)
    began = time.perf_counter()
    run_demo(out, seed=5, settings=settings, resume=True)
    second_call = time.perf_counter() - began
    # the wall time counts both calls (up to the stage the first was stopped in), not the last alone
    total = json.loads((out / "run.json").read_text())["timings_s"]["total"]
    assert first_call > 0 and first_call + 0.5 * second_call <= total <= first_call + second_call + 1.0
    assert not (out / "elapsed.json").exists()
    resumed = out / "seed-5"
    after = (
        (resumed / "adapters" / "math" / "adapter_model.safetensors").stat().st_mtime_ns,
        (resumed / "eval" / "linear" / "composite.jsonl").stat().st_mtime_ns,
    )
    assert after == before  # the LoRA was not trained again, the row not scored again
    assert not (tmp_path / ".run.partial").exists() and not (out / "resume.json").exists()
    whole = json.loads((demo_run[0] / "results.json").read_text())["per_seed"][0]
    again = json.loads((out / "results.json").read_text())["per_seed"][0]
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in whole]  # as if never stopped


def test_bad_setting_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--output", str(tmp_path / "x"), "--set", "base.stepz=3"])
    assert result.exit_code == 2 and "did you mean 'steps'" in result.output
    assert not (tmp_path / "x").exists()


def _features(record: dict) -> set[str]:
    """Which skill a record needs: M (a multiplication story), E (the extra clause), P (a PAL program)."""
    found = set()
    if _is_mul_story(record):
        found.add("M")
    if " . then " in record["instruction"]:
        found.add("E")
    if record["output"].startswith("def solution ( ) : return"):
        found.add("P")
    return found


def test_the_three_way_composite_needs_all_three_skills() -> None:
    sizes = BenchmarkSizes(base=900, skill=300, test=100)
    bench = build_benchmark(2, sizes, skills=3)
    # The base has none of the three; each skill's data exactly one; the 2-way composite M and P;
    # the 3-way composite (and its oracle's data) all three.
    assert all(not _features(r) for r in bench.base)
    assert any(len(r["output"].split(" + ")) == 2 and "compute" in r["instruction"] for r in bench.base)
    assert not any(
        len([w for w in r["instruction"].split() if w.isdigit()]) > 2
        for r in bench.base
        if "compute" not in r["instruction"]
    )
    expected = {"math": {"M"}, "code": {"P"}, "extra": {"E"}, "composite": {"M", "P"}}
    for split, features in expected.items():
        assert all(_features(r) == features for r in bench.train[split]), split
    assert all(_features(r) == {"E"} for r in bench.test["extra"])
    for split in (bench.train["composite3"], bench.test["composite3"]):
        assert all(_features(r) == {"M", "E", "P"} for r in split)
        for record, (a, b, c) in zip(split, _operands(split), strict=True):
            assert record["output"] == f"def solution ( ) : return {a} * {b} + {c}"
            assert (
                record["value"] == a * b + c and str(c) in record["instruction"].split(" . then ")[1].split()
            )
    # What a pair of skills would answer is wrong: math + code ignore the clause (a * b, never
    # a * b + c), code + extra read the story as an addition (a + b + c, right only for a = b = 2),
    # math + extra write no program at all (no ``solution()``: scored no-code).
    triples = _operands(bench.test["composite3"])
    assert all(a * b != a * b + c for a, b, c in triples)
    assert sum(a + b + c == a * b + c for a, b, c in triples) <= 0.1 * len(triples)
    # Two skills: the very same splits as before the third skill existed.
    two = build_benchmark(2, sizes)
    assert two.base != bench.base and set(two.train) == {"math", "code", "composite"}
    assert build_benchmark(2, sizes, skills=2).test == two.test


def _operands(records: list[dict]) -> list[tuple[int, int, int]]:
    """``(a, b, c)`` of each 3-way composite record, from its program ``... return a * b + c``."""
    found = []
    for record in records:
        a, times, b, plus, c = record["output"].split("return ")[1].split()
        assert (times, plus) == ("*", "+")
        found.append((int(a), int(b), int(c)))
    return found


def test_frames_tokenizer_tells_the_frames_apart() -> None:
    tokenizer = build_tokenizer(skills=3, frames=True)
    bench = build_benchmark(1, BenchmarkSizes(base=120, skill=20, test=10), skills=3)
    record = bench.test["composite3"][0]
    seen = set()
    for name in BASE_FORMATS:
        prompt, _ = TEMPLATES.get(name)(record, tokenizer)
        ids = tuple(tokenizer(prompt)["input_ids"])
        assert tokenizer.unk_token_id not in ids, name
        seen.add(ids)
    assert len(seen) == len(BASE_FORMATS)  # fmt8 and fmt10 differ only in whitespace, yet differ here
    for r in bench.all_records():
        assert tokenizer.unk_token_id not in tokenizer(f"{r['instruction']} {r['output']}")["input_ids"]


def test_held_out_stats() -> None:
    stats = held_out_stats(
        {"plain": 1.0, "fmt7": 0.5, "fmt8": 0.25, "fmt10": 0.75}, ["fmt7", "fmt8", "fmt10"]
    )
    assert stats == {"mean": 0.5, "worst": 0.25, "best": 0.75, "spread": 0.5}


@pytest.fixture(scope="module")
def k3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo-k3") / "run"
    args = ["demo", "--output", str(out), "--seed", "3"]
    for item in [*TINY, "skills=3", "format_robust=true", "extra_rows=true"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (out.parent / "printed.txt").write_text(result.output)  # what the terminal showed
    return out


def test_the_terminal_shows_the_three_skill_table_too(k3_run: Path) -> None:
    printed = (k3_run.parent / "printed.txt").read_text()
    k3 = json.loads((k3_run / "results.json").read_text())["k3"]["table"]
    head, _, tail = printed.partition("three skills (K = 3)")
    assert tail, printed  # the second table follows the two-skill one
    assert "3-way composite" in tail and "extra skill" in tail and "3-way composite" not in head
    for row in k3:  # every K = 3 row, with its 3-way composite accuracy
        line = next(line for line in tail.splitlines() if f" {row['method']} " in line)
        assert f"{100 * row['composite3']['mean']:.1f}" in line, line


def _accuracy(path: Path) -> float:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 12
    return sum(r["correct"] for r in records) / len(records)


def test_three_skills_and_formats_write_every_artifact(k3_run: Path) -> None:
    for name in ("scaling.png", "formats.png", "cat_weights_k3.png", "report.md", "results.json"):
        assert (k3_run / name).is_file(), name
    report = (k3_run / "report.md").read_text()
    for heading in (
        "## Three skills (K = 3)",
        "### How each method scales with K",
        "## Prompt-format robustness",
    ):
        assert heading in report
    assert (k3_run / "report.html").read_text().count("data:image/png;base64,") == 5
    seed = k3_run / "seed-3"
    for folder in (
        "cat-k3",
        "merges/ties-k3",
        "adapters/extra",
        "adapters/oracle-k3",
        "adapters/datamix-k3",
    ):
        assert (seed / folder / "run.json").is_file(), folder
    for folder in ("cat-target", "cat-target-k3", "merges/layer_swap-k3", "merges/tsv-k3"):
        assert (seed / folder / "adapter_config.json").is_file(), folder
    robust = json.loads((seed / "cat-format-robust" / "run.json").read_text())["training"]["formats"]
    assert robust["pool"] == ["plain", "fmt1", "fmt2", "fmt4"] and min(robust["examples"].values()) > 0
    assert "formats" not in json.loads((seed / "cat" / "run.json").read_text()).get("training", {})


def test_three_skills_and_formats_numbers_agree_with_the_per_example_files(k3_run: Path) -> None:
    results = json.loads((k3_run / "results.json").read_text())
    seed = k3_run / "seed-3"
    k3 = results["k3"]
    assert k3["tasks"] == list(TASKS_K3)
    assert {"extra skill LoRA", "CAT (trained)", "TIES", "oracle (composite data)"} <= {
        r["method"] for r in k3["table"]
    }
    extra = {
        "CAT on target examples",
        "LoRA-Flow (per-layer gates)",
        "LoRA-Flow → CAT (mean gates)",
        "layer swap",
    }
    assert extra <= {r["method"] for r in k3["table"]} and extra <= {r["method"] for r in results["table"]}
    for row in k3["per_seed"][0]:
        for task in TASKS_K3:
            assert row["accuracy"][task] == _accuracy(
                seed / "eval-k3" / slug(row["method"]) / f"{task}.jsonl"
            )
    two = {r["method"]: r["composite"]["mean"] for r in results["table"]}
    three = {r["method"]: r["composite3"]["mean"] for r in k3["table"]}
    for row in results["scaling"]:
        assert row["K=3"]["mean"] == three[row["method"]]
        assert (row["K=2"] or {}).get("mean") == two.get(row["method"])
    formats = results["formats"]
    assert formats["frames"] == ["plain", "fmt7", "fmt8", "fmt10"]
    methods = [r["method"] for r in formats["table"]]
    assert methods == ["CAT (trained)", "CAT, format-robust", "DATA-MIX", "oracle (composite data)"]
    for row, table_row in zip(formats["per_seed"][0], formats["table"], strict=True):
        for frame in formats["frames"]:
            accuracy = _accuracy(seed / "eval-formats" / slug(row["method"]) / f"{frame}.jsonl")
            assert row["accuracy"][frame] == accuracy == table_row[frame]["mean"]
        stats = held_out_stats(row["accuracy"], formats["held_out"])
        assert {s: table_row["held_out"][s]["mean"] for s in STATS} == pytest.approx(stats)
    prompt = json.loads((seed / "eval-formats" / "data-mix" / "fmt7.jsonl").read_text().splitlines()[0])[
        "prompt"
    ]
    assert prompt.startswith("Instruction write a program .")


def test_bad_skills_and_formats_are_one_line(tmp_path: Path) -> None:
    for setting, message in (
        ("skills=4", "2 or 3 skills"),
        ("held_out_formats=[fmt1]", "also in train_formats"),
        ("train_formats=[plain, fmt9]", "not among the base's frames"),
    ):
        result = CliRunner().invoke(app, ["demo", "--output", str(tmp_path / "x"), "--set", setting])
        assert result.exit_code == 2 and message in result.output, (setting, result.output)
