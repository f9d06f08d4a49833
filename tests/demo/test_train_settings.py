"""The studies' settings reach the training config of every LoRA they train (demo.methods.train_lora)."""

from __future__ import annotations

import pytest

from lorasoup.demo.methods import train_lora
from lorasoup.demo.real_study import RealDemoSettings
from lorasoup.demo.settings import DemoSettings


@pytest.mark.parametrize(
    ("settings", "expected"),
    [(RealDemoSettings(tf32=True), True), (RealDemoSettings(), None), (DemoSettings(), None)],
)
def test_tf32_reaches_the_training_of_the_real_study_only(settings, expected, tmp_path, monkeypatch) -> None:
    from lorasoup.training import skill

    configs = []
    monkeypatch.setattr(skill, "train_skill", lambda config, progress=None: configs.append(config))
    sources = [("math", str(tmp_path / "math.json"), None)]
    train_lora(tmp_path / "base", sources, tmp_path / "out", settings, seed=0)
    (config,) = configs
    assert config.train.tf32 is expected
    assert config.train.max_steps == settings.lora_steps  # one source: the study's own step count
