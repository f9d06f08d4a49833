"""Move a file larger than one device call's carry (64 MiB) to the GPU machine in parts.

The device tool copies the working tree (and named ``carry`` paths, 64 MiB in all) to a machine
that stays warm for about 30 s after a call. A model file of 98 MiB (the SmolLM2 GGUF) or 241 MiB
(Gemma-3-270M) must therefore travel in parts, one part per call, the calls back to back so that
the machine, and the parts already staged on it, are still there:

    here, once:       python bench/carry.py split MODEL.gguf .carry/model     (parts + manifest)
    device call k:    python bench/carry.py stage .carry/model --part K       (carry partK + MANIFEST.json)
    last device call: python bench/carry.py stage .carry/model --part N && \\
                      python bench/carry.py join .carry/model                 (prints the joined path)

``stage`` copies its part out of the call's tree (the next call replaces that tree) into a store
under /tmp, which lives as long as the machine. A fresh machine has an empty store: a part staged
after the machine was lost finds the earlier parts missing, and ``stage`` says so (exit code 3: start
again from part 0) instead of letting a later step fail on a short file. Every part and the joined
file are checked against the sha256 recorded by ``split``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MANIFEST = "MANIFEST.json"
DEFAULT_STORE = Path(os.environ.get("LORASOUP_ASSETS", "/tmp/lorasoup-assets"))
DEFAULT_PART_MIB = 50  # leaves room under the 64 MiB carry for the repository itself (10 MiB in session 11)
LOST = 3  # exit code: the machine went back between two calls; the parts must be sent again


class CarryError(Exception):
    """A problem the user must act on; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    os.replace(temporary, path)


