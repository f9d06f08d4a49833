"""Rebuild a smollm2 demo table from its per-example files, for a run cut off before its report.

The device tool stops a command after 10 minutes; the GPU run of ``lorasoup demo --model smollm2``
(``bench/device_smollm2.sh``) finished every scoring but was stopped while writing its report. Every
scored example is in ``SEED_DIR/eval/<method>/<task>.jsonl``, so the table is recomputed from those
(accuracy = correct / examples, as the harness scores it) and drawn with lorasoup's report functions.

    python bench/smollm2_report_from_evals.py RUN/seed-0 docs/results/demo-smollm2-gpu --note "..."

The GSM-Hard column is added when the run scored it (``eval/<method>/gsm-hard.jsonl``), with the
LoRA Soups paper's figures beside it, labelled as another model's. A row the run did not reach is
"–" (its mean is null in ``results.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorasoup.demo.run import paper_gsm_hard_lines
from lorasoup.demo.scoring import slug
from lorasoup.demo.settings import TASKS
from lorasoup.report import markdown_table, methods_bar_chart, weights_heatmap

# The methods of the real demo, in its order, with their kinds (demo/compose.py, demo/real_study.py).
METHODS = [
    ("base model", "reference"),
    ("math skill LoRA", "skill"),
    ("code skill LoRA", "skill"),
    ("DATA-MIX", "baseline"),
    ("linear", "merge"),
    ("TIES", "merge"),
    ("DARE", "merge"),
    ("SVD", "merge"),
    ("core-space TIES", "merge"),
    ("TSV-Merge", "merge"),
    ("layer swap", "merge"),
    ("CAT, weights at init", "CAT"),
    ("CAT, uniform weights", "CAT"),
    ("CAT (trained)", "CAT"),
    ("LoraHub search", "search"),
    ("MoE (per-token router)", "baseline"),
    ("MoE → CAT (mean gates)", "baseline"),
    ("CAT on target examples", "CAT"),  # extra_rows only
    ("LoRA-Flow (per-layer gates)", "baseline"),
    ("LoRA-Flow → CAT (mean gates)", "baseline"),
    ("oracle (composite data)", "ceiling"),
]


def accuracy(path: Path) -> tuple[float, int] | None:
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sum(1 for r in rows if r.get("correct")) / len(rows), len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("seed_dir", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--note", default="", help="a paragraph on how the run was made")
    parser.add_argument("--title", default="seed 0, H200", help="what ran where, for the title and chart")
    args = parser.parse_args()
    scored_gsm_hard = any((args.seed_dir / "eval").glob("*/gsm-hard.jsonl"))
    tasks = (*TASKS, "gsm-hard") if scored_gsm_hard else TASKS
    table, counts = [], {}
    scored = {path.name for path in (args.seed_dir / "eval").iterdir() if path.is_dir()}
    # a row the run never had (the extra rows off, an older run) is left out; one it did not reach is "–"
    extra = {"CAT on target examples", "LoRA-Flow (per-layer gates)", "LoRA-Flow → CAT (mean gates)"}
    for method, kind in METHODS:
        if method in extra and slug(method) not in scored:
            continue
        row: dict = {"method": method, "kind": kind, "detail": ""}
        for task in tasks:
            found = accuracy(args.seed_dir / "eval" / slug(method) / f"{task}.jsonl")
            value = None if found is None else found[0]
            if found is not None:
                counts[f"{method}/{task}"] = found[1]
            row[task] = {"mean": value, "std": 0.0, "values": [value]}
        table.append(row)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(
        json.dumps({"tasks": list(tasks), "table": table, "examples": counts}, indent=1) + "\n",
        encoding="utf-8",
    )
    plotted = [{**r, **{t: {"mean": r[t]["mean"] or 0.0, "std": 0.0} for t in tasks}} for r in table]
    methods_bar_chart(
        plotted, tasks, args.output / "methods.png", title=f"accuracy per method ({args.title})"
    )
    weights = json.loads((args.seed_dir / "cat" / "cat_weights.json").read_text(encoding="utf-8"))
    weights_heatmap(
        weights["weights"], args.output / "cat_weights.png", title="CAT's learned weights (seed 0)"
    )

    def cell(row: dict, task: str) -> str:
        return "–" if row[task]["mean"] is None else f"{100 * row[task]['mean']:.1f}"

    headers = ["method", "composite task (%)", "math skill (%)", "code skill (%)", "GSM-Hard (%)"]
    lines = [
        markdown_table(
            headers[: len(tasks) + 1], [[r["method"], *(cell(r, t) for t in tasks)] for r in table]
        )
    ]
    if scored_gsm_hard:
        reached = [r for r in table if r["gsm-hard"]["mean"] is not None]
        lines += ["", *paper_gsm_hard_lines(reached)]
    text = "\n".join(
        [
            f"# lorasoup demo --model smollm2 on a GPU ({args.title})",
            "",
            args.note,
            "",
            *lines,
            "",
            "![accuracy per method](methods.png)",
            "",
            "![CAT weights](cat_weights.png)",
            "",
        ]
    )
    (args.output / "report.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
