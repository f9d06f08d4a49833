"""A built benchmark saved to a file and read back exactly, one ``Benchmark`` per seed.

Building the smollm2 demo's data needs reasoning-gym and runs every CodeI/O reference in the sandbox
(minutes for GPU-sized splits on a small machine). ``lorasoup demo --model smollm2 --save-benchmark
PATH`` builds it once; a run with ``--set benchmark_file=PATH`` reads it instead, on a machine that
only trains and scores (a GPU box without reasoning-gym or internet). This module imports neither
reasoning-gym nor torch.

The file is JSON, gzip-compressed when its name ends in ``.gz``, written atomically::

    {"format": "lorasoup-benchmark", "version": 1,
     "built_with": {"sizes.skill": 3000, ..., "template": "chat", "cutoff_len": 256, "tokenizer": "…"},
     "sources": {"reasoning-gym": "0.1.25"},
     "seeds": {"0": {"base": [], "train": {"math": [...], ...}, "test": {...}}}}

``built_with`` holds everything the records depend on besides the seed (flat keys, as ``--set``
names them); reading refuses a file whose ``built_with`` differs from the run's, or that lacks the
run's seed, with the one line that says how to fix it. JSON keeps Python's ints and floats exactly
(floats are written with ``repr``), so a record reads back equal to the one written.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorasoup.artifacts import write_bytes_atomic
from lorasoup.demo.benchmark import Benchmark
from lorasoup.errors import DataError

FORMAT = "lorasoup-benchmark"
VERSION = 1
SAVE_HINT = "lorasoup demo --model smollm2 --save-benchmark PATH"


def write_benchmarks(
    path: str | Path,
    benchmarks: Mapping[int, Benchmark],
    built_with: Mapping[str, Any],
    *,
    sources: Mapping[str, str] | None = None,
) -> Path:
    """Write ``benchmarks`` (seed → benchmark) to ``path`` through a temporary file and
    an atomic replace (``lorasoup.artifacts``), so a reader never sees half a file."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "built_with": dict(built_with),
        "sources": dict(sources or {}),
        "seeds": {
            str(seed): {"base": b.base, "train": b.train, "test": b.test} for seed, b in benchmarks.items()
        },
    }
    try:
        text = json.dumps(payload, allow_nan=False, ensure_ascii=False)
    except ValueError as exc:  # NaN or infinity in a record: JSON has no exact spelling for them
        raise DataError(f"benchmark for {path} holds a value JSON cannot store exactly: {exc}") from exc
    data = text.encode("utf-8")
    if _gzipped(path):
        data = gzip.compress(data, compresslevel=6, mtime=0)  # mtime 0: same data, same bytes
    write_bytes_atomic(path, data)
    return path


def read_benchmark(path: str | Path, seed: int, built_with: Mapping[str, Any]) -> Benchmark:
    """The benchmark of ``seed`` from ``path``, after checking it was built as ``built_with`` says."""
    payload = _read(Path(path))
    check_built_with(path, payload, built_with, [seed])
    split = payload["seeds"][str(seed)]
    return Benchmark(base=split["base"], train=split["train"], test=split["test"])


def check_benchmark_file(
    path: str | Path, built_with: Mapping[str, Any], seeds: list[int] | None = None
) -> dict[str, Any]:
    """Read ``path`` and check it against the run (``built_with``, and ``seeds`` when given) before
    any long work; returns the file's content."""
    payload = _read(Path(path))
    check_built_with(path, payload, built_with, seeds)
    return payload


def check_built_with(
    path: str | Path, payload: Mapping[str, Any], built_with: Mapping[str, Any], seeds: list[int] | None
) -> None:
    """A one-line ``DataError`` naming every key the file and the run disagree on, or a missing seed.

    Only the keys of ``built_with`` are compared (the run may know more, e.g. no tokenizer yet)."""
    recorded = payload["built_with"]
    differ = [key for key in built_with if recorded.get(key) != built_with[key]]
    if differ:
        theirs = ", ".join(f"{key}={recorded.get(key)!r}" for key in differ)
        ours = ", ".join(f"{key}={built_with[key]!r}" for key in differ)
        raise DataError(
            f"benchmark_file {path} was built with {theirs}, but this run has {ours}; set the file's "
            f"values, or rebuild it for these settings: {SAVE_HINT}"
        )
    have = sorted(int(s) for s in payload["seeds"])
    missing = [s for s in seeds or [] if str(s) not in payload["seeds"]]
    if missing:
        raise DataError(
            f"benchmark_file {path} holds seeds {have}, not {missing}; run those seeds, or rebuild it "
            f"with --seed/--seeds covering them: {SAVE_HINT}"
        )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides a record's token count: the vocabulary, chat template and EOS token.

    The data keep only records within the study's token budget, so a file is valid for the tokenizer
    it was built with."""
    content = [sorted(tokenizer.get_vocab().items()), tokenizer.chat_template, tokenizer.eos_token]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"benchmark_file {path} does not exist; build it with: {SAVE_HINT}")
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
        payload = json.loads(text)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise DataError(f"benchmark_file {path} cannot be read ({detail}); rebuild it: {SAVE_HINT}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"benchmark_file {path} is not a lorasoup benchmark file; build one: {SAVE_HINT}")
    if payload.get("version") != VERSION:
        raise DataError(
            f"benchmark_file {path} has format version {payload.get('version')!r}, this lorasoup reads "
            f"{VERSION}; rebuild it: {SAVE_HINT}"
        )
    return payload


def _gzipped(path: Path) -> bool:
    return path.suffix == ".gz"
