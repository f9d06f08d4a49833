"""Flags reach the typed config as values: validated by the one loader, never re-parsed as text."""

from dataclasses import dataclass, field

import pytest
import yaml

from lorasoup.cli.options import load_run_config, only_if, split_commas
from lorasoup.errors import ConfigError


@dataclass
class Export:
    merge: bool = False
    rank: int | None = None


@dataclass
class Run:
    output: str
    export: Export = field(default_factory=Export)
    data: list[str] = field(default_factory=list)


def test_flags_beat_set_and_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output": "from-yaml", "export": {"rank": 2}}))
    run = load_run_config(Run, path, ["output=from-set", "export.rank=3"], {"output": "from-flag"})
    assert run.output == "from-flag" and run.export.rank == 3
    run = load_run_config(Run, path, ["export.rank=3"], {"export.merge": True, "export.rank": None})
    assert run.export == Export(merge=True, rank=3)  # None: the flag was not given


def test_set_beats_flags_where_a_command_kept_that_order(tmp_path):
    run = load_run_config(Run, None, ["output=from-set"], {"output": "from-flag"}, set_beats_flags=True)
    assert run.output == "from-set"


def test_flag_values_are_not_parsed_as_yaml():
    for text in ("123", "a: b", "runs/[x]", "true"):
        assert load_run_config(Run, None, None, {"output": text}).output == text
    assert load_run_config(Run, None, None, {"output": "o", "data": ["1", "b"]}).data == ["1", "b"]


def test_flags_meet_the_loaders_checks():
    with pytest.raises(ConfigError, match="missing required key 'output'"):
        load_run_config(Run, None, None, {})
    with pytest.raises(ConfigError, match=r"export\.rank: expected an integer"):
        load_run_config(Run, None, None, {"output": "o", "export.rank": "two"})
    with pytest.raises(ConfigError, match="unknown key 'exprt'"):
        load_run_config(Run, None, None, {"output": "o", "exprt.rank": 2})


def test_small_helpers():
    assert only_if(True) is True and only_if(False) is None
    assert split_commas(["a, b", "c", ""]) == ["a", "b", "c"] and split_commas(None) == []
