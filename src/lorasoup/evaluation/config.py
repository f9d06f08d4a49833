"""The ``lorasoup eval`` config: which model, which task on which data, how to decode, where to write.

Defaults and why:
- ``generation``: empty, so the task's own settings apply (its ``max_new_tokens`` and stop strings),
  greedy (deterministic); ``generation.sampling: paper`` gives the reference's T=0.1, top-p 0.95.
- ``dtype: float32``: the reference evaluated in fp32; bf16 changes greedy outputs a little.
- ``backend: hf``: transformers' ``generate`` (greedy or sampling); ``cudagraph`` replays the decoding
  step as a CUDA graph (greedy only, same decoding rules, faster on a GPU); ``vllm`` when installed.
- ``resume: true``: an interrupted run continues from ``OUTPUT.partial/examples.jsonl``.
- ``output``: ``runs/eval/<task name>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lorasoup.config import require
from lorasoup.evaluation.generate import GenerationOptions
from lorasoup.evaluation.tasks.scoring import SandboxOptions


@dataclass
class EvalRunConfig:
    """Everything ``lorasoup eval`` needs; see docs/evaluation.md."""

    model: str
    task: str
    adapter: str | None = None
    data: list[str] = field(default_factory=list)
    fewshot: str | None = None
    num_fewshot: int | None = None
    output: str | None = None
    limit: int | None = None
    backend: Literal["hf", "cudagraph", "vllm"] = "hf"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = None
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    sandbox: SandboxOptions = field(default_factory=SandboxOptions)
    chunk_size: int | None = None
    resume: bool = True
    overwrite: bool = False

    def validate(self) -> None:
        require(self.limit is None or self.limit >= 1, f"limit must be at least 1, got {self.limit}")
        require(self.num_fewshot is None or self.num_fewshot >= 0, "num_fewshot must be >= 0")
        require(self.chunk_size is None or self.chunk_size >= 1, "chunk_size must be at least 1")
