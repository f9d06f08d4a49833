"""Tasks: built-in specs, the reference prompts, data layouts, inputs, custom YAML, and scoring
(GSM-Hard programs run in the real sandbox)."""

import json
import os
from pathlib import Path

import pytest
import yaml

from lorasoup.errors import ConfigError, DataError
from lorasoup.evaluation.tasks import (
    SandboxOptions,
    Task,
    TaskSpec,
    get_task_spec,
    register_task,
    resolve_inputs,
    task_names,
)

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "lora-soups"
# The full LoRA Soups test files (github.com/aksh555/LoRA-Soups, data/): inside the repository at
# shared/data/lora-soups/data (a link is enough), or wherever LORASOUP_LORA_SOUPS_DATA points.
SHARED_IN_REPO = Path("shared") / "data" / "lora-soups" / "data"
SHARED = Path(
    os.environ.get("LORASOUP_LORA_SOUPS_DATA") or Path(__file__).resolve().parents[2] / SHARED_IN_REPO
)
SHARED_MISSING = (
    f"the full LoRA Soups data is not at {SHARED_IN_REPO} in the repository: link the data/ folder of "
    "github.com/aksh555/LoRA-Soups there, or set LORASOUP_LORA_SOUPS_DATA"
)


def prepared(name, data=(FIXTURES,), **kwargs):
    spec = get_task_spec(name)
    inputs = resolve_inputs(spec, [str(d) for d in data], **kwargs)
    task = Task.from_inputs(spec, inputs, kwargs.get("num_fewshot"))
    return task, task.load(inputs.data)


def reference_prompt(instruction, demos, header, footer):
    """The reference cat_eval.py prompt, written out by hand."""
    text = header + "\n\n"
    for d in demos:
        text += f"### Instruction:\n{d['instruction']}\n\n### Response:\n{d['output']}\n\n"
    return text + footer + f"### Instruction:\n{instruction}\n\n### Response:\n"


def test_builtin_tasks_load_and_validate():
    assert {"gsm-hard", "qa", "rc", "prompt-formats"} <= set(task_names())
    for name in task_names():
        get_task_spec(name).validate()


@pytest.mark.parametrize(
    ("name", "demo_file", "count", "header", "footer"),
    [
        (
            "gsm-hard",
            "math.json",
            None,
            "Let's use Python to solve math problems step by step. Below are a few "
            "Instruction-Response pairs on how to do it.",
            "Now write a function 'solution' encolsed in ``` in Python to solve this Instruction. Write only "
            "a code block. Write only valid Python code without using any units with the numerical values "
            "and any invalid symbols.\n\n",
        ),
        (
            "qa",
            "qa.json",
            1,
            "Below are a few Instruction-Response pairs on answering questions.",
            "Now write a Response for this Instruction. Output only the correct answer.\n\n",
        ),
        (
            "rc",
            "rc.json",
            None,
            "Below are a few Instruction-Response pairs on solving reading comprehension.",
            "Now write a Response for this Instruction. Output only the correct answer.\n\n",
        ),
    ],
)
def test_prompts_are_the_reference_prompts(name, demo_file, count, header, footer):
    task, examples = prepared(name)
    demos = json.loads((FIXTURES / "few_shot_demo" / demo_file).read_text())[:count]
    for example in examples:
        assert task.prompt(example) == reference_prompt(example.fields["instruction"], demos, header, footer)


def test_prompt_formats_use_alpaca_and_score_n():
    task, examples = prepared(
        "prompt-formats",
        data=[
            FIXTURES / "test_datasets/prompt_formats/test_instructions_format3.json",
            FIXTURES / "test_datasets/prompt_formats/test_instructions_format7.json",
        ],
    )
    assert [e.subset for e in examples] == ["test_instructions_format3"] * 2 + [
        "test_instructions_format7"
    ] * 2
    assert examples[0].reference == "3"
    prompt = task.prompt(examples[0])
    assert prompt.startswith("Below is an instruction that describes a task.") and prompt.endswith(
        "### Response:\n"
    )
    assert examples[1].reference == "3"
    scored = task.score(examples[:2], ["the correct answer is 3", "I count 5 words, so 2"])
    assert [s.verdict for s in scored] == ["correct", "wrong"]


def test_qa_layouts_closed_book():
    task, examples = prepared("qa")
    layouts = {e.notes["layout"] for e in examples if e.subset == "biology_test"}
    assert layouts == {"answer+context", "answer+input+output", "answer+output"}
    rows = [
        *json.loads((FIXTURES / "test_datasets/qa/test.json").read_text()),
        *json.loads((FIXTURES / "test_datasets/qa/biology_test.json").read_text()),
    ]
    for example, row in zip(examples, rows, strict=True):
        assert set(example.fields) == {"instruction", "question"}
        assert example.fields["question"] == example.fields["instruction"]
        if "context" in row:  # closed-book: the context never reaches the prompt
            assert row["context"][20:80] not in task.prompt(example)
    bio = [e for e in examples if e.subset == "biology_test"]
    assert {e.reference for e in bio} >= {"hydrophilic", "carbohydrate receptors (lectins)"}


