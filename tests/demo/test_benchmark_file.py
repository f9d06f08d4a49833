"""The smollm2 demo's data saved to a file and read back (``--save-benchmark``, ``benchmark_file``):
exact round trip, refusal of a file built for other settings, and no reasoning-gym when reading."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorasoup.cli import app
from lorasoup.config import load_config
from lorasoup.demo.benchmark import Benchmark
from lorasoup.demo.benchmark_file import read_benchmark, tokenizer_fingerprint, write_benchmarks
from lorasoup.demo.real import RealSizes
from lorasoup.demo.real_study import RealDemoSettings, built_with, real_benchmark, seed_runner
from lorasoup.errors import DataError
from tests.conftest import build_tokenizer


def tricky(seed: int) -> Benchmark:
    """Values JSON could bend: floats without a short decimal, -0.0, big ints and floats, unicode."""
    records = [
        {"instruction": f'q{seed} £ × ÷ \n\t"quoted"', "output": "```python\nx\n```", "value": 0.1 + 0.2},
        {"instruction": "big", "output": "é", "value": 10**18 + 1, "task": 7},
        {"instruction": "neg", "output": "", "value": -0.0},
        {"instruction": "float", "output": "1e16", "value": 1e16},
    ]
    return Benchmark(
        base=[],
        train={"math": records[:2], "code": records[2:], "composite": records[::-1]},
        test={"composite": records[:1], "math": records[1:3], "code": records[3:]},
    )


def same(a: Benchmark, b: Benchmark) -> bool:
    """Equal, with every value of the same type (1 == 1.0 would hide an int turned float)."""
    pairs = list(zip(a.all_records(), b.all_records(), strict=True))
    typed = all(type(x[k]) is type(y[k]) for x, y in pairs for k in x) and all(
        str(x["value"]) == str(y["value"])
        for x, y in pairs  # -0.0 stays -0.0
    )
    return a == b and list(a.train) == list(b.train) and list(a.test) == list(b.test) and typed


SETTINGS = RealDemoSettings(template="plain")


def grown() -> object:
    """The test tokenizer with one token more."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    return tokenizer


@pytest.mark.parametrize("name", ["bench.json", "bench.json.gz"])
def test_round_trip_is_exact(tmp_path: Path, tokenizer, name: str) -> None:
    key = built_with(SETTINGS, tokenizer)
    path = write_benchmarks(tmp_path / name, {0: tricky(0), 5: tricky(5)}, key)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    for seed in (0, 5):
        assert same(read_benchmark(path, seed, key), tricky(seed))
    assert not same(read_benchmark(path, 5, key), tricky(0))  # the check itself can fail
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


def test_real_records_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("reasoning_gym")
    from lorasoup.demo.real import build_real_benchmark

    built = build_real_benchmark(2, RealSizes(skill=3, test=3), fits=lambda r: len(r["output"]) < 700)
    path = write_benchmarks(tmp_path / "b.json.gz", {2: built}, {"k": 1})
    assert same(read_benchmark(path, 2, {"k": 1}), built)


def test_a_file_built_for_other_settings_is_refused(tmp_path: Path, tokenizer) -> None:
    path = write_benchmarks(tmp_path / "b.json.gz", {0: tricky(0)}, built_with(SETTINGS, tokenizer))
    other = RealDemoSettings(template="plain", sizes=RealSizes(skill=3000, test=200))
    with pytest.raises(
        DataError, match=r"sizes\.skill=160, sizes\.test=30.*sizes\.skill=3000.*--save-benchmark"
    ):
        read_benchmark(path, 0, built_with(other, tokenizer))
    with pytest.raises(DataError, match=r"cutoff_len=256.*cutoff_len=512"):
        read_benchmark(path, 0, built_with(RealDemoSettings(template="plain", cutoff_len=512), tokenizer))
    with pytest.raises(DataError, match="tokenizer="):  # records were filtered with another vocabulary
        read_benchmark(path, 0, built_with(SETTINGS, grown()))
    with pytest.raises(DataError, match=r"holds seeds \[0\], not \[1\]"):
        read_benchmark(path, 1, built_with(SETTINGS))
    with pytest.raises(DataError, match="does not exist; build it with: lorasoup demo --model smollm2"):
        read_benchmark(tmp_path / "missing.json", 0, {})
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(DataError, match="not a lorasoup benchmark file"):
        read_benchmark(tmp_path / "other.json", 0, {})
    (tmp_path / "cut.json.gz").write_bytes(gzip.compress(b'{"format": "lorasoup-benchmark"')[:-8])
    with pytest.raises(DataError, match="cannot be read"):
        read_benchmark(tmp_path / "cut.json.gz", 0, {})


