"""The ``lorasoup cat`` config: what to compose, on which data, how to train the weights, what to write.

Defaults and why:
- ``cat.parameterisation: softmax`` and ``cat.granularity: module``: the paper's code.
- ``train.learning_rate: 0.02``: CAT trains only a few hundred scalars. The paper's 1e-4 for ~1,700
  Adam steps moves each weight by at most ~0.17 from its random start; our small studies needed 1e-2
  to 5e-2 before the weights learned anything. ``run.json`` records how far they moved.
- ``data.train_on_inputs: false``: loss on response tokens only (the paper's code used the whole
  sequence; set it to true to reproduce that).
- ``cat.init_from: null``: start from θ0 as above. A path to a ``search_weights.json`` (``lorasoup
  search``) or ``cat_weights.json`` starts from those weights instead (``free``: any values; ``softmax``:
  positive rows summing to 1).
- ``data.formats: []``: one template (``data.template``) for every example, as the paper. A list of
  formats makes the training format-robust: each example is rendered in a format dealt to it from
  the list (``lorasoup.training.formats``; ``data.format_seed``, default ``train.seed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from lorasoup.config import require
from lorasoup.training.formats import FormatSpec, check_pool

Dtype = Literal["float32", "bfloat16", "float16"]
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


@dataclass
class AdapterRef:
    """A skill adapter: a PEFT adapter directory or hub id, and a short name for reports."""

    path: str
    name: str | None = None
    revision: str | None = None

    @classmethod
    def from_value(cls, value: Any, where: str) -> AdapterRef:
        from lorasoup.config import ConfigError

        if isinstance(value, str) and value:
            return cls(path=value)
        raise ConfigError(f"{where}: expected an adapter path or a mapping with 'path', got {value!r}")


@dataclass
class DataConfig:
    """Training data for the CAT weights: the skills' own data mixed (the paper) or target-task data.

    ``formats``: when given, the pool of prompt formats (template names, format strings or
    FormatSpread-style specs; see ``lorasoup.training.formats``) replacing ``template``; each example
    gets one, dealt from ``format_seed`` (``None``: ``train.seed``).
    """

    train: list[str] = field(default_factory=list)
    template: str = "alpaca"
    cutoff_len: int = 256
    train_on_inputs: bool = False
    max_examples: int | None = None
    formats: list[FormatSpec] = field(default_factory=list)
    format_seed: int | None = None
    pad_to_multiple_of: int = 1  # = cutoff_len: one batch shape, what train.compile=reduce-overhead wants

    def validate(self) -> None:
        require(
            self.pad_to_multiple_of >= 1,
            f"data.pad_to_multiple_of must be at least 1, got {self.pad_to_multiple_of}",
        )
        require(
            bool(self.train),
            "data.train: give at least one dataset (a .json/.jsonl file or a hub dataset id)",
        )
        require(self.cutoff_len >= 8, f"data.cutoff_len must be at least 8 tokens, got {self.cutoff_len}")
        require(self.max_examples is None or self.max_examples > 0, "data.max_examples must be positive")
        if self.formats:
            check_pool(self.formats)
            require(
                self.template == "alpaca" or self.template in [spec.name for spec in self.formats],
                f"data.template {self.template!r} is unused when data.formats is given; "
                "list it in data.formats instead",
            )
        else:
            require(self.format_seed is None, "data.format_seed needs data.formats (the pool to draw from)")


@dataclass
class CatOptions:
    granularity: Literal["module", "layer", "global"] = "module"
    parameterisation: Literal["softmax", "free"] = "softmax"
    dropout: float = 0.0
    init_from: str | None = None

    def validate(self) -> None:
        require(0.0 <= self.dropout < 1.0, f"cat.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainOptions:
    learning_rate: float = 2e-2
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 0
    log_every: int = 10
    dtype: Dtype = "float32"
    device: str | None = None
    # torch.compile of each decoder layer (regional: one graph serves every layer, seconds to build).
    # reduce-overhead adds CUDA graphs: on an H100 the 7B step is 1.14-1.18x the frozen base's floor
    # (docs/benchmarks.md); give it fixed shapes (data.pad_to_multiple_of = data.cutoff_len).
    compile: CompileMode = "none"

    def validate(self) -> None:
        require(
            self.compile in COMPILE_MODES,
            f"train.compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}",
        )
        require(self.learning_rate > 0, f"train.learning_rate must be positive, got {self.learning_rate}")
        require(self.epochs >= 1, f"train.epochs must be at least 1, got {self.epochs}")
        require(self.max_steps is None or self.max_steps >= 1, "train.max_steps must be at least 1")
        require(
            self.batch_size >= 1 and self.grad_accum >= 1,
            "train.batch_size and train.grad_accum must be >= 1",
        )
        require(
            0.0 <= self.warmup_ratio < 1.0, f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}"
        )
        require(self.save_every >= 0, "train.save_every must be >= 0 (0 saves only at the end)")


@dataclass
class ExportOptions:
    """How the folded adapter is written.

    ``rank``: recompress every module to at most this rank with the exact truncated SVD (the
    discarded energy per module goes to run.json); ``None`` keeps the exact concatenated rank.
    ``rank_bucket: vllm`` then pads with zero rows to vLLM's next rank bucket (exact).
    """

    merge: bool = False
    rank_bucket: Literal["none", "vllm"] = "none"
    rank: int | None = None
    dtype: Dtype = "float32"

    def validate(self) -> None:
        require(self.rank is None or self.rank >= 1, f"export.rank must be at least 1, got {self.rank}")


@dataclass
class CatRunConfig:
    """Everything ``lorasoup cat`` needs; see ``configs/cat-example.yaml``."""

    base_model: str
    adapters: list[AdapterRef]
    data: DataConfig
    output: str
    cat: CatOptions = field(default_factory=CatOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    export: ExportOptions = field(default_factory=ExportOptions)
    allow_base_mismatch: bool = False
    resume_from: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        require(bool(self.adapters), "adapters: list at least one adapter directory")
