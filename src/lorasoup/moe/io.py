"""Save and load a trained mixture of LoRA experts.

A MoE artifact is a directory:

* ``moe_config.json``: ``format: "lorasoup-moe"``, ``format_version``, ``base_model`` (the model
  spec; local paths made absolute), ``router`` (``granularity``, ``top_k``, ``renormalize``),
  ``adapters`` (in gate order: ``name``, ``path``, ``copied``, and the ``sha256`` of each of the
  adapter's files),
  ``groups`` (router names in order, with ``in_features``), ``modules`` (module path → router name)
  and ``training_data`` (the data config the routers were trained on, or null);
* ``router.safetensors``: ``<router name>.weight (K, in)`` and ``<router name>.bias (K,)``, float32,
  where a router name is a module path (``router.granularity: module``) or a block path (``layer``);
* ``adapters/NN-name/``: a copy of each PEFT adapter when ``copied`` is true; otherwise ``path`` is
  the adapter's original location and its files must still have the recorded sha256 to load.

``load_moe`` rebuilds the composition on the base model: the model it returns generates like any
transformers model (``model.generate``, KV cache included).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorasoup.adapters import CONFIG_NAME, WEIGHT_NAMES, load_adapter, resolve_adapter_dir
from lorasoup.artifacts import file_sha256, write_json_atomic
from lorasoup.errors import AdapterError, LorasoupError
from lorasoup.moe.inject import MoeComposition, compose_moe

MOE_CONFIG = "moe_config.json"
ROUTER_WEIGHTS = "router.safetensors"
FORMAT = "lorasoup-moe"
FORMAT_VERSION = 1


def _adapter_files(directory: Path) -> list[Path]:
    return [directory / name for name in (CONFIG_NAME, *WEIGHT_NAMES) if (directory / name).is_file()]


def _adapter_entry(adapter: Any, index: int, directory: Path, copy: bool) -> dict[str, Any]:
    source = resolve_adapter_dir(adapter.source)
    files = _adapter_files(source)
    entry: dict[str, Any] = {
        "name": adapter.name,
        "copied": copy,
        "sha256": {f.name: file_sha256(f) for f in files},
    }
    if copy:
        relative = Path("adapters") / f"{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', adapter.name)}"
        (directory / relative).mkdir(parents=True)
        for f in files:
            shutil.copy2(f, directory / relative / f.name)
        entry["path"] = relative.as_posix()
    else:
        entry["path"] = str(source.resolve())
    return entry


def save_moe(
    composition: MoeComposition,
    directory: str | Path,
    *,
    base_model: str,
    copy_adapters: bool = True,
    training_data: dict[str, Any] | None = None,
) -> Path:
    """Write ``composition`` as a MoE artifact (module docstring) into ``directory`` (created if needed).

    The caller owns atomicity (``lorasoup.artifacts.atomic_output_dir``).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    local = Path(base_model).expanduser()
    routers = list(composition.routers)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": str(local.resolve()) if local.exists() else base_model,
        "router": {
            "granularity": composition.granularity,
            "top_k": composition.top_k,
            "renormalize": composition.renormalize,
        },
        "adapters": [
            _adapter_entry(adapter, k, directory, copy_adapters)
            for k, adapter in enumerate(composition.adapters)
        ],
        "groups": [
            {"name": name, "in_features": router.in_features}
            for name, router in zip(composition.group_names, routers, strict=True)
        ],
        "modules": {site.path: composition.group_names[site.group] for site in composition.sites},
        "training_data": training_data,
    }
    save_file(composition.router_state(), str(directory / ROUTER_WEIGHTS), metadata={"format": "pt"})
    write_json_atomic(directory / MOE_CONFIG, config)
    return directory


def read_moe_config(directory: str | Path) -> dict[str, Any]:
    """``moe_config.json`` of a MoE artifact, checked for its format."""
    path = Path(directory) / MOE_CONFIG
    if not path.is_file():
        raise LorasoupError(f"{directory}: no {MOE_CONFIG}; pass a directory written by `lorasoup moe`")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LorasoupError(f"{path}: not valid JSON ({err}); the artifact is damaged") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise LorasoupError(f"{path}: not a lorasoup MoE config (format must be {FORMAT!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise LorasoupError(
            f"{path}: format_version {config.get('format_version')!r} is not supported "
            f"(this lorasoup reads {FORMAT_VERSION}); use the lorasoup version that wrote it"
        )
    return config


def _load_adapters(directory: Path, entries: list[dict[str, Any]]) -> list[Any]:
    adapters = []
    for entry in entries:
        path = directory / entry["path"] if entry["copied"] else Path(entry["path"])
        for name, digest in entry["sha256"].items():
            file = path / name
            if not file.is_file() or file_sha256(file) != digest:
                raise AdapterError(
                    f"adapter {entry['name']!r}: {file} is missing or changed since the MoE was trained "
                    "(sha256 mismatch); restore the original adapter or retrain the routers"
                )
        adapters.append(load_adapter(path, name=entry["name"]))
    return adapters


def _load_router_state(composition: MoeComposition, directory: Path, config: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    names = [group["name"] for group in config["groups"]]
    if names != composition.group_names:
        raise LorasoupError(
            f"{directory}: the routers ({len(names)}) do not match the modules the adapters adapt "
            f"({len(composition.group_names)}); the adapters or the artifact changed"
        )
    state = load_file(str(directory / ROUTER_WEIGHTS))
    with torch.no_grad():
        for name, router in zip(names, composition.routers, strict=True):
            for part in ("weight", "bias"):
                tensor = state.get(f"{name}.{part}")
                target = getattr(router, part)
                if tensor is None or tensor.shape != target.shape:
                    raise LorasoupError(
                        f"{directory / ROUTER_WEIGHTS}: {name}.{part} is missing or has the wrong shape; "
                        "the artifact is damaged"
                    )
                target.copy_(tensor)


def load_moe(
    directory: str | Path,
    *,
    model: nn.Module | None = None,
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> MoeComposition:
    """Rebuild a saved MoE on its base model (or on ``model``, a fresh base model already loaded).

    ``base_model`` overrides the recorded model spec (say, the same model in another directory).
    """
    directory = Path(directory)
    config = read_moe_config(directory)
    if not (directory / ROUTER_WEIGHTS).is_file():
        raise LorasoupError(f"{directory}: no {ROUTER_WEIGHTS}; the artifact is incomplete")
    adapters = _load_adapters(directory, config["adapters"])
    if model is None:
        from lorasoup.models import load_base_model, parse_model_spec

        spec = parse_model_spec(base_model or config["base_model"])
        model = load_base_model(spec, dtype=dtype, device=device)
    router = config["router"]
    composition = compose_moe(
        model,
        adapters,
        granularity=router["granularity"],
        top_k=router["top_k"],
        renormalize=bool(router.get("renormalize", False)),
        allow_base_mismatch=True,  # checked when the routers were trained
    )
    _load_router_state(composition, directory, config)
    composition.model.eval()
    return composition
