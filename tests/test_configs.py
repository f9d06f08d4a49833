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
