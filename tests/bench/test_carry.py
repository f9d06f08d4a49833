"""bench/carry.py: a file sent in parts over back-to-back device calls comes back whole, or says why not."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("carry", Path(__file__).parents[2] / "bench" / "carry.py")
carry = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(carry)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(2_500_001))  # not a multiple of the part size: a short last part
    return path


def send_all(folder: Path, store: Path, parts: int) -> Path:
    for index in range(parts):
        carry.stage(folder, index, store=store)
    return carry.join(folder, store=store)


def test_split_stage_join_round_trip(model_file: Path, tmp_path: Path) -> None:
    manifest = carry.split(model_file, tmp_path / "parts", part_bytes=1_000_000)
    # as few parts as 1 MB allows (3), of equal size: the room beside each part is the same
    assert [p["size"] for p in manifest["parts"]] == [833_334, 833_334, 833_333]
    joined = send_all(tmp_path / "parts", tmp_path / "store", 3)
    assert joined.read_bytes() == model_file.read_bytes()
    assert carry.join(tmp_path / "parts", store=tmp_path / "store") == joined  # joined once, reused


def test_a_part_staged_on_a_fresh_machine_says_the_machine_was_lost(model_file: Path, tmp_path: Path) -> None:
    carry.split(model_file, tmp_path / "parts", part_bytes=1_000_000)
    carry.stage(tmp_path / "parts", 0, store=tmp_path / "store")
    fresh = tmp_path / "fresh-machine-store"
    with pytest.raises(
        carry.CarryError, match=r"lost since the last call.*part0.*again from part 0"
    ) as caught:
        carry.stage(tmp_path / "parts", 1, store=fresh)
    assert caught.value.code == carry.LOST
    with pytest.raises(carry.CarryError, match=r"part0, part1, part2 of model\.gguf not staged") as caught:
        carry.join(tmp_path / "parts", store=fresh)
    assert caught.value.code == carry.LOST


def test_a_damaged_part_is_refused_before_it_is_staged(model_file: Path, tmp_path: Path) -> None:
    carry.split(model_file, tmp_path / "parts", part_bytes=1_000_000)
    part = tmp_path / "parts" / "part0"
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(carry.CarryError, match="part0 is damaged"):
        carry.stage(tmp_path / "parts", 0, store=tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_the_command_line_reports_a_missing_manifest_in_one_line(tmp_path: Path, capsys) -> None:
    assert carry.main(["stage", str(tmp_path / "nothing"), "--part", "0", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("carry: ") and "MANIFEST.json was not carried" in err and "\n" not in err


def test_fits_counts_the_tree_as_the_device_tool_does_and_the_carried_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / ".gitignore").write_text("/.carry/\n")  # 9 bytes, untracked, not ignored: it travels
    (repo / "code.py").write_bytes(b"x" * 1000)
    subprocess.run(["git", "add", "code.py"], cwd=repo, check=True)
    (repo / "new.txt").write_bytes(b"y" * 200)  # untracked, not ignored: travels
    (repo / ".carry" / "parts").mkdir(parents=True)
    (repo / ".carry" / "parts" / "part0").write_bytes(b"z" * 5000)  # ignored: only when carried
    (repo / ".carry" / "parts" / "MANIFEST.json").write_bytes(b"{}")
    sizes = carry.call_bytes(repo, [repo / ".carry" / "parts"])
    assert sizes == {"tree": 9 + 1000 + 200, str(repo / ".carry" / "parts"): 5002}
    with pytest.raises(carry.CarryError, match="nothing to carry"):
        carry.call_bytes(repo, [repo / "absent"])

    monkeypatch.chdir(repo)
    assert carry.main(["fits", ".carry/parts"]) == 0 and "fits one call" in capsys.readouterr().out
    monkeypatch.setattr(carry, "CARRY_LIMIT", 6000)
    assert carry.main(["fits", ".carry/parts"]) == 1 and "does NOT fit" in capsys.readouterr().out