def test_qa_answer_from_output_and_bad_rows(tmp_path):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"instruction": "Q?", "output": "The correct answer is blue"}]))
    _, examples = prepared("qa", data=[data], num_fewshot=0)
    assert examples[0].reference == "blue"
    data.write_text(json.dumps([{"instruction": "Q?", "output": "blue"}]))
    with pytest.raises(DataError, match=r"qa.json: row 0: needs an 'answer'"):
        prepared("qa", data=[data], num_fewshot=0)


def test_qa_and_rc_scoring():
    task, examples = prepared("qa")
    reference = examples[0].reference
    scored = task.score(examples[:2], [f"The correct answer is {reference}", "### nothing"])
    assert scored[0].correct and scored[0].scores["tfidf_cosine"] == pytest.approx(1.0)
    assert scored[0].scores["token_f1"] == pytest.approx(1.0)
    assert not scored[1].correct and scored[1].verdict == "wrong"
    rc, rc_examples = prepared("rc")
    answer = rc_examples[0].reference
    out = rc.score(rc_examples, [f"the correct answer is {answer}", "  "])
    assert out[0].correct
    assert out[0].scores == {"exact_match": 1.0, "token_f1": 1.0, "novel_token_f1": 1.0}
    assert out[1].verdict == "no-answer" and out[1].scores["token_f1"] == 0.0


def test_inputs_need_user_data_and_demos(tmp_path):
    spec = get_task_spec("gsm-hard")
    with pytest.raises(ConfigError, match="needs data: pass --data"):
        resolve_inputs(spec)
    data = FIXTURES / "test_datasets/math/test.json"
    with pytest.raises(ConfigError, match="--fewshot FILE"):
        resolve_inputs(spec, [str(data)])
    assert resolve_inputs(spec, [str(data)], num_fewshot=0).fewshot is None
    demos = FIXTURES / "few_shot_demo/math.json"
    assert resolve_inputs(spec, [str(data)], str(demos)).fewshot == demos
    with pytest.raises(DataError, match="does not exist"):
        resolve_inputs(spec, [str(tmp_path / "missing.json")], num_fewshot=0)
    with pytest.raises(DataError, match="does not exist"):
        resolve_inputs(spec, [str(tmp_path)])  # a folder without the task's files
    with pytest.raises(ConfigError, match="puts few-shot demos"):
        Task(spec)  # never silently zero-shot
    assert Task(spec, num_fewshot=0).prefix.startswith("Let's use Python")


def test_bad_rows_name_file_and_row(tmp_path):
    bad = tmp_path / "math.jsonl"
    bad.write_text('{"instruction": "q", "answer": 3}\n{"instruction": "q", "answer": "three"}\n')
    with pytest.raises(DataError, match=r"math.jsonl: row 1: 'answer' must be a number"):
        prepared("gsm-hard", data=[bad], num_fewshot=0)
    bad.write_text('{"instruction": "q", "answer": 3}\n{oops\n')
    with pytest.raises(DataError, match=r"math.jsonl: line 2: invalid JSON"):
        prepared("gsm-hard", data=[bad], num_fewshot=0)


def test_custom_yaml_task(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "add.jsonl").write_text(
        '{"q": "2+3", "a": "5"}\n{"q": "4+4", "a": "8"}\n', encoding="utf-8"
    )
    (tmp_path / "demos.json").write_text(json.dumps([{"q": "1+1", "a": "2"}]))
    spec_file = tmp_path / "add.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "name": "add",
                "data": ["data/add.jsonl"],
                "prompt": "Q: {q}\nA:",
                "fewshot": {"path": "demos.json", "demo": "Q: {q}\nA: {a}\n\n"},
                "reference": "a",
                "extractor": "last_number",
                "metric": "numeric",
                "generation": {"max_new_tokens": 4, "stop": ["\n"]},
            }
        )
    )
    spec = get_task_spec(str(spec_file))
    inputs = resolve_inputs(spec)  # paths relative to the YAML file
    task = Task.from_inputs(spec, inputs)
    examples = task.load(inputs.data)
    assert task.prompt(examples[1]) == "Q: 1+1\nA: 2\n\nQ: 4+4\nA:"
    assert [s.correct for s in task.score(examples, [" 5", " 9"])] == [True, False]

    spec_file.write_text(yaml.safe_dump({"name": "x", "extractor": "last_numbr"}))
    with pytest.raises(ConfigError, match="did you mean 'last_number'"):
        get_task_spec(str(spec_file))
    spec_file.write_text(yaml.safe_dump({"name": "x", "promt": "{q}"}))
    with pytest.raises(ConfigError, match="unknown key 'promt'"):
        get_task_spec(str(spec_file))
    with pytest.raises(ConfigError, match=r"unknown task 'gsm_hard'.*did you mean 'gsm-hard'"):
        get_task_spec("gsm_hard")


