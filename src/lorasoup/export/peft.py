"""Write plain PEFT LoRA adapters and merged full weights.

An exported adapter is what stock ``peft.PeftModel.from_pretrained`` (and vLLM) loads: the config is
built through ``peft.LoraConfig`` with one rank ``r`` and ``lora_alpha = r`` (scale 1, so the stored
factors are the update itself), no ``rank_pattern``/``alpha_pattern``, no rsLoRA.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lorasoup.adapters import LoraFactors

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def target_modules_for(paths: list[str], model: nn.Module | None) -> list[str]:
    """The shortest ``target_modules`` that selects exactly ``paths`` in ``model``.

    Leaf names (``q_proj``) are what vLLM and most tools expect; they are used when they select no
    module beyond ``paths``. Otherwise (say, only some layers adapted) the full paths are written.
    """
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if model is None:
        return sorted(paths)
    selected = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in leaves}
    return leaves if selected == set(paths) else sorted(paths)


def save_peft_adapter(
    factors: Mapping[str, LoraFactors],
    out_dir: Path,
    *,
    base_model: str | None,
    model: nn.Module | None = None,
    target_modules: list[str] | None = None,
    fan_in_fan_out: bool = False,
) -> Path:
    """Write ``factors`` (module path → ``LoraFactors`` of ``A (r, in)``, ``B (out, r)``, all of one rank
    and at scale 1) as a PEFT adapter with ``lora_alpha = r``.

    ``target_modules``: given by a caller that knows them without the model; else
    :func:`target_modules_for` (full paths when ``model`` is None). ``base_model`` is recorded by its
    canonical name (``models.canonical_model_name``: an alias becomes its hub id). ``out_dir`` must
    exist; the caller owns atomicity (see ``lorasoup.artifacts``).
    """
    from peft import LoraConfig

    from lorasoup.models import canonical_model_name

    ranks = {f.rank for f in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"all modules must share one rank before export, got {sorted(ranks)}")
    scales = sorted({f.scale for f in factors.values()} - {1.0})
    if scales:
        raise ValueError(f"factors must be at scale 1 before export (at_unit_scale), got {scales}")
    rank = ranks.pop()
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        bias="none",
        target_modules=target_modules or target_modules_for(list(factors), model),
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=canonical_model_name(base_model),
        task_type="CAUSAL_LM",
    )
    config.save_pretrained(str(out_dir))
    tensors = {}
    for path, f in factors.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = f.A.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = f.B.contiguous()
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir


def merge_factors_into(model: nn.Module, factors: Mapping[str, LoraFactors]) -> nn.Module:
    """``W = W0 + s·B A`` for every module, in place, computed in float32 and cast back.

    GPT-2's Conv1D stores ``W0`` as ``(in, out)``, so it gets ``(B A)ᵀ``.
    """
    with torch.no_grad():
        for path, factors_at in factors.items():
            A, B = factors_at.at_unit_scale().A, factors_at.B
            module = model.get_submodule(path)
            weight = module.weight
            delta = B.float() @ A.float()  # (out, in)
            if not isinstance(module, nn.Linear):  # Conv1D
                delta = delta.T
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return model


def save_merged(
    model: nn.Module, factors: Mapping[str, LoraFactors], tokenizer: Any, directory: Path
) -> nn.Module:
    """``merge_factors_into(model, factors)`` saved with ``tokenizer`` as a plain transformers checkpoint in
    ``directory`` (the ``merged/`` of merge, cat and search outputs); returns the merged model."""
    merged = merge_factors_into(model, factors)
    merged.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return merged
