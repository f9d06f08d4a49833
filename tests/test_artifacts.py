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


def test_versions_name_lorasoup_run_from_a_source_tree(monkeypatch):
    """The GPU machine runs the copy on PYTHONPATH, with no install record: its results must still
    say which lorasoup they came from, not "not installed"."""
    import lorasoup
    from lorasoup import artifacts

    real = artifacts.metadata.version

    def version(name):
        if name == "lorasoup":
            raise artifacts.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(artifacts.metadata, "version", version)
    versions = artifacts.package_versions()
    assert versions["lorasoup"] == f"{lorasoup.__version__} (source tree, not installed)"
    assert versions["torch"] == real("torch")
