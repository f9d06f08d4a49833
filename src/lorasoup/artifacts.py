"""Run directories: written atomically, and describing themselves in ``run.json``.

Every command builds its artifact in a hidden temporary directory beside the destination and renames
it into place only when everything is written, so a crash or a bad input never leaves a half-written
result where a user (or a later command) would take it for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from lorasoup.errors import LorasoupError

RUN_JSON = "run.json"
_PACKAGES = ("lorasoup", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers")


def require_free_output(destination: Path, *, overwrite: bool) -> None:
    """Fail early (before any long work) when ``destination`` exists and may not be replaced."""
    if destination.exists() and not overwrite:
        raise LorasoupError(f"output {destination} already exists; choose another path or pass --overwrite")


@contextmanager
def atomic_output_dir(destination: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``destination`` if the block succeeds.

    On any exception the temporary directory is removed and ``destination`` is left as it was. Before
    the rename, paths into the staging directory that its text artifacts record (a demo adapter's base
    model trained in it, ``results.json``'s artifact fields) are rewritten to ``destination``
    (:func:`relocate_paths`), so nothing written names a folder that no longer exists.
    """
    destination = Path(destination)
    require_free_output(destination, overwrite=overwrite)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        yield staging
        _move_into_place(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


RELOCATED_SUFFIXES = (".json", ".yaml", ".md", ".html", ".txt")
"""The text artifacts that may name their own folder (configs, records, reports); weights and
per-example logs never do and are not read."""


def relocate_paths(staging: Path, destination: Path) -> None:
    """Rewrite the staging folder's path (as written, and absolute) to ``destination`` in the text
    artifacts under ``staging``. The staging name (``.NAME.tmp-XXXX``, or a resumable run's
    ``.NAME.partial``) is unique, so a plain text replacement cannot touch anything else."""
    pairs = [(str(staging.resolve()), str(destination.resolve())), (str(staging), str(destination))]
    for path in staging.rglob("*"):
        if path.suffix not in RELOCATED_SUFFIXES or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        if staging.name not in text:
            continue
        for old, new in pairs:
            text = text.replace(old, new)
        path.write_text(text, encoding="utf-8", errors="surrogateescape")


@contextmanager
def resumable_output_dir(
    destination: str | Path, fingerprint: dict[str, Any], *, overwrite: bool = False
) -> Iterator[Path]:
    """Like :func:`atomic_output_dir`, but the work happens in ``.NAME.partial`` beside
    ``destination`` and that folder stays after a failure or a kill, so that running again with the
    same ``fingerprint`` (what the results depend on) resumes in it; it becomes ``destination`` when
    the block succeeds. A partial folder of other settings is refused with a one-line error."""
    destination = Path(destination)
    require_free_output(destination, overwrite=overwrite)
    work = destination.with_name(f".{destination.name}.partial")
    stamp = work / "resume.json"
    wanted = json.loads(json.dumps(to_jsonable(fingerprint)))
    if work.exists():
        found = json.loads(stamp.read_text(encoding="utf-8")) if stamp.is_file() else None
        if found != wanted:
            raise LorasoupError(
                f"{work} holds a partial run of other settings; remove it, or resume with the settings "
                "it was started with"
            )
    else:
        work.mkdir(parents=True)
        stamp.write_text(json.dumps(wanted, indent=1), encoding="utf-8")
    yield work
    stamp.unlink()
    _move_into_place(work, destination)


def _move_into_place(folder: Path, destination: Path) -> None:
    """Rename a finished ``folder`` to ``destination``, its recorded paths relocated first."""
    relocate_paths(folder, destination)
    replace_dir(folder, destination)


def replace_dir(folder: Path, destination: Path) -> None:
    """Rename a finished ``folder`` to ``destination``, replacing an older one only once it is whole
    (the old one is renamed aside first and removed after)."""
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        destination.rename(old)
        folder.rename(destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        folder.rename(destination)


@contextmanager
def atomic_file(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; if the block succeeds it replaces ``path`` (``os.replace``,
    atomic on POSIX), otherwise it is removed. The one atomic writer: every file lorasoup writes goes
    through it (or through :func:`atomic_output_dir` for a whole directory). ``suffix`` keeps an
    extension for writers that read it (matplotlib picks the format from ``.png``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON (indented, one trailing newline) atomically."""
    write_text_atomic(path, json.dumps(to_jsonable(payload), indent=2, sort_keys=False) + "\n")


def to_jsonable(value: Any) -> Any:
    """Dataclasses, paths, tuples and torch dtypes to plain JSON values."""
    if is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    if versions.get("lorasoup") == "not installed":
        # run from a source tree on PYTHONPATH (the GPU machine's copy): the code is there, only its
        # install record is not
        from lorasoup import __version__

        versions["lorasoup"] = f"{__version__} (source tree, not installed)"
    return versions


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inputs_fingerprint(paths: list[Path]) -> dict[str, str]:
    """sha256 of each regular file, so a run can be matched to the exact inputs it read."""
    return {str(p): file_sha256(p) for p in paths if p.is_file()}


def run_record(
    *, command: str, config: Any, seed: int, timings: dict[str, float], **extra: Any
) -> dict[str, Any]:
    """The content of ``run.json``: what ran, with which versions, seed and timings."""
    return {
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "seed": seed,
        "config": to_jsonable(config),
        "versions": package_versions(),
        "platform": platform.platform(),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        **to_jsonable(extra),
    }
