"""The scaling study (``lorasoup study``) and the demo's device setting: configs, a CPU smoke study,
``--only`` / ``--report-only`` / resume, device errors, and CPU = auto = worker processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lorasoup.cli import app
from lorasoup.config import load_config
from lorasoup.demo import DemoSettings, run_demo
from lorasoup.demo.base import BaseModelSize
from lorasoup.demo.scale import StudyConfig
from lorasoup.demo.scale_report import overtaking
from lorasoup.demo.settings import TASKS
from tests.conftest import TINY_DEMO, on_gpu

CONFIGS = Path(__file__).parents[2] / "configs" / "study"
SMOKE = CONFIGS / "scale-cpu-smoke.yaml"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
TINY = TINY_DEMO


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _study(*args: str) -> tuple[int, str]:
    """Exit code and output; an exception the command raised is appended (a failed assert then
    names it: the runner keeps it out of the output)."""
    result = CliRunner().invoke(app, ["study", *args])
    raised = (
        "" if result.exception is None or isinstance(result.exception, SystemExit) else repr(result.exception)
    )
    return result.exit_code, result.output + raised


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_configs_load(path: Path) -> None:
    config = load_config(StudyConfig, path)  # a GPU study's config loads anywhere; runs check the device
    assert len(config.sizes) >= 2 and config.seed_list
    layers = [config.settings(preset).base for preset in config.sizes]
    widths = [(base.layers, base.hidden) for base in layers]
    assert widths == sorted(widths), "sizes are listed smallest first"


def test_the_gpu_ladder_starts_at_the_default_and_reaches_100m() -> None:
    config = load_config(StudyConfig, CONFIGS / "scale-gpu.yaml")
    first = config.settings(config.sizes[0])
    assert first.base == BaseModelSize(cuda_bf16=True)  # the demo's default base
    top = config.settings(config.sizes[-1]).base
    weights = top.layers * (4 * top.hidden**2 + 3 * top.hidden * top.intermediate)
    assert 80e6 < weights < 120e6


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"jobz": 2}, "unknown key 'jobz'; did you mean 'jobs'?"),
        ({"sizes": [{"name": "a", "set": {"base.layerz": 2}}]}, "'sizes[0].set.base.layerz'; did you mean"),
        ({"sizes": [{"name": "a", "set": {"base": {"hidden": 30, "heads": 4}}}]}, "multiple of base.heads"),
        ({"base": {"lora_stepz": 2}}, "unknown key 'base.lora_stepz'"),
        ({"sizes": [{"name": "a"}, {"name": "a"}]}, "'a' is used twice"),
        ({"sizes": [{"name": "../up"}]}, "sizes[0].name '../up'"),
        ({"sizes": [{"name": "a", "set": [1]}]}, "sizes[0].set: expected a mapping"),
        ({"seeds": [1, 1]}, "no seed twice"),
        ({"base": {"device": "gpu"}}, "device: 'gpu' is not allowed; choose one of auto, cpu, cuda"),
    ],
)
def test_bad_study_config_is_one_line(tmp_path: Path, change: dict, message: str) -> None:
    data = {"sizes": [{"name": "a", "set": {}}], "base": {"device": "cpu"}, **change}
    code, output = _study(str(_write(tmp_path, data)), "--output", str(tmp_path / "out"))
    assert code == 2 and message in " ".join(output.split()), output
    assert not (tmp_path / "out").exists()


@NO_CUDA
def test_cuda_asked_for_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    code, output = _study(str(SMOKE), "--output", str(tmp_path / "out"), "--set", "base.device=cuda")
    assert code == 2 and "torch sees no CUDA GPU" in output and not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["demo", "--output", str(tmp_path / "d"), "--set", "device=cuda"])
    assert result.exit_code == 2 and "use 'auto' or 'cpu'" in result.output


def test_only_unknown_size_lists_the_names(tmp_path: Path) -> None:
    code, output = _study(str(SMOKE), "--output", str(tmp_path / "out"), "--only", "xs,huge")
    assert code == 2 and "no size named 'huge'; the config has xs, s" in output


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study") / "run"
    code, output = _study(str(SMOKE), "--output", str(out), "--jobs", "2")  # a worker process per size
    assert code == 0, output
    assert "CAT (trained)" in output and "scaling.md" in output
    return out


def test_smoke_study_writes_the_scaling_report(smoke: Path) -> None:
    for name in ("scaling.md", "scaling.html", "scaling.json", "scaling.png", "run.json"):
        assert (smoke / name).is_file(), name
    for size in ("xs", "s"):
        assert (smoke / size / "report.md").is_file() and (smoke / size / "seed-0" / "cat").is_dir()
    text = (smoke / "scaling.md").read_text()
    for heading in (
        "## Composite task",
        "## Where CAT overtakes DATA-MIX and the merges",
        "## Skill retention",
    ):
        assert heading in text
    assert "CAT (trained) is" in text and "| CAT − DATA-MIX |" in text
    assert (smoke / "scaling.html").read_text().count("data:image/png;base64,") == 1
    record = json.loads((smoke / "run.json").read_text())
    assert record["command"] == "study" and record["finished"] == ["xs", "s"] and record["missing"] == []
    assert json.loads((smoke / "xs" / "run.json").read_text())["jobs"] == 2


def test_scaling_numbers_agree_with_each_size(smoke: Path) -> None:
    data = json.loads((smoke / "scaling.json").read_text())
    assert [size["name"] for size in data["sizes"]] == ["xs", "s"] and data["tasks"] == list(TASKS)
    for index, size in enumerate(data["sizes"]):
        results = json.loads((smoke / size["name"] / "results.json").read_text())
        record = json.loads((smoke / size["name"] / "run.json").read_text())
        assert size["parameters"] == record["base_models"][0]["parameters"]
        assert size["device"] == results["device"] == "cpu" and size["seeds"] == [0]
        assert size["pretraining"] == "fp32"
        for row in results["table"]:
            for task in TASKS:
                assert data["accuracy"][row["method"]][task][index] == row[task]
    assert data["sizes"][0]["parameters"] < data["sizes"][1]["parameters"]
    assert set(data["overtaking"]) == {"DATA-MIX", "linear", "TIES", "DARE", "SVD"}


def test_only_then_report_only_rebuilds_the_whole_report(smoke: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    code, output = _study(str(SMOKE), "--output", str(out), "--only", "xs")
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["xs"]
    # xs ran here in this process, in the smoke study in a worker process: the same numbers, bytes
    assert _tables(out / "xs") == _tables(smoke / "xs")
    adapter = Path("seed-0/adapters/datamix/adapter_model.safetensors")
    assert (out / "xs" / adapter).read_bytes() == (smoke / "xs" / adapter).read_bytes()
    assert json.loads((out / "scaling.json").read_text())["missing"] == ["s"]
    assert "Not finished yet: s." in (out / "scaling.md").read_text()
    shutil.copytree(smoke / "s", out / "s")  # as a second process (another GPU) would have written it
    # where it runs is not what it is: a device other than the run's is no mismatch
    code, output = _study(str(SMOKE), "--output", str(out), "--report-only", "--set", "base.device=auto")
    assert code == 0, output
    merged = json.loads((out / "scaling.json").read_text())
    whole = json.loads((smoke / "scaling.json").read_text())
    assert merged["missing"] == [] and merged["notices"] == [] and merged["accuracy"] == whole["accuracy"]
    assert json.loads((out / "run.json").read_text())["ran_now"] == []


def test_finished_sizes_are_kept_and_changed_ones_refused(smoke: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    shutil.copytree(smoke, out)
    before = (out / "xs" / "results.json").read_bytes()
    code, output = _study(str(SMOKE), "--output", str(out))
    assert code == 0 and "kept finished sizes: xs, s" in output
    assert (out / "xs" / "results.json").read_bytes() == before
    code, output = _study(str(SMOKE), "--output", str(out), "--set", "base.lora_steps=5", "--only", "xs")
    assert code == 2 and "other settings or seeds" in output and "--overwrite" in output


class Stop(Exception):
    """What a GPU call's time limit does to a study, here raised from the progress hook."""


