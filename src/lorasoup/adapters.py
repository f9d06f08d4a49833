"""LoRA adapters in PEFT format, read into plain per-module factors.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``). For every adapted module it holds ``A (r×in)`` and ``B (out×r)``; the module's
update is ``ΔW = s · B A`` with ``s = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA,
https://arxiv.org/abs/2312.03732). ``rank_pattern`` / ``alpha_pattern`` give per-module exceptions,
resolved here with PEFT's own matching rule so both tools agree.

Module paths are relative to the causal-LM model (what PEFT wraps as ``base_model.model``), e.g.
``model.layers.0.self_attn.q_proj`` for Llama or ``transformer.h.0.attn.c_attn`` for GPT-2.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from lorasoup.errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

# PEFT writes "base_model.model.<module>.lora_A.weight"; older or hand-made files may keep the adapter
# name ("...lora_A.default.weight") or lack the prefix.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA (use_dora=True)",
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_tokens": "trainable tokens (trainable_token_indices)",
}


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: ``ΔW = scale · B @ A``.

    Shapes: ``A (r, in)``, ``B (out, r)``. For GPT-2's Conv1D the stored base weight is ``(in, out)``
    (``fan_in_fan_out``), but A and B keep these shapes; only merging into the base transposes.
    """

    A: Tensor
    B: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    def at_unit_scale(self) -> LoraFactors:
        """The same update at scale 1, the scale folded into ``A``: ``(s·A, B)`` (``self`` if s is 1).

        Composed, merged and recompressed adapters are all at scale 1 (PEFT's ``lora_alpha = r``)."""
        return self if self.scale == 1.0 else LoraFactors(self.scale * self.A, self.B, 1.0)

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense ``ΔW (out, in)``; for tests and small models only."""
        return (self.B.to(dtype) @ self.A.to(dtype)).mul_(self.scale)

    def delta_rows(
        self,
        start: int,
        stop: int,
        dtype: torch.dtype = torch.float32,
        *,
        times: float = 1.0,
        out: Tensor | None = None,
    ) -> Tensor:
        """Rows ``start:stop`` of ``times · ΔW``: a ``(stop − start, in)`` tensor (fresh, or written into
        ``out``), the rest never built. The scalars go into the small ``B`` rows, so the block costs one
        GEMM and no extra pass."""
        return torch.matmul(self.B[start:stop].to(dtype) * (self.scale * times), self.A.to(dtype), out=out)

    def delta_entries(self, rows: Tensor, cols: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Scattered entries ``ΔW[rows[m], cols[m]]``: ``rows, cols (M,)`` → ``(M,)``, in ``O(M·r)``."""
        return (self.B[rows].to(dtype) * self.A[:, cols].T.to(dtype)).sum(dim=1).mul_(self.scale)


@dataclass
class LoraAdapter:
    """A LoRA adapter: its factors per module plus what its config says about it."""

    name: str
    source: str
    modules: dict[str, LoraFactors]
    base_model: str | None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    peft_config: dict[str, Any] = field(default_factory=dict)

    @property
    def target_names(self) -> list[str]:
        """Leaf names of the adapted modules (``q_proj``, ``v_proj``...)."""
        return sorted({path.rsplit(".", 1)[-1] for path in self.modules})

    @property
    def ranks(self) -> list[int]:
        return sorted({f.rank for f in self.modules.values()})

    @property
    def num_parameters(self) -> int:
        return sum(f.A.numel() + f.B.numel() for f in self.modules.values())

    def summary(self) -> dict[str, Any]:
        """What a run record says of this input: where it came from, its ranks, how many modules."""
        return {"source": self.source, "ranks": self.ranks, "modules": len(self.modules)}

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values())).A.dtype


