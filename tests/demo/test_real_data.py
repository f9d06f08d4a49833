"""The smollm2 demo's data (reasoning-gym): records well-formed, references numeric, seeded, and every
training answer scored correct by the very scorer the study uses (so a wrong reference would show)."""

from __future__ import annotations

import math

import pytest

from lorasoup.demo.procedural import BUILDERS
from lorasoup.demo.real import (
    GSM_SUFFIX,
    PROGRAM_REQUEST,
    RealSizes,
    build_real_benchmark,
    gsm_problems,
    pal_program,
)
from lorasoup.demo.real_study import RealDemoSettings, task_specs
from lorasoup.evaluation.tasks import Task
from lorasoup.training.templates import check_record

SIZES = RealSizes(skill=6, test=4)


def short(record: dict) -> bool:
    return len(record["instruction"]) + len(record["output"]) <= 900


@pytest.fixture(scope="module")
def bench():
    return build_real_benchmark(3, SIZES, fits=short)


def test_pal_program_computes_the_answer_from_the_worked_equations() -> None:
    worked = (
        "He works 6 days/week * 2 weeks/month = 12 days/month\n"
        "He earns £195/day * 12 days/month = £2,340/month\n"
        "A year is 12 months, so he earns £2340/month * 12 months/year = £28080\n"
        "#### 28080"
    )
    program = pal_program("He works 2 weeks a month and 6 days a week for £195 a day.", worked, 28080)
    assert program == (
        "def solution():\n"
        "    days = 6 * 2\n"
        "    value = 195 * days\n"  # "12 days/month" is the result named days
        "    value_2 = value * 12\n"  # "12 months" is not the 12 days: the number stays
        "    return value_2\n"
    )
    percent = pal_program("A $400 fee plus 8%.", "The fee is $400 x 8% = $32.\n#### 32", 32)
    assert percent == "def solution():\n    value = 400 * (8 / 100)\n    return value\n"
    # The last equation must give the answer; prose numbers before an equation are dropped.
    assert pal_program("q", "In 2 weeks she reads 3 + 4 = 7 books.\n#### 8", 8) is None
    assert pal_program("q", "In 2 weeks she reads 3 + 4 = 7 books.\n#### 7", 7).endswith(
        "= 3 + 4\n    return books\n"
    )


def test_gsm_problems_are_seeded_filtered_and_their_programs_return_the_answer() -> None:
    first = [p for _, p in zip(range(20), gsm_problems(0, max_steps=2), strict=False)]
    again = [p for _, p in zip(range(20), gsm_problems(0, max_steps=2), strict=False)]
    other = [p for _, p in zip(range(20), gsm_problems(1, max_steps=2), strict=False)]
    assert first == again and first != other
    assert len({p.question for p in first}) == 20
    for problem in first:
        assert problem.program.count(" = ") <= 2 and problem.worked.rstrip().endswith(f"#### {problem.value}")
        assert not problem.question.endswith(GSM_SUFFIX)
        namespace: dict = {}
        exec(problem.program, namespace)  # our own generated arithmetic, see pal_program
        assert math.isclose(namespace["solution"](), problem.value)


def test_benchmark_records_are_well_formed_numeric_and_disjoint(bench) -> None:
    assert bench.base == []
    for split, size in ((bench.train, SIZES.skill), (bench.test, SIZES.test)):
        assert {name: len(records) for name, records in split.items()} == {
            "math": size,
            "code": size,
            "composite": size,
        }
        for records in split.values():
            for index, record in enumerate(records):
                check_record(record, f"record {index}")
                assert short(record)  # the study's token budget, here in characters
                assert isinstance(record["value"], int | float) and not isinstance(record["value"], bool)
                assert math.isfinite(record["value"])
    for name in ("code", "composite"):
        for record in (*bench.train[name], *bench.test[name]):
            assert record["instruction"].endswith(PROGRAM_REQUEST) and "def solution():" in record["output"]
    for record in (*bench.train["math"], *bench.test["math"]):
        assert record["instruction"].endswith(GSM_SUFFIX) and "def " not in record["output"]

    # No test problem is trained on; the code skill is scored on computations it never saw, and none of
    # its records is a word problem (every one comes from a procedural generator).
    def question(record: dict) -> str:
        return record["instruction"].removesuffix(GSM_SUFFIX).removesuffix(f"\n{PROGRAM_REQUEST}")

    trained = {question(r) for name in ("math", "composite") for r in bench.train[name]}
    tested = [question(r) for name in ("math", "composite") for r in bench.test[name]]
    assert len(set(tested)) == len(tested) and not trained & set(tested)
    code_tested = {r["instruction"] for r in bench.test["code"]}
    assert not code_tested & {r["instruction"] for r in bench.train["code"]}
    assert {r["task"] for r in (*bench.train["code"], *bench.test["code"])} <= set(BUILDERS)
    assert not {question(r) for r in (*bench.train["code"], *bench.test["code"])} & (trained | set(tested))


def test_the_first_design_holds_codeio_tasks_out() -> None:
    first = build_real_benchmark(3, SIZES, fits=short, code_skill="codeio")
    assert not {r["task"] for r in first.test["code"]} & {r["task"] for r in first.train["code"]}
    assert all("def main_solution(" in r["output"] for r in first.train["code"])


def test_same_seed_same_records(bench) -> None:
    assert (
        build_real_benchmark(3, SIZES, fits=short) == bench
    )  # another seed: see test_gsm_problems_are_seeded...


@pytest.mark.parametrize("name", ["composite", "math", "code"])
def test_reference_answers_score_correct_under_the_study_scorer(bench, name) -> None:
    """The training outputs, given as generations, pass the study's own scorer (the sandbox runs the
    programs): references agree with what the programs and worked answers compute."""
    spec = task_specs(RealDemoSettings())[name]
    records = bench.train[name] + (bench.test[name] if name == "code" else [])
    task = Task(spec, num_fewshot=0)
    scored = task.score(task.examples(records), [r["output"] for r in records])
    assert [s.verdict for s in scored] == ["correct"] * len(records)


def test_demo_model_choice_is_checked(tmp_path) -> None:
    from typer.testing import CliRunner

    from lorasoup.cli import app

    result = CliRunner().invoke(app, ["demo", "--model", "smollm3", "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--model must be one of tiny, smollm2" in result.output
    result = CliRunner().invoke(
        app, ["demo", "--model", "smollm2", "--output", str(tmp_path / "x"), "--set", "base.steps=3"]
    )
    assert result.exit_code == 2 and "base" in result.output  # tiny-only fields are errors here
    assert not (tmp_path / "x").exists()