def test_the_run_reads_the_file_and_never_imports_reasoning_gym(
    tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_benchmarks(tmp_path / "b.json.gz", {3: tricky(3)}, built_with(SETTINGS, tokenizer))
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # importing it now raises ImportError
    settings = RealDemoSettings(template="plain", benchmark_file=str(path))
    assert same(real_benchmark(3, settings, tokenizer), tricky(3))
    with pytest.raises(DataError, match="reasoning-gym"):  # without the file the run would need it
        real_benchmark(3, RealDemoSettings(template="plain"), tokenizer)


def test_a_wrong_file_fails_before_the_model_is_converted(
    tmp_path: Path, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_benchmarks(tmp_path / "b.json", {0: tricky(0)}, built_with(SETTINGS, tokenizer))

    def convert(*args: object) -> None:
        raise AssertionError("the model was converted before the benchmark file was checked")

    monkeypatch.setattr("lorasoup.demo.real_study.prepare_base", convert)
    settings = RealDemoSettings(template="chat", benchmark_file=str(path))
    with pytest.raises(DataError, match="template='plain'"):
        seed_runner(tmp_path, settings)


def test_cli_saves_the_benchmark_that_a_run_then_reads(
    tmp_path: Path, llama_dir: Path, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[int] = []

    def build(seed: int, sizes: object, fits: object = None, code_skill: str = "procedural") -> Benchmark:
        built.append(seed)
        return tricky(seed)

    monkeypatch.setattr("lorasoup.demo.real_study.build_real_benchmark", build)
    path = tmp_path / "b.json.gz"
    common = ["demo", "--model", "smollm2", "--set", f"model={llama_dir}", "--set", "template=plain"]
    args = [*common, "--set", "sizes.skill=2", "--seed", "4", "--seeds", "2", "--save-benchmark", str(path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert built == [4, 5] and "benchmark_file=" in result.output and not (tmp_path / "runs").exists()
    overrides = ["template=plain", "sizes.skill=2", f"benchmark_file={path}"]
    settings = load_config(RealDemoSettings, None, overrides)
    assert same(real_benchmark(5, settings, tokenizer), tricky(5))
    assert json.loads(gzip.decompress(path.read_bytes()))["built_with"]["sizes.skill"] == 2

    refused = {
        "--model tiny": ["demo", "--save-benchmark", str(path)],
        "benchmark_file": [*common, "--set", f"benchmark_file={path}", "--save-benchmark", str(path)],
        "--overwrite": [*common, "--no-overwrite", "--save-benchmark", str(path)],
    }
    for why, args in refused.items():
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, (why, result.output)
    assert built == [4, 5]


def test_the_fingerprint_follows_the_vocabulary_template_and_eos() -> None:
    assert tokenizer_fingerprint(build_tokenizer()) == tokenizer_fingerprint(build_tokenizer())
    assert tokenizer_fingerprint(grown()) != tokenizer_fingerprint(build_tokenizer())
    templated = build_tokenizer()
    templated.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(templated) != tokenizer_fingerprint(build_tokenizer())
    other_eos = build_tokenizer()
    other_eos.eos_token = "<s>"  # transformers 5.17 on SmolLM2's GGUF (models.align_special_tokens)
    assert tokenizer_fingerprint(other_eos) != tokenizer_fingerprint(build_tokenizer())


def test_the_model_tokenizer_takes_its_special_tokens_from_the_config(tmp_path: Path) -> None:
    from lorasoup.models import align_special_tokens, load_tokenizer, parse_model_spec
    from tests.conftest import build_llama

    broken = build_tokenizer()
    broken.eos_token, broken.pad_token = "<s>", "<s>"  # BOS as EOS, as transformers 5.17 reads a GGUF
    broken.save_pretrained(tmp_path)
    config = build_llama(len(broken)).config  # pad 0, bos 1, eos 2: <pad>, <s>, </s>
    config.save_pretrained(tmp_path)
    fixed = align_special_tokens(load_tokenizer(parse_model_spec(str(tmp_path))), config)
    assert (fixed.bos_token, fixed.eos_token, fixed.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer_fingerprint(fixed) == tokenizer_fingerprint(build_tokenizer())