def split(source: Path, folder: Path, *, part_bytes: int = DEFAULT_PART_MIB << 20) -> dict:
    """Cut ``source`` into ``folder/part0, part1, ...`` of at most ``part_bytes``, as few as that allows
    and of equal size (the last a few bytes shorter: every call keeps the same room beside its part,
    and the last call, which carries the data too, is not the tightest), and write the manifest (name,
    size and sha256 of the whole file and of each part). Returns the manifest."""
    if not source.is_file():
        raise CarryError(f"no file at {source}")
    if part_bytes < 1:
        raise CarryError(f"the part size must be positive, got {part_bytes} bytes")
    size = source.stat().st_size
    count = max(1, -(-size // part_bytes))
    part_bytes = max(1, -(-size // count))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("part*"):
        stale.unlink()
    parts = []
    with source.open("rb") as handle:
        while block := handle.read(part_bytes):
            name = f"part{len(parts)}"
            _write_atomic(folder / name, block)
            parts.append({"name": name, "size": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    manifest = {"name": source.name, "size": source.stat().st_size, "sha256": sha256(source), "parts": parts}
    _write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise CarryError(f"{path} was not carried: name it in every call's carry list")
    return json.loads(path.read_text())


def _store_for(manifest: dict, store: Path) -> Path:
    return store / manifest["sha256"][:16]  # one folder per file version: stale parts never mix in


def stage(folder: Path, index: int, *, store: Path = DEFAULT_STORE) -> list[str]:
    """Copy part ``index`` from the carried ``folder`` into the machine's store, checked; the parts
    before it must already be there (else the machine was lost: :data:`LOST`). Returns the parts
    staged so far."""
    manifest = read_manifest(folder)
    parts = manifest["parts"]
    if not 0 <= index < len(parts):
        raise CarryError(f"{manifest['name']} has parts 0..{len(parts) - 1}, not {index}")
    target = _store_for(manifest, store)
    missing = [p["name"] for p in parts[:index] if not _intact(target / p["name"], p)]
    if missing:
        raise CarryError(
            "the device machine was lost since the last call (a fresh one has none of "
            f"{', '.join(missing)}): stage {manifest['name']} again from part 0, in back-to-back calls",
            LOST,
        )
    part = parts[index]
    carried = folder / part["name"]
    if not carried.is_file():
        raise CarryError(f"{carried} was not carried: name it in this call's carry list")
    if not _intact(carried, part):
        raise CarryError(f"{carried} is damaged (size or sha256 differs from the manifest): split again")
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(carried, target / f".{part['name']}.tmp")
    os.replace(target / f".{part['name']}.tmp", target / part["name"])
    return [p["name"] for p in parts if (target / p["name"]).is_file()]


def join(folder: Path, *, store: Path = DEFAULT_STORE) -> Path:
    """The whole file, joined from the staged parts and checked (once joined, later calls reuse it)."""
    manifest = read_manifest(folder)
    target = _store_for(manifest, store)
    whole = target / manifest["name"]
    if whole.is_file() and whole.stat().st_size == manifest["size"] and sha256(whole) == manifest["sha256"]:
        return whole
    missing = [p["name"] for p in manifest["parts"] if not _intact(target / p["name"], p)]
    if missing:
        raise CarryError(
            f"{', '.join(missing)} of {manifest['name']} not staged on this machine: if they were, the "
            "machine was lost between calls; stage every part again, in back-to-back calls",
            LOST,
        )
    temporary = target / f".{manifest['name']}.tmp"
    with temporary.open("wb") as out:
        for part in manifest["parts"]:
            with (target / part["name"]).open("rb") as handle:
                shutil.copyfileobj(handle, out)
    if sha256(temporary) != manifest["sha256"]:
        temporary.unlink()
        raise CarryError(f"the joined {manifest['name']} does not match its sha256: split and send again")
    os.replace(temporary, whole)
    return whole


CARRY_LIMIT = 64 << 20  # what one device call takes: the working tree and the carried paths


def call_bytes(repo: Path, carried: list[Path]) -> dict[str, int]:
    """Here, before a device call: the bytes that would travel — the tree (tracked files and untracked
    ones git does not ignore, as the device tool counts it) and each carried path (a folder whole)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    files = [repo / name for name in listed if name]
    sizes = {"tree": sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())}
    for path in carried:
        if not path.exists():
            raise CarryError(f"nothing to carry at {path}")
        inside = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        sizes[str(path)] = sum(f.stat().st_size for f in inside)
    return sizes


def _intact(path: Path, part: dict) -> bool:
    return path.is_file() and path.stat().st_size == part["size"] and sha256(path) == part["sha256"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cut = commands.add_parser("split", help="here: cut a file into parts and write the manifest")
    cut.add_argument("source", type=Path)
    cut.add_argument("folder", type=Path)
    cut.add_argument("--part-mib", type=int, default=DEFAULT_PART_MIB)
    put = commands.add_parser("stage", help="on the device: copy one carried part into the store")
    put.add_argument("folder", type=Path)
    put.add_argument("--part", type=int, required=True)
    put.add_argument("--store", type=Path, default=DEFAULT_STORE)
    whole = commands.add_parser("join", help="on the device: join the staged parts, print the file's path")
    whole.add_argument("folder", type=Path)
    whole.add_argument("--store", type=Path, default=DEFAULT_STORE)
    fits = commands.add_parser("fits", help="here: would one device call take the tree and these paths?")
    fits.add_argument("carried", type=Path, nargs="*")
    args = parser.parse_args(argv)
    try:
        if args.command == "fits":
            sizes = call_bytes(Path.cwd(), args.carried)
            total = sum(sizes.values())
            for name, size in sizes.items():
                print(f"{size / 2**20:8.1f} MiB  {name}")
            verdict = "fits" if total <= CARRY_LIMIT else "does NOT fit"
            print(f"{total / 2**20:8.1f} MiB  in all: {verdict} one call's {CARRY_LIMIT >> 20} MiB")
            return 0 if total <= CARRY_LIMIT else 1
        if args.command == "split":
            manifest = split(args.source, args.folder, part_bytes=args.part_mib << 20)
            count = len(manifest["parts"])
            print(f"{manifest['name']}: {count} parts in {args.folder}, sha256 {manifest['sha256']}")
        elif args.command == "stage":
            staged = stage(args.folder, args.part, store=args.store)
            print(f"staged: {', '.join(staged)}")
        else:
            print(join(args.folder, store=args.store))
    except CarryError as error:
        print(f"carry: {error}", file=sys.stderr)
        return error.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