def test_missing_prompt_field_is_a_one_line_error():
    task = Task(TaskSpec(name="t", prompt="{question}"))
    with pytest.raises(DataError, match=r"example data/0: the prompt uses \{question\}"):
        task.examples([{"instruction": "x", "answer": "y"}])


def test_prompt_typo_is_found_when_the_data_loads(tmp_path):
    """A custom task's ``{qestion}`` stops ``task.load`` (before any model), naming row and fields."""
    (tmp_path / "rows.jsonl").write_text('{"question": "2+2?", "answer": "4"}\n')
    (tmp_path / "typo.yaml").write_text(
        yaml.safe_dump({"name": "typo", "data": ["rows.jsonl"], "prompt": "Q: {qestion}\nA:"})
    )
    spec = get_task_spec(str(tmp_path / "typo.yaml"))
    task = Task.from_inputs(spec, resolve_inputs(spec))
    with pytest.raises(DataError, match=r"rows/0: the prompt uses \{qestion\}.*fields: answer, question"):
        task.load(resolve_inputs(spec).data)


def test_question_field_is_checked():
    spec = TaskSpec(name="q", prompt="{instruction}", metric="novel_token_f1")
    with pytest.raises(ConfigError, match="novel_token_f1 reads the question"):
        spec.validate()
    task = Task(TaskSpec(name="q", prompt="{instruction}", metric="novel_token_f1", question="query"))
    with pytest.raises(DataError, match="reads the question from field 'query'"):
        task.examples([{"instruction": "x", "answer": "y"}])
    with pytest.raises(ConfigError, match="headline 'f1'"):
        TaskSpec(name="q", headline="f1").validate()


def test_qa_question_echo_is_scored_and_fails_the_echo_proof_score():
    """The question used as the answer passes the paper's TF-IDF rule on most D&D rows; novel-token F1
    gives it 0, so the echo baseline shows it."""
    task, examples = prepared("qa")
    questions = [e.fields["question"] for e in examples]
    scored = task.score(examples, [f"The correct answer is {q}" for q in questions])
    assert all(s.echo["scores"] == s.scores for s in scored)  # the model echoed: same as the baseline
    assert sum(s.echo["correct"] for s in scored) >= len(scored) // 2  # the paper's rule is fooled
    assert all(s.echo["scores"]["novel_token_f1"] == 0.0 for s in scored)
    assert task.spec.headline == "novel_token_f1"


def test_rc_short_perfect_answer_gets_headline_credit():
    """ "Etanercept" for "Etanercept is the most widely used anti-TNF drug.": exact match 0 (the column
    kept), the headline token F1 credits it, novel-token F1 in full."""
    task, examples = prepared("rc")
    example = next(e for e in examples if e.reference.startswith("Etanercept is the most widely"))
    assert example.fields["question"] == "Which is the most widely used anti-TNF drug?"
    scored = task.score([example], ["the correct answer is Etanercept"])[0]
    assert scored.scores["exact_match"] == 0.0 and not scored.correct
    assert task.spec.headline == "token_f1" and scored.scores["token_f1"] == pytest.approx(2 / 8)
    assert scored.scores["novel_token_f1"] == 1.0
    assert scored.echo["scores"]["novel_token_f1"] == 0.0


def test_register_task_from_code():
    spec = TaskSpec(name="echo-test-task", prompt="{instruction}", metric="token_f1")
    register_task(spec)
    assert get_task_spec("echo-test-task") is spec
    with pytest.raises(ValueError, match="registered twice"):
        register_task(spec)


PROGRAMS = {
    "correct int": "```python\ndef solution():\n    eggs = 16 - 3 - 4933828\n    return eggs * 2\n```",
    "correct float": "```\ndef solution():\n    n = 531811\n    return n + n * 3 + n * 3 * 0.7\n```",
    "printed": "```\nprint(2287720 + 2287720 // 2)\n```",
    "wrong": "```\ndef solution():\n    return (16 - 4933828) * 2\n```",
    "no code": "The answer is 3431580.",
    "error": "```\ndef solution():\n    return 1 / 0\n```",
    "timeout": "```\ndef solution():\n    while True:\n        pass\n```",
}


