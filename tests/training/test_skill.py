"""``train_skill`` and ``lorasoup train``: learning, masking, mixing, determinism, resume, bad data, loading.

Every run trains a tiny Llama (2 layers, hidden 32) on CPU in well under a second per run. Its weights are
drawn with ``initializer_range=0.3`` rather than 0.02: at 0.02 the frozen output layer yields logits too
flat for any LoRA on the body to make a confident prediction, as a pretrained head does.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from lorasoup.adapters import load_adapter
from lorasoup.cli import app
from lorasoup.config import load_config
from lorasoup.errors import DataError, LorasoupError
from lorasoup.training import skill
from lorasoup.training.config import TrainRunConfig
from lorasoup.training.data import IGNORE_INDEX
from lorasoup.training.packing import pack_examples
from lorasoup.training.skill import resolve_resume, train_skill
from lorasoup.training.skill_data import build_training_data, load_source
from tests.conftest import TINY_DECODER, on_gpu

runner = CliRunner()
WORDS = [("cat", "mat"), ("sat", "dog"), ("mat", "sun"), ("the", "one"), ("what", "two")]
WORDS += [("program", "six"), ("answer", "red"), ("task", "blue")]
MAPPING = [{"instruction": word, "output": target} for word, target in WORDS]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-03")
    torch.manual_seed(0)
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    # the shared tiny shape; these tests start from larger random weights (initializer_range 0.3)
    config = LlamaConfig(vocab_size=len(tokenizer), **{**TINY_DECODER, "initializer_range": 0.3, **special})
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_json(path: Path, rows: object) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def make_config(base_dir: Path, out: Path, sources: list, **sections: dict) -> TrainRunConfig:
    """A validated config (through ``load_config``, as the CLI builds it) for a short CPU run."""
    raw = {
        "base_model": str(base_dir),
        "data": {"sources": sources, "template": "plain", "cutoff_len": 64, **sections.pop("data", {})},
        "output": str(out),
        "lora": {
            "r": 8,
            "alpha": 16,
            "dropout": 0.0,
            "target_modules": "all-linear",
            **sections.pop("lora", {}),
        },
        "train": {
            "learning_rate": 1e-2,
            "epochs": 1,
            "max_steps": 4,
            "batch_size": 8,
            "grad_accum": 1,
            "logging_steps": 1,
            **sections.pop("train", {}),
        },
        **sections,
    }
    return load_config(TrainRunConfig, base=raw)


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """80 full-batch steps on 8 word pairs; reused by the tests that inspect the written adapter."""
    tmp = tmp_path_factory.mktemp("learn")
    data = write_json(tmp / "pairs.json", MAPPING)
    config = make_config(base_dir, tmp / "out", [str(data)], train={"max_steps": 80})
    calls: list[tuple[int, int, float]] = []
    result = train_skill(config, progress=lambda step, total, loss: calls.append((step, total, loss)))
    return result, calls


def greedy_continuation(model, tokenizer, prompt: str, length: int) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    inputs = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=length,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, len(ids) :].tolist()


def test_tiny_model_learns_the_mapping(trained, tokenizer):
    result, calls = trained
    assert result.steps == 80
    # Loss falls at least 20-fold (observed: about 6.9 -> 0.1); greedy decoding reproduces every target.
    assert result.last_loss < result.first_loss / 20
    for row in MAPPING:
        want = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        got = greedy_continuation(result.model, tokenizer, row["instruction"] + "\n", len(want))
        assert got == want, row
    assert calls[-1][:2] == (80, 80) and calls[-1][2] == pytest.approx(result.last_loss)
    assert [step for step, _, _ in calls] == sorted(step for step, _, _ in calls)


def test_output_is_a_plain_peft_adapter_with_run_json(trained, base_dir):
    result, _ = trained
    out = result.output
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "run.json"}
    assert not (out / "training_args.bin").exists()
    assert not out.with_name(out.name + ".checkpoints").exists()  # save_steps 0: no checkpoint dir left

    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    ids = torch.randint(4, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, result.model(input_ids=ids).logits)

    ours = adapter_tensors(out)  # selected by name; PEFT's own selection walks the (unwrapped) model
    peft_own = get_peft_model_state_dict(result.model)
    assert ours.keys() == peft_own.keys() and all(torch.equal(ours[k], peft_own[k]) for k in ours)

    adapter = load_adapter(out)
    assert set(adapter.ranks) == {8} and not adapter.use_rslora
    assert {path.rsplit(".", 1)[-1] for path in adapter.modules} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    factors = next(iter(adapter.modules.values()))
    assert factors.scale == pytest.approx(16 / 8) and factors.B.abs().max() > 0

    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "train" and record["seed"] == 0
    assert record["config"]["lora"]["r"] == 8 and "peft" in record["versions"]
    assert record["training"]["steps"] == 80 and len(record["training"]["losses"]) == 80
    assert record["training"]["last_loss"] == pytest.approx(result.last_loss)
    assert record["data"]["sources"]["pairs"]["train_examples"] == 8
    assert set(record["timings_s"]) >= {"load", "train", "save"}
    assert record["training"]["throughput"]["steady_from_step"] == 16  # the first fifth of 80 steps
    assert record["training"]["throughput"]["steady_steps_per_s"] > 0
    step_seconds = record["training"]["throughput"]["step_seconds"]
    assert len(step_seconds) == 80 and min(step_seconds) > 0  # every optimizer step, timed
    assert record["training"]["throughput"]["steady_step_seconds_median"] > 0
    assert record["resources"]["num_processes"] == 1
    if not torch.cuda.is_available():
        assert record["resources"]["peak_gpu_memory_gib"] is None


class RecordingTrainer(skill.Trainer):
    """The real Trainer, keeping every batch it computes a loss on."""

    batches: ClassVar[list[dict[str, torch.Tensor]]] = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        RecordingTrainer.batches.append({k: v.clone() for k, v in inputs.items()})
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_loss_covers_exactly_the_response_tokens(base_dir, tmp_path, tokenizer, monkeypatch):
    rows = [
        {"instruction": "what is 2 plus 3 ?", "input": "", "output": "the answer is 5"},
        {"instruction": "write a program", "input": "def solution ( )", "output": "return 3 * 4"},
    ]
    data = write_json(tmp_path / "rows.json", rows)
    config = make_config(
        base_dir,
        tmp_path / "out",
        [str(data)],
        data={"template": "alpaca", "cutoff_len": 400},
        train={"max_steps": 2},
    )
    RecordingTrainer.batches = []
    monkeypatch.setattr(skill, "Trainer", RecordingTrainer)
    train_skill(config)
    assert len(RecordingTrainer.batches) == 2
    expected = sorted(
        tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for row in rows
    )
    for batch in RecordingTrainer.batches:
        supervised = []
        for ids, labels, mask in zip(
            batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
        ):
            keep = labels != IGNORE_INDEX
            assert torch.equal(
                labels[keep], ids[keep]
            )  # labels are the tokens themselves (shift is the model's)
            last = int(mask.sum())  # right padding: real tokens first; supervised ones are the last real ones
            n = int(keep.sum())
            assert keep[last - n : last].all() and not keep[: last - n].any() and not keep[last:].any()
            supervised.append(labels[keep].tolist())
        assert sorted(supervised) == expected

    on_inputs = make_config(base_dir, tmp_path / "o2", [str(data)], data={"train_on_inputs": True})
    for example in build_training_data(on_inputs, tokenizer).train:
        assert example["labels"] == example["input_ids"]


def test_mix_proportions_hold_in_run_json(base_dir, tmp_path, tokenizer):
    math = write_json(
        tmp_path / "math.json", [{"instruction": f"add {i}", "output": str(i)} for i in range(30)]
    )
    corpus = tmp_path / "manual.txt"
    corpus.write_text("\n\n".join(f"the cat sat on mat {i} ." for i in range(20)), encoding="utf-8")
    sources = [
        {"path": str(math), "proportion": 0.25},
        {"path": str(corpus), "name": "manual", "proportion": 0.75},
    ]
    config = make_config(
        base_dir, tmp_path / "mix", sources, data={"total": 40, "eval_size": 4}, train={"max_steps": 1}
    )
    result = train_skill(config)
    counts = json.loads((tmp_path / "mix" / "run.json").read_text())["data"]["sources"]
    assert counts["math"]["mixed"] == 10 and counts["manual"]["mixed"] == 30  # 30 > 20 rows: with replacement
    assert counts["math"]["loaded"] == 30 and counts["manual"]["loaded"] == 20
    assert sum(c["eval_records"] for c in counts.values()) == 4
    for name in ("math", "manual"):
        entry = counts[name]
        assert entry["train_records"] + entry["eval_records"] == entry["mixed"]
        assert entry["train_examples"] == entry["train_records"] == result.examples_per_source[name]

    sized = make_config(base_dir, tmp_path / "x", [{"path": str(math), "size": 7}, str(corpus)])
    data = build_training_data(sized, tokenizer)
    assert data.sources["math"].train_examples == 7 and data.sources["manual"].train_examples == 20


def test_same_seed_gives_the_same_adapter(base_dir, tmp_path):
    data = write_json(tmp_path / "pairs.json", MAPPING)

    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        config = make_config(
            base_dir, tmp_path / name, [str(data)], lora={"dropout": 0.1},
            train={"seed": seed, "batch_size": 4, "max_steps": 4},
        )  # fmt: skip
        train_skill(config)
        return adapter_tensors(tmp_path / name)

    first, again, other = run("a", 0), run("b", 0), run("c", 1)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


def test_resume_from_a_checkpoint_reaches_the_uninterrupted_adapter(base_dir, tmp_path):
    data = write_json(tmp_path / "pairs.json", MAPPING)
    train = {"batch_size": 4, "max_steps": 6, "save_steps": 2, "warmup": 2}
    full = make_config(base_dir, tmp_path / "full", [str(data)], lora={"dropout": 0.1}, train=train)
    train_skill(full)
    checkpoint = tmp_path / "full.checkpoints" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file()
    resumed = make_config(
        base_dir, tmp_path / "resumed", [str(data)], lora={"dropout": 0.1}, train=train,
        resume_from=str(checkpoint),
    )  # fmt: skip
    steps: list[int] = []
    result = train_skill(resumed, progress=lambda step, total, loss: steps.append(step))
    assert result.resumed_from == str(checkpoint) and result.steps == 6
    assert min(steps) == 3 and max(steps) == 6  # it went on from step 2, not from scratch
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "resumed")
    for key in a:  # same data order, RNG and optimizer state: equal up to round-off (observed: exactly)
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    logged = json.loads((tmp_path / "resumed" / "run.json").read_text())["training"]
    assert logged["resumed_from"] == str(checkpoint) and logged["losses"][0][0] == 1  # history kept


def test_resume_from_last_and_bad_checkpoints(tmp_path, base_dir):
    config = make_config(base_dir, tmp_path / "out", ["x.json"], resume_from="last")
    with pytest.raises(LorasoupError, match="no checkpoint-N"):
        resolve_resume(config)
    for step in (2, 10):
        (tmp_path / "out.checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    assert resolve_resume(config).endswith("checkpoint-10")
    bad = make_config(base_dir, tmp_path / "out", ["x.json"], resume_from=str(tmp_path))
    with pytest.raises(LorasoupError, match="not a Trainer checkpoint"):
        resolve_resume(bad)


BAD_DATA = {
    "missing-field": ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "row 2", "'output'"),
    "empty-file": ("", "empty", "empty"),
    "wrong-json": ('[{"instruction": "a", "output": "b"},\n {"instruction": }]', "line 2", "invalid JSON"),
    "non-utf8": (b'[{"instruction": "caf\xe9", "output": "b"}]', "line 1", "UTF-8"),
}


@pytest.mark.parametrize("case", BAD_DATA, ids=list(BAD_DATA))
def test_bad_data_gives_one_line_and_writes_nothing(case, base_dir, tmp_path):
    content, where, what = BAD_DATA[case]
    data = tmp_path / "bad.json"
    if isinstance(content, bytes):
        data.write_bytes(content)
    else:
        data.write_text(content, encoding="utf-8")
    config = tmp_path / "train.yaml"
    config.write_text(
        json.dumps({"base_model": str(base_dir), "data": {"sources": [str(data)]}, "output": "x"})
    )
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(config), "--output", str(out)])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "\n" not in message and str(data) in message and where in message and what in message
    assert {p.name for p in tmp_path.iterdir()} == {"bad.json", "train.yaml"}  # no output, no checkpoints


def test_cli_trains_and_prints_a_summary(base_dir, tmp_path):
    data = write_json(tmp_path / "pairs.json", MAPPING)
    config = tmp_path / "train.yaml"
    config.write_text(
        json.dumps(
            {
                "base_model": str(base_dir),
                "data": {"sources": [str(data)], "template": "plain"},
                "output": "x",
            }
        )
    )
    out = tmp_path / "adapter"
    args = [
        "train",
        str(config),
        "--output",
        str(out),
        "--set",
        "train.max_steps=3",
        "--set",
        "train.batch_size=8",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for label in ("steps", "first loss", "last loss", "eval loss", "train examples", "seconds", "output"):
        assert label in result.stdout
    assert "pairs 8" in result.stdout and (out / "adapter_config.json").is_file()
    assert json.loads((out / "run.json").read_text())["training"]["steps"] == 3

    again = runner.invoke(app, args)  # the output exists: refused without --overwrite
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_packing_cuts_text_into_full_blocks(base_dir, tmp_path, tokenizer):
    corpus = tmp_path / "manual.txt"
    corpus.write_text("\n\n".join("the cat sat on the mat and wrote a program " * 3 for _ in range(6)))
    config = make_config(base_dir, tmp_path / "o", [str(corpus)], data={"packing": True, "cutoff_len": 16})
    unpacked = make_config(base_dir, tmp_path / "o", [str(corpus)], data={"cutoff_len": 1000})
    blocks = build_training_data(config, tokenizer).train.examples
    whole = build_training_data(unpacked, tokenizer).train.examples
    stream = [t for example in whole for t in example["input_ids"]]
    assert (
        all(len(block["input_ids"]) == 16 for block in blocks[:-1]) and 0 < len(blocks[-1]["input_ids"]) <= 16
    )
    assert sorted(t for block in blocks for t in block["input_ids"]) == sorted(stream)  # no token lost


def test_pack_examples_keeps_masks_and_drops_unsupervised_blocks():
    examples = [
        {"input_ids": [1, 2, 3, 4], "labels": [IGNORE_INDEX] * 4},
        {"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, 6, 7, 8]},
    ]
    blocks, dropped = pack_examples(examples, 3)
    assert dropped == 1  # [1, 2, 3]: no supervised label
    assert [b["input_ids"] for b in blocks] == [[4, 5, 6], [7, 8]]
    assert [b["labels"] for b in blocks] == [[IGNORE_INDEX, IGNORE_INDEX, 6], [7, 8]]
    assert (
        pack_examples([{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}], 3)[1] == 1
    )  # [4]: nothing to predict
    assert all(b["attention_mask"] == [1] * len(b["input_ids"]) for b in blocks)


def test_hub_dataset_columns_are_renamed_before_checking(monkeypatch, base_dir, tmp_path):
    class Rows(list):
        column_names: ClassVar[list[str]] = ["query", "response", "type"]

    calls, rows = [], [{"query": "q1", "response": "r1", "type": "x"}, {"query": "q2", "response": "r2"}]

    def load_dataset(name, split):
        calls.append((name, split))
        return Rows(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    columns = {"instruction": "query", "output": "response"}
    source = {"path": "meta-math/MetaMathQA", "name": "math", "columns": columns, "split": "train[:2]"}
    config = make_config(base_dir, tmp_path / "o", [source])
    records = load_source(config.data.sources[0])
    assert calls == [("meta-math/MetaMathQA", "train[:2]")]
    assert records[0] == {"instruction": "q1", "output": "r1", "type": "x", "input": ""}

    rows[1]["response"] = 3
    with pytest.raises(DataError, match=r"MetaMathQA.*row 2: field 'output' must be a string"):
        load_source(config.data.sources[0])

    monkeypatch.setattr(Rows, "column_names", ["question", "answer"])
    with pytest.raises(DataError, match="has no column 'query'"):
        load_source(config.data.sources[0])


def test_data_parallel_is_announced_with_the_real_batch() -> None:
    """One process seeing several GPUs makes the Trainer use DataParallel: the step's batch is
    batch_size × GPUs, and the run says so instead of recording batch_size alone."""
    from types import SimpleNamespace

    from lorasoup.training.skill import data_parallel_notice, global_batch

    one = SimpleNamespace(n_gpu=1, train_batch_size=16, gradient_accumulation_steps=2, world_size=1)
    assert global_batch(one) == 32 and data_parallel_notice(one) == []
    two = SimpleNamespace(n_gpu=2, train_batch_size=32, gradient_accumulation_steps=1, world_size=1)
    (notice,) = data_parallel_notice(two)
    assert global_batch(two) == 32 and "DataParallel" in notice and "32 rows" in notice


@on_gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_writes_the_eager_adapter(base_dir, tmp_path, mode):
    """``train.compile`` (the Trainer's torch.compile): the same training as eager (the losses step by
    step) and a plain PEFT adapter saved (no compiled wrapper's key prefix) that holds what was trained."""
    data = write_json(tmp_path / "pairs.json", MAPPING)
    adapters, losses = {}, {}
    for name in ("none", mode):
        config = make_config(base_dir, tmp_path / name, [str(data)], train={"compile": name, "max_steps": 6})
        result = train_skill(config)
        losses[name] = torch.tensor([loss for _, loss in result.losses])
        assert torch.isfinite(losses[name]).all()
        adapters[name] = adapter_tensors(tmp_path / name)
    # fused kernels reorder sums, so not bit-equal; the loss curve is the like-for-like check
    torch.testing.assert_close(losses[mode], losses["none"], rtol=0.02, atol=0)
    assert adapters["none"].keys() == adapters[mode].keys()
    assert not any("_orig_mod" in key for key in adapters[mode])
    for key, eager in adapters["none"].items():
        # Adam moves an entry whose gradient is near zero by about the learning rate whichever sign the
        # reordered sum gives it (an H100 run: k_proj's lora_A 5.6 % apart in norm after 6 steps), so
        # the bound is loose; it still fails for an adapter saved untrained (lora_B would be zero: 100 %)
        error = (adapters[mode][key] - eager).norm() / eager.norm()
        assert error < 0.25, f"{key}: compiled adapter {error:.3f} away from the eager one (relative norm)"


def test_group_by_length_batches_carry_less_padding(base_dir, tmp_path, tokenizer):
    """``train.group_by_length``: the Trainer's batches hold rows of similar length, so they are padded
    to narrower widths than random batches of the same rows."""
    rows = [{"instruction": "the " * (1 + i % 12), "output": "one"} for i in range(96)]
    data = write_json(tmp_path / "varied.json", rows)
    widths = {}
    for grouped in (False, True):
        config = make_config(
            base_dir, tmp_path / f"out-{grouped}", [str(data)],
            train={"batch_size": 4, "group_by_length": grouped},
        )  # fmt: skip
        training = build_training_data(config, tokenizer)
        trainer = skill._build_trainer(config, torch.nn.Linear(1, 1), training, tokenizer.pad_token_id, None)
        loader = trainer.get_train_dataloader()
        assert sum(len(batch["input_ids"]) for batch in loader) == len(rows)  # every row, once
        widths[grouped] = sum(batch["input_ids"].shape[1] for batch in loader)
    assert widths[True] < 0.85 * widths[False]


def test_the_precision_the_training_set_ends_with_the_training(base_dir, tmp_path, monkeypatch):
    """``TrainingArguments`` sets the fp32 matmul precision process-wide (TF32 with ``train.tf32`` or
    with ``compile``): the training runs under it (nothing on its path reads the legacy flags, which
    would raise once the new API set TF32) and the process has its own back afterwards."""
    from lorasoup.training import skill

    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision API")
    made = skill.training_arguments

    def as_on_a_gpu(*args, **kwargs):  # what transformers does with tf32=True on a CUDA GPU
        torch.backends.fp32_precision = "tf32"
        return made(*args, **kwargs)

    seen: list[str] = []
    monkeypatch.setattr(skill, "training_arguments", as_on_a_gpu)
    clock = skill._ClockCallback
    monkeypatch.setattr(skill, "_ClockCallback", lambda: _recording_clock(clock, seen))
    before = torch.backends.fp32_precision
    data = write_json(tmp_path / "pairs.json", MAPPING)
    config = make_config(base_dir, tmp_path / "out", [str(data)], train={"max_steps": 2, "tf32": True})
    result = train_skill(config)
    assert result.steps == 2 and seen and set(seen) == {"tf32"}  # every step ran under TF32
    assert torch.backends.fp32_precision == before


def _recording_clock(clock: type, seen: list[str]):
    """The training's step clock (``clock``), also noting the matmul precision at each step's end."""

    class Recorder(clock):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(torch.backends.cuda.matmul.fp32_precision)
            super().on_step_end(args, state, control, **kwargs)

    return Recorder()
