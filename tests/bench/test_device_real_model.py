"""bench/device_real_model.sh: the model's settings, one-line refusals, and a model file sent one part
per call (only the parts a call carries are in its tree) joins whole on the machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"


def script(tree: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "bench/device_real_model.sh", *args],
        cwd=tree,
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def call_tree(tmp_path: Path, name: str) -> Path:
    """A device call's copy of the repository: bench/ and nothing carried yet."""
    tree = tmp_path / name
    (tree / "bench").mkdir(parents=True)
    for file in ("device_real_model.sh", "carry.py"):
        shutil.copy(BENCH / file, tree / "bench" / file)
    return tree


def test_settings_per_model_and_a_wrong_model_in_one_line(tmp_path: Path) -> None:
    tree = call_tree(tmp_path, "here")
    smollm2 = script(tree, "settings").stdout
    gemma = script(tree, "settings", "--sizes", REAL_MODEL="gemma3").stdout
    chosen = dict(item.split("=", 1) for item in smollm2.split() if item != "--set")
    # one epoch of the skill data: the size the math-steps check chose (docs/real-model.md)
    assert int(chosen["lora_steps"]) * int(chosen["batch_size"]) == int(chosen["sizes.skill"]) == 6400
    assert "template=plain" not in smollm2
    assert "--set template=plain" in gemma and "lora_steps" not in gemma  # --sizes: what the data depend on
    wrong = script(tree, "settings", REAL_MODEL="llama")
    assert (
        wrong.returncode == 2
        and wrong.stderr.strip().count("\n") == 0
        and "smollm2 or gemma3" in wrong.stderr
    )


def test_parts_staged_call_by_call_join_whole(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(os.urandom(2_500_001))
    here = call_tree(tmp_path, "here")
    split = [sys.executable, "bench/carry.py", "split", str(model), ".carry/gemma3", "--part-mib", "1"]
    subprocess.run(split, cwd=here, check=True, capture_output=True)
    parts = sorted((here / ".carry" / "gemma3").glob("part*"))
    assert len(parts) == 3
    store = tmp_path / "machine-store"
    for index, part in enumerate(parts):  # each call carries one part and the manifest
        tree = call_tree(tmp_path, f"call-{index}")
        (tree / ".carry" / "gemma3").mkdir(parents=True)
        shutil.copy(part, tree / ".carry" / "gemma3" / part.name)
        shutil.copy(here / ".carry" / "gemma3" / "MANIFEST.json", tree / ".carry" / "gemma3")
        staged = script(tree, "stage", REAL_MODEL="gemma3", LORASOUP_ASSETS=str(store))
        assert staged.returncode == 0, staged.stderr
    empty = call_tree(tmp_path, "no-part")
    refused = script(empty, "stage", REAL_MODEL="gemma3", LORASOUP_ASSETS=str(store))
    assert refused.returncode == 2 and "no part of .carry/gemma3 was carried" in refused.stderr
    joined = subprocess.run(
        [sys.executable, "bench/carry.py", "join", ".carry/gemma3", "--store", str(store)],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(joined).read_bytes() == model.read_bytes()