def test_a_stopped_study_resumes_its_unfinished_size(smoke: Path, tmp_path: Path) -> None:
    """``--resume``: a size stopped part way stays in ``.SIZE.partial``; the next run keeps its base,
    LoRAs and scored rows, finishes it with the numbers of an uninterrupted run, and counts both
    runs' seconds."""
    from lorasoup.demo.scale import run_study

    config = load_config(StudyConfig, SMOKE, ["jobs=1"])
    out = tmp_path / "resumed"

    def stop_after_the_merges(what: str, done: int, total: int) -> None:
        if "scoring CAT, weights at init" in what:
            raise Stop

    with pytest.raises(Stop):
        run_study(config, output=out, only=["xs"], stage=stop_after_the_merges, resume=True)
    partial = out / ".xs.partial" / "seed-0"
    kept = [
        partial / "base" / "pretraining.json",
        partial / "adapters" / "math" / "adapter_model.safetensors",
    ]
    kept.append(partial / "eval" / "linear" / "composite.jsonl")
    assert all(path.is_file() for path in kept) and not (out / "xs").exists()
    before = [path.stat().st_mtime_ns for path in kept]
    first_call = json.loads((out / ".xs.partial" / "elapsed.json").read_text())["elapsed_s"]

    summary = run_study(config, output=out, only=["xs"], resume=True)
    assert summary.ran == ["xs"] and not (out / ".xs.partial").exists()
    finished = out / "xs" / "seed-0"
    after = [(finished / path.relative_to(partial)).stat().st_mtime_ns for path in kept]
    assert after == before  # the base was not pre-trained again, the LoRA not trained, the row not scored
    assert _tables(out / "xs") == _tables(smoke / "xs")
    assert not (out / "xs" / "elapsed.json").exists()
    assert json.loads((out / "xs" / "run.json").read_text())["timings_s"]["total"] >= first_call