def test_gsm_hard_programs_in_the_sandbox():
    task, examples = prepared("gsm-hard")
    texts = list(PROGRAMS.values())
    rows = [examples[0], examples[2], examples[1], examples[0], examples[1], examples[0], examples[0]]
    scored = task.score(rows, texts, SandboxOptions(timeout_s=1.0, workers=2))
    verdicts = dict(zip(PROGRAMS, (s.verdict for s in scored), strict=True))
    assert verdicts == {
        "correct int": "correct",
        "correct float": "correct",
        "printed": "correct",
        "wrong": "wrong",
        "no code": "no-code",
        "error": "error",
        "timeout": "timeout",
    }
    assert scored[0].extracted == "-9867630" and scored[1].extracted == "3244047.0999999996"
    assert "ZeroDivisionError" in scored[5].detail
    assert [s.scores["numeric"] for s in scored] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_a_returned_string_with_commas_is_not_a_number():
    """PAL's scorer takes ``float(answer)``: '-9,867,630' fails it, '-9867630' passes."""
    task, examples = prepared("gsm-hard")
    texts = [
        "```\ndef solution():\n    return '-9,867,630'\n```",
        "```\ndef solution():\n    return '-9867630'\n```",
        "```\ndef solution():\n    return -9867630\n```",
    ]
    scored = task.score([examples[0]] * 3, texts, SandboxOptions(timeout_s=5.0, workers=2))
    assert [s.verdict for s in scored] == ["wrong", "correct", "correct"]
    assert "returned the string '-9,867,630', not a number" in scored[0].detail


@pytest.mark.skipif(not SHARED.is_dir(), reason=SHARED_MISSING)
def test_shared_test_files_load():
    counts = {}
    for name in ("gsm-hard", "qa", "rc", "prompt-formats"):
        task, examples = prepared(name, data=[SHARED])
        counts[name] = len(examples)
        assert all(task.prompt(e) for e in examples[:3])
    assert counts == {"gsm-hard": 1319, "qa": 95, "rc": 201, "prompt-formats": 4 * 417}
    _, math = prepared("gsm-hard", data=[SHARED])
    assert sum(1 for e in math if e.reference != int(e.reference)) == 303


def count_program_runs(monkeypatch) -> list[list[str]]:
    """Each call of the sandbox's ``run_programs`` from here on: the programs it was given."""
    from lorasoup.evaluation import sandbox

    seen: list[list[str]] = []
    real = sandbox.run_programs

    def counting(codes, **kwargs):
        seen.append(list(codes))
        return real(codes, **kwargs)

    monkeypatch.setattr(sandbox, "run_programs", counting)
    return seen


def test_strict_pal_scorer_and_identical_programs_run_once(monkeypatch):
    task, examples = prepared("gsm-hard")
    strict = Task(TaskSpec(**{**vars(task.spec), "scorer": "program_solution"}), num_fewshot=0)
    seen = count_program_runs(monkeypatch)
    texts = [PROGRAMS["correct int"], PROGRAMS["printed"], PROGRAMS["correct int"], PROGRAMS["correct int"]]
    rows = [examples[0], examples[1], examples[0], examples[0]]
    scored = strict.score(rows, texts, SandboxOptions(timeout_s=2.0, workers=2))
    assert [s.verdict for s in scored] == ["correct", "no-code", "correct", "correct"]
    assert "solution()" in scored[1].detail
    assert len(seen) == 1 and len(seen[0]) == 2  # two distinct programs, each run once
    lenient = task.score(rows[:2], texts[:2], SandboxOptions(timeout_s=2.0, workers=2))
    assert [s.verdict for s in lenient] == ["correct", "correct"]  # printing counts for `program`


def test_a_program_cache_carries_results_across_score_calls(monkeypatch):
    from lorasoup.evaluation import sandbox

    task, examples = prepared("gsm-hard")
    seen = count_program_runs(monkeypatch)
    cache = sandbox.ProgramCache()
    options = SandboxOptions(timeout_s=2.0, workers=2)
    texts, rows = [PROGRAMS["correct int"], PROGRAMS["printed"]], [examples[0], examples[1]]
    first = task.score(rows, texts, options, cache)
    second = task.score(rows, texts, options, cache)  # another model writing the same programs
    assert [s.verdict for s in first] == [s.verdict for s in second] == ["correct", "correct"]
    assert [s.extracted for s in first] == [s.extracted for s in second]
    assert len(seen) == 2 and len(seen[0]) == 2 and seen[1] == []  # the second call ran nothing
    assert cache.hits == 2 and len(cache) == 2
    plain = task.score(rows, texts, options)  # no cache: runs again
    assert len(seen) == 3 and [s.verdict for s in plain] == ["correct", "correct"]
