"""The ``lorasoup train`` config: base model, data (one skill or a DATA-MIX), LoRA, training schedule.

One config trains one LoRA. A skill LoRA names one data source; the DATA-MIX baseline of the LoRA Soups
paper (https://arxiv.org/abs/2410.13025) names several, each with an optional ``size`` (records) or
``proportion`` (share of ``data.total``), mixed reproducibly by :func:`lorasoup.training.data.mix_records`.
See ``configs/train-example.yaml`` and ``configs/paper/``.

Defaults and why:
- ``data.template: alpaca``: the paper's prompt. Raw-text corpora (``.txt``) bypass templates.
- ``data.train_on_inputs: false``: loss on response tokens only. The paper's code supervised the whole
  sequence; ``configs/paper/`` sets ``true`` to reproduce it.
- ``lora``: r=8, alpha=16, dropout 0.05 and PEFT's per-architecture default targets when none are given.
  The paper used r=32, alpha=64 on q/k/v/up/down (its configs say so).
- ``train.optim: adamw_torch`` (the paper's), seeded by ``train.seed``; ``train.warmup`` is a step count
  (int) or a fraction of all steps (float in [0, 1)), as the Trainer's ``warmup_steps`` takes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lorasoup.config import require
from lorasoup.options import COMPILE_MODES, CompileMode, check_schedule

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class Columns:
    """Which column of a hub dataset holds each record field, e.g. MetaMathQA's ``query``/``response``.

    Only for hub datasets: local files must already use ``instruction``/``input``/``output`` or ``text``.
    """

    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    text: str | None = None

    def mapping(self) -> dict[str, str]:
        """``{source column: record field}`` for the fields that are renamed."""
        named = {
            "instruction": self.instruction,
            "input": self.input,
            "output": self.output,
            "text": self.text,
        }
        return {column: record_field for record_field, column in named.items() if column is not None}

    def validate(self) -> None:
        columns = [c for c in (self.instruction, self.input, self.output, self.text) if c is not None]
        require(bool(columns), "columns: name at least one of instruction, input, output, text")
        require(len(set(columns)) == len(columns), f"columns: each column may be used once, got {columns}")


@dataclass
class DataSource:
    """One dataset: a ``.json``/``.jsonl``/``.txt`` file or a hub dataset id, and its share of a mix.

    A bare string in YAML is a source with only ``path``. ``size`` (records, sampled without replacement
    when it fits, with replacement beyond) and ``proportion`` (of ``data.total``) are exclusive; a source
    with neither contributes all of its records.
    """

    path: str
    name: str | None = None
    size: int | None = None
    proportion: float | None = None
    split: str = "train"
    columns: Columns | None = None

    @classmethod
    def from_value(cls, value: Any, where: str) -> DataSource:
        from lorasoup.config import ConfigError

        if isinstance(value, str) and value:
            return cls(path=value)
        raise ConfigError(f"{where}: expected a dataset path or a mapping with 'path', got {value!r}")

    @property
    def label(self) -> str:
        """The source's name in reports and ``run.json``: ``name``, else the file stem or hub id."""
        if self.name:
            return self.name
        path = Path(self.path)
        return path.stem if path.suffix else self.path

    def validate(self) -> None:
        require(
            self.size is None or self.proportion is None,
            f"data source {self.label!r}: give size or proportion, not both",
        )
        require(self.size is None or self.size >= 1, f"data source {self.label!r}: size must be >= 1")
        require(
            self.proportion is None or 0 < self.proportion <= 1,
            f"data source {self.label!r}: proportion must be in (0, 1], got {self.proportion}",
        )
        require(
            self.columns is None or Path(self.path).suffix.lower() not in (".json", ".jsonl", ".txt"),
            f"data source {self.label!r}: columns applies to hub datasets only; rename the fields of "
            f"{self.path} to instruction/input/output (or text)",
        )


@dataclass
class DataOptions:
    """The training set: sources (mixed when several), template, tokenisation, held-out split."""

    sources: list[DataSource] = field(default_factory=list)
    total: int | None = None
    template: str = "alpaca"
    cutoff_len: int = 256
    train_on_inputs: bool = False
    add_eos: bool = True
    packing: bool = False
    eval_size: int | float = 0

    def validate(self) -> None:
        from lorasoup.training.templates import TEMPLATES

        require(bool(self.sources), "data.sources: list at least one dataset (a file or a hub dataset id)")
        labels = [source.label for source in self.sources]
        require(
            len(set(labels)) == len(labels),
            f"data.sources: names must be unique, got {labels}; give each source a distinct 'name'",
        )
        shares = [s.proportion for s in self.sources if s.proportion is not None]
        require(
            not shares or self.total is not None,
            "data.total: sources given by proportion need the size of the whole mix (data.total)",
        )
        require(self.total is None or self.total >= 1, f"data.total must be >= 1, got {self.total}")
        require(sum(shares) <= 1 + 1e-9, f"data.sources: proportions sum to {sum(shares):.6g} > 1")
        TEMPLATES.get(self.template)  # unknown names fail here, listing the valid ones
        require(self.cutoff_len >= 8, f"data.cutoff_len must be at least 8 tokens, got {self.cutoff_len}")
        if isinstance(self.eval_size, float):
            require(
                0 < self.eval_size < 1,
                f"data.eval_size as a fraction must be in (0, 1), got {self.eval_size}",
            )
        else:
            require(self.eval_size >= 0, f"data.eval_size must be >= 0 records, got {self.eval_size}")

    @property
    def is_mix(self) -> bool:
        return len(self.sources) > 1


