"""bench/user_path.py: its --tiny path on the CPU runs the real `lorasoup cat` and `lorasoup train` from
YAML and writes the JSON the GPU run will, with sane values."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"


def load(name: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))  # user_path imports cat_step from beside it
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_user_path_tiny_times_both_commands_from_their_run_json(tmp_path, monkeypatch) -> None:
    user_path = load("user_path", monkeypatch)
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "user_path.json"
    argv = ["--tiny", "--bench-step", "--work", str(tmp_path / "work"), "--out", str(out)]
    assert user_path.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "user_path" and result["device"] == "cpu"
    assert {"torch", "transformers", "peft", "accelerate", "python"} <= set(result["versions"])

    runs = {run["run"]: run for run in result["runs"]}
    assert set(runs) == {"cat-2", "train"}
    for run in runs.values():
        assert run["rc"] == 0 and "error" not in run
        assert run["steps"] == 6 and len(run["ms_all"]) == 6  # every step timed, from run.json
        assert 0 < run["ms_per_step_min"] <= run["ms_per_step_median"] <= run["ms_per_step_max"]
        assert run["ms_per_step_steady_mean"] > 0 and math.isfinite(run["last_loss"])
        assert Path(yaml_output(run["config"]), "run.json").is_file()
    assert runs["cat-2"]["compile"] == "none"  # eager on the CPU; reduce-overhead is the GPU default

    bench = {row["variant"]: row for row in result["bench"]}
    assert set(bench) == {"cat_2", "lora_train"}
    assert all(row["ms_median"] > 0 and row["losses_finite"] for row in bench.values())
    ratios = {r["run"]: r for r in result["ratios"]}
    assert ratios["cat-2"]["bench"] == "cat_2" and ratios["train"]["bench"] == "lora_train"
    for ratio in ratios.values():
        assert ratio["ratio"] == pytest.approx(ratio["command_ms"] / ratio["bench_ms"]) and ratio["ratio"] > 0
        assert isinstance(ratio["within_10_percent"], bool)


def yaml_output(config: str) -> str:
    import yaml

    return yaml.safe_load(Path(config).read_text())["output"]


def test_user_path_configs_go_through_the_commands_loaders(tmp_path, monkeypatch) -> None:
    from lorasoup.config import ConfigError

    user_path = load("user_path", monkeypatch)
    args = user_path.parse_args(["--tiny", "--ks", "2", "4", "--work", str(tmp_path)])
    configs = user_path.write_configs(args, tmp_path)
    assert set(configs) == {"cat-2", "cat-4", "train"}
    # a key the commands' loaders refuse fails here, not on the GPU
    plain = user_path.train_config

    def with_typo(args, work):
        config = plain(args, work)
        config["train"]["compile_mode"] = "reduce-overhead"
        return config

    monkeypatch.setattr(user_path, "train_config", with_typo)
    with pytest.raises(ConfigError, match=r"unknown key 'train\.compile_mode'"):
        user_path.write_configs(args, tmp_path)
