"""Every YAML shipped in configs/ loads into its config type without errors."""

from pathlib import Path

import pytest

from lorasoup.cat.config import CatRunConfig
from lorasoup.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("cat-*.yaml"))


def test_there_are_shipped_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_cat_config_loads(path):
    config = load_config(CatRunConfig, path)
    assert config.adapters and config.data.train
    assert config.cat.parameterisation in ("softmax", "free")


MERGE_CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("merge-*.yaml"))


@pytest.mark.parametrize("path", MERGE_CONFIGS, ids=lambda p: p.name)
def test_shipped_merge_config_loads(path):
    from lorasoup.merging.config import MergeRunConfig

    config = load_config(MergeRunConfig, path)
    assert config.adapters and config.method


def test_there_are_shipped_merge_configs():
    assert MERGE_CONFIGS


EXAMPLES = {
    "train-example.yaml": ["train", "--set", "train.max_steps=2"],
    "cat-example.yaml": ["cat", "--set", "train.max_steps=2"],
    "merge-example.yaml": ["merge"],
    "moe-example.yaml": ["moe", "--set", "train.max_steps=2"],
    "search-example.yaml": ["search", "--set", "search.iterations=1", "--set", "search.population=4"],
}
"""Each example config and the command that runs it (with fewer steps: the test checks that the files
run, not what they learn)."""


def test_every_example_config_is_run_by_the_test():
    shipped = {p.name for p in (Path(__file__).parent.parent / "configs").glob("*-example.yaml")}
    assert shipped == set(EXAMPLES)


@pytest.fixture(scope="module")
def demo_seed(tmp_path_factory, one_thread):
    """A reduced `lorasoup demo` run's seed-0 folder: what the examples point at (runs/demo/seed-0)."""
    from typer.testing import CliRunner

    from lorasoup.cli import app
    from tests.conftest import TINY_DEMO

    out = tmp_path_factory.mktemp("demo") / "demo"
    args = ["demo", "--output", str(out)] + [a for item in TINY_DEMO for a in ("--set", item)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out / "seed-0"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_runs_on_the_demo_outputs(name, demo_seed, tmp_path):
    """Issue 20 (6): the shipped examples run as written after `lorasoup demo`; only the demo folder
    (a reduced run's, in a temporary directory) and the output folder are moved."""
    from typer.testing import CliRunner

    from lorasoup.cli import app

    text = (Path(__file__).parent.parent / "configs" / name).read_text()
    assert "runs/demo/seed-0/" in text
    text = text.replace("runs/demo/seed-0", str(demo_seed)).replace("output: runs/", f"output: {tmp_path}/")
    config = tmp_path / name
    config.write_text(text)
    command, *overrides = EXAMPLES[name]
    result = CliRunner().invoke(app, [command, str(config), *overrides])
    assert result.exit_code == 0, result.output
    written = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert any((p / "run.json").is_file() for p in written), written
