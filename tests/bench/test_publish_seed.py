"""bench/publish_seed.py: a seed the device sent back becomes its docs/results folder (report files,
this seed's stage lines per call, per-example files in xz), whole or not at all."""

from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"
_SPEC = importlib.util.spec_from_file_location("publish_seed", BENCH / "publish_seed.py")
publish_seed = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(publish_seed)


def device_call(tmp_path: Path, name: str, stages: str) -> Path:
    call = tmp_path / name
    call.mkdir()
    (call / "stages.txt").write_text(stages)
    (call / "env.txt").write_text(f"NVIDIA H100 ({name})\n")
    return call


def seed_archive(tmp_path: Path, *, with_eval: bool = True) -> Path:
    run = tmp_path / "run" / "seed-1"
    (run / "seed-1" / "adapters" / "math").mkdir(parents=True)
    (run / "seed-1" / "adapters" / "math" / "adapter_config.json").write_text("{}")
    if with_eval:
        for row in ("base-model", "cat-trained"):
            (run / "seed-1" / "eval" / row).mkdir(parents=True)
            (run / "seed-1" / "eval" / row / "composite.jsonl").write_text(json.dumps({"row": row}) + "\n")
    (run / "results.json").write_text(json.dumps({"table": []}))
    (run / "report.md").write_text("# report\n")
    (run / "run.json").write_text("{}")
    (run / "report.html").write_text("<html></html>")  # not kept: report.md says the same
    archive = tmp_path / "seed-1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(run, arcname="seed-1")
    return archive


def test_publish_keeps_reports_this_seeds_stages_and_per_example_files(tmp_path) -> None:
    calls = [
        device_call(tmp_path, "12", "seed 1: \x1b[1mscoring base model\nseed 2: scoring base model\n"),
        device_call(tmp_path, "13", "seed 2: training CAT weights\nseed 1: scoring CAT (trained)\n"),
    ]
    dest = tmp_path / "docs" / "demo-seed1"
    publish_seed.publish(seed_archive(tmp_path), dest, calls, note="two seeds side by side")

    assert sorted(p.name for p in dest.iterdir()) == [
        "env.txt", "per-example.tar.xz", "report.md", "results.json", "run.json", "stages.txt"
    ]  # fmt: skip
    assert (dest / "env.txt").read_text() == "NVIDIA H100 (12)\n"
    assert (dest / "stages.txt").read_text().splitlines() == [
        "# two seeds side by side", "## call 1", "seed 1: scoring base model",
        "## call 2", "seed 1: scoring CAT (trained)",
    ]  # fmt: skip
    assert (dest / "per-example.tar.xz").read_bytes()[:6] == b"\xfd7zXZ\x00"  # xz magic
    with tarfile.open(dest / "per-example.tar.xz") as tar:  # bench/verdicts.py reads it as any tar
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
        assert names == ["seed-1/eval/base-model/composite.jsonl", "seed-1/eval/cat-trained/composite.jsonl"]
        assert json.loads(tar.extractfile("seed-1/eval/cat-trained/composite.jsonl").read()) == {
            "row": "cat-trained"
        }


def test_publishing_again_gives_the_same_archive_and_needs_overwrite(tmp_path) -> None:
    archive, dest = seed_archive(tmp_path), tmp_path / "out"
    publish_seed.publish(archive, dest, [])
    first = (dest / "per-example.tar.xz").read_bytes()
    with pytest.raises(publish_seed.LorasoupError):
        publish_seed.publish(archive, dest, [])
    publish_seed.publish(archive, dest, [], overwrite=True)
    assert (dest / "per-example.tar.xz").read_bytes() == first


def test_a_seed_without_per_example_files_is_refused_and_nothing_is_written(tmp_path, capsys) -> None:
    dest = tmp_path / "out"
    assert publish_seed.main([str(seed_archive(tmp_path, with_eval=False)), str(dest)]) == 2
    assert "no seed-1/seed-1/eval folder" in capsys.readouterr().err
    assert not dest.exists() and not list(tmp_path.glob(".out*"))
