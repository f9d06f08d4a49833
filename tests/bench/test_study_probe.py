"""bench/study_probe.py: its --tiny path trains the study's LoRA twice (full fp32, and with train.tf32,
which a CPU ignores) and decodes with the study's backend for the base, the LoRA unmerged and merged."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"
_SPEC = importlib.util.spec_from_file_location("study_probe", BENCH / "study_probe.py")
study_probe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(study_probe)


def test_the_probe_times_training_and_scoring(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "probe.json"
    assert study_probe.main(["--tiny", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["tf32"] for row in result["training"]] == [False, True]
    assert not any(row["tf32_applied"] for row in result["training"])  # no CUDA here
    for row in result["training"]:
        assert row["steps"] == 4 and row["step_s_median"] > 0  # the Trainer's own steady steps
        run = json.loads((Path(row["adapter"]) / "run.json").read_text())
        assert run["config"]["train"]["tf32"] is (True if row["tf32"] else None)  # as the study passes it
    scoring = result["scoring"]
    for name in ("base", "lora_unmerged", "lora_merged"):
        assert scoring[name]["new_tokens"] == 4 * 8  # EOS ignored: every row runs to the end
        assert scoring[name]["tokens_per_s"] > 0
    assert scoring["merged_identical"] == "4 of 4"  # fp32 on a CPU: merging changes no greedy token
