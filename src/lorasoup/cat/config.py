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
from typing import Literal

from lorasoup.config import require
from lorasoup.options import AdapterRef, DataConfig, ExportOptions, FitOptions


@dataclass
class CatOptions:
    granularity: Literal["module", "layer", "global"] = "module"
    parameterisation: Literal["softmax", "free"] = "softmax"
    dropout: float = 0.0
    init_from: str | None = None

    def validate(self) -> None:
        require(0.0 <= self.dropout < 1.0, f"cat.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class CatRunConfig:
    """Everything ``lorasoup cat`` needs; see ``configs/cat-example.yaml``."""

    base_model: str
    adapters: list[AdapterRef]
    data: DataConfig
    output: str
    cat: CatOptions = field(default_factory=CatOptions)
    train: FitOptions = field(default_factory=FitOptions)
    export: ExportOptions = field(default_factory=ExportOptions)
    allow_base_mismatch: bool = False
    resume_from: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        require(bool(self.adapters), "adapters: list at least one adapter directory")
