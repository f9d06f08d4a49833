"""``lorasoup merge`` and ``lorasoup compress``, end to end: load, check, merge module by module, export.

The artifact directory (written atomically) holds a plain PEFT adapter (``r = lora_alpha``: scale 1,
every module padded with zero rank rows to one rank), ``merge_report.json`` (per-module rank and
discarded energy), ``run.json``, and with ``merge: true`` the full merged weights in ``merged/``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lorasoup.adapters import LoraAdapter, LoraFactors, load_adapter, load_adapters
from lorasoup.artifacts import (
    atomic_output_dir,
    inputs_fingerprint,
    require_free_output,
    run_record,
    write_json_atomic,
)
from lorasoup.compat import check_compatibility
from lorasoup.devices import DTYPES, default_device
from lorasoup.errors import ConfigError, LorasoupError
from lorasoup.export.serving import pad_factors
from lorasoup.lowrank import recompress_modules
from lorasoup.merging.base import MERGE_METHODS, MergeMethod, MergeParams, ModuleMerge, StreamingMerge
from lorasoup.merging.config import MergeRunConfig
from lorasoup.merging.layer_swap import module_swap_weights

ModuleProgress = Callable[[int, int], None]


@dataclass
class MergeResult:
    output: Path
    method: str
    rank: int
    modules: dict[str, dict[str, Any]]
    notices: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_discarded_energy(self) -> float | None:
        values = [m["discarded_energy"] for m in self.modules.values() if m["discarded_energy"] is not None]
        return max(values) if values else None


def module_generator(seed: int, path: str, device: torch.device) -> torch.Generator:
    """A generator per module, seeded from ``(seed, path)``: a module's random draws do not depend on
    which other modules exist or on the order they are merged in."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()))


def merge_adapters(
    adapters: list[LoraAdapter],
    weights: list[float],
    method: MergeMethod,
    params: MergeParams,
    *,
    modules: list[str],
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: ModuleProgress | None = None,
    module_weights: Mapping[str, list[float]] | None = None,
) -> tuple[dict[str, LoraFactors], dict[str, dict[str, Any]]]:
    """Merge ``adapters`` module by module: ``{path: LoraFactors}`` (``A (k, in)``, ``B (out, k)``, scale
    1) on the CPU in float32,
    plus per-module facts (rank, discarded energy). At most two modules are on ``device`` at a time
    (a streaming method overlaps one module's host work with the next one's device work), except
    for a batched streaming method, which holds the modules it groups up to its byte cap
    (``merging.core_batched``).
    ``module_weights``: per-module rows multiplying ``weights`` (a layer swap's one-hot rows)."""
    target = torch.device(default_device(device))
    # on the host: methods read weights as numbers, which would be a device read per module
    weight_tensor = torch.tensor(weights, dtype=torch.float32)
    streaming = streaming_merge(method, target)
    merged: dict[str, LoraFactors] = {}
    facts: dict[str, dict[str, Any]] = {}

    def record(finished: list[tuple[str, ModuleMerge]]) -> None:
        for path, result in finished:
            # copies that do not wait for the device: the next module's work is queued meanwhile
            merged[path] = LoraFactors(_to_host(result.A), _to_host(result.B), 1.0)
            facts[path] = {"rank": result.A.shape[0], "discarded_energy": result.discarded_energy}
            if progress is not None:
                progress(len(merged), len(modules))

    for path in modules:
        factors: list[LoraFactors | None] = [
            _on(a.modules[path], target) if path in a.modules else None for a in adapters
        ]
        generator = module_generator(seed, path, target)
        w = weight_tensor if module_weights is None else weight_tensor * torch.tensor(module_weights[path])
        try:
            if streaming is None:
                record([(path, method.merge(factors, w, params, generator))])
            else:
                record(streaming.submit(path, factors, w, params, generator))
        except ValueError as err:
            raise LorasoupError(f"{method.name} at {path}: {err}") from None
    if streaming is not None:
        record(streaming.finish())
    if target.type == "cuda":
        torch.cuda.synchronize(target)  # every copy to the host has landed before anyone reads one
    return merged, facts  # in module order: a streaming merge returns modules in the order submitted


