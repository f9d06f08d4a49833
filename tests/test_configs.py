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