def test_report_only_needs_a_finished_size(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, output = _study(str(SMOKE), "--output", str(tmp_path / "empty"), "--report-only")
    assert code == 2 and "holds no finished size" in output


def test_overtaking_is_computed_from_the_numbers() -> None:
    def cell(mean: float, std: float = 0.0) -> dict:
        return {"mean": mean, "std": std, "values": [mean - std, mean + std]}

    cat = [cell(0.1), cell(0.3), cell(0.5, 0.01), cell(0.6, 0.01)]
    rival = [cell(0.2), cell(0.4), cell(0.4, 0.01), cell(0.5, 0.01)]
    found = overtaking(cat, rival)
    assert found["from"] == 2 and found["above"] == [False, False, True, True]
    assert found["margin"][-1] == pytest.approx(10.0) and found["clear"][-1] is True
    assert overtaking(rival, cat)["from"] is None
    assert overtaking([cell(0.5), None], [cell(0.1), cell(0.2)])["above"] == [True, None]


def _tables(out: Path) -> list:
    results = json.loads((out / "results.json").read_text())
    return [[(row["method"], row["accuracy"]) for row in rows] for rows in results["per_seed"]]


@NO_CUDA
def test_cpu_and_auto_give_identical_results(tmp_path: Path) -> None:
    runs = {}
    for device in ("cpu", "auto"):
        settings = load_config(DemoSettings, None, [*TINY, f"device={device}"])
        run_demo(tmp_path / device, seed=7, settings=settings)
        runs[device] = _tables(tmp_path / device)
        assert json.loads((tmp_path / device / "results.json").read_text())["device"] == "cpu"
    assert runs["cpu"] == runs["auto"]
    for name in ("adapters/math/adapter_model.safetensors", "cat/adapter_model.safetensors"):
        assert (tmp_path / "cpu" / "seed-7" / name).read_bytes() == (
            tmp_path / "auto" / "seed-7" / name
        ).read_bytes()


@on_gpu
def test_smoke_study_runs_on_cuda(tmp_path: Path) -> None:
    code, output = _study(
        str(SMOKE),
        "--output",
        str(tmp_path / "out"),
        "--set",
        "base.device=cuda",
        "--set",
        "seeds=2",
        "--jobs",
        "2",
    )
    assert code == 0, output
    data = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert all(size["device"] == "cuda" and size["gpu"] for size in data["sizes"])


def test_the_ladder_says_how_each_base_was_pre_trained(smoke: Path, tmp_path: Path) -> None:
    """bf16 autocast applies on CUDA only (base.py), so one config pre-trains another base on a CPU:
    the report's ladder says which, from each size's own results."""
    out = tmp_path / "precision"
    shutil.copytree(smoke, out)
    results_path = out / "s" / "results.json"
    results = json.loads(results_path.read_text())
    results["settings"]["base"]["cuda_bf16"] = True  # as scale-gpu.yaml asks, run on a CPU: fp32
    results_path.write_text(json.dumps(results))
    xs_path = out / "xs" / "results.json"
    xs = json.loads(xs_path.read_text())
    xs["settings"]["base"]["cuda_bf16"], xs["device"] = True, "cuda"  # as a GPU run records it
    xs_path.write_text(json.dumps(xs))
    code, output = _study(str(SMOKE), "--output", str(out), "--report-only")
    assert code == 0, output
    sizes = json.loads((out / "scaling.json").read_text())["sizes"]
    assert [size["pretraining"] for size in sizes] == ["bf16 autocast", "fp32"]
    ladder = (out / "scaling.md").read_text()
    assert "| pre-training |" in ladder and "| bf16 autocast |" in ladder
