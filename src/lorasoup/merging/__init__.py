"""Classic merges of LoRA adapters, exact in ΔW space, plus PEFT's factor-space variants by name.

Importing this package registers every method in ``MERGE_METHODS``; a new method is one module
that calls ``register``.
"""

from lorasoup.merging import (  # noqa: F401  (registration)
    concat,
    core_space,
    factor_space,
    layer_swap,
    task_arithmetic,
    tsv,
)
from lorasoup.merging.base import MERGE_METHODS, MergeMethod, MergeParams, ModuleMerge

__all__ = ["MERGE_METHODS", "MergeMethod", "MergeParams", "ModuleMerge"]
