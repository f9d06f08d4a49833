"""``lorasoup report --rank-sweep`` on a demo run rebuilds the run's own task: the tokenizer of its
skills and frames, the three-skill composite for the K = 3 study's CAT, and a one-line refusal for a
real-model demo run (whose task is not rebuilt from a seed)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from lorasoup.demo.settings import DemoSettings, settings_record
from lorasoup.demo.study import demo_benchmark, demo_tokenizer
from lorasoup.demo.sweep import demo_sweep_inputs
from lorasoup.errors import ConfigError
from lorasoup.report.runs import Run
from tests.conftest import build_llama


def demo_run(folder: Path, settings: DemoSettings, model: str = "tiny") -> Run:
    """A demo folder with its results.json and seed 1's base model, as the demo leaves them."""
    folder.mkdir()
    record = {"model": model, "settings": settings_record(settings)}
    (folder / "results.json").write_text(json.dumps(record))
    tokenizer = demo_tokenizer(settings)
    base = folder / "seed-1" / "base"
    build_llama(len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return Run(path=folder, kind="demo", record={})


def cat_run(demo: Run, name: str) -> Run:
    return Run(path=demo.path / "seed-1" / name, kind="cat", record={})


def test_the_k3_cat_is_swept_on_the_three_skill_composite(tmp_path: Path) -> None:
    settings = replace(DemoSettings(), skills=3)
    demo = demo_run(tmp_path / "demo", settings)
    benchmark = demo_benchmark(1, settings)
    for name, task in (("cat-k3", "composite3"), ("cat", "composite")):
        inputs = demo_sweep_inputs(demo, cat_run(demo, name))
        assert inputs.task.spec.name == f"demo-{task}"
        prompts = [example.fields["instruction"] for example in inputs.examples]
        assert prompts == [record["instruction"] for record in benchmark.test[task]]
        # the extra skill's words are in the run's tokenizer (the default one lacks them)
        assert inputs.tokenizer.get_vocab() == demo_tokenizer(settings).get_vocab()
    assert demo_tokenizer(settings).get_vocab() != demo_tokenizer(DemoSettings()).get_vocab()


def test_a_real_model_demo_run_is_refused_in_one_line(tmp_path: Path) -> None:
    demo = demo_run(tmp_path / "demo", DemoSettings(), model="smollm2")
    with pytest.raises(ConfigError, match="--model smollm2 run") as refused:
        demo_sweep_inputs(demo, cat_run(demo, "cat"))
    assert "\n" not in str(refused.value) and "--task" in str(refused.value)
