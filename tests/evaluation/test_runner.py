"""The runner end to end on the tiny Llama: in-memory scoring, artifacts, resume, custom YAML, CLI."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lorasoup.cli import app
from lorasoup.config import load_config
from lorasoup.errors import ConfigError, DataError, LorasoupError
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
    assert run["scoring"]["correct_when"] == "exact_match() > 0.5" and "sandbox" not in run["scoring"]
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


def test_progress_moves_per_generation_batch():
    """Each generation batch is scored, saved and reported as it finishes (not once per 4 batches)."""
    task = Task(TaskSpec(name="echo", prompt="{question}", extractor="strip", metric="exact_match"))
    examples = task.examples([{"question": f"q{i}", "answer": f"q{i}"} for i in range(5)])
    calls, seen = [], []

    def fake(prompts, settings):
        calls.append(len(prompts))
        return [Generation(p, 1, 1, "stop") for p in prompts]

    run_examples(
        fake, None, task, examples, GenerationSettings(batch_size=2), progress=lambda *a: seen.append(a)
    )
    assert calls == [2, 2, 1] and [done for done, _, _ in seen] == [2, 4, 5]
    assert seen[-1] == (5, 5, 1.0)


def qa_like_task(tmp_path, greedy, typo=False):
    """A custom task with a question field: novel-token F1 leads, the echo baseline is scored. Each
    answer is its question plus a word, so an echo passes TF-IDF > 0.3 and gets 0 novel-token F1."""
    rows = [{"question": q, "answer": f"{q} zebra"} for q in QUESTIONS if q != "0 1 2 3"]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": "qa-like",
        "data": ["rows.jsonl"],
        "prompt": "{qestion}" if typo else "{question}",
        "extractor": "strip",
        "metric": "tfidf_cosine",
        "threshold": 0.3,
        "extra_metrics": ["novel_token_f1"],
        "headline": "novel_token_f1",
        "question": "question",
        "generation": {"max_new_tokens": 6, "batch_size": 3},
    }
    path = tmp_path / "qa-like.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_echo_baseline_and_headline_in_summary_and_reports(llama_dir, tmp_path, greedy):
    task = qa_like_task(tmp_path, greedy)
    args = ["eval", "--model", str(llama_dir), "--task", str(task), "--output", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "question echo" in result.output  # the echo row, under the model's
    assert re.search(r"subset\s*┃\s*examples\s*┃\s*novel_token_f1\s*┃", result.output)  # headline leads
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    echo = summary["echo_baseline"]
    assert summary["headline"] == "novel_token_f1" and summary["accuracy_rule"] == "tfidf_cosine > 0.3"
    assert echo["examples"] == 7 and echo["metrics"]["novel_token_f1"] == 0.0
    assert echo["accuracy"] == 1.0  # the paper's rule passes every echo
    table = (tmp_path / "out" / "summary.md").read_text().splitlines()
    assert table[2].startswith(
        "| model | adapter | examples | **novel_token_f1** | accuracy (tfidf_cosine > 0.3)"
    )
    assert table[5].startswith("| question echo (no model) | - | 7 | 0.0000 | 1.0000")
    record = json.loads((tmp_path / "out" / "examples.jsonl").read_text().splitlines()[0])
    assert record["echo"]["scores"]["novel_token_f1"] == 0.0


def test_prompt_typo_stops_before_the_model_loads(tmp_path, greedy):
    """``{qestion}`` is reported from the data alone (the model path does not even exist), and no
    ``.partial`` is left behind."""
    task = qa_like_task(tmp_path, greedy, typo=True)
    with pytest.raises(DataError, match=r"rows/0: the prompt uses \{qestion\}.*fields: answer, question"):
        evaluate(config_for(tmp_path / "no-model-here", task, tmp_path / "out"))
    assert not (tmp_path / "out.partial").exists()


def test_a_partial_run_with_no_records_does_not_block_the_rerun(llama_dir, tmp_path, greedy):
    """A run that failed before scoring anything (here: a missing adapter) leaves nothing to resume, so
    the corrected command runs instead of asking for --no-resume."""
    task, expected = write_task(tmp_path, greedy)
    with pytest.raises(LorasoupError):
        evaluate(config_for(llama_dir, task, tmp_path / "out", adapter=str(tmp_path / "missing-adapter")))
    fixed = evaluate(config_for(llama_dir, task, tmp_path / "out"))
    assert fixed.resumed == 0 and fixed.summary["correct"] == expected


def test_run_json_records_the_scoring_rule_and_the_sandbox():
    from lorasoup.evaluation.tasks.scoring import SandboxOptions, scoring_record

    record = scoring_record(get_task_spec("gsm-hard"), SandboxOptions(timeout_s=2.0))
    assert record["metric_args"] == {"abs_tol": 0.001, "rel_tol": 0.0}
    assert record["correct_when"] == "numeric(abs_tol=0.001, rel_tol=0.0) > 0.5"
    assert record["sandbox"]["isolation"] in ("namespaces", "fallback")
    assert record["sandbox"]["limits"]["timeout_s"] == 2.0 and record["sandbox"]["layers"]
    qa = scoring_record(get_task_spec("qa"), SandboxOptions())
    assert qa["correct_when"] == "tfidf_cosine() > 0.3" and "sandbox" not in qa
    assert (qa["headline"], qa["question"]) == ("novel_token_f1", "question")
