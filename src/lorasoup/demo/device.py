"""Where the demo study runs: ``device: auto | cpu | cuda`` of its settings.

``auto`` picks CUDA when torch sees a GPU, else the CPU. Every stage follows the one setting: base
pre-training, the LoRAs (``train_skill``), merges, CAT and the MoE (accelerate), the weight search,
and generation for scoring. On the CPU, ``cpu`` and ``auto`` are the same run, number for number.

One GPU per process: with several visible, transformers' ``Trainer`` would wrap the LoRA runs in
``DataParallel`` (a batch per GPU, so a different global batch), so the study refuses; run one
process per GPU with ``CUDA_VISIBLE_DEVICES`` (``lorasoup study --only`` splits a study that way).

Settings check the name when they load (:func:`check_device`), so a GPU study's config still loads
on a laptop (to rebuild its report); whether this machine can run it (:func:`resolve_device`) is
checked when a run starts, before any work.
"""

from __future__ import annotations

import torch

from lorasoup.config import require
from lorasoup.devices import cuda_available

DEVICES = ("auto", "cpu", "cuda")


def check_device(device: str) -> None:
    """The setting names a device kind (settings validate this when they load, anywhere); whether
    this machine has it is :func:`resolve_device`'s question, asked when a run starts."""
    require(device in DEVICES, f"device: {device!r} is not allowed; choose one of {', '.join(DEVICES)}")


def resolve_device(device: str) -> str:
    """``"cpu"`` or ``"cuda"`` for the setting ``device`` on this machine; a one-line ``ConfigError``
    if it cannot run here (no GPU for ``cuda``, or several visible)."""
    check_device(device)
    cuda = cuda_available()
    require(
        device != "cuda" or cuda,
        "device: 'cuda' asked for, but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
        "use 'auto' or 'cpu'",
    )
    chosen = "cuda" if cuda and device != "cpu" else "cpu"
    if chosen == "cuda":
        count = torch.cuda.device_count()
        require(
            count == 1,
            f"device: {count} CUDA GPUs are visible; the demo uses one per process: set "
            "CUDA_VISIBLE_DEVICES=0 (one process per GPU; see docs/study.md), or device: cpu",
        )
    return chosen


def device_facts(device: str) -> dict[str, str]:
    """What ran the study, for ``results.json`` and ``run.json``: the device, and the GPU's name."""
    chosen = resolve_device(device)
    facts = {"device": chosen}
    if chosen == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts
