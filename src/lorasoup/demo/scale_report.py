"""The scaling study's report: ``scaling.md``, ``scaling.html``, ``scaling.json``, ``scaling.png`` and
``run.json`` in the study's folder, built from each finished size's ``results.json`` and ``run.json``.

Composite accuracy of every method (mean ± std over seeds) against the base model's parameter count,
the oracle as the ceiling; skill retention (math / code) per size; and, computed from the numbers,
where CAT (trained) overtakes DATA-MIX and each merge (:func:`overtaking`). Sizes not finished yet
are listed as missing, so a report written after part of the ladder (``--only``) says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasoup.demo.settings import TASKS
from lorasoup.errors import LorasoupError

if TYPE_CHECKING:
    from lorasoup.demo.scale import StudyConfig

CAT = "CAT (trained)"
RIVALS = ("DATA-MIX", "linear", "TIES", "DARE", "SVD")
"""What CAT is measured against: the paper's claim is CAT > DATA-MIX and the static merges."""
UNTRAINED = ("base model", "CAT, weights at init", "CAT, uniform weights")
LADDER_COLUMNS = [
    "size",
    "parameters",
    "layers × hidden",
    "base steps",
    "LoRA steps",
    "CAT steps",
    "device",
    "pre-training",
    "s per seed",
]
Cell = dict[str, Any] | None
"""One size's ``{"mean", "std", "values"}`` of a method on a task; None where the method did not run."""


