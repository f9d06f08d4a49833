"""The runner end to end on the tiny Llama: in-memory scoring, artifacts, resume, custom YAML, CLI."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lorasoup.cli import app
from lorasoup.config import load_config
from lorasoup.errors import ConfigError, LorasoupError
from lorasoup.evaluation.config import EvalRunConfig
from lorasoup.evaluation.generate import Generation, GenerationSettings, generate
from lorasoup.evaluation.metrics import normalize_answer
from lorasoup.evaluation.runner import evaluate, evaluate_model, read_records, run_examples
from lorasoup.evaluation.tasks import Task, TaskSpec, get_task_spec, resolve_inputs
from tests.conftest import build_llama

runner = CliRunner()
FIXTURES = Path(__file__).resolve().parents[1] / "data" / "lora-soups"
QUESTIONS = ["the cat", "what is 12", "def solution", "below is", "0 1 2 3", "the mat", "a program", "write"]
SETTINGS = GenerationSettings(max_new_tokens=6, batch_size=3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def greedy(tokenizer):
    """What the tiny model writes for each question (greedy), so references can be made to match."""
    texts = [g.text for g in generate(build_llama(len(tokenizer)), tokenizer, QUESTIONS, SETTINGS)]
    usable = [i for i, t in enumerate(texts) if normalize_answer(t)]
    assert len(usable) >= 4, texts
    return texts, usable


def echo_rows(greedy, subset_of=None):
    """Rows whose answer is the model's own output for every other usable question: accuracy known."""
    texts, usable = greedy
    rows, expected = [], 0
    for i, question in enumerate(QUESTIONS):
        match = i in usable and i % 2 == 0
        rows.append({"question": question, "answer": texts[i] if match else "zzz nothing"})
        expected += match
    return rows, expected


def write_task(tmp_path, greedy):
    rows, expected = echo_rows(greedy)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    (tmp_path / "b.json").write_text(json.dumps(rows[5:]))
    spec = {
        "name": "echo",
        "data": ["a.jsonl", "b.json"],
        "prompt": "{question}",
        "reference": "answer",
        "extractor": "strip",
        "metric": "exact_match",
        "extra_metrics": ["token_f1"],
        "generation": {"max_new_tokens": 6, "batch_size": 3},
    }
    path = tmp_path / "echo.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, expected


def config_for(llama_dir, task, output, **extra):
    base = {"model": str(llama_dir), "task": str(task), "output": str(output), "chunk_size": 2, **extra}
    return load_config(EvalRunConfig, None, [f"{k}={json.dumps(v)}" for k, v in base.items()])


def test_evaluate_model_in_memory(tokenizer, greedy):
    rows, expected = echo_rows(greedy)
    task = Task(TaskSpec(name="echo", prompt="{question}", extractor="strip", metric="exact_match"))
    outcome = evaluate_model(build_llama(len(tokenizer)), tokenizer, task, task.examples(rows), SETTINGS)
    assert [r.generation for r in outcome.results] == greedy[0]
    assert outcome.summary["correct"] == expected and outcome.summary["examples"] == len(QUESTIONS)
    assert outcome.summary["accuracy"] == pytest.approx(expected / len(QUESTIONS))
    assert outcome.throughput["new_tokens"] == sum(r.new_tokens for r in outcome.results) > 0


