"""``lorasoup demo --model PATH``: the real-model study on a model other than SmolLM2 (issue 18), and
the one-line refusal of ``template: chat`` for a base model without a chat template (Gemma-3-270M's
GGUF carries none), before the model is dequantised and converted."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorasoup.cli import app
from lorasoup.demo import demo_choice
from lorasoup.demo.real_study import model_title
from lorasoup.errors import ConfigError
from tests.demo.test_benchmark_file import tricky


def test_a_model_path_picks_the_real_study_on_that_model(llama_dir: Path) -> None:
    assert demo_choice("tiny") == ("tiny", {}) and demo_choice("smollm2") == ("smollm2", {})
    assert demo_choice(str(llama_dir)) == ("real", {"model": str(llama_dir.resolve())})
    with pytest.raises(ConfigError, match="tiny, smollm2 or a model: 'smollm3' is not a model"):
        demo_choice("smollm3")
    assert model_title(str(llama_dir)) == llama_dir.name
    assert model_title("smollm2-135m") == "SmolLM2-135M-Instruct"


def test_a_base_model_without_chat_template_fails_in_one_line_before_conversion(
    tmp_path: Path, llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def convert(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded before the template was checked")

    monkeypatch.setattr("lorasoup.models.load_base_model", convert)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["demo", "--model", str(llama_dir), "--output", str(out)])
    assert result.exit_code == 2, result.output
    error = result.output.strip().splitlines()[-1]  # after the progress line of the conversion stage
    assert error.startswith("error:") and "no chat template" in error and "--set template=plain" in error
    assert "Traceback" not in result.output
    assert not out.exists()


def test_the_model_flag_and_a_model_setting_conflict(tmp_path: Path, llama_dir: Path) -> None:
    args = ["demo", "--model", str(llama_dir), "--set", "model=smollm2-135m", "--output", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "drop --set model=smollm2-135m" in result.output


def test_save_benchmark_takes_a_model_path(
    tmp_path: Path, llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lorasoup.demo.real_study.build_real_benchmark", lambda seed, *a, **k: tricky(seed))
    path = tmp_path / "b.json.gz"
    args = ["demo", "--model", str(llama_dir), "--set", "template=plain", "--save-benchmark", str(path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert path.is_file()
