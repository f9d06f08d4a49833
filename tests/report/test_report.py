"""``lorasoup report`` on a tiny demo run and on single runs: every section, every image, one-line errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lorasoup.cli import app
from lorasoup.report.page import SECTIONS
from tests.conftest import TINY_DEMO

runner = CliRunner()
TINY = TINY_DEMO


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report-demo") / "demo"
    args = ["demo", "--output", str(out)]
    for item in TINY:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def report(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["report", *args])
    return result.exit_code, result.output


def images_in(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_demo_report_has_every_section_and_every_image(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    code, printed = report(str(demo_dir), "--output", str(out), "--rank-sweep", "2,4")
    assert code == 0, printed
    text = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for title in SECTIONS:
        assert f"\n## {title}\n" in text, title
        assert f"<h2>{title.replace(chr(39), '&#x27;')}</h2>" in page, title
    names = images_in(text)
    # bar chart, CAT weights, angles (one pair), conflicts, energy, accuracy vs rank
    assert len(names) == 6 and len(set(names)) == 6
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert page.count("data:image/png;base64,") == len(names) and "missing image" not in page
    assert "| CAT (trained) |" in text and "### Merges and recompressions" in text
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "report" and sorted(record["images"]) == sorted(names)
    numbers = json.loads((out / "diagnostics.json").read_text())
    sweep = next(iter(numbers["rank_sweep"].values()))
    assert [p["rank"] for p in sweep["points"]] == [2, 4, None] and sweep["task"] == "demo-composite"
    angles = next(iter(numbers["angles"].values()))
    assert all(0.0 <= a <= 90.0 for module in angles.values() for a in module["column"] + module["row"])
    # the demo's TIES density (0.75) is what the conflicts use
    assert all(v["density"] == 0.75 for v in numbers["sign_conflicts"].values())
    assert not list(tmp_path.glob(".report.tmp-*"))


def write_eval_task(folder: Path) -> tuple[Path, Path]:
    rows = [{"question": q, "answer": "7"} for q in ("there are 3 apples", "tom has 4 books", "x")]
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": "tiny-echo",
        "prompt": "{question}",
        "metric": "exact_match",
        "generation": {"max_new_tokens": 3},
    }
    task = folder / "tiny.yaml"
    task.write_text(yaml.safe_dump(spec))
    return task, data


def test_report_reads_cat_merge_train_and_eval_runs(demo_dir: Path, tmp_path: Path) -> None:
    seed = demo_dir / "seed-0"
    task, data = write_eval_task(tmp_path)
    evaluated = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(seed / "base"),
            "--task",
            str(task),
            "--data",
            str(data),
            "--output",
            str(evaluated),
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "report"
    runs = [seed / "cat", seed / "merges" / "ties", seed / "adapters" / "math", evaluated]
    args = [
        *map(str, runs),
        "--output",
        str(out),
        "--rank-sweep",
        "1",
        "--task",
        str(task),
        "--data",
        str(data),
    ]
    code, printed = report(*args)
    assert code == 0, printed
    text = (out / "report.md").read_text()
    for table in ("### CAT runs", "### Merges and recompressions", "### Evaluations", "### Training runs"):
        assert table in text, table
    assert "| tiny-echo |" in text and "| ties |" in text
    assert "### cat on tiny-echo" in text and "density 0.75" in text
    for name in images_in(text):
        assert (out / name).is_file()


def test_adapters_flag_compares_skills_without_a_cat_run(demo_dir: Path, tmp_path: Path) -> None:
    skills = demo_dir / "seed-0" / "adapters"
    out = tmp_path / "report"
    code, printed = report(
        str(skills / "math"), "--adapters", f"{skills / 'math'},{skills / 'code'}", "--density", "0.3",
        "--output", str(out),
    )  # fmt: skip
    assert code == 0, printed
    text = (out / "report.md").read_text()
    assert "## Principal angles" in text and "## TIES sign conflicts" in text and "density 0.3" in text
    assert "## Recompression energy kept" in text and "### math" in text and "### code" in text
    assert "## CAT's learned weights" not in text and "## Accuracy vs rank" not in text


def one_line_error(args: list[str]) -> str:
    code, printed = report(*args)
    assert code == 2, printed
    assert len(printed.strip().splitlines()) == 1, printed
    return printed


def test_bad_run_dirs_are_one_line_errors(demo_dir: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "report")
    assert "not a directory" in one_line_error([str(tmp_path / "nowhere"), "--output", out])
    (tmp_path / "empty").mkdir()
    assert "no run.json" in one_line_error([str(tmp_path / "empty"), "--output", out])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "run.json").write_text(json.dumps({"command": "frobnicate"}))
    assert "'frobnicate'" in one_line_error([str(tmp_path / "other"), "--output", out])
    broken = tmp_path / "broken"
    shutil.copytree(demo_dir / "seed-0" / "cat", broken)
    (broken / "cat_weights.json").unlink()
    assert "cat_weights.json" in one_line_error([str(broken), "--output", out])
    moved = tmp_path / "moved" / "deeper" / "cat"
    shutil.copytree(demo_dir / "seed-0" / "cat", moved)  # its skills are no longer beside it
    record = moved / "run.json"  # and the folder its run.json names is gone (copied from elsewhere)
    record.write_text(record.read_text().replace(str(demo_dir.resolve()), str(tmp_path / "gone")))
    assert "--adapters" in one_line_error([str(moved), "--output", out])
    no_task = one_line_error([str(demo_dir / "seed-0" / "cat"), "--rank-sweep", "2", "--output", out])
    assert "--task" in no_task
    assert "--rank-sweep" in one_line_error([str(demo_dir), "--rank-sweep", "two", "--output", out])
    assert not (tmp_path / "report").exists()


def test_pipes_in_table_cells_survive_markdown_and_html() -> None:
    from lorasoup.report import markdown_table, markdown_to_html

    table = markdown_table(["name", "max |Δw|"], [["a|b", "1"]])
    assert table.splitlines()[0] == "| name | max \\|Δw\\| |"
    page = markdown_to_html(table, title="t", images={})
    assert "<th>max |Δw|</th>" in page and "<td>a|b</td><td>1</td>" in page
