"""The real-model study converts its base model once per run folder: a resumed run (the next GPU call)
reuses the checkpoint converted before, unless the source or template changed or the conversion was
cut off midway."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorasoup.demo import real_study
from lorasoup.demo.real_study import RealDemoSettings, seed_runner


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    done: list[str] = []
    real = real_study.prepare_base

    def counted(model: str, directory: Path, template: str = "chat") -> dict:
        done.append(template)
        return real(model, directory, template)

    monkeypatch.setattr(real_study, "prepare_base", counted)
    return done


def base_facts(runner) -> dict:
    return runner.args[1]  # functools.partial(_run_on_base, base_dir, facts)


def test_a_resumed_run_reuses_the_converted_base(tmp_path: Path, llama_dir: Path, conversions) -> None:
    settings = RealDemoSettings(model=str(llama_dir), template="plain")
    first = base_facts(seed_runner(tmp_path, settings))
    assert conversions == ["plain"] and (tmp_path / "base" / "config.json").is_file()
    again = base_facts(seed_runner(tmp_path, settings))
    assert conversions == ["plain"]  # not converted again
    assert again == first | {"reused": True} and again["num_parameters"] > 0

    seed_runner(tmp_path, RealDemoSettings(model=str(llama_dir), template="alpaca"))
    assert conversions == ["plain", "alpaca"]  # another template: converted again


def test_a_cut_off_or_changed_source_is_converted_again(tmp_path: Path, llama_dir: Path, conversions) -> None:
    settings = RealDemoSettings(model=str(llama_dir), template="plain")
    seed_runner(tmp_path, settings)
    record = tmp_path / "base" / "lorasoup-base.json"
    record.unlink()  # as if the call ended between the checkpoint and its record
    (tmp_path / "base" / "stale.bin").write_bytes(b"x")
    seed_runner(tmp_path, settings)
    assert len(conversions) == 2 and not (tmp_path / "base" / "stale.bin").exists()  # emptied first

    gguf = tmp_path / "model.gguf"  # a file source is known by its size and time too
    gguf.write_bytes(b"0")
    saved = json.loads(record.read_text())
    saved["source"] = real_study._base_source(RealDemoSettings(model=str(gguf), template="plain"))
    record.write_text(json.dumps(saved))
    changed = RealDemoSettings(model=str(gguf), template="plain")
    assert real_study._reused_base(tmp_path / "base", changed) is not None
    os.utime(gguf, ns=(1, 1))  # the file was replaced since
    assert real_study._reused_base(tmp_path / "base", changed) is None
