"""How each row of a demo study fails one task: its per-example verdicts counted over seeds.

Reads the per-example files a demo run writes (``seed-K/eval/<row>/<task>.jsonl``), from run
folders or from the ``per-example.tar.xz`` archives committed beside docs/results' real-model runs,
and prints one Markdown table: per row (in the order of ``--results``' table), how many answers were
correct, wrong (a number, not the reference), an error (the program raised or did not parse), gave no
code (no ``solution()`` to run: a worked answer), or timed out. docs/real-model.md's failure-mode
table is this command's output (tests/demo/test_docs_table.py checks it).

    PYTHONPATH=src python bench/verdicts.py docs/results/demo-smollm2-gpu-h100-3seeds/results.json \\
        docs/results/demo-smollm2-gpu-h100-procedural{,-seed1,-seed2}/per-example.tar.xz
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from lorasoup.demo.scoring import slug
from lorasoup.report import markdown_table

VERDICTS = ("correct", "wrong", "error", "no-code", "timeout")


def records(source: Path, task: str) -> Iterator[tuple[str, dict]]:
    """``(row folder, record)`` for every scored example of ``task`` in a run folder or an archive."""
    suffix = f"/{task}.jsonl"
    if source.is_dir():
        for path in sorted(source.glob(f"seed-*/eval/*/{task}.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                yield path.parent.name, json.loads(line)
        return
    with tarfile.open(source) as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.endswith(suffix):
                row = member.name.split("/")[-2]
                for line in archive.extractfile(member).read().decode("utf-8").splitlines():
                    yield row, json.loads(line)


def count_verdicts(sources: list[Path], task: str) -> dict[str, collections.Counter]:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for source in sources:
        for row, record in records(source, task):
            counts[row][record["verdict"]] += 1
    return counts


def verdict_table(results: dict, sources: list[Path], task: str = "composite") -> list[str]:
    """The Markdown lines: one row per method of ``results``' table that has ``task`` answers."""
    counts = count_verdicts(sources, task)
    unknown = {v for c in counts.values() for v in c} - set(VERDICTS)
    if unknown:
        raise ValueError(f"verdicts this table has no column for: {sorted(unknown)}")
    rows = [
        [row["method"], sum(found.values()), *(found[v] for v in VERDICTS)]
        for row in results["table"]
        if (found := counts.get(slug(row["method"])))
    ]
    return markdown_table(["method", "answers", *VERDICTS], rows).splitlines()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="a results.json whose table gives the rows and their order")
    p.add_argument("sources", type=Path, nargs="+", help="run folders or per-example.tar.xz archives")
    p.add_argument("--task", default="composite")
    args = p.parse_args(argv)
    missing = [str(path) for path in [args.results, *args.sources] if not path.exists()]
    if missing:
        print(f"verdicts.py: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    results = json.loads(args.results.read_text(encoding="utf-8"))
    print("\n".join(verdict_table(results, args.sources, args.task)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