def comparable(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A size's settings as compared between a config and a finished run: all but ``device``
    (where it ran does not change what it is, and ``auto`` and ``cuda`` name the same GPU)."""
    return {key: value for key, value in settings.items() if key != "device"}


def collect(out: Path, config: StudyConfig) -> dict[str, Any]:
    """``scaling.json``'s content: every finished size of ``config`` in ``out``, in the config's order."""
    from lorasoup.demo.base import bf16_pretraining
    from lorasoup.demo.settings import settings_record

    sizes, missing, notices = [], [], []
    for preset in config.sizes:
        folder = out / preset.name
        try:
            results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
            record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            missing.append(preset.name)
            continue
        expected = comparable(json.loads(json.dumps(settings_record(config.settings(preset)))))
        if comparable(results["settings"]) != expected or results.get("seeds") != config.seed_list:
            notices.append(f"{preset.name}: its settings or seeds differ from the config's (shown as it ran)")
        base = results["settings"]["base"]
        sizes.append(
            {
                "name": preset.name,
                "parameters": record["base_models"][0]["parameters"],
                "shape": {k: base[k] for k in ("layers", "hidden", "intermediate", "heads")},
                "steps": {
                    "base": base["steps"],
                    "lora": results["settings"]["lora_steps"],
                    "cat": results["settings"]["cat_steps"],
                },
                "seeds": results["seeds"],
                "device": results.get("device", "cpu"),
                "gpu": results.get("gpu"),
                # one config pre-trains a different base on a CPU (docs/study.md, the 0.7M rung)
                "pretraining": "bf16 autocast"
                if bf16_pretraining(results.get("device", "cpu"), base.get("cuda_bf16", False))
                else "fp32",
                "seconds": record["timings_s"]["total"],
                "seed_seconds": [
                    record["timings_s"].get(f"seed_{seed}_total_s") for seed in results["seeds"]
                ],
                "table": results["table"],
            }
        )
    if not sizes:
        listed = ", ".join(config.names)
        raise LorasoupError(f"{out} holds no finished size of this study ({listed}); run the study first")
    methods = list(dict.fromkeys(row["method"] for size in sizes for row in size["table"]))
    accuracy = {
        method: {task: [_cell(size["table"], method, task) for size in sizes] for task in TASKS}
        for method in methods
    }
    data = {
        "tasks": list(TASKS),
        "sizes": [{k: v for k, v in size.items() if k != "table"} for size in sizes],
        "methods": methods,
        "kinds": {row["method"]: row["kind"] for size in sizes for row in size["table"]},
        "accuracy": accuracy,
        "missing": missing,
        "notices": notices,
    }
    data["overtaking"] = {
        rival: overtaking(accuracy.get(CAT, {}).get("composite", []), accuracy[rival]["composite"])
        for rival in RIVALS
        if rival in accuracy and CAT in accuracy
    }
    return data


def _cell(table: Sequence[dict[str, Any]], method: str, task: str) -> Cell:
    row = next((r for r in table if r["method"] == method), None)
    return None if row is None else row[task]


def overtaking(cat: Sequence[Cell], rival: Sequence[Cell]) -> dict[str, Any]:
    """Where CAT's mean composite accuracy is above ``rival``'s, size by size (sizes in ladder order).

    ``from``: the index of the first size from which CAT is above at every larger size (None if it
    is not above at the largest); ``above``: per size, True / False (None where either is missing);
    ``margin``: CAT − rival in points; ``clear``: the margin exceeds the two seed spreads (std)
    added (None with one seed).
    """
    above, margin, clear = [], [], []
    for c, r in zip(cat, rival, strict=True):
        if c is None or r is None:
            above.append(None)
            margin.append(None)
            clear.append(None)
            continue
        difference = 100 * (c["mean"] - r["mean"])
        above.append(difference > 0)
        margin.append(difference)
        spread = len(c["values"]) > 1 and len(r["values"]) > 1
        clear.append(abs(difference) > 100 * (c["std"] + r["std"]) if spread else None)
    start = None
    for index in range(len(above) - 1, -1, -1):
        if not above[index]:
            break
        start = index
    return {"from": start, "above": above, "margin": margin, "clear": clear}


def overtaking_lines(data: dict[str, Any]) -> list[str]:
    """One sentence per rival: where CAT (trained) overtakes it, if anywhere."""
    names = [size["name"] for size in data["sizes"]]
    lines = []
    for rival, found in data["overtaking"].items():
        above = [names[i] for i, a in enumerate(found["above"]) if a]
        start = found["from"]
        if start == 0:
            text = f"CAT (trained) is above {rival} at every size"
        elif start is not None:
            text = f"CAT (trained) overtakes {rival} at {names[start]} and stays above at every larger size"
        elif above:
            text = f"CAT (trained) is above {rival} at {', '.join(above)} only, not at the largest size"
        else:
            text = f"CAT (trained) is never above {rival}"
        last, clear = found["margin"][-1], found["clear"][-1]
        if last is not None:
            spread = "" if clear is None else f", {'beyond' if clear else 'within'} the seeds' spread"
            text += f" (largest size: {last:+.1f} points{spread})"
        lines.append(f"- {text}.")
    return lines


def write_scaling(out: Path, config: StudyConfig, *, ran: Sequence[str], seconds: float) -> dict[str, Any]:
    """Write ``scaling.{json,md,html,png}`` and ``run.json`` into ``out`` (each atomically)."""
    from lorasoup.artifacts import run_record, to_jsonable, write_json_atomic
    from lorasoup.report import markdown_to_html
    from lorasoup.report.plots import accuracy_vs_size

    data = collect(out, config)
    write_json_atomic(out / "scaling.json", data)
    figure = _atomic_png(out / "scaling.png", lambda path: accuracy_vs_size(_series(data), path, **_labels()))
    text = scaling_markdown(data)
    _write_text(out / "scaling.md", text)
    page = markdown_to_html(text, title="lorasoup study", images={"scaling.png": figure})
    _write_text(out / "scaling.html", page)
    record = run_record(
        command="study",
        config=to_jsonable(config),
        seed=config.seed_list[0],
        timings={"total": seconds, **{f"{s['name']}_s": s["seconds"] for s in data["sizes"]}},
        seeds=config.seed_list,
        ran_now=list(ran),
        finished=[s["name"] for s in data["sizes"]],
        missing=data["missing"],
    )
    write_json_atomic(out / "run.json", record)
    return data


def _labels() -> dict[str, Any]:
    return {
        "titles": ("composite task", "skill retention (mean of math and code)"),
        "ceiling": "oracle (composite data)",
    }


def _series(data: dict[str, Any]) -> list[dict[str, list[tuple[float, float, float]]]]:
    """Per panel (composite, retention), per plotted method: ``(parameters, mean %, std %)`` per size."""
    xs = [size["parameters"] for size in data["sizes"]]
    composite: dict[str, list[tuple[float, float, float]]] = {}
    retention: dict[str, list[tuple[float, float, float]]] = {}
    for method in data["methods"]:
        if method in UNTRAINED or data["kinds"].get(method) == "skill":
            continue
        cells = data["accuracy"][method]
        composite[method] = [
            (x, 100 * c["mean"], 100 * c["std"]) for x, c in zip(xs, cells["composite"], strict=True) if c
        ]
        retention[method] = [
            (x, 50 * (m["mean"] + k["mean"]), 50 * (m["std"] + k["std"]))
            for x, m, k in zip(xs, cells["math"], cells["code"], strict=True)
            if m and k
        ]
    return [composite, retention]


def _write_text(path: Path, text: str) -> None:
    from lorasoup.artifacts import write_text_atomic

    write_text_atomic(path, text)


def _atomic_png(path: Path, draw: Any) -> Path:
    """Draw into a temporary file beside ``path``, then rename it into place."""
    from lorasoup.artifacts import atomic_file

    with atomic_file(path, suffix=".png") as tmp:
        draw(tmp)
    return path


def _pct(value: Cell, seeds: int) -> str:
    if value is None:
        return "–"
    mean = f"{100 * value['mean']:.1f}"
    return f"{mean} ± {100 * value['std']:.1f}" if seeds > 1 else mean


def scaling_markdown(data: dict[str, Any]) -> str:
    """The report's Markdown: what ran, composite accuracy per size, where CAT overtakes, retention."""
    from lorasoup.report import markdown_table

    sizes = data["sizes"]
    seeds = max(len(size["seeds"]) for size in sizes)
    names = [size["name"] for size in sizes]
    ladder = [
        [
            size["name"],
            f"{size['parameters']:,} ({human_count(size['parameters'])})",
            "{layers} × {hidden} (MLP {intermediate}, {heads} heads)".format(**size["shape"]),
            str(size["steps"]["base"]),
            str(size["steps"]["lora"]),
            str(size["steps"]["cat"]),
            size["gpu"] or size["device"],
            size.get("pretraining", "fp32"),
            _per_seed(size["seed_seconds"]),
        ]
        for size in sizes
    ]
    composite = [
        [method, *(_pct(cell, seeds) for cell in data["accuracy"][method]["composite"])]
        for method in data["methods"]
    ]
    retention = [
        [method, *(_pair(m, c) for m, c in zip(cells["math"], cells["code"], strict=True))]
        for method, cells in ((m, data["accuracy"][m]) for m in data["methods"])
    ]
    margins = [
        [f"CAT − {rival}", *(_margin(m, c) for m, c in zip(found["margin"], found["clear"], strict=True))]
        for rival, found in data["overtaking"].items()
    ]
    lines = [
        "# lorasoup study: skill composition across base model sizes",
        "",
        "The demo study (docs/demo.md: a math skill LoRA and a code skill LoRA composed to answer "
        "multiplication stories with PAL programs) at each base model size of the ladder; every size "
        f"runs every method with the same seeds ({', '.join(map(str, sizes[0]['seeds']))}). "
        "Accuracy in %" + (", mean ± std over seeds." if seeds > 1 else "."),
        "",
        markdown_table(LADDER_COLUMNS, ladder),
    ]
    if data["missing"]:
        lines += [f"Not finished yet: {', '.join(data['missing'])}.", ""]
    lines += [f"Notice: {notice}." for notice in data["notices"]]
    lines += [
        "## Composite task",
        "",
        "The oracle (a LoRA trained on composite data) is the ceiling.",
        "",
        markdown_table(["method", *names], composite),
        "![composite accuracy and retention against parameters](scaling.png)",
        "",
        "## Where CAT overtakes DATA-MIX and the merges",
        "",
        *overtaking_lines(data),
        "",
        "Margins (CAT (trained) minus the method, points; † where it exceeds the two seed spreads added):",
        "",
        markdown_table(["", *names], margins),
        "## Skill retention",
        "",
        "Each skill's own task (math % / code %): does a composition keep what each LoRA knows?",
        "",
        markdown_table(["method", *names], retention),
    ]
    return "\n".join(lines)


def _pair(math: Cell, code: Cell) -> str:
    if math is None or code is None:
        return "–"
    return f"{100 * math['mean']:.1f} / {100 * code['mean']:.1f}"


def _margin(margin: float | None, clear: bool | None) -> str:
    return "–" if margin is None else f"{margin:+.1f}" + (" †" if clear else "")


def _per_seed(seconds: Sequence[float | None]) -> str:
    known = [s for s in seconds if s is not None]
    return f"{sum(known) / len(known):.0f}" if known else "–"


def human_count(count: int) -> str:
    """``701312`` → ``0.70 M``, ``52448`` → ``52 k``."""
    if count >= 10_000_000:
        return f"{count / 1e6:.0f} M"
    if count >= 1_000_000:
        return f"{count / 1e6:.1f} M"
    return f"{count / 1e6:.2f} M" if count >= 100_000 else f"{count / 1e3:.0f} k"
