"""`lorasoup compress` loads its config through the strict loader: --set, flags on top, one-line errors;
`lorasoup merge --list` shows every reference whole."""

from typer.testing import CliRunner

from lorasoup.adapters import load_adapter
from lorasoup.cli import app
from lorasoup.cli.commands.merge import weighted_adapter

runner = CliRunner()


def test_compress_takes_set_and_its_flags_beat_it(make_lora, tmp_path):
    source = make_lora("wide", r=8, alpha=16, seed=5)
    out = tmp_path / "small"
    result = runner.invoke(app, ["compress", str(source), "--output", str(out), "--set", "rank=3"])
    assert result.exit_code == 0, result.output
    assert load_adapter(out).peft_config["r"] == 3
    args = ["compress", str(source), "--output", str(out), "--set", "rank=3", "--rank", "2", "--overwrite"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_adapter(out).peft_config["r"] == 2


def test_compress_config_errors_are_one_line(make_lora, tmp_path):
    source = make_lora("wide", r=8, seed=5)
    out = tmp_path / "small"
    for extra, message in (
        (["--set", "rnk=3"], "did you mean 'rank'?"),
        (["--set", "rank=three"], "rank: expected an integer"),
        ([], "give --rank k or --energy e"),
    ):
        result = runner.invoke(app, ["compress", str(source), "--output", str(out), *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
        assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_weighted_adapter_reads_a_weight_after_the_last_colon():
    assert weighted_adapter("runs/math:0.7") == {"path": "runs/math", "weight": 0.7}
    assert weighted_adapter("org/adapter:main") == {"path": "org/adapter:main"}
    assert weighted_adapter("runs/math") == {"path": "runs/math"}


def test_merge_without_merged_weights_never_touches_the_base_model(make_lora, tmp_path, monkeypatch):
    """Issue 20 (7): offline, with a hub id that is nowhere on disk, `merge: false` works (target_modules
    from the adapters) and `--merge` fails first, in one line, before any work and with nothing written."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = make_lora("a", seed=1, targets=["q_proj", "v_proj"]), make_lora("b", seed=2, targets=["q_proj"])
    missing = "nobody-xyz/no-such-model-20"
    args = [
        "merge",
        "--method",
        "ties",
        "--density",
        "0.5",
        "-a",
        str(a),
        "-a",
        str(b),
        "--base-model",
        missing,
    ]
    result = runner.invoke(app, [*args, "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    config = load_adapter(tmp_path / "out").peft_config
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == missing

    def no_merge(*args, **kwargs):
        raise AssertionError("the merge ran before the base model was checked")

    monkeypatch.setattr("lorasoup.merging.run.merge_adapters", no_merge)
    result = runner.invoke(app, [*args, "--merge", "--output", str(tmp_path / "merged")])
    assert result.exit_code == 2 and missing in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "merged").exists()


def test_compress_with_merge_checks_the_base_first(make_lora, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = make_lora("wide", r=8, seed=5)
    monkeypatch.setattr("lorasoup.merging.run.load_adapter", lambda *a, **k: 1 / 0)
    args = ["compress", str(source), "--rank", "2", "--merge", "--base-model", "nobody-xyz/no-such-model-20"]
    result = runner.invoke(app, [*args, "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no-such-model-20" in result.output, result.output


def test_merge_list_shows_every_reference_whole_on_a_narrow_terminal():
    """At 80 columns a reference URL is folded over lines, never cut with an ellipsis."""
    import re

    from lorasoup.merging import MERGE_METHODS

    result = CliRunner().invoke(app, ["merge", "--list"], terminal_width=80)
    assert result.exit_code == 0 and "…" not in result.output
    cells = [line.split("│")[-2].strip() for line in result.output.splitlines() if line.count("│") >= 5]
    references = "".join(cells)  # the reference column, its folded lines joined
    for name in MERGE_METHODS:
        for url in re.findall(r"https?://\S+", MERGE_METHODS.get(name).reference):
            assert url.rstrip(";,") in references, (name, url)
