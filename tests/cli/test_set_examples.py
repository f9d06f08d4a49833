"""Every command's ``--set`` help gives an example key of that command's own config.

The help once offered ``--set train.learning_rate=0.05`` to ``eval``, ``merge``, ``search`` and
``study``, whose configs have no ``train``: a reader copying it got "unknown key".
"""

import dataclasses
import re
import types
import typing

import pytest
import typer

from lorasoup.cat.config import CatRunConfig
from lorasoup.cli import app
from lorasoup.demo import DemoSettings
from lorasoup.demo.scale import StudyConfig
from lorasoup.evaluation.config import EvalRunConfig
from lorasoup.merging.config import MergeRunConfig
from lorasoup.merging.run import CompressConfig
from lorasoup.moe.config import MoeDistillConfig, MoeRunConfig
from lorasoup.report.build import ReportConfig
from lorasoup.search.config import SearchRunConfig
from lorasoup.training.config import TrainRunConfig

CONFIGS = {
    "cat": CatRunConfig,
    "demo": DemoSettings,
    "study": StudyConfig,
    "merge": MergeRunConfig,
    "compress": CompressConfig,
    "train": TrainRunConfig,
    "eval": EvalRunConfig,
    "report": ReportConfig,
    "search": SearchRunConfig,
    "moe train": MoeRunConfig,
    "moe distill": MoeDistillConfig,
}
# Free-form mappings a config validates later against another class: the study's ``base`` holds
# DemoSettings fields.
MAPPINGS = {(StudyConfig, "base"): DemoSettings}


def commands(group, prefix=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from commands(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), command


def set_examples() -> dict[str, list[str]]:
    found = {}
    for name, command in commands(typer.main.get_command(app)):
        for param in command.params:
            if "--set" in getattr(param, "opts", ()):
                found[name] = re.findall(r"--set (\S+?)=", param.help)
    return found


def dataclass_in(annotation):
    """The dataclass an annotation names (``X``, ``X | None``), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(filter(None, map(dataclass_in, typing.get_args(annotation))), None)
    return None


def resolves(cls, key: str) -> bool:
    head, _, rest = key.partition(".")
    hints = typing.get_type_hints(cls)
    if head not in hints:
        return False
    if not rest:
        return True
    inner = MAPPINGS.get((cls, head)) or dataclass_in(hints[head])
    return inner is not None and resolves(inner, rest)


def test_every_command_with_set_is_checked():
    assert set(set_examples()) == set(CONFIGS)


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_the_set_example_is_a_key_of_the_commands_config(command):
    keys = set_examples()[command]
    assert keys, f"{command}: its --set help gives no example"
    for key in keys:
        assert resolves(CONFIGS[command], key), f"lorasoup {command} --set {key}=…: not a key of its config"


def test_the_resolver_rejects_what_the_loader_would():
    assert resolves(CatRunConfig, "train.learning_rate")
    assert not resolves(EvalRunConfig, "train.learning_rate")
    assert not resolves(StudyConfig, "base.lora_stepz") and resolves(StudyConfig, "base.lora_steps")