@dataclass
class LoraOptions:
    """PEFT ``LoraConfig`` fields, under PEFT's names where they differ from plain words."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str | None = None
    use_rslora: bool = False

    def validate(self) -> None:
        require(self.r >= 1, f"lora.r must be >= 1, got {self.r}")
        require(self.alpha > 0, f"lora.alpha must be positive, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str):
            require(
                self.target_modules == "all-linear",
                f"lora.target_modules: a list of module names or 'all-linear', got {self.target_modules!r}",
            )
        elif self.target_modules is not None:
            require(
                bool(self.target_modules),
                "lora.target_modules: the list is empty; omit it for PEFT's default",
            )


@dataclass
class TrainOptions:
    """Trainer settings. ``batch_size`` is per device; the effective batch is batch × grad_accum × devices."""

    learning_rate: float = 3e-4
    epochs: float = 3
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 4
    warmup: int | float = 0
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    optim: Literal["adamw_torch", "adamw_torch_fused", "sgd", "adafactor"] = "adamw_torch"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    data_seed: int | None = None
    dtype: Dtype = "float32"
    gradient_checkpointing: bool = False
    save_steps: int = 0
    save_total_limit: int | None = None
    eval_steps: int = 0
    load_best_at_end: bool = False
    logging_steps: int = 10
    use_cpu: bool = False
    # Batches of rows of similar length (the Trainer's LengthGroupedSampler: shuffled groups of 50
    # batches, sorted by length inside a group): less padding, so fewer FLOPs where lengths vary.
    group_by_length: bool = False
    # torch.compile of the whole PEFT model by the Trainer (``torch_compile``/``torch_compile_mode``):
    # none | default | reduce-overhead (CUDA graphs: give it fixed shapes, rows of one length) |
    # max-autotune-no-cudagraphs. Compiling is paid once, in the first steps.
    compile: CompileMode = "none"
    # fp32 matmuls on TF32 tensor cores while training (CUDA, Ampere or newer; ignored on a CPU):
    # true | false | null (transformers' choice: on with compile, off otherwise). Set for the
    # training only: the process's own precision is back once the adapter is written.
    tf32: bool | None = None

    def validate(self) -> None:
        require(
            self.compile in COMPILE_MODES,
            f"train.compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}",
        )
        check_schedule(self)
        require(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        require(self.save_steps >= 0, "train.save_steps must be >= 0 (0: no checkpoints)")
        require(self.eval_steps >= 0, "train.eval_steps must be >= 0 (0: evaluate once, at the end)")
        require(
            self.save_total_limit is None or self.save_total_limit >= 1, "train.save_total_limit must be >= 1"
        )
        if self.load_best_at_end:
            require(
                self.eval_steps > 0 and self.save_steps > 0 and self.save_steps % self.eval_steps == 0,
                "train.load_best_at_end needs eval_steps > 0 and save_steps a multiple of eval_steps",
            )


@dataclass
class TrainRunConfig:
    """Everything ``lorasoup train`` needs; see ``configs/train-example.yaml``.

    ``output`` receives the PEFT adapter and ``run.json`` (atomically); Trainer checkpoints go to
    ``OUTPUT.checkpoints/checkpoint-N``. ``resume_from`` is such a directory, or ``last`` for the newest.
    """

    base_model: str
    data: DataOptions
    output: str
    lora: LoraOptions = field(default_factory=LoraOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    resume_from: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        require(
            not self.train.load_best_at_end or self.data.eval_size != 0,
            "train.load_best_at_end needs held-out data: set data.eval_size",
        )
        require(
            self.train.eval_steps == 0 or self.data.eval_size != 0,
            "train.eval_steps needs held-out data: set data.eval_size (or eval_steps: 0)",
        )

    @property
    def checkpoint_dir(self) -> Path:
        output = Path(self.output)
        return output.with_name(output.name + ".checkpoints")