def streaming_merge(method: MergeMethod, target: torch.device) -> StreamingMerge | None:
    """The method's streaming merge where it pays, on CUDA (the modules batched or pipelined); None
    elsewhere, where each module is merged on its own (the same updates; tests run both)."""
    return method.streaming(target) if method.streaming is not None and target.type == "cuda" else None


def _to_host(tensor: Tensor) -> Tensor:
    return tensor.float().to("cpu", non_blocking=True)


def _on(factors: LoraFactors, device: torch.device) -> LoraFactors:
    # non_blocking: a host-to-device copy need not wait for the work already queued on the device
    A, B = (t.to(device, non_blocking=True) for t in (factors.A, factors.B))
    return LoraFactors(A=A, B=B, scale=factors.scale)


def pad_all(factors: dict[str, LoraFactors], dtype: torch.dtype) -> tuple[dict[str, LoraFactors], int]:
    """Pad every module to the largest rank with zero rows (exact) and cast: PEFT wants one ``r``."""
    rank = max(f.rank for f in factors.values())
    return {path: pad_factors(f, rank, dtype) for path, f in factors.items()}, rank


def run_merge(config: MergeRunConfig, *, progress: ModuleProgress | None = None) -> MergeResult:
    """Merge ``config.adapters`` with ``config.method`` and write the artifact directory."""
    output = Path(config.output)
    require_free_output(output, overwrite=config.overwrite)
    check_base(config)
    clock = time.perf_counter()
    timings: dict[str, float] = {}
    adapters = load_adapters(config.adapters)
    report = check_compatibility(
        adapters, allow_base_mismatch=config.allow_base_mismatch, base_model=config.base_model
    )
    report.raise_if_incompatible()
    method = MERGE_METHODS.get(config.method)
    timings["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    rows = None
    if config.layer_swap is not None:  # space "layer": each module's one-hot row from the rule
        rows = module_swap_weights(
            config.layer_swap.rule(), [a.name for a in adapters], report.modules, config.layer_swap.num_layers
        )
    merged, facts = merge_adapters(
        adapters,
        [a.weight for a in config.adapters],
        method,
        config.merge_params(),
        modules=report.modules,
        seed=config.seed,
        device=config.device,
        progress=progress,
        module_weights=rows,
    )
    timings["merge"] = time.perf_counter() - clock
    notices = list(report.notices)
    clock = time.perf_counter()
    rank = _write_artifact(
        config, adapters, merged, facts, notices, timings, extra={"method": _describe(method)}
    )
    return MergeResult(
        output=output,
        method=method.name,
        rank=rank,
        modules=facts,
        notices=notices,
        seconds=sum(timings.values()) + time.perf_counter() - clock,
    )


def _describe(method: MergeMethod) -> dict[str, Any]:
    return {
        "name": method.name,
        "space": method.space,
        "summary": method.summary,
        "reference": method.reference,
    }


def _write_artifact(
    config: Any,
    adapters: list[LoraAdapter],
    factors: dict[str, LoraFactors],
    facts: dict[str, dict[str, Any]],
    notices: list[str],
    timings: dict[str, float],
    *,
    extra: dict[str, Any],
) -> int:
    """Pad, write the PEFT adapter (+ merged weights), ``merge_report.json`` and ``run.json`` atomically.

    The base model is read only to write merged weights (``merge: true``), and was checked by
    :func:`check_base` before the work; otherwise ``target_modules`` come from the adapters.
    """
    from lorasoup.export.peft import save_merged, save_peft_adapter
    from lorasoup.models import load_base_model, load_tokenizer, parse_model_spec

    clock = time.perf_counter()
    padded, rank = pad_all(factors, DTYPES[config.dtype])
    base_name = config.base_model or adapters[0].base_model
    discarded = [f["discarded_energy"] for f in facts.values() if f["discarded_energy"] is not None]
    with atomic_output_dir(config.output, overwrite=config.overwrite) as staging:
        model = None
        if config.merge:
            spec = parse_model_spec(config.base_model)
            model = save_merged(load_base_model(spec), padded, load_tokenizer(spec), staging / "merged")
        save_peft_adapter(
            padded,
            staging,
            base_model=base_name,
            model=model,
            target_modules=None if model is not None else adapters_target_leaves(adapters, list(padded)),
            fan_in_fan_out=adapters[0].fan_in_fan_out,
        )
        write_json_atomic(
            staging / "merge_report.json",
            {
                "rank": rank,
                "max_discarded_energy": max(discarded) if discarded else None,
                "mean_discarded_energy": sum(discarded) / len(discarded) if discarded else None,
                "modules": facts,
            },
        )
        timings["export"] = time.perf_counter() - clock
        record = run_record(
            command=extra.get("command", "merge"),
            config=config,
            seed=getattr(config, "seed", 0),
            timings=timings,
            adapters={a.name: a.summary() for a in adapters},
            inputs_sha256=inputs_fingerprint(
                [Path(a.source) / "adapter_model.safetensors" for a in adapters]
            ),
            export={"rank": rank, "merged": bool(config.merge)},
            notices=notices,
            **{k: v for k, v in extra.items() if k != "command"},
        )
        write_json_atomic(staging / "run.json", record)
    return rank


def check_base(config: Any) -> None:
    """Before any work: a command that writes merged weights reads the base model's config now (a
    missing path or an unreachable hub id fails first, not after the merge); one that does not never
    touches the base model."""
    from lorasoup.models import load_skeleton, parse_model_spec

    if config.merge:
        load_skeleton(parse_model_spec(config.base_model))


def adapters_target_leaves(adapters: list[LoraAdapter], paths: list[str]) -> list[str] | None:
    """``target_modules`` for ``paths`` without the base model: their leaf names when every input
    adapter was made with leaf names applied to the whole model (PEFT then adapted every module so
    named, so the leaves of the union select exactly the union); None (full paths) otherwise."""
    targets: set[str] = set()
    for adapter in adapters:
        config = adapter.peft_config
        names = config.get("target_modules")
        if not isinstance(names, list) or any("." in n for n in names):
            return None
        if config.get("layers_to_transform") is not None or config.get("exclude_modules"):
            return None
        targets.update(names)
    leaves = {p.rsplit(".", 1)[-1] for p in paths}
    union = {p for a in adapters for p in a.modules}
    return sorted(leaves) if leaves <= targets and set(paths) == union else None


@dataclass
class CompressConfig:
    """``lorasoup compress``: one adapter recompressed exactly to a lower rank."""

    adapter: str
    output: str
    rank: int | None = None
    energy: float | None = None
    base_model: str | None = None
    merge: bool = False
    dtype: str = "float32"
    overwrite: bool = False

    def validate(self) -> None:
        if self.rank is None and self.energy is None:
            raise ConfigError("compress: give --rank k or --energy e (fraction of ‖ΔW‖² to keep)")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"--rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"--energy must be in (0, 1], got {self.energy}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def run_compress(config: CompressConfig, *, progress: ModuleProgress | None = None) -> MergeResult:
    config.validate()
    output = Path(config.output)
    require_free_output(output, overwrite=config.overwrite)
    if config.merge and config.base_model is None:
        raise ConfigError("--merge writes full merged weights, so --base-model must name the base model")
    check_base(config)
    clock = time.perf_counter()
    adapter = load_adapter(config.adapter)
    scaled = {path: LoraFactors(f.A.float(), f.B.float(), f.scale) for path, f in adapter.modules.items()}
    factors, facts = recompress_modules(scaled, rank=config.rank, energy=config.energy, progress=progress)
    timings = {"compress": time.perf_counter() - clock}
    rank = _write_artifact(
        config,
        [adapter],
        factors,
        facts,
        [],
        timings,
        extra={"command": "compress", "method": "exact truncated SVD"},
    )
    return MergeResult(
        output=output, method="compress", rank=rank, modules=facts, seconds=sum(timings.values())
    )
