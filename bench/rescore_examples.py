"""Re-score per-example files (``examples.jsonl`` or a demo's ``eval/<method>/<task>.jsonl``) with
today's metrics, without a model: before → after accuracy per file, and the examples that changed.

``--metric numeric`` re-scores each record's ``extracted`` against its ``reference`` (for program tasks,
``extracted`` is what ``solution()`` returned). ``--programs`` also re-runs, in the sandbox, the programs
of records scored correct, to apply the rule that a returned string must pass ``float()`` (the records
do not say whether ``solution()`` returned a string or a number).

    python bench/rescore_examples.py --metric numeric --programs RUN/seed-0/eval/*/*.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorasoup.evaluation.extract import extract_program
from lorasoup.evaluation.metrics import METRICS
from lorasoup.evaluation.sandbox import SandboxLimits, run_programs


def rescore(path: Path, metric: str, programs: bool) -> tuple[int, int, int, list[str]]:
    """(examples, correct before, correct after, ids whose verdict changed) of one file."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    score = METRICS.get(metric)
    after = {r["id"]: bool(r["correct"]) and score(r["extracted"], r["reference"]) > 0.5 for r in records}
    if programs:
        kept = [(r, code) for r in records if after[r["id"]] and (code := extract_program(r["generation"]))]
        ran = run_programs([code for _, code in kept], call="solution", limits=SandboxLimits())
        for (record, _), result in zip(kept, ran, strict=True):
            if result.returned_type == "str" and not _reads_as_float(result.returned or ""):
                after[record["id"]] = False
    changed = [r["id"] for r in records if bool(r["correct"]) != after[r["id"]]]
    return len(records), sum(bool(r["correct"]) for r in records), sum(after.values()), changed


def _reads_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--metric", default="numeric")
    parser.add_argument("--programs", action="store_true", help="re-run the correct ones' programs")
    args = parser.parse_args()
    for path in args.files:
        count, before, after, changed = rescore(path, args.metric, args.programs)
        note = f"  changed: {', '.join(changed)}" if changed else ""
        print(f"{path}: {before}/{count} → {after}/{count}{note}")


if __name__ == "__main__":
    main()
