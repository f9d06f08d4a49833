"""Devices and dtypes, named once: config dtype names → torch dtypes, and "CUDA if available".

Library code that needs a default device asks :func:`default_device` instead of repeating the
``torch.cuda.is_available()`` test; the RNG helpers save and restore the CUDA generators only where
CUDA exists, so a checkpoint written on a GPU machine resumes on a CPU one.
"""

from __future__ import annotations

from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def default_device(device: str | None = None) -> str:
    """``device`` when given, else ``"cuda"`` if torch sees a GPU, else ``"cpu"``."""
    return device or ("cuda" if cuda_available() else "cpu")


def rng_state() -> dict[str, Any]:
    """The global CPU and (where present) CUDA RNG states, as a checkpoint stores them."""
    return {
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if cuda_available() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`rng_state`: the CUDA states only where this machine has CUDA."""
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and cuda_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
