"""artifacts.atomic_output_dir: what is written in the staging folder names the final one."""

import json

from lorasoup.artifacts import atomic_output_dir


def test_paths_into_the_staging_folder_are_rewritten_to_the_destination(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with atomic_output_dir("runs/demo") as staging:
        (staging / "seed-0" / "lora").mkdir(parents=True)
        record = {"base_model_name_or_path": str(staging / "seed-0" / "base"), "abs": str(staging.resolve())}
        (staging / "seed-0" / "lora" / "adapter_config.json").write_text(json.dumps(record))
        (staging / "weights.bin").write_bytes(str(staging).encode())  # not a text artifact: left alone
    written = json.loads((tmp_path / "runs/demo/seed-0/lora/adapter_config.json").read_text())
    assert written == {"base_model_name_or_path": "runs/demo/seed-0/base", "abs": str(tmp_path / "runs/demo")}
    assert ".tmp-" in (tmp_path / "runs/demo/weights.bin").read_text()
