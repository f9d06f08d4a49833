"""Turn one finished real-model seed that a device call sent back into its folder under docs/results.

``bench/device_real_model.sh run`` returns each finished seed as ``$OUT/seed-K.tar.gz`` (the run
folder: report, results, run.json, plots, and the work folder ``seed-K/`` with every per-example file)
beside the call's ``env.txt`` and ``stages.txt``. The committed folder keeps what a reader needs and
nothing that weighs: the report files, the machine (``env.txt``), when each stage began in each call
(``stages.txt``, this seed's lines only) and the per-example files as ``per-example.tar.xz``, which
``bench/verdicts.py`` reads. xz, not gzip: a fifth of the size, and every committed byte travels in each
device call's 64 MiB beside a model's parts.

    PYTHONPATH=src python bench/publish_seed.py /work/.device/12/seed-1.tar.gz \\
        docs/results/demo-smollm2-gpu-h100-steps400-seed1 --calls /work/.device/12 /work/.device/13 \\
        --note "session 12, one H100: seeds 0 and 1 side by side, two calls with --resume"

The folder is written whole or not at all; an existing one is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lorasoup.artifacts import atomic_output_dir
from lorasoup.errors import LorasoupError

REPORT_FILES = ("report.md", "results.json", "run.json", "cat_weights.png", "methods.png")
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive", type=Path, help="seed-K.tar.gz from a device call's $OUT")
    p.add_argument("destination", type=Path, help="the folder to write, e.g. docs/results/NAME-seedK")
    p.add_argument("--calls", type=Path, nargs="*", default=[], help="the calls' $OUT folders, in order")
    p.add_argument("--note", default="", help="first lines of stages.txt (what ran where)")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def seed_folder(root: Path) -> Path:
    """The run folder inside an unpacked archive: the one top-level ``seed-K`` with ``results.json``."""
    found = [d for d in root.iterdir() if d.is_dir() and (d / "results.json").is_file()]
    if len(found) != 1:
        raise LorasoupError(
            f"expected one finished seed folder (with results.json) in the archive, found {len(found)}"
        )
    return found[0]


def stage_lines(calls: list[Path], seed_name: str, note: str) -> str:
    """This seed's stage lines from each call's stages.txt, under a ``## call N`` header per call."""
    prefix = seed_name.replace("-", " ") + ": "  # "seed-1" -> "seed 1: ", as the demo's progress bar
    lines = [f"# {line}" for line in note.splitlines()]
    for number, call in enumerate(calls, start=1):
        stages = call / "stages.txt"
        if not stages.is_file():
            raise LorasoupError(
                f"{stages} does not exist: pass the $OUT folders of the calls that ran this seed"
            )
        lines.append(f"## call {number}")
        text = ESCAPES.sub("", stages.read_text(encoding="utf-8", errors="replace"))
        lines += [line for line in text.splitlines() if line.startswith(prefix)]
    return "\n".join(lines) + "\n"


def publish(
    archive: Path, destination: Path, calls: list[Path], note: str = "", overwrite: bool = False
) -> Path:
    if not archive.is_file():
        raise LorasoupError(f"{archive} does not exist")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(scratch, filter="data")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise LorasoupError(f"{archive} is not a readable tar archive: {err}") from err
        run = seed_folder(Path(scratch))
        evals = run / run.name / "eval"
        if not evals.is_dir():
            raise LorasoupError(f"{archive} has no {run.name}/{run.name}/eval folder: no per-example files")
        with atomic_output_dir(destination, overwrite=overwrite) as staging:
            for name in REPORT_FILES:
                if (run / name).is_file():
                    shutil.copy2(run / name, staging / name)
            if calls:
                if (calls[0] / "env.txt").is_file():
                    shutil.copy2(calls[0] / "env.txt", staging / "env.txt")
                (staging / "stages.txt").write_text(stage_lines(calls, run.name, note), encoding="utf-8")
            with tarfile.open(staging / "per-example.tar.xz", "w:xz", preset=9) as out:
                out.add(evals, arcname=f"{run.name}/eval", filter=_plain_member)
    return destination


def _plain_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """No owner or time in the archive, so publishing the same seed twice gives the same bytes."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = publish(args.archive, args.destination, args.calls, args.note, args.overwrite)
    except LorasoupError as err:
        print(f"publish_seed.py: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