def test_evaluate_writes_artifacts(llama_dir, tmp_path, greedy):
    task, expected = write_task(tmp_path, greedy)
    result = evaluate(config_for(llama_dir, task, tmp_path / "out"))
    out = tmp_path / "out"
    assert result.output == out and not (tmp_path / "out.partial").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "examples.jsonl",
        "run.json",
        "summary.json",
        "summary.md",
    ]
    records = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"a/{i}" for i in range(5)] + [f"b/{i}" for i in range(3)]
    assert {"prompt", "generation", "extracted", "verdict", "correct", "scores"} <= set(records[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["correct"] == expected and set(summary["subsets"]) == {"a", "b"}
    across = summary["across_subsets"]
    assert across["spread"] == pytest.approx(across["best"] - across["worst"])
    assert summary["throughput"]["tokens_per_s"] > 0
    assert "Across subsets" in (out / "summary.md").read_text()
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "eval" and run["accuracy"] == summary["accuracy"] and len(run["inputs"]) == 2
    with pytest.raises(LorasoupError, match="already exists"):
        evaluate(config_for(llama_dir, task, out))


def test_resume_from_a_partial_run_gives_the_same_results(llama_dir, tmp_path, greedy):
    task, _ = write_task(tmp_path, greedy)
    whole = evaluate(config_for(llama_dir, task, tmp_path / "whole"))

    def crash(done, total, accuracy):
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(config_for(llama_dir, task, tmp_path / "cut"), progress=crash)
    partial = tmp_path / "cut.partial" / "examples.jsonl"
    assert not (tmp_path / "cut").exists() and len(read_records(partial)) == 4
    with partial.open("a") as handle:  # a crash in the middle of a write
        handle.write('{"id": "a/9", "subs')
    resumed = evaluate(config_for(llama_dir, task, tmp_path / "cut"))
    assert resumed.resumed == 4 and resumed.throughput["examples"] == 4
    drop = ("throughput",)
    assert {k: v for k, v in resumed.summary.items() if k not in drop} == {
        k: v for k, v in whole.summary.items() if k not in drop
    }
    assert (tmp_path / "cut" / "examples.jsonl").read_text() == (
        tmp_path / "whole" / "examples.jsonl"
    ).read_text()


def test_changed_settings_refuse_to_resume(llama_dir, tmp_path, greedy):
    task, _ = write_task(tmp_path, greedy)

    def crash(done, total, accuracy):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(config_for(llama_dir, task, tmp_path / "out"), progress=crash)
    changed = config_for(llama_dir, task, tmp_path / "out", generation={"max_new_tokens": 3})
    with pytest.raises(ConfigError, match=r"other settings \(changed: decoding\).*--no-resume"):
        evaluate(changed)
    fresh = evaluate(
        config_for(llama_dir, task, tmp_path / "out", generation={"max_new_tokens": 3}, resume=False)
    )
    assert fresh.resumed == 0 and all(r.new_tokens <= 3 for r in fresh.results)


def test_run_examples_keeps_order_and_scores_programs():
    spec = get_task_spec("gsm-hard")
    task = Task.from_inputs(spec, resolve_inputs(spec, [str(FIXTURES)]))
    examples = task.load(resolve_inputs(spec, [str(FIXTURES)]).data)
    programs = {
        0: "```\ndef solution():\n    return (16 - 3 - 4933828) * 2\n```",
        1: "no program",
        2: "```\ndef solution():\n    return 1/0\n```",
    }
    seen = []

    def fake(prompts, settings):
        seen.append(len(prompts))
        return [
            Generation(programs[[task.prompt(e) for e in examples].index(p)], 10, 3, "stop") for p in prompts
        ]

    results, speed = run_examples(fake, None, task, examples, GenerationSettings(), chunk_size=1)
    assert seen == [1, 1, 1]
    assert [r.verdict for r in results] == ["correct", "no-code", "error"]
    assert speed["new_tokens"] == 9 and speed["examples"] == 3


def test_cli_end_to_end_with_adapter_and_limit(llama_dir, tmp_path, greedy, make_lora):
    task, _ = write_task(tmp_path, greedy)
    adapter = make_lora("skill")
    args = ["eval", "--model", str(llama_dir), "--adapter", str(adapter), "--task", str(task), "--limit", "2"]
    args += ["--output", str(tmp_path / "cli"), "--batch-size", "2", "--max-new-tokens", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "wrote" in result.output
    records = (tmp_path / "cli" / "examples.jsonl").read_text().splitlines()
    assert [json.loads(r)["id"] for r in records] == ["a/0", "a/1", "b/0", "b/1"]  # --limit per data file
    run = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert run["config"]["adapter"] == str(adapter) and run["config"]["generation"]["max_new_tokens"] == 4
    assert all(json.loads(r)["new_tokens"] <= 4 for r in records)


def test_cli_errors_are_one_line(llama_dir, tmp_path, greedy, monkeypatch):
    task, _ = write_task(tmp_path, greedy)
    result = runner.invoke(app, ["eval", "--task", str(task)])
    assert result.exit_code == 2 and "missing required key 'model'" in result.output
    monkeypatch.setitem(sys.modules, "vllm", None)
    args = [
        "eval",
        "--model",
        str(llama_dir),
        "--task",
        str(task),
        "--backend",
        "vllm",
        "--output",
        str(tmp_path / "v"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "pip install vllm" in result.output
    result = runner.invoke(app, ["eval", "--model", str(llama_dir), "--task", "gsm-hard"])
    assert result.exit_code == 2 and "needs data: pass --data" in result.output
