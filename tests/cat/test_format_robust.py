"""Format-robust CAT end to end: every format is trained on (counted), seeded, default path untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorasoup.cat.config import CatRunConfig
from lorasoup.cat.run import run_cat
from lorasoup.cli import app
from lorasoup.config import load_config

RECORDS = [
    {"instruction": f"what is {a} plus {b} ?", "input": "", "output": f"the answer is {a + b}"}
    for a in range(5)
    for b in range(4)
]
FORMATS = [
    "plain",
    "fmt2",
    {"name": "qa", "prompt": "Q: {instruction}\n{input}\nA: ", "prompt_no_input": "Q: {instruction}\nA: "},
    {"name": "shout", "casing": "upper", "separator": " = ", "joiner": " | ", "response_label": "result"},
]


@pytest.fixture
def setup(make_lora, llama_dir, tmp_path):
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(RECORDS))
    adapters = [
        {"path": str(make_lora("math", r=4, seed=1)), "name": "math"},
        {"path": str(make_lora("code", r=2, alpha=4, seed=2, targets=["q_proj", "v_proj"])), "name": "code"},
    ]

    def config(name: str, **data_options) -> dict:
        return {
            "base_model": str(llama_dir),
            "adapters": adapters,
            "data": {"train": [str(data)], "cutoff_len": 64, **data_options},
            "output": str(tmp_path / name),
            "train": {"learning_rate": 0.1, "max_steps": 4, "batch_size": 5, "seed": 2, "device": "cpu"},
        }

    return config


def run(config: dict):
    return run_cat(load_config(CatRunConfig, base=config))


def learned(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def test_every_format_is_trained_on_counted_and_seeded(setup, tmp_path):
    config = setup("robust", formats=FORMATS, format_seed=7)
    path = tmp_path / "cat.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["cat", str(path)])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "robust" / "run.json").read_text())
    formats = record["training"]["formats"]
    assert formats["pool"] == ["plain", "fmt2", "qa", "shout"] and formats["seed"] == 7
    assert formats["examples"] == dict.fromkeys(formats["pool"], 5)  # 20 records dealt to 4 formats
    assert sum(formats["examples"].values()) == record["training"]["examples"] == 20
    assert record["config"]["data"]["formats"][2]["prompt"] == FORMATS[2]["prompt"]

    again = run(setup("again", formats=FORMATS, format_seed=7))
    assert again.formats.examples == formats["examples"]
    first, second = learned(tmp_path / "robust"), learned(tmp_path / "again")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (
        json.loads((tmp_path / "robust" / "cat_weights.json").read_text())["weights"]
        == json.loads((tmp_path / "again" / "cat_weights.json").read_text())["weights"]
    )

    other = run(setup("other", formats=FORMATS, format_seed=8))
    assert not torch.equal(other.composition.weights.theta.detach(), again.composition.weights.theta.detach())


def test_default_path_is_unchanged_and_a_pool_of_one_matches_it(setup, tmp_path):
    default = run(setup("default", template="plain"))
    pooled = run(setup("pooled", formats=["plain"]))
    assert default.formats is None
    assert "formats" not in json.loads((tmp_path / "default" / "run.json").read_text())["training"]
    assert pooled.formats.examples == {"plain": 20}
    assert torch.equal(default.composition.weights.theta.detach(), pooled.composition.weights.theta.detach())
    assert default.fit.losses == pooled.fit.losses
