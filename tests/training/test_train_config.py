"""``TrainRunConfig``: shipped configs load, the paper's hyper-parameters hold, bad values fail at load."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

from lorasoup.config import load_config
from lorasoup.errors import ConfigError
from lorasoup.training.config import TrainRunConfig
from lorasoup.training.skill import lora_config, training_arguments

CONFIGS = Path(__file__).parents[2] / "configs"
TRAIN_CONFIGS = [*sorted((CONFIGS / "paper").glob("*.yaml")), CONFIGS / "train-example.yaml"]
PAPER_SKILLS = {"skill-math.yaml": "meta-math/MetaMathQA", "skill-code.yaml": "sahil2801/CodeAlpaca-20k"}


def test_there_are_shipped_train_configs():
    names = {path.name for path in TRAIN_CONFIGS}
    assert {"skill-math.yaml", "skill-code.yaml", "datamix-math-code.yaml", "train-example.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_train_config_loads(path):
    config = load_config(TrainRunConfig, path)
    assert config.data.sources and config.output
    lora_config(config.lora)  # PEFT accepts the LoRA section as written


@pytest.mark.parametrize("name", sorted(PAPER_SKILLS))
def test_paper_math_and_code_skills_use_the_papers_recipe(name):
    config = load_config(TrainRunConfig, CONFIGS / "paper" / name)
    assert [source.path for source in config.data.sources] == [PAPER_SKILLS[name]]
    assert config.base_model == "yahma/llama-7b-hf"
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (32, 64, 0.05)
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    t = config.train
    assert (t.learning_rate, t.epochs, t.batch_size * t.grad_accum, t.warmup) == (3e-4, 3, 16, 100)
    assert config.data.cutoff_len == 256 and config.data.template == "alpaca" and config.data.eval_size == 120


def test_datamix_config_mixes_both_paper_skills():
    mix = load_config(TrainRunConfig, CONFIGS / "paper" / "datamix-math-code.yaml")
    math = load_config(TrainRunConfig, CONFIGS / "paper" / "skill-math.yaml")
    assert [s.label for s in mix.data.sources] == ["math", "code"] and mix.data.is_mix
    assert (mix.lora, mix.train) == (math.lora, math.train)  # same recipe as the skill LoRAs


@pytest.mark.parametrize("name", ["ddp-2gpu.yaml", "fsdp-2gpu.yaml"])
def test_accelerate_configs_parse(name):
    config = ClusterConfig.from_yaml_file(str(CONFIGS / "accelerate" / name))
    assert config.num_processes == 2
    expected = DistributedType.FSDP if name.startswith("fsdp") else DistributedType.MULTI_GPU
    assert config.distributed_type == expected
    if expected == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_version"] == 2  # FSDP1's wrapper names hide LoRA weights from PEFT


BASE = {"base_model": "some/model", "data": {"sources": ["train.json"]}, "output": "out"}


def test_minimal_config_defaults_and_overrides():
    config = load_config(TrainRunConfig, base=BASE, overrides=["train.learning_rate=1e-3", "lora.r=4"])
    assert config.train.learning_rate == 1e-3 and config.lora.r == 4
    assert config.data.template == "alpaca" and not config.data.train_on_inputs
    source = config.data.sources[0]
    assert (source.path, source.label, source.size, source.proportion) == ("train.json", "train", None, None)
    assert config.checkpoint_dir == Path("out.checkpoints")
    args = training_arguments(config, has_eval=False, quiet=True)
    assert args.report_to in ([], ["none"], "none") and args.disable_tqdm and args.seed == 0


@pytest.mark.parametrize(
    ("mode", "expected"), [("none", None), ("default", "default"), ("reduce-overhead", "reduce-overhead")]
)
def test_train_compile_reaches_the_trainer(mode, expected):
    config = load_config(TrainRunConfig, base=BASE, overrides=[f"train.compile={mode}"])
    args = training_arguments(config, has_eval=False, quiet=True)
    assert args.torch_compile == (expected is not None)
    if expected is not None:  # the Trainer's own default mode is "default" when None is passed
        assert args.torch_compile_mode in ((None, "default") if expected == "default" else (expected,))


def test_group_by_length_reaches_the_trainer():
    plain = training_arguments(load_config(TrainRunConfig, base=BASE), has_eval=False, quiet=True)
    grouped = load_config(TrainRunConfig, base=BASE, overrides=["train.group_by_length=true"])
    args = training_arguments(grouped, has_eval=False, quiet=True)

    def strategy(a) -> str:  # transformers 5: train_sampling_strategy; 4.x: group_by_length
        named = getattr(a, "train_sampling_strategy", None)
        return named or ("group_by_length" if getattr(a, "group_by_length", False) else "random")

    assert (strategy(plain), strategy(args)) == ("random", "group_by_length")


def test_warmup_is_steps_or_a_fraction():
    steps = load_config(TrainRunConfig, base=BASE, overrides=["train.warmup=100"])
    ratio = load_config(TrainRunConfig, base=BASE, overrides=["train.warmup=0.1"])
    assert steps.train.warmup == 100 and isinstance(steps.train.warmup, int)
    assert ratio.train.warmup == 0.1 and isinstance(ratio.train.warmup, float)


def test_hub_source_with_columns():
    raw = {
        **BASE,
        "data": {"sources": [{"path": "meta-math/MetaMathQA", "columns": {"instruction": "query"}}]},
    }
    source = load_config(TrainRunConfig, base=raw).data.sources[0]
    assert source.label == "meta-math/MetaMathQA" and source.columns.mapping() == {"query": "instruction"}


BAD = {
    "unknown key": (["train.lerning_rate=1"], "did you mean 'learning_rate'"),
    "size and proportion": (["data.sources=[{path: a.json, size: 2, proportion: 0.5}]"], "not both"),
    "proportion without total": (["data.sources=[{path: a.json, proportion: 0.5}]"], "data.total"),
    "proportions over 1": (
        ["data.total=10", "data.sources=[{path: a.json, proportion: 0.7}, {path: b.json, proportion: 0.7}]"],
        "sum to 1.4",
    ),
    "duplicate names": (["data.sources=[a/x.json, b/x.json]"], "unique"),
    "unknown template": (["data.template=alpacca"], "alpaca"),
    "columns on a file": (["data.sources=[{path: a.json, columns: {instruction: q}}]"], "hub datasets only"),
    "empty columns": (["data.sources=[{path: o/n, columns: {}}]"], "at least one"),
    "no sources": (["data.sources=[]"], "at least one dataset"),
    "bad eval fraction": (["data.eval_size=1.5"], "eval_size"),
    "bad warmup": (["train.warmup=1.5"], "integer for steps"),
    "bad target string": (["lora.target_modules=all"], "all-linear"),
    "bad dtype": (["train.dtype=fp8"], "float32"),
    "bad compile": (["train.compile=fast"], "reduce-overhead"),
    "best without eval": (
        ["train.load_best_at_end=true", "train.eval_steps=10", "train.save_steps=20"],
        "eval_size",
    ),
    "best misaligned": (
        ["train.load_best_at_end=true", "train.eval_steps=10", "train.save_steps=15", "data.eval_size=5"],
        "multiple of eval_steps",
    ),
    "zero rank": (["lora.r=0"], "lora.r"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_values_fail_at_load_with_one_line(case):
    overrides, needle = BAD[case]
    with pytest.raises(ConfigError) as info:
        load_config(TrainRunConfig, base=BASE, overrides=overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message


@pytest.mark.parametrize("value", ["true", "false", "null"])
def test_tf32_reaches_the_trainer_only_where_it_trains_on_cuda(value, monkeypatch):
    """``train.tf32`` is transformers' ``tf32`` when the run trains on a CUDA GPU; on a CPU, where
    transformers refuses it, it is left out (the same YAML works on both machines)."""
    import transformers.training_args as hf_args

    from lorasoup.training import skill

    config = load_config(TrainRunConfig, base=BASE, overrides=[f"train.tf32={value}"])
    monkeypatch.setattr(skill, "cuda_available", lambda: False)
    assert training_arguments(config, has_eval=False, quiet=True).tf32 is None  # CPU: not passed
    passed: dict = {}
    monkeypatch.setattr(skill, "cuda_available", lambda: True)
    monkeypatch.setattr(skill, "TrainingArguments", lambda **kwargs: passed.update(kwargs) or hf_args)
    training_arguments(config, has_eval=False, quiet=True)
    assert passed.get("tf32", "absent") == {"true": True, "false": False, "null": "absent"}[value]
