"""Option types shared by several commands: adapters to compose, CAT-style training data, the fit
loop's options, and how a composed adapter is exported.

``lorasoup cat``, ``lorasoup search`` and ``lorasoup moe`` read these sections under the same names
with the same checks; a command's own sections live in its package (``cat/config.py``, ...).
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
class FitOptions:
    """How to fit a few weights on a frozen model with our own loop (``lorasoup.training.loop``): CAT's
    weights, the MoE baseline's routers. The names follow ``lorasoup.training.config.TrainOptions``
    (the Trainer's vocabulary): ``warmup`` is a step count (int) or a fraction of all steps (float in
    [0, 1)); ``save_steps`` 0 saves only at the end; ``logging_steps`` spaces the log lines."""

    learning_rate: float = 2e-2
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup: int | float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_steps: int = 0
    logging_steps: int = 10
    dtype: Dtype = "float32"
    device: str | None = None
    # torch.compile of each decoder layer (regional: one graph serves every layer, seconds to build).
    # reduce-overhead adds CUDA graphs: on an H100 the 7B step is 1.17-1.20x the frozen base's own
    # step under graphs (docs/benchmarks.md); without graphs CAT is host-bound (2.5x). Give it fixed
    # shapes (data.pad_to_multiple_of = data.cutoff_len).
    compile: CompileMode = "none"

    def validate(self) -> None:
        require(
            self.compile in COMPILE_MODES,
            f"train.compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}",
        )
        require(self.epochs >= 1, f"train.epochs must be at least 1, got {self.epochs}")
        check_schedule(self)
        require(self.save_steps >= 0, "train.save_steps must be >= 0 (0 saves only at the end)")


def check_schedule(train: Any) -> None:
    """The checks every ``train:`` section shares (``FitOptions``, the Trainer's ``TrainOptions``): a
    positive learning rate and epochs, batch and accumulation, warm-up as steps or a fraction, logging."""
    require(train.learning_rate > 0, f"train.learning_rate must be positive, got {train.learning_rate}")
    require(train.epochs > 0, f"train.epochs must be positive, got {train.epochs}")
    require(train.max_steps is None or train.max_steps >= 1, "train.max_steps must be at least 1")
    require(
        train.batch_size >= 1 and train.grad_accum >= 1, "train.batch_size and train.grad_accum must be >= 1"
    )
    if isinstance(train.warmup, float):
        require(
            0 <= train.warmup < 1,
            f"train.warmup: a fraction must be in [0, 1), got {train.warmup}; use an integer for steps",
        )
    else:
        require(train.warmup >= 0, f"train.warmup must be >= 0 steps, got {train.warmup}")
    require(train.logging_steps >= 1, "train.logging_steps must be >= 1")


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
