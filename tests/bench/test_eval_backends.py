"""bench/eval_backends.py: its --tiny path on the CPU compares `lorasoup eval`'s cudagraph and hf backends
on GSM-Hard with the paper's prompt (a tiny random model) and writes the JSON the GPU run will."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"
GSM_HARD = BENCH.parents[1] / "shared" / "data" / "lora-soups" / "data"
_SPEC = importlib.util.spec_from_file_location("eval_backends", BENCH / "eval_backends.py")
eval_backends = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(eval_backends)


@pytest.mark.skipif(not GSM_HARD.is_dir(), reason=f"no LoRA Soups data at {GSM_HARD}")
def test_eval_backends_tiny_compares_cudagraph_with_hf_on_gsm_hard(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "eval_backends.json"
    argv = ["--tiny", "--data", str(GSM_HARD), "--work", str(tmp_path / "model"), "--out", str(out)]
    assert eval_backends.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "eval_backends" and result["device"] == "cpu"
    assert result["prompt_start"].startswith("Let's use Python to solve math problems")  # the PAL prompt
    assert result["settings"]["do_sample"] is False and "### Instruction" in result["settings"]["stop"]
    rows = {row["backend"]: row for row in result["rows"]}
    assert set(rows) == {"hf", "cudagraph"}
    for row in rows.values():
        assert row["examples"] == 4 and 0 < row["new_tokens"] <= 4 * 16
        assert row["tokens_per_s"] > 0 and row["prompt_tokens_mean"] > 300  # 8 demos before each question
        assert row["graphs"] is False  # no CUDA: eager decoding steps
    assert rows["cudagraph"]["facts"]["shared_prefix_tokens"] > 0  # the 8-shot prefix prefilled once
    (comparison,) = result["comparisons"]
    assert comparison["baseline"] == "hf" and comparison["backend"] == "cudagraph"
    assert comparison["identical"] == comparison["total"] == 4 and comparison["all_identical"]
    assert comparison["tokens_per_s_ratio"] == pytest.approx(
        rows["cudagraph"]["tokens_per_s"] / rows["hf"]["tokens_per_s"]
    )


def test_eval_backends_names_the_generations_that_differ() -> None:
    hf = {"backend": "hf", "tokens_per_s": 100.0, "generate_s": 2.0}
    graph = {"backend": "cudagraph", "tokens_per_s": 400.0, "generate_s": 0.5}
    result = eval_backends.compare(hf, graph, ["a", "b", "c"], ["x = 1", "y", "z"], ["x = 2", "y", "z"])
    assert result["tokens_per_s_ratio"] == 4.0 and result["generate_s_ratio"] == 4.0
    assert (result["identical"], result["total"], result["all_identical"]) == (2, 3, False)
    assert result["differing"] == [{"id": "a", "common_prefix_chars": 4}]