def resolve_adapter_dir(source: str | Path, revision: str | None = None) -> Path:
    """A local adapter directory, or the snapshot of a hub repo holding one.

    Hub ids (``owner/name``) are fetched with ``huggingface_hub``; only the config and weight files are
    downloaded. A path that looks local but does not exist is an error, never a hub lookup.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_local:
        raise AdapterError(
            f"adapter directory {text!r} does not exist; pass a PEFT adapter directory or a hub id"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=[CONFIG_NAME, *WEIGHT_NAMES]))
    except Exception as err:  # the hub client raises many types; all mean "could not fetch"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdapterError(
            f"could not fetch adapter {text!r} from the hub ({first}); pass a local adapter directory"
        ) from None


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{directory}: no {CONFIG_NAME}; is this a PEFT adapter directory?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_path}: not valid JSON ({err}); re-save the adapter with PEFT") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    return config


def _check_supported(config: dict[str, Any], where: Path) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"{where}: peft_type {peft_type!r} is not supported; lorasoup composes LoRA adapters"
        )
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA (use_dora=True)")
    if config.get("bias", "none") != "none":
        problems.append(f"trained biases (bias={config.get('bias')!r})")
    if config.get("lora_bias"):
        problems.append("trained LoRA biases (lora_bias=True)")
    if config.get("modules_to_save"):
        problems.append(f"fully trained modules (modules_to_save={config['modules_to_save']})")
    if config.get("trainable_token_indices"):
        problems.append("trainable tokens (trainable_token_indices)")
    if problems:
        raise AdapterError(
            f"{where}: unsupported adapter feature: {', '.join(problems)}; use a plain LoRA adapter"
        )


def _read_weights(directory: Path) -> dict[str, Tensor]:
    for name in WEIGHT_NAMES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt files surface as several error types
            raise AdapterError(
                f"{path}: cannot read adapter weights ({type(err).__name__}); the file is corrupt"
            ) from None
    raise AdapterError(f"{directory}: no {' or '.join(WEIGHT_NAMES)}")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: a pattern key matches a module whose name ends with it at a dot boundary."""
    from peft.utils.other import get_pattern_key

    if not patterns:
        return default
    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def _pair_factors(weights: dict[str, Tensor], where: Path) -> dict[str, dict[str, Tensor]]:
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in weights.items():
        for marker, feature in _UNSUPPORTED_KEYS.items():
            if marker in key:
                raise AdapterError(f"{where}: unsupported adapter feature: {feature} (key {key!r})")
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(
                f"{where}: unexpected tensor {key!r}; only lora_A/lora_B weights are supported"
            )
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    return pairs


def _check_finite(A: Tensor, B: Tensor, module: str, where: Path) -> None:
    """Refuse NaN / inf factors: composed, they poison every weight they touch, silently."""
    for which, tensor in (("lora_A", A), ("lora_B", B)):
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise AdapterError(
                f"{where}: module {module!r} has {bad} non-finite value(s) (NaN or inf) in {which}; "
                "the adapter is corrupt: re-train or re-export it"
            )


def load_adapter(source: str | Path, name: str | None = None, revision: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA adapter into per-module ``LoraFactors``.

    Raises ``AdapterError`` (one line) for a missing or corrupt file, inconsistent shapes, or a feature
    lorasoup cannot compose yet (DoRA, trained biases, ``modules_to_save``, embedding LoRA), and for
    non-finite (NaN / inf) factors.
    """
    directory = resolve_adapter_dir(source, revision)
    config = _read_config(directory)
    _check_supported(config, directory)
    pairs = _pair_factors(_read_weights(directory), directory)
    if not pairs:
        raise AdapterError(f"{directory}: the adapter holds no LoRA weights")

    use_rslora = bool(config.get("use_rslora", False))
    default_r, default_alpha = config.get("r", 8), config.get("lora_alpha", 8)
    modules: dict[str, LoraFactors] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterError(
                f"{directory}: module {module!r} has no {missing} weight; the file is incomplete"
            )
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(
                f"{directory}: module {module!r} has mismatched shapes lora_A {tuple(A.shape)} and "
                f"lora_B {tuple(B.shape)}; expected (r, in) and (out, r)"
            )
        _check_finite(A, B, module, directory)
        rank = A.shape[0]
        declared = _pattern_value(config.get("rank_pattern") or {}, module, default_r)
        if declared != rank:
            raise AdapterError(
                f"{directory}: module {module!r} has rank {rank} but the config declares r={declared}; "
                "fix r / rank_pattern in adapter_config.json"
            )
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, default_alpha)
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        modules[module] = LoraFactors(A=A, B=B, scale=float(scale))

    return LoraAdapter(
        name=name or directory.name,
        source=str(source),
        modules=modules,
        base_model=config.get("base_model_name_or_path"),
        use_rslora=use_rslora,
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        peft_config=config,
    )


def check_finite_weights(source: str | Path, revision: str | None = None) -> Path:
    """The adapter's directory, after checking every tensor in its weights file is finite.

    For code that hands the adapter to PEFT itself (evaluation) rather than reading it with
    ``load_adapter``: the same one-line refusal of NaN / inf weights, whatever the adapter's features.
    """
    directory = resolve_adapter_dir(source, revision)
    for key, tensor in _read_weights(directory).items():
        bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
        if bad:
            raise AdapterError(
                f"{directory}: tensor {key!r} has {bad} non-finite value(s) (NaN or inf); "
                "the adapter is corrupt: re-train or re-export it"
            )
    return directory


class AdapterSource(Protocol):
    """What a config says about one adapter (``AdapterRef`` and friends)."""

    path: str
    name: str | None
    revision: str | None


def load_adapters(refs: list[AdapterSource]) -> list[LoraAdapter]:
    """Load every adapter a config lists; directories named alike ("adapter") get distinct names."""
    adapters = [load_adapter(ref.path, name=ref.name, revision=ref.revision) for ref in refs]
    names = [a.name for a in adapters]
    for i, adapter in enumerate(adapters):
        if names.count(adapter.name) > 1 and refs[i].name is None:
            adapter.name = f"{adapter.name}_{i}"
    return adapters
