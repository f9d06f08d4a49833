"""The ``lorasoup moe`` configs: train the routers (``MoeRunConfig``) and distill them (``MoeDistillConfig``).

Defaults and why:
- ``router.granularity: module``: one router per adapted module on that module's input, as mergoo's
  LoRA MoE (the paper's MoE baseline). ``layer``: one router per transformer block on its input.
- ``router.top_k: null``: soft gating over all adapters (MoLE / X-LoRA style); an integer k keeps the
  k best adapters per token, each with its full-softmax probability (Switch Transformer);
  ``router.renormalize: true`` renormalises the k gates to sum to 1 (Shazeer et al. 2017; Mixtral).
- ``router.balance_coef: 0.01``: the Switch Transformer's α for the load-balancing loss.
- ``router.init_std: 0.01``: small random router weights (zero bias), so the model starts close to
  the uniform mixture of the adapters and top-k ties are broken per token.
- ``router.preset: lora_flow``: LoRA-Flow's fusion gates (Wang et al. ACL 2024, ``moe.flow_gate``):
  soft (``top_k: null``) per-layer gates on the block input (``granularity: layer``) trained on the
  LM loss alone (``balance_coef: 0``), usually on a few hundred target examples; the preset checks
  those three values (``lorasoup moe train --flow`` sets them).
- ``train.learning_rate: 0.001``: a router has K × hidden weights per module, far more than CAT's
  K scalars, and its logits grow with the width of the hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lorasoup.config import require
from lorasoup.options import AdapterRef, Dtype, FitOptions


@dataclass
class MoeDataConfig:
    """The routers' training data: the skills' own data mixed (as the paper's MoE baseline)."""

    train: list[str] = field(default_factory=list)
    template: str = "alpaca"
    cutoff_len: int = 256
    train_on_inputs: bool = False
    max_examples: int | None = None

    def validate(self) -> None:
        require(
            bool(self.train),
            "data.train: give at least one dataset (a .json/.jsonl file or a hub dataset id)",
        )
        require(self.cutoff_len >= 8, f"data.cutoff_len must be at least 8 tokens, got {self.cutoff_len}")
        require(self.max_examples is None or self.max_examples > 0, "data.max_examples must be positive")


@dataclass
class RouterOptions:
    preset: Literal["lora_flow"] | None = None
    granularity: Literal["module", "layer"] = "module"
    top_k: int | None = None
    renormalize: bool = False
    balance_coef: float = 0.01
    init_std: float = 0.01
    dropout: float = 0.0

    def validate(self) -> None:
        require(
            self.top_k is None or self.top_k >= 1,
            f"router.top_k must be at least 1 (or null for soft gating), got {self.top_k}",
        )
        require(
            not (self.renormalize and self.top_k == 1),
            "router.renormalize with top_k=1 makes every gate 1, so the router gets no gradient; "
            "set renormalize to false",
        )
        require(self.balance_coef >= 0, f"router.balance_coef must be >= 0, got {self.balance_coef}")
        require(self.init_std >= 0, f"router.init_std must be >= 0, got {self.init_std}")
        require(0.0 <= self.dropout < 1.0, f"router.dropout must be in [0, 1), got {self.dropout}")
        if self.preset == "lora_flow":
            require(
                self.granularity == "layer" and self.top_k is None and self.balance_coef == 0.0,
                "router.preset lora_flow is soft per-layer gates without a balancing loss: set "
                f"router.granularity: layer, top_k: null, balance_coef: 0 (got {self.granularity}, "
                f"{self.top_k}, {self.balance_coef}), or train with `lorasoup moe train --flow`",
            )


@dataclass
class MoeTrainOptions(FitOptions):
    """CAT's training options with a router-sized default learning rate."""

    learning_rate: float = 1e-3


@dataclass
class MoeSaveOptions:
    """``copy_adapters``: copy the adapters into the artifact (self-contained) or only reference them
    by path and sha256 (checked when the artifact is loaded)."""

    copy_adapters: bool = True


@dataclass
class MoeRunConfig:
    """Everything ``lorasoup moe`` needs; see ``configs/moe-example.yaml``."""

    base_model: str
    adapters: list[AdapterRef]
    data: MoeDataConfig
    output: str
    router: RouterOptions = field(default_factory=RouterOptions)
    train: MoeTrainOptions = field(default_factory=MoeTrainOptions)
    save: MoeSaveOptions = field(default_factory=MoeSaveOptions)
    allow_base_mismatch: bool = False
    resume_from: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        require(bool(self.adapters), "adapters: list at least one adapter directory")
        top_k = self.router.top_k
        require(
            top_k is None or top_k <= len(self.adapters),
            f"router.top_k={top_k} exceeds the number of adapters ({len(self.adapters)}); "
            "choose at most that many, or null for soft gating",
        )


@dataclass
class MoeDistillConfig:
    """``lorasoup moe distill``: average a trained router's gates over data into static CAT weights.

    Unset data fields (``data``, ``template``, ``cutoff_len``, ``max_examples``) default to what the
    routers were trained on, as recorded in the artifact's ``moe_config.json``.
    """

    run_dir: str
    output: str
    data: list[str] = field(default_factory=list)
    template: str | None = None
    cutoff_len: int | None = None
    max_examples: int | None = None
    base_model: str | None = None
    batch_size: int = 8
    dtype: Dtype = "float32"
    export_dtype: Dtype = "float32"
    device: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        require(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
